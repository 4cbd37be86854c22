"""The registration network: voxelmorph's ``VxmPairwise`` (a U-Net predicting a stationary velocity field,
integrated by scaling and squaring) on the pair after the SAM affine, at ``spacing_mm`` (2-4 mm).

Tensor conventions (see :mod:`regsam.register.torch_fields`): images are (B, C, D, H, W) with tensor axes
z, y, x of the network grid; voxelmorph's displacement is (B, 3, D, H, W) in **voxels**, channel ``k`` along
tensor axis ``2 + k``, and its warp samples the moving image at ``i + d[:, :, i]`` (the MONAI ``Warp`` DDF
convention). :func:`network_field_to_world` is the one place that turns it into the project's convention
(mm, world LPS axes through the grid's direction, fixed ``x`` -> moving ``x + u(x)``).

Inputs: HU clipped to [-1024, 1024] and scaled to [-1, 1] (:func:`regsam.embed.preprocess.normalize_hu`),
fixed as voxelmorph's *target*, moving (already through the affine ``T0``) as its *source*, each optionally
followed by ``feature_channels`` SAM fine-embedding channels projected on one fixed PCA basis (chosen at
training start, stored with the weights, so a channel means the same thing in every pair).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from regsam.embed.preprocess import HU_WINDOW, normalize_hu
from regsam.embed.weights import DEFAULT_WEIGHTS, embedder_fingerprint, read_weights
from regsam.errors import InputError
from regsam.io.atomic import atomic_path
from regsam.io.geometry import antialias, bin_shrink, empty_like_grid
from regsam.io.images import AIR_HU
from regsam.io.transforms import TransformLike
from regsam.register.torch_fields import ddf_to_field, image_to_tensor

if TYPE_CHECKING:
    import voxelmorph as vxm

#: the shipped network (trained by ``regsam train-deformable --config configs/deformable/sam_net_chest.yaml``)
DEFAULT_NET_WEIGHTS = Path(__file__).resolve().parents[2] / "weights" / "sam_net_chest.pt"
#: the shipped embedders a network may have been trained on, in the order they are tried (see :func:`network_embedder`):
#: the default, then the one the shipped network was trained on, kept when the default moves on
SHIPPED_EMBEDDERS = (DEFAULT_WEIGHTS, DEFAULT_WEIGHTS.with_name("sam_net_embedder.pt"))
NET_WEIGHTS_FORMAT = 1


@dataclass(frozen=True)
class NetConfig:
    """Architecture and input grid of the network (the ``model`` section of a deformable config)."""

    #: isotropic spacing (mm) the network runs at; 2-4 mm
    spacing_mm: float = 4.0
    #: U-Net widths per level (each level halves the grid; inputs are padded to a multiple of 2**len)
    nb_features: tuple[int, ...] = (16, 32, 32, 32)
    #: scaling-and-squaring steps (0: the velocity is used as the displacement, not diffeomorphic)
    integration_steps: int = 5
    #: SAM fine-embedding channels (on the weights' fixed PCA basis) given beside each image; 0: images only
    feature_channels: int = 0
    #: HU window mapped to [-1, 1]
    hu_window: tuple[float, float] = HU_WINDOW
    #: > 0: instead of the SAM channels themselves, the fixed side gets their correlation volume (cosine of the
    #: fixed and the moving features at ``(2 r + 1)^3`` offsets, ``correlation_dilation`` voxels apart; SAME++'s
    #: input) and the moving side the image alone; needs ``feature_channels``
    correlation_radius: int = 0
    correlation_dilation: int = 2

    def __post_init__(self) -> None:
        if not 1.0 <= float(self.spacing_mm) <= 8.0:
            raise InputError(f"model.spacing_mm must be in [1, 8] mm, got {self.spacing_mm}")
        if not self.nb_features or any(int(n) < 1 for n in self.nb_features):
            raise InputError(f"model.nb_features must be positive widths, got {list(self.nb_features)}")
        if self.integration_steps < 0 or self.feature_channels < 0:
            raise InputError("model.integration_steps and model.feature_channels must be >= 0")
        if self.correlation_radius < 0 or self.correlation_dilation < 1:
            raise InputError("model.correlation_radius must be >= 0 and model.correlation_dilation >= 1")
        if self.correlation_radius and not self.feature_channels:
            raise InputError("model.correlation_radius needs model.feature_channels > 0 (the features it correlates)")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> NetConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"config: unknown key 'model.{unknown[0]}' (known: {', '.join(sorted(known))})")
        fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**fixed)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def input_channels(self) -> tuple[int, int]:
        """(moving, fixed) input channels: the image plus the SAM channels, or on the fixed side their correlation."""
        if self.correlation_radius:
            return 1, 1 + (2 * int(self.correlation_radius) + 1) ** 3
        return 1 + int(self.feature_channels), 1 + int(self.feature_channels)

    @property
    def stride(self) -> int:
        """Every input extent must be a multiple of this (one max-pool per U-Net level)."""
        return 2 ** len(self.nb_features)


def build_network(cfg: NetConfig | dict) -> vxm.nn.models.VxmPairwise:
    """A 3D ``VxmPairwise``: source = moving, target = fixed, with :attr:`NetConfig.input_channels` channels."""
    cfg = cfg if isinstance(cfg, NetConfig) else NetConfig.from_dict(cfg)
    source, target = cfg.input_channels
    import voxelmorph as vxm  # it imports neurite and matplotlib (0.5-1 s): only a network stage pays for it

    return vxm.nn.models.VxmPairwise(
        ndim=3, source_channels=source, target_channels=target, nb_features=[int(n) for n in cfg.nb_features],
        integration_steps=int(cfg.integration_steps),
    )


def correlation_volume(fixed: torch.Tensor, moving: torch.Tensor, radius: int, dilation: int) -> torch.Tensor:
    """Cosine of ``fixed`` (B, C, D, H, W) with ``moving`` shifted by every offset of ``{-r..r}^3 * dilation`` voxels
    (moving read at ``i + o``, replicated beyond its border): (B, (2r + 1)^3, D, H, W), offsets z-major, x fastest."""
    f = F.normalize(fixed.float(), dim=1, eps=1e-6)
    m = F.normalize(moving.float(), dim=1, eps=1e-6)
    reach = radius * dilation
    padded = F.pad(m, [reach] * 6, mode="replicate")
    d, h, w = f.shape[2:]
    steps = range(0, 2 * reach + 1, dilation)
    return torch.stack([(f * padded[:, :, z : z + d, y : y + h, x : x + w]).sum(dim=1)
                        for z in steps for y in steps for x in steps], dim=1)


def network_inputs(
    fixed_image: torch.Tensor, moving_image: torch.Tensor, fixed_features: torch.Tensor | None,
    moving_features: torch.Tensor | None, cfg: NetConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fixed_t, moving_t) for :func:`predict_residual`: images (B, 1, D, H, W), followed by the SAM channels
    (B, feature_channels, D, H, W) or, on the fixed side only, their :func:`correlation_volume`."""
    if not cfg.feature_channels:
        return fixed_image, moving_image
    assert fixed_features is not None and moving_features is not None
    if cfg.correlation_radius:
        corr = correlation_volume(fixed_features, moving_features, cfg.correlation_radius, cfg.correlation_dilation)
        return torch.cat([fixed_image, corr.to(fixed_image.dtype)], dim=1), moving_image
    return (torch.cat([fixed_image, fixed_features.to(fixed_image.dtype)], dim=1),
            torch.cat([moving_image, moving_features.to(moving_image.dtype)], dim=1))


