"""The SAM embedding network: a small 3D residual encoder with an FPN-style decoder and two heads.

Outputs for an input ``x`` of shape (B, 1, D, H, W) (D, H, W multiples of :attr:`SAMEmbedder.stride`):

* ``fine``   (B, Cf, D/2, H/2, W/2)  local embedding, L2-normalised along C;
* ``coarse`` (B, Cc, D/8, H/8, W/8)  global embedding with a large receptive field, L2-normalised.

Level geometry (used identically in training and inference): every strided convolution has
kernel 3 and padding 1, so output voxel ``i`` of a level with factor ``f`` is centred on input voxel
``f * i``. A level therefore has the input grid's origin and direction and ``f`` times its spacing
(see :func:`level_geometry`).

Building blocks are MONAI's :class:`~monai.networks.blocks.Convolution` and
:class:`~monai.networks.blocks.ResidualUnit`. Normalisation is batch norm, so that in eval mode an
embedding does not depend on the field of view or on how a scan is split into windows.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn

from regsam.devices import resolve_device
from regsam.embed.preprocess import DEFAULT_SPACING_MM, HU_WINDOW
from regsam.errors import InputError
from regsam.io.atomic import atomic_path

#: Where :func:`load_embedder` looks when no path is given.
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "sam_chest.pt"

#: file-format version of :func:`save_weights`
WEIGHTS_FORMAT = 1

_ACT = ("leakyrelu", {"negative_slope": 0.1, "inplace": True})


class SAMEmbedder(nn.Module):
    """3D CNN producing fine (1/2) and coarse (1/8) L2-normalised embeddings.

    Args:
        channels: encoder channels at 1/2, 1/4, 1/8, 1/16 of the input resolution.
        fine_dim: Cf, channels of the fine embedding (SAM: 128).
        coarse_dim: Cc, channels of the coarse embedding (SAM: 128).
        coarse_head_channels: decoder width at 1/16 and 1/8 (coarse path).
        fine_head_channels: decoder width at 1/4 and 1/2 (fine path).
        context_dilation: dilation of the extra residual unit at 1/16 that widens the receptive field.
        min_input_size: smallest accepted input side in voxels (before padding to the stride).
    """

    #: inputs must be padded to a multiple of this along every axis
    stride: int = 16
    #: output level -> down-sampling factor relative to the input
    level_factors: dict[str, int] = {"fine": 2, "coarse": 8}

    def __init__(
        self,
        channels: Sequence[int] = (16, 32, 64, 128),
        fine_dim: int = 128,
        coarse_dim: int = 128,
        coarse_head_channels: int = 64,
        fine_head_channels: int = 32,
        context_dilation: int = 2,
        min_input_size: int = 32,
    ) -> None:
        super().__init__()
        if len(channels) != 4:
            raise InputError(f"SAMEmbedder: channels needs 4 values (1/2, 1/4, 1/8, 1/16), got {list(channels)}")
        c0, c1, c2, c3 = (int(c) for c in channels)
        hc, hf = int(coarse_head_channels), int(fine_head_channels)
        self.config: dict[str, Any] = {
            "channels": [c0, c1, c2, c3],
            "fine_dim": int(fine_dim),
            "coarse_dim": int(coarse_dim),
            "coarse_head_channels": hc,
            "fine_head_channels": hf,
            "context_dilation": int(context_dilation),
            "min_input_size": int(min_input_size),
        }
        self.min_input_size = int(min_input_size)
        self.fine_dim, self.coarse_dim = int(fine_dim), int(coarse_dim)
        #: input spacing (mm) and HU window the model was trained with (set by :func:`load_embedder`)
        self.spacing_mm: float = DEFAULT_SPACING_MM
        self.hu_window: tuple[float, float] = HU_WINDOW

        def conv(cin: int, cout: int, k: int = 3, s: int = 1, plain: bool = False) -> Convolution:
            return Convolution(3, cin, cout, strides=s, kernel_size=k, act=_ACT, norm="batch", conv_only=plain)

        def res(cin: int, cout: int, s: int = 1, dilation: int = 1) -> ResidualUnit:
            return ResidualUnit(3, cin, cout, strides=s, kernel_size=3, subunits=2, act=_ACT, norm="batch", dilation=dilation)

        # encoder
        self.enc1 = nn.Sequential(conv(1, c0, s=2), conv(c0, c0))  # 1/2
        self.enc2 = res(c0, c1, s=2)  # 1/4
        self.enc3 = res(c1, c2, s=2)  # 1/8
        self.enc4 = res(c2, c3, s=2)  # 1/16
        self.context = res(c3, c3, dilation=context_dilation)  # 1/16, receptive field ~ 440 input voxels
        # coarse (global) path: 1/16 -> 1/8
        self.lat4 = conv(c3, hc, k=1, plain=True)
        self.lat3 = conv(c2, hc, k=1, plain=True)
        self.coarse_block = conv(hc, hc)
        self.coarse_out = conv(hc, coarse_dim, k=1, plain=True)
        # fine (local) path: 1/8 -> 1/4 -> 1/2
        self.top3 = conv(hc, hf, k=1, plain=True)
        self.lat2 = conv(c1, hf, k=1, plain=True)
        self.fine_block = conv(hf, hf)
        self.lat1 = conv(c0, hf, k=1, plain=True)
        self.fine_mix = conv(hf, 2 * hf, k=1)
        self.fine_out = conv(2 * hf, fine_dim, k=1, plain=True)

    @staticmethod
    def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=like.shape[2:], mode="trilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Embed a batch.

        Args:
            x: (B, 1, D, H, W) normalised intensities (see :func:`regsam.embed.preprocess.preprocess`),
                D, H, W multiples of :attr:`stride`.

        Returns:
            ``{"fine": (B, Cf, D/2, H/2, W/2), "coarse": (B, Cc, D/8, H/8, W/8)}``, unit vectors along C.
        """
        if x.ndim != 5 or x.shape[1] != 1:
            raise InputError(f"SAMEmbedder expects a (B, 1, D, H, W) tensor, got shape {tuple(x.shape)}")
        if any(int(s) % self.stride for s in x.shape[2:]):
            raise InputError(f"SAMEmbedder: spatial size {tuple(x.shape[2:])} is not a multiple of {self.stride}")
        x1 = self.enc1(x)
        x2 = self.enc2(x1)
        x3 = self.enc3(x2)
        x4 = self.context(self.enc4(x3))
        p3 = self.lat3(x3) + self._up(self.lat4(x4), x3)
        coarse = self.coarse_out(self.coarse_block(p3))
        p2 = self.fine_block(self.lat2(x2) + self._up(self.top3(p3), x2))
        p1 = self.lat1(x1) + self._up(p2, x1)
        fine = self.fine_out(self.fine_mix(p1))
        return {"fine": F.normalize(fine, dim=1), "coarse": F.normalize(coarse, dim=1)}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_weights(self, path: str | os.PathLike, config: dict | None = None) -> Path:
        """Write this model's weights and architecture (+ the training ``config``) atomically; see :func:`save_weights`."""
        return save_weights(self, path, config)

    def _fine_tail_linear(self) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
        """The 1x1x1 layers after ``p1`` as (weight (Cin, Cout), bias, activation) with eval batch norm folded in."""
        layers = []
        for block in (self.fine_mix, self.fine_out):
            conv = block.conv
            w = conv.weight.reshape(conv.out_channels, conv.in_channels).t()
            b = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels, device=w.device)
            act = False
            adn = getattr(block, "adn", None)
            if adn is not None and hasattr(adn, "N"):
                bn = adn.N
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                w = w * scale[None, :]
                b = (b - bn.running_mean) * scale + bn.bias
            if adn is not None and hasattr(adn, "A"):
                act = True
            layers.append((w.contiguous(), b.contiguous(), act))
        return layers

    @torch.inference_mode()
    def embed_volume(self, x: torch.Tensor, fine_dtype: torch.dtype = torch.float16, slab: int = 8) -> dict[str, torch.Tensor]:
        """Eval-mode forward for one large volume with bounded memory; same values as :meth:`forward`.

        The encoder runs in channels-last layout; the fine head (all 1x1x1 after the last up-sampling) runs
        slab by slab along D and writes straight into a ``fine_dtype`` output.

        Args:
            x: (1, 1, D, H, W), D, H, W multiples of :attr:`stride`.
            fine_dtype: dtype of the returned fine embedding (float16 halves its memory).
            slab: fine-level slices per slab.

        Returns:
            ``{"fine": (1, Cf, D/2, H/2, W/2) fine_dtype, "coarse": (1, Cc, D/8, H/8, W/8) float32}``; both tensors
            are channels-last in memory (``.permute(0, 2, 3, 4, 1)`` is contiguous).
        """
        if self.training:
            raise RuntimeError("embed_volume needs eval mode (call model.eval())")
        if x.ndim != 5 or x.shape[0] != 1 or x.shape[1] != 1:
            raise InputError(f"embed_volume expects a (1, 1, D, H, W) tensor, got shape {tuple(x.shape)}")
        if any(int(s) % self.stride for s in x.shape[2:]):
            raise InputError(f"embed_volume: spatial size {tuple(x.shape[2:])} is not a multiple of {self.stride}")
        cl = torch.channels_last_3d
        x = x.contiguous(memory_format=cl)
        x1 = self.enc1(x)
        x2 = self.enc2(x1)
        x3 = self.enc3(x2)
        x4 = self.context(self.enc4(x3))
        p3 = self.lat3(x3) + self._up(self.lat4(x4), x3)
        del x3, x4
        coarse = F.normalize(self.coarse_out(self.coarse_block(p3)), dim=1).contiguous(memory_format=cl)
        p2 = self.fine_block(self.lat2(x2) + self._up(self.top3(p3), x2))
        del x2, p3
        d2, h2, w2 = (int(s) for s in x1.shape[2:])
        fine_cl = torch.empty((1, d2, h2, w2, self.fine_dim), dtype=fine_dtype, device=x.device)
        lat_w = self.lat1.conv.weight.reshape(self.lat1.conv.out_channels, -1).t()
        lat_b = self.lat1.conv.bias
        tail = self._fine_tail_linear()
        slope = _ACT[1]["negative_slope"]
        step = max(2, int(slab) // 2 * 2)
        for z0 in range(0, d2, step):
            z1 = min(z0 + step, d2)
            # trilinear x2 up-sampling of p2 for fine slices [z0, z1) from p2 slices [a, b) with a one-slice halo
            a, b = max(z0 // 2 - 1, 0), min((z1 + 1) // 2 + 1, p2.shape[2])
            up = F.interpolate(p2[:, :, a:b], size=(2 * (b - a), h2, w2), mode="trilinear", align_corners=False)
            up = up[:, :, z0 - 2 * a : z1 - 2 * a].permute(0, 2, 3, 4, 1).reshape(-1, up.shape[1])
            rows = x1[:, :, z0:z1].permute(0, 2, 3, 4, 1).reshape(-1, x1.shape[1])
            h = torch.addmm(lat_b, rows, lat_w).add_(up)
            for w, bias, act in tail:
                h = torch.addmm(bias, h, w)
                if act:
                    h = F.leaky_relu(h, slope, inplace=True)
            h = F.normalize(h, dim=1)
            fine_cl[0, z0:z1] = h.reshape(z1 - z0, h2, w2, -1).to(fine_dtype)
        return {"fine": fine_cl.permute(0, 4, 1, 2, 3), "coarse": coarse}


def level_geometry(origin: Sequence[float], spacing: Sequence[float], direction: Sequence[float], factor: int) -> tuple:
    """Origin, spacing, direction (mm, LPS) of an output level ``factor`` times coarser than the input grid.

    Output voxel ``i`` is centred on input voxel ``factor * i`` (kernel-3, padding-1 strided convolutions),
    so the origin and direction are unchanged and the spacing is multiplied by ``factor``.
    """
    return tuple(float(o) for o in origin), tuple(float(s) * factor for s in spacing), tuple(float(d) for d in direction)


def save_weights(model: nn.Module, path: str | os.PathLike, config: dict | None = None, extra: dict | None = None) -> Path:
    """Write ``model``'s weights, its architecture and the training ``config`` to ``path`` atomically.

    The file is a ``torch.save`` dict: ``format``, ``model_config`` (kwargs of :class:`SAMEmbedder`),
    ``state_dict`` (float32) and ``config`` (the training configuration, for the record).
    """
    net = model.module if hasattr(model, "module") else model
    if not isinstance(net, SAMEmbedder):
        raise TypeError(f"save_weights expects a SAMEmbedder, got {type(net).__name__}")
    payload = {
        "format": WEIGHTS_FORMAT,
        "model_config": dict(net.config),
        "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
        "config": config or {},
        **(extra or {}),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_embedder(path: str | os.PathLike | None = None, device: str | torch.device | None = None) -> SAMEmbedder:
    """Load a :class:`SAMEmbedder` in eval mode.

    Args:
        path: a file written by :func:`save_weights` (or a training checkpoint); ``None`` means the shipped
            default ``regsam/weights/sam_chest.pt``.
        device: where to put the model (default: ``"cuda"`` when available, else ``"cpu"``).

    Raises:
        InputError: the file is missing, unreadable or not regsam embedder weights.
    """
    weights = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not weights.is_file():
        if path is None:
            raise InputError(
                f"no default embedder weights at {weights}; train them with "
                "'python -m regsam.embed.train --config regsam/configs/embedder/sam_chest.yaml --out runs/sam_chest' "
                "or pass a weights file"
            )
        raise InputError(f"embedder weights not found: {weights}")
    try:
        payload = torch.load(weights, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is bad input
        raise InputError(f"{weights}: not a readable torch file ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not isinstance(payload, dict) or "state_dict" not in payload or "model_config" not in payload:
        raise InputError(f"{weights}: not regsam embedder weights (no state_dict/model_config)")
    model = SAMEmbedder(**payload["model_config"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise InputError(f"{weights}: weights do not fit the stored architecture ({str(exc).splitlines()[0][:160]})") from None
    crops = (payload.get("config") or {}).get("crops") or {}
    model.spacing_mm = float(crops.get("base_spacing_mm", DEFAULT_SPACING_MM))
    model.hu_window = tuple(float(v) for v in crops.get("hu_window", HU_WINDOW))  # type: ignore[assignment]
    model.eval()
    return model.to(resolve_device(device))


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return int(sum(p.numel() for p in model.parameters()))

