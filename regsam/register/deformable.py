"""Per-pair deformable refinement by gradient descent (Adam), multi-resolution, on CPU or GPU.

Starting from an initial mapping ``T0`` (fixed -> moving: an affine, the coarse field of
:mod:`regsam.fit.smooth`, any transform or field, or identity), a residual displacement
``r`` on a working grid over the fixed image is optimised so that the final mapping

    x  ->  T0(x + r(x))            (displacement u(x) = r(x) + u0(x + r(x)))

aligns the images. The moving image (and moving features) are resampled once through ``T0``
onto each level's grid (SimpleITK, world coordinates), so the optimisation only warps
same-grid tensors with :class:`monai.networks.blocks.Warp`.

Loss (per level, optionally weighted by a fixed mask):

* ``weight_image`` x image dissimilarity: ``lncc`` (:class:`monai.losses.LocalNormalizedCrossCorrelationLoss`,
  in [-1, 0]) or ``mind`` (mean squared difference of MIND-SSC descriptors, :func:`mind_ssc`);
  CT intensities are clipped to [-1000, 400] HU and scaled to [0, 1];
* ``weight_embed`` x (1 - cosine similarity) between fixed and warped moving feature maps
  (e.g. SAM embeddings; skipped when no features are given, and on levels past ``embed_levels``);
* ``weight_smooth`` x :class:`monai.losses.BendingEnergyLoss` or ``DiffusionLoss`` (``normalize=True``:
  roughly independent of the grid resolution) of the displacement (of the velocity when diffeomorphic).

``diffeomorphic=True`` parametrises ``r`` as the exponential of a stationary velocity field
(:class:`monai.networks.blocks.DVF2DDF`, scaling and squaring). The result is upsampled
(linearly) from the working grid to the fixed grid. Folding is checked on the returned field
(det J of x -> x + u(x) on the fixed grid); if any voxel folds, the residual is smoothed with a
growing Gaussian until none does, and if the initial mapping itself folds, the whole field is
smoothed as well (reported in ``info["folding_fix"]``).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from regsam.devices import resolve_device
from regsam.errors import InputError
from regsam.io.geometry import antialias, grid_of
from regsam.io.images import check_volume
from regsam.io.transforms import TransformLike, as_transform, check_displacement_field, jacobian_determinant
from regsam.register import torch_fields as tf

#: HU window mapped to [0, 1] for the image similarity.
HU_RANGE = (-1000.0, 400.0)

#: With a fixed mask, each level's similarity is computed on the mask's bounding box grown by this margin (mm):
#: more than the LNCC window plus the residual motion a level adds, so clamping at the box edge never reaches
#: a masked voxel's window; on a full-field chest CT the lungs' box is a fraction of the scan.
MASK_MARGIN_MM = 24.0

#: Compute budgets. ``iterations`` lists the Adam steps per level, coarsest first; level ``l`` of ``levels``
#: has spacing ``s * 2 ** (levels - 1 - l)`` with ``s = max(spacing_mm, finest spacing of the fixed image)``. ``lr`` is in voxels of the level per step.
#: ``finest_control_ratio`` r > 1 keeps the finest level's displacement on an r times coarser control grid
#: (trilinearly upsampled), so the regulariser and the optimiser state cost 1/r^3 there while the similarity
#: still sees every voxel. ``embed_levels`` (None: all) is how many of the coarsest levels use the embedding term.
_FAST: dict[str, Any] = {
    "spacing_mm": 4.0,
    "levels": 2,
    "iterations": (80, 50),
    "lr": 0.1,
    "similarity": "lncc",
    "lncc_kernel": 5,
    "weight_image": 1.0,
    "weight_embed": 1.0,
    "weight_smooth": 0.01,
    "regulariser": "bending",
    "param_smoothing": 1,
    "diffeomorphic": False,
    "integration_steps": 7,
    "mind_radius": 1,
    "mind_dilation": 2,
    "feature_spacing_mm": 8.0,
    "finest_control_ratio": 1,
    "embed_levels": None,
    "tolerance": None,
}
PRESETS: dict[str, dict[str, Any]] = {
    "fast": _FAST,
    "accurate": {**_FAST, "spacing_mm": 2.0, "levels": 3, "iterations": (120, 100, 60), "lncc_kernel": 7, "feature_spacing_mm": 4.0},
}
DEFAULT_PRESET = "fast"


@dataclass
class DeformableResult:
    """Outcome of :func:`refine_deformable`.

    Attributes:
        field: ``sitkVectorFloat64`` displacement on the fixed grid (mm, world LPS, fixed x -> moving x + u(x)).
        folding_share: share of fixed-grid voxels with det J <= 0 (0 unless the fold repair failed).
        info: settings used, loss per level (first/last), timings (s), folding repair report.
    """

    field: sitk.Image
    folding_share: float
    info: dict = field(default_factory=dict)


# ------------------------------------------------------------------ MIND-SSC
def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC descriptors (Heinrich et al., MICCAI 2013) of a (B, 1, D, H, W) image -> (B, 12, D, H, W).

    Patch distances (box of side ``2 * radius + 1``) between the 12 pairs of the 6-neighbourhood at
    squared distance 2 (neighbours ``dilation`` voxels away), normalised by their mean and mapped through exp(-x).
    """
    six = torch.tensor([[0, 1, 1], [1, 1, 0], [1, 0, 1], [1, 1, 2], [2, 1, 1], [1, 2, 1]])
    pairs = [(i, j) for i in range(6) for j in range(i + 1, 6) if int(((six[i] - six[j]) ** 2).sum()) == 2]
    padded = F.pad(image, [dilation] * 6, mode="replicate")
    d, h, w = image.shape[2:]

    def shifted(offset: torch.Tensor) -> torch.Tensor:  # the image moved by (offset - 1) * dilation voxels
        z, y, x = (int(o) * dilation for o in offset)
        return padded[:, :, z : z + d, y : y + h, x : x + w]

    # shifted slices, not one-hot dilated convolutions: CPU torch runs dilated conv3d on its slow path
    diff = torch.cat([shifted(six[i]) - shifted(six[j]) for i, j in pairs], dim=1)
    ssd = box_mean(F.pad(diff * diff, [radius] * 6, mode="replicate"), 2 * radius + 1)
    mind = ssd - ssd.min(dim=1, keepdim=True).values
    var = mind.mean(dim=1, keepdim=True)
    mean_var = var.mean()
    var = torch.clamp(var, min=float(mean_var) * 1e-3 + 1e-12, max=float(mean_var) * 1e3 + 1e-12)
    return torch.exp(-mind / var)