def predict_residual(net: torch.nn.Module, fixed_t: torch.Tensor, moving_t: torch.Tensor) -> torch.Tensor:
    """The network's displacement (B, 3, D, H, W) in voxels of the input grid, channels along tensor axes z, y, x.

    ``fixed_t``/``moving_t``: (B, C, D, H, W) from :func:`network_inputs`, on the same grid, D, H, W multiples of
    the network stride; ``moving_t`` is the moving image already resampled through ``T0`` onto that grid. The
    result ``d`` maps fixed voxel ``i`` to ``i + d[:, :, i]`` of that resampled moving image (the residual ``r``
    of the SAM contract ``x -> T0(x + r(x))``, in voxels; :func:`network_field_to_world` gives mm).
    """
    same_grid = fixed_t.dim() == moving_t.dim() == 5 and (
        fixed_t.shape[:1] + fixed_t.shape[2:] == moving_t.shape[:1] + moving_t.shape[2:])
    if not same_grid:
        raise InputError(f"network inputs must be two (B, C, D, H, W) tensors on one grid, got "
                         f"{tuple(fixed_t.shape)} and {tuple(moving_t.shape)}")
    return net(moving_t, fixed_t, return_field_type="displacement")


def network_field_to_world(displacement: torch.Tensor, grid: sitk.Image) -> sitk.Image:
    """voxelmorph displacement (1, 3, D, H, W; voxels; channels z, y, x) -> world field (mm, LPS) on ``grid``.

    The only conversion between the network's units/axes and the project's convention: each channel is scaled
    by its axis' spacing and rotated through ``grid``'s direction matrix
    (:func:`regsam.register.torch_fields.ddf_to_field`, which the MONAI ``Warp`` convention shares).
    """
    if displacement.dim() != 5 or displacement.shape[:2] != (1, 3):
        raise InputError(f"displacement must be (1, 3, D, H, W), got {tuple(displacement.shape)}")
    return ddf_to_field(displacement.detach().float(), grid)


# ------------------------------------------------------------------ grids and inputs
def network_grid(
    fixed: sitk.Image, spacing_mm: float, multiple: int, min_size_xyz: Sequence[int] = (1, 1, 1)
) -> sitk.Image:
    """The grid the network runs on: ``fixed``'s origin and direction, isotropic ``spacing_mm``, covering the
    fixed image, each extent padded (at the high end) to a multiple of ``multiple`` voxels and to at least
    ``min_size_xyz``. Empty uint8 image."""
    extent = (np.array(fixed.GetSize()) - 1) * np.array(fixed.GetSpacing())
    size = np.floor(extent / float(spacing_mm)).astype(np.int64) + 1
    size = np.maximum((np.ceil(size / multiple) * multiple).astype(np.int64), np.asarray(min_size_xyz, dtype=np.int64))
    return empty_like_grid(size, fixed.GetOrigin(), (float(spacing_mm),) * 3, fixed.GetDirection())


def image_on_grid(image: sitk.Image, grid: sitk.Image, transform: TransformLike | None,
                  hu_window: tuple[float, float] = HU_WINDOW) -> torch.Tensor:
    """``image`` (HU) sampled at ``transform(x)`` for every voxel ``x`` of ``grid`` (linear after Gaussian
    antialiasing to the grid's spacing; air outside), clipped and scaled to [-1, 1]: (1, 1, D, H, W) float32.

    The antialiasing makes a 0.7 mm scan (inference) and a 2 mm training scan look alike at the network spacing.
    """
    if transform is None:
        t: sitk.Transform = sitk.Transform()
    elif isinstance(transform, sitk.Image):
        t = sitk.DisplacementFieldTransform(sitk.Image(transform))
    else:
        t = transform
    smooth = antialias(bin_shrink(sitk.Cast(image, sitk.sitkFloat32), grid.GetSpacing()), np.array(grid.GetSpacing()))
    on = sitk.Resample(smooth, grid, t, sitk.sitkLinear, AIR_HU, sitk.sitkFloat32)
    return normalize_hu(image_to_tensor(on), hu_window)


# ------------------------------------------------------------------ weights files
@dataclass
class LoadedNetwork:
    """A network in eval mode with its configuration (and the training config it came from)."""

    net: torch.nn.Module
    config: NetConfig
    training: dict = field(default_factory=dict)
    #: ``(basis (k, C), mean (C, 1))`` projecting SAM fine embeddings onto the input channels (None: k = 0)
    feature_basis: tuple[torch.Tensor, torch.Tensor] | None = None