def box_mean(volume: torch.Tensor, side: int) -> torch.Tensor:
    """Mean over boxes of ``side`` voxels of a (B, C, D, H, W) tensor, valid part only (each axis shrinks by side - 1).

    Separable shifted sums: on CPU 2-4x faster than ``avg_pool3d`` for 3-voxel boxes on millions of voxels; autograd-safe.
    """
    for dim in (2, 3, 4):
        n = volume.shape[dim] - side + 1
        total = volume.narrow(dim, 0, n).clone()
        for k in range(1, side):
            total += volume.narrow(dim, k, n)
        volume = total
    return volume / float(side) ** 3


def local_contrast(image: torch.Tensor, window: int = 3, clip: float = 3.0) -> torch.Tensor:
    """The locally normalised intensity of a (B, 1, D, H, W) image: ``(I - mean) / std`` over a box of side
    ``window`` voxels, clipped to +-``clip`` and divided by it (range [-1, 1]). Like LNCC's terms it ignores a local
    gain and offset (the lungs' density change between breathing phases), but it keeps the intensity's sign and
    position that MIND-SSC's patch distances blur."""
    pad = [window // 2] * 6
    mean = box_mean(F.pad(image, pad, mode="replicate"), window)
    var = box_mean(F.pad(image * image, pad, mode="replicate"), window) - mean * mean
    return ((image - mean) / torch.sqrt(var.clamp_min(0.0) + 1e-4)).clamp(-clip, clip) / clip


# ------------------------------------------------------------------ helpers
def _config(preset: str | None, overrides: dict) -> dict:
    name = preset or DEFAULT_PRESET
    if name not in PRESETS:
        raise InputError(f"unknown deformable preset '{name}' (known: {', '.join(sorted(PRESETS))})")
    cfg = dict(PRESETS[name])
    unknown = sorted(set(overrides) - set(cfg))
    if unknown:
        raise InputError(f"unknown deformable option(s) {', '.join(unknown)} (known: {', '.join(sorted(cfg))})")
    cfg.update(overrides)
    cfg["iterations"] = tuple(int(i) for i in np.atleast_1d(cfg["iterations"]))
    if len(cfg["iterations"]) != int(cfg["levels"]):
        if len(cfg["iterations"]) == 1:
            cfg["iterations"] = cfg["iterations"] * int(cfg["levels"])
        else:
            raise InputError(f"iterations {cfg['iterations']} must list one count per level ({cfg['levels']} levels)")
    if cfg["similarity"] not in ("lncc", "mind"):
        raise InputError(f"similarity must be 'lncc' or 'mind', got {cfg['similarity']!r}")
    if cfg["regulariser"] not in ("bending", "diffusion"):
        raise InputError(f"regulariser must be 'bending' or 'diffusion', got {cfg['regulariser']!r}")
    if float(cfg["spacing_mm"]) <= 0 or int(cfg["levels"]) < 1:
        raise InputError("spacing_mm must be positive and levels >= 1")
    if int(cfg["finest_control_ratio"]) < 1:
        raise InputError(f"finest_control_ratio must be an integer >= 1, got {cfg['finest_control_ratio']!r}")
    cfg["embed_levels"] = int(cfg["levels"]) if cfg["embed_levels"] is None else int(cfg["embed_levels"])
    if cfg["embed_levels"] < 0:
        raise InputError(f"embed_levels must be >= 0 (or None for all levels), got {cfg['embed_levels']!r}")
    cfg["preset"] = name
    return cfg


def _normalise_ct(image: sitk.Image) -> sitk.Image:
    lo, hi = HU_RANGE
    clipped = sitk.Clamp(sitk.Cast(image, sitk.sitkFloat32), sitk.sitkFloat32, lo, hi)
    return (clipped - lo) / (hi - lo)


def _resample(image: sitk.Image, grid: sitk.Image, transform: sitk.Transform, default: float) -> sitk.Image:
    return sitk.Resample(image, grid, transform, sitk.sitkLinear, float(default), sitk.sitkFloat32)


def _smooth_param(theta: torch.Tensor, passes: int) -> torch.Tensor:
    """``passes`` rounds of a 3x3x3 box filter (edge-replicated, :func:`box_mean`)."""
    out = theta
    for _ in range(int(passes)):
        out = box_mean(F.pad(out, [1] * 6, mode="replicate"), 3)
    return out


class _Adam:
    """Adam on one tensor through torch's functional ``torch.optim.adam.adam``.

    ``torch.optim.Adam``'s constructor imports ``torch._dynamo`` (~3 s on the first call in a process, more
    than a whole registration level); the functional form runs the same update without it.
    """

    def __init__(self, param: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        from torch.optim.adam import adam

        self._adam = adam
        self.param, self.lr, self.betas, self.eps = param, float(lr), betas, float(eps)
        self.exp_avg = torch.zeros_like(param)
        self.exp_avg_sq = torch.zeros_like(param)
        self.step_count = torch.zeros((), dtype=torch.float32)

    def zero_grad(self) -> None:
        self.param.grad = None

    def step(self) -> None:
        with torch.no_grad():
            self._adam(
                [self.param], [self.param.grad], [self.exp_avg], [self.exp_avg_sq], [], [self.step_count],
                foreach=False, capturable=False, differentiable=False, fused=None, grad_scale=None, found_inf=None,
                has_complex=False, amsgrad=False, beta1=self.betas[0], beta2=self.betas[1], lr=self.lr,
                weight_decay=0.0, eps=self.eps, maximize=False,
            )


def _as_feature_tensor(values, name: str) -> torch.Tensor:
    if isinstance(values, np.ndarray):
        values = torch.from_numpy(np.ascontiguousarray(values))
    if not isinstance(values, torch.Tensor):
        raise InputError(f"{name} must be a torch tensor or numpy array (C, D, H, W), got {type(values).__name__}")
    if values.dim() == 5 and values.shape[0] == 1:
        values = values[0]
    if values.dim() != 4:
        raise InputError(f"{name} must have shape (C, D, H, W), got {tuple(values.shape)}")
    values = values.detach().to("cpu", torch.float32)
    if not torch.isfinite(values).all():
        raise InputError(f"{name} contains NaN or infinite values")
    return values


def _feature_geometry(values: torch.Tensor, geometry: sitk.Image | None, image: sitk.Image, name: str) -> sitk.Image:
    if geometry is None:
        return tf.pooled_geometry(image, tuple(values.shape[1:]))
    if tuple(geometry.GetSize()[::-1]) != tuple(values.shape[1:]):
        raise InputError(
            f"{name}: geometry size {geometry.GetSize()} (x, y, z) does not match the feature shape {tuple(values.shape[1:])} (D, H, W)"
        )
    return geometry


def _unit(features: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return features / features.norm(dim=1, keepdim=True).clamp_min(eps)


def _weighted_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return values.mean()
    w = weight.expand_as(values)
    return (values * w).sum() / w.sum().clamp_min(1e-6)


def _initial_transform(initial: TransformLike | None) -> sitk.Transform:
    if initial is None:
        return sitk.Transform()
    if isinstance(initial, sitk.Image):
        return sitk.DisplacementFieldTransform(check_displacement_field(initial, "initial field"))
    return as_transform(initial)


def _mask_box(mask: torch.Tensor | None, margin_zyx: list[int]) -> tuple[slice, slice, slice]:
    """Slices (z, y, x) of the bounding box of ``mask`` (1, 1, D, H, W) grown by ``margin_zyx`` voxels (everything without a mask)."""
    if mask is None:
        return (slice(None),) * 3
    occupied = mask[0, 0] > 0
    box = []
    for axis, margin in enumerate(margin_zyx):
        others = tuple(a for a in range(3) if a != axis)
        hits = torch.nonzero(occupied.any(dim=others[1]).any(dim=others[0])).flatten()
        box.append(slice(max(int(hits[0]) - margin, 0), int(hits[-1]) + 1 + margin))
    return tuple(box)


def mask_on(mask: sitk.Image | None, grid: sitk.Image, device: torch.device) -> torch.Tensor | None:
    if mask is None:
        return None
    on = sitk.Resample(sitk.Cast(mask != 0, sitk.sitkFloat32), grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    t = tf.image_to_tensor(on, device)
    t = (t > 0.01).to(t.dtype)
    if float(t.sum()) < 8:
        return None
    return t


def _level_inputs(fixed, moving, grids, t0, cfg, fixed_mask, dev) -> list[dict]:
    """Fixed and moving (through ``t0``) intensities (or MIND) on every level grid, cropped to the mask's box."""
    fixed_n, moving_n = _normalise_ct(fixed), _normalise_ct(moving)
    level_data = []
    for grid in grids:
        spacing = np.array(grid.GetSpacing())
        f_img = tf.image_to_tensor(_resample(antialias(fixed_n, spacing), grid, sitk.Transform(), 0.0), dev)
        m_img = tf.image_to_tensor(_resample(antialias(moving_n, spacing), grid, t0, 0.0), dev)  # 0 = air after normalising
        if cfg["similarity"] == "mind":
            f_img = mind_ssc(f_img, int(cfg["mind_radius"]), int(cfg["mind_dilation"]))
            m_img = mind_ssc(m_img, int(cfg["mind_radius"]), int(cfg["mind_dilation"]))
        mask = mask_on(fixed_mask, grid, dev)
        box = _mask_box(mask, [int(np.ceil(MASK_MARGIN_MM / s)) for s in spacing[::-1]])
        crop = (slice(None), slice(None), *box)
        level_data.append({"grid": grid, "box": crop, "fixed": f_img[crop], "moving": m_img[crop],
                           "mask": None if mask is None else mask[crop]})
    return level_data


def _feature_inputs(fixed, moving, t0, has_initial, features, geometries, base, cfg, fixed_mask, dev) -> dict:
    """Fixed and moving (through ``t0``) feature maps on the embedding term's grid (unit vectors)."""
    ff = _as_feature_tensor(features[0], "fixed_features")
    mf = _as_feature_tensor(features[1], "moving_features")
    if ff.shape[0] != mf.shape[0]:
        raise InputError(f"fixed features have {ff.shape[0]} channels but moving features {mf.shape[0]}")
    f_geo = _feature_geometry(ff, geometries[0], fixed, "fixed_features")
    m_geo = _feature_geometry(mf, geometries[1], moving, "moving_features")
    # The embedding term guides the large-scale alignment; a coarser grid than the image term's
    # keeps warping C channels (and its backward pass) cheap.
    feat_spacing = max(float(np.min(f_geo.GetSpacing())), base, float(cfg["feature_spacing_mm"]))
    fgrid = tf.corner_aligned_grid(fixed, feat_spacing)
    f_on = tf.sample_world(ff, f_geo, fgrid).to(dev)
    m_on = tf.sample_world(mf, m_geo, fgrid, transform=t0 if has_initial else None).to(dev)
    return {"grid": fgrid, "fixed": _unit(f_on[None]), "moving": m_on[None], "mask": mask_on(fixed_mask, fgrid, dev)}


class FieldParametrisation:
    """theta (on its control grid, voxels of the level) -> the residual's voxel DDF on a level grid.

    Without sliding theta has 3 channels. With a sliding mask it has 6: one smooth field inside the
    (fixed) lungs and one outside, blended by the mask resampled onto the level grid (linear, so the
    switch takes one voxel), each regularised on its own: the lungs may slide along the chest wall.
    """

    def __init__(self, cfg: dict, sliding_mask: sitk.Image | None, dev: torch.device):
        self.passes = int(cfg["param_smoothing"])
        self.to_ddf = tf.make_dvf2ddf(int(cfg["integration_steps"])) if cfg["diffeomorphic"] else None
        self.mask = None if sliding_mask is None else sitk.Cast(sliding_mask != 0, sitk.sitkFloat32)
        self.dev = dev
        self._blend: dict[tuple, torch.Tensor] = {}
        self.channels = 3 if self.mask is None else 6

    def blend_on(self, grid: sitk.Image) -> torch.Tensor:
        shape = tf.grid_shape(grid)
        if shape not in self._blend:
            on = sitk.Resample(self.mask, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
            self._blend[shape] = tf.image_to_tensor(on, self.dev)
        return self._blend[shape]

    def smooth(self, theta: torch.Tensor) -> torch.Tensor:
        """The field(s) the regulariser sees (and that carry over to the next level): (1, channels, ...)."""
        return _smooth_param(theta, self.passes)

    def ddf(self, theta: torch.Tensor, grid: sitk.Image) -> torch.Tensor:
        shape = tf.grid_shape(grid)
        parts = []
        for part in self.smooth(theta).split(3, dim=1):
            parts.append(tf.resize_local_mm(self.to_ddf(part) if self.to_ddf is not None else part, shape))
        if len(parts) == 1:
            return parts[0]
        inside = self.blend_on(grid)
        return inside * parts[0] + (1.0 - inside) * parts[1]


def _start(prev_mm: torch.Tensor | None, initial_residual, grid, control_shape, param, dev) -> torch.Tensor:
    """theta's start on a level: the previous level's smooth field(s), the given residual, or zeros."""
    spacing = tf.spacing_zyx(grid, dev)
    if prev_mm is not None:
        return torch.cat([tf.resize_local_mm(p, control_shape) / spacing for p in prev_mm.split(3, dim=1)], dim=1)
    if initial_residual is None:
        return torch.zeros((1, param.channels) + control_shape, device=dev)
    control = tf.corner_aligned_grid(grid, size_xyz=control_shape[::-1])
    # nearest-neighbour extrapolation: a residual on a smaller box (the lungs') continues flat beyond it, no jump
    r = sitk.Resample(check_displacement_field(initial_residual, "initial residual"), control, sitk.Transform(),
                      sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64, True)
    start = tf.field_to_local_mm(r, dev) / spacing
    return start.repeat(1, param.channels // 3, 1, 1, 1)


def optimise_level(data, theta, param, cfg, losses_fn, steps: int) -> tuple[list[float], int]:
    """Adam on theta for at most ``steps``; stops early once the loss improves less than ``tolerance`` per 10 steps."""
    optimizer = _Adam(theta, lr=float(cfg["lr"]))
    tolerance = cfg["tolerance"]
    losses: list[float] = []
    for step in range(steps):
        optimizer.zero_grad()
        loss = losses_fn(param.ddf(theta, data["grid"]), param.smooth(theta))
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if tolerance is not None and step >= 19 and step % 10 == 9:
            if losses[-11] - losses[-1] < float(tolerance) * abs(losses[-11]):
                return losses, step + 1
    return losses, steps


def _level_loss(data, feat, use_embed: bool, cfg, regulariser, lncc, warp, warp_features, dev):
    """The loss of one level as a function of (voxel DDF on the level grid, regularised field(s))."""
    spacing = tf.spacing_zyx(data["grid"], dev)

    def loss_fn(ddf: torch.Tensor, reg_field: torch.Tensor) -> torch.Tensor:
        loss = torch.zeros((), device=dev)
        if float(cfg["weight_image"]) > 0:
            warped = warp(data["moving"], ddf[data["box"]])
            if cfg["similarity"] == "lncc":
                sim = _weighted_mean(lncc(warped, data["fixed"]), data["mask"])
            else:
                sim = _weighted_mean(((warped - data["fixed"]) ** 2).sum(dim=1, keepdim=True), data["mask"])
            loss = loss + float(cfg["weight_image"]) * sim
        if use_embed:
            fddf = tf.resize_local_mm(ddf * spacing, tf.grid_shape(feat["grid"])) / tf.spacing_zyx(feat["grid"], dev)
            moved = _unit(warp_features(feat["moving"], fddf))
            dissim = 1.0 - (moved * feat["fixed"]).sum(dim=1, keepdim=True)
            loss = loss + float(cfg["weight_embed"]) * _weighted_mean(dissim, feat["mask"])
        if float(cfg["weight_smooth"]) > 0:
            with warnings.catch_warnings():  # MONAI indexes with lists of slices; torch warns on every call
                warnings.simplefilter("ignore", UserWarning)
                for field_part in reg_field.split(3, dim=1):
                    loss = loss + float(cfg["weight_smooth"]) * regulariser(field_part)
        return loss

    return loss_fn


def _optimise_levels(fixed, level_data, feat, cfg, base, initial_residual, sliding_mask, dev):
    """Adam on every level, coarse to fine, each started from the previous level's smooth field(s).

    Returns (theta of the finest level, its :class:`FieldParametrisation`, the image warp, per-level history).
    """
    from monai.losses import BendingEnergyLoss, DiffusionLoss, LocalNormalizedCrossCorrelationLoss

    levels = len(level_data)
    warp = tf.make_warp(padding_mode="border")
    warp_features = tf.make_warp(padding_mode="border")  # Warp caches its grid per shape: one per grid
    lncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=int(cfg["lncc_kernel"]), reduction="none").to(dev)
    regulariser = (BendingEnergyLoss if cfg["regulariser"] == "bending" else DiffusionLoss)(normalize=True)
    param = FieldParametrisation(cfg, sliding_mask, dev)
    history = []
    theta, prev_mm = None, None
    for lvl, data in enumerate(level_data):
        t_level = time.perf_counter()
        grid = data["grid"]
        # theta is kept in voxels of the level grid but may live on a coarser control grid (finest level only)
        ratio = int(cfg["finest_control_ratio"]) if lvl == levels - 1 else 1
        control_shape = tf.grid_shape(grid) if ratio == 1 else tf.grid_shape(tf.corner_aligned_grid(fixed, base * ratio))
        theta = _start(prev_mm, initial_residual, grid, control_shape, param, dev).clone().requires_grad_(True)
        use_embed = feat is not None and lvl < cfg["embed_levels"]
        loss_fn = _level_loss(data, feat, use_embed, cfg, regulariser, lncc, warp, warp_features, dev)
        losses, steps = optimise_level(data, theta, param, cfg, loss_fn, cfg["iterations"][lvl])
        with torch.no_grad():  # carry the smooth field(s) (the velocity when diffeomorphic) to the next level, in mm
            prev_mm = param.smooth(theta).detach() * tf.spacing_zyx(grid, dev).repeat(1, param.channels // 3, 1, 1, 1)
        history.append({"spacing_mm": [float(s) for s in grid.GetSpacing()], "size": list(grid.GetSize()),
                        "iterations": steps, "max_iterations": cfg["iterations"][lvl],
                        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                        "control_size": list(theta.shape[2:][::-1]), "similarity_size": list(data["fixed"].shape[2:][::-1]),
                        "embedding_term": use_embed, "seconds": time.perf_counter() - t_level})
    return theta, param, warp, history


def _final_field(fixed, work, ddf_work, u0_local, warp, dev, max_fold_repairs: int) -> tuple[sitk.Image, float, dict]:
    """u = r + u0(x + r) on the fixed grid, smoothed locally where it folds; if it still folds (on the fixed grid),
    smooth r (then the whole field) until it does not."""
    fixed_geo = grid_of(fixed)

    unfold_rounds: list[int] = []

    def field_of(ddf_vox: torch.Tensor, total_sigma: float = 0.0, local: bool = True) -> sitk.Image:
        with torch.no_grad():
            r_local = ddf_vox * tf.spacing_zyx(work, dev)
            total = r_local if u0_local is None else r_local + warp(u0_local, ddf_vox)
            if total_sigma > 0:
                total = tf.gaussian_blur(total, [total_sigma] * 3)
            if local:  # first smooth only where it folds (keeps sliding and sharp valid motion elsewhere)
                total, rounds = tf.unfold_locally(total, tuple(float(v) for v in work.GetSpacing()[::-1]), min_det=0.1)
                unfold_rounds.append(rounds)
        on_work = tf.local_mm_to_field(total, work)
        if tf.grid_shape(work) == tf.grid_shape(fixed_geo):
            on_work.CopyInformation(fixed_geo)
            return on_work
        return sitk.Resample(on_work, fixed_geo, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64, True)

    def min_det(image: sitk.Image) -> tuple[float, float]:
        det = sitk.GetArrayFromImage(jacobian_determinant(image))
        return float(det.min()), float(np.mean(det <= 0))

    # Repair, mildest first: smooth the optimised residual r (sigma 0.5, 1, ... working voxels); if the
    # initial mapping itself folds, that cannot help, so then the whole field is smoothed as well.
    result = field_of(ddf_work, local=False)
    lowest, share = min_det(result)
    repair = {"folded_before": share, "min_det_before": lowest, "residual_sigma_voxels": 0.0, "field_sigma_voxels": 0.0}
    if lowest <= 0:
        result = field_of(ddf_work)
        lowest, share = min_det(result)
    repairs, smoothed = int(bool(unfold_rounds and unfold_rounds[0])), ddf_work
    while lowest <= 0 and repairs < max_fold_repairs:
        repairs += 1
        repair["residual_sigma_voxels"] = 0.5 * repairs
        smoothed = tf.gaussian_blur(ddf_work, [0.5 * repairs] * 3)
        result = field_of(smoothed)
        lowest, share = min_det(result)
    extra = 0
    while lowest <= 0 and extra < max_fold_repairs:
        extra += 1
        repair["field_sigma_voxels"] = 0.5 * extra
        result = field_of(smoothed, total_sigma=0.5 * extra)
        lowest, share = min_det(result)
    repair.update({"repairs": repairs + extra, "folded_after": share, "min_det_after": lowest,
                   "local_unfold_rounds": unfold_rounds})
    return result, share, repair


# ------------------------------------------------------------------ main entry
def refine_deformable(
    fixed: sitk.Image,
    moving: sitk.Image,
    initial: TransformLike | None = None,
    *,
    preset: str | None = None,
    fixed_mask: sitk.Image | None = None,
    fixed_features: torch.Tensor | np.ndarray | None = None,
    moving_features: torch.Tensor | np.ndarray | None = None,
    fixed_feature_geometry: sitk.Image | None = None,
    moving_feature_geometry: sitk.Image | None = None,
    initial_residual: sitk.Image | None = None,
    sliding_mask: sitk.Image | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    max_fold_repairs: int = 8,
    **overrides,
) -> DeformableResult:
    """Refine ``initial`` (fixed -> moving) by optimising a dense residual displacement.

    Args:
        fixed, moving: 3D CT volumes (HU), any grids; world coordinates relate them.
        initial: the starting fixed -> moving mapping ``T0``: a SimpleITK transform, a displacement field
            (e.g. :func:`regsam.fit.smooth.fit_smooth_field`), or ``None`` (identity).
        preset: ``fast`` (default: 4 mm, 2 levels) or ``accurate`` (2 mm, 3 levels); see :data:`PRESETS`.
        fixed_mask: optional mask (non-zero inside, any grid) weighting the similarity terms.
        fixed_features, moving_features: optional feature maps (C, D, H, W) (torch or numpy) of the
            fixed and moving images, both given or neither. With ``*_feature_geometry`` ``None`` a map
            is taken to tile its image's field of view in equal blocks (:func:`torch_fields.pooled_geometry`);
            otherwise the geometry image's grid (size x, y, z = W, H, D) places it in the world
            (e.g. ``Embedding.fine_geometry``).
        initial_residual: optional start of the residual ``r`` (world displacement image, mm, any grid), e.g.
            from :func:`regsam.register.capture.capture_motion`; zeros otherwise.
        sliding_mask: optional fixed-image mask (lungs) across which the residual may slide (see
            :class:`FieldParametrisation`).
        device: ``'cpu'`` or ``'cuda'``.
        seed: torch seed (the optimisation is deterministic on CPU).
        max_fold_repairs: Gaussian smoothing rounds tried when the result folds: first of the residual
            (sigma 0.5, 1, ... working voxels), then, should the initial mapping itself fold, of the whole field.
        overrides: any key of the preset (``iterations``, ``weight_smooth``, ``diffeomorphic``, ``tolerance`` ...).

    Returns:
        :class:`DeformableResult` whose ``field`` lies on the fixed grid.

    Raises:
        InputError: bad images, mask, features, preset or options.
    """
    t_start = time.perf_counter()
    check_volume(fixed, "fixed image")
    check_volume(moving, "moving image")
    cfg = _config(preset, overrides)
    dev = resolve_device(device)
    torch.manual_seed(int(seed))
    if (fixed_features is None) != (moving_features is None):
        raise InputError("give both fixed_features and moving_features, or neither")
    t0 = _initial_transform(initial)
    levels = int(cfg["levels"])
    # a level finer than the fixed image costs time and memory and adds no information
    base = max(float(cfg["spacing_mm"]), float(min(fixed.GetSpacing())))
    work = tf.corner_aligned_grid(fixed, base)
    grids = [tf.corner_aligned_grid(fixed, base * 2 ** (levels - 1 - lvl)) for lvl in range(levels)]
    timings: dict[str, float] = {}

    t = time.perf_counter()
    level_data = _level_inputs(fixed, moving, grids, t0, cfg, fixed_mask, dev)
    timings["prepare"] = time.perf_counter() - t
    feat = None
    if fixed_features is not None and float(cfg["weight_embed"]) > 0:
        t = time.perf_counter()
        feat = _feature_inputs(fixed, moving, t0, initial is not None, (fixed_features, moving_features),
                               (fixed_feature_geometry, moving_feature_geometry), base, cfg, fixed_mask, dev)
        timings["features"] = time.perf_counter() - t

    # ---------------------------------------------------------- optimisation, coarse to fine
    t = time.perf_counter()
    theta, param, warp, history = _optimise_levels(fixed, level_data, feat, cfg, base, initial_residual, sliding_mask, dev)
    timings["optimise"] = time.perf_counter() - t

    t = time.perf_counter()
    with torch.no_grad():
        ddf_work = param.ddf(theta, work).detach()  # finest level grid == work grid
    u0_local = tf.transform_to_local_mm(t0, work, dev) if initial is not None else None
    result, det_share, repair = _final_field(fixed, work, ddf_work, u0_local, warp, dev, max_fold_repairs)
    timings["finalise"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    info = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
        "working_grid": {"size": list(work.GetSize()), "spacing_mm": [float(s) for s in work.GetSpacing()]},
        "levels": history,
        "embedding_term": feat is not None,
        "feature_grid": None if feat is None else {"size": list(feat["grid"].GetSize()),
                                                   "spacing_mm": [float(s) for s in feat["grid"].GetSpacing()]},
        "sliding": sliding_mask is not None,
        "initial_residual": initial_residual is not None,
        "folding_fix": repair,
        "timings": timings,
        "device": str(dev),
    }
    return DeformableResult(field=result, folding_share=det_share, info=info)


__all__ = ["PRESETS", "DeformableResult", "local_contrast", "mind_ssc", "refine_deformable", "HU_RANGE"]