def save_network(net: torch.nn.Module, cfg: NetConfig, path: str | os.PathLike, training: dict | None = None,
                 feature_basis: tuple[torch.Tensor, torch.Tensor] | None = None) -> Path:
    """Write ``{format, net_config, state_dict, training, feature_basis}`` atomically (float32, ~1 MB).

    ``feature_basis`` is required when ``cfg.feature_channels > 0`` (see :class:`LoadedNetwork`).
    """
    if cfg.feature_channels and feature_basis is None:
        raise InputError("a network with feature_channels > 0 needs its feature_basis")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": NET_WEIGHTS_FORMAT, "kind": "regsam-deformable-net", "net_config": cfg.to_dict(),
               "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}, "training": training or {},
               "feature_basis": None if feature_basis is None else [t.detach().cpu() for t in feature_basis]}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def network_weights_file(path: str | os.PathLike | None = None) -> Path:
    """The network weights file ``path`` (default: the shipped one), or InputError (one line) when it is missing."""
    weights = Path(path) if path is not None else DEFAULT_NET_WEIGHTS
    if not weights.is_file():
        if path is None:
            raise InputError(f"sam-net: no shipped network weights at {weights}; train them with 'regsam "
                             "train-deformable --config configs/deformable/sam_net_chest.yaml --out runs/sam_net' "
                             "and pass net_weights (--net-weights)")
        raise InputError(f"sam-net: network weights not found: {weights}")
    return weights


def _read_network_file(path: str | os.PathLike | None) -> tuple[Path, dict]:
    """The weights file (default: the shipped one) and its ``torch.save`` payload, checked to be network weights."""
    weights = network_weights_file(path)
    try:
        payload = torch.load(weights, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is bad input
        raise InputError(f"{weights}: not a readable torch file ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or "state_dict" not in payload or "net_config" not in payload:
        raise InputError(f"{weights}: not regsam network weights (no state_dict/net_config)")
    return weights, payload


def load_network(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> LoadedNetwork:
    """Load network weights (default: the shipped ``regsam/weights/sam_net_chest.pt``) in eval mode.

    Raises:
        InputError: the file is missing, unreadable or not regsam network weights (one line).
    """
    weights, payload = _read_network_file(path)
    cfg = NetConfig.from_dict(payload["net_config"])
    net = build_network(cfg)
    try:
        net.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[0][:120]
        raise InputError(f"{weights}: weights do not fit the stored architecture ({first})") from None
    basis = payload.get("feature_basis")
    if cfg.feature_channels and (basis is None or tuple(basis[0].shape)[0] != cfg.feature_channels):
        raise InputError(f"{weights}: a network with SAM feature inputs but no matching feature_basis")
    return LoadedNetwork(net.to(torch.device(device)).eval(), cfg, dict(payload.get("training", {})),
                         None if basis is None else (basis[0], basis[1]))


def network_embedder(net_weights: str | os.PathLike | None, weights: str | os.PathLike | None) -> Path | None:
    """The embedder weights a network's SAM inputs must come from: ``weights`` when given, else a shipped one.

    A network with SAM inputs (``feature_channels > 0``) records the fingerprint of the embedder it was trained on
    (``training.embedder_fingerprint``, :func:`regsam.embed.weights.embedder_fingerprint`); its PCA basis and its
    correlation inputs only mean something for that embedder. Without ``weights`` the first of
    :data:`SHIPPED_EMBEDDERS` with that fingerprint is used; a network without SAM inputs or without a record keeps
    ``weights`` (``None``: the default embedder).

    Raises:
        InputError: ``weights`` is another embedder, or no shipped embedder is the network's (one line).
    """
    path, payload = _read_network_file(net_weights)  # the record alone: the network is built by its stage
    wanted = (payload.get("training") or {}).get("embedder_fingerprint")
    if not NetConfig.from_dict(payload["net_config"]).feature_channels or not wanted:
        return None if weights is None else Path(weights)
    name = path.name
    if weights is not None:
        got = embedder_fingerprint(read_weights(weights).state_dict)
        if got != wanted:
            raise InputError(f"sam-net: network {name} was trained on embedder {wanted}, but {weights} is {got}; "
                             "pass the embedder it was trained on (--weights) or retrain the network")
        return Path(weights)
    for path in SHIPPED_EMBEDDERS:
        if path.is_file() and embedder_fingerprint(read_weights(path).state_dict) == wanted:
            return path
    raise InputError(f"sam-net: network {name} was trained on embedder {wanted}, which is not shipped; "
                     "pass its weights (--weights)")


__all__ = [
    "DEFAULT_NET_WEIGHTS", "SHIPPED_EMBEDDERS", "network_embedder", "LoadedNetwork", "NetConfig", "build_network",
    "correlation_volume", "image_on_grid", "load_network", "network_field_to_world", "network_grid", "network_inputs",
    "network_weights_file", "predict_residual", "save_network",
]
