"""Large-motion capture: a coarse-to-fine discrete displacement search with convex coupling.

Breathing moves the lung base 20-40 mm. A smooth fit of sparse embedding matches or a few gradient
steps recover about half of that; a search over a cube of candidate displacements at every control
point does not depend on a good start. The design follows the idea of ConvexAdam (Siebert et al.,
IEEE TMI 2024) and SAMConvex (Li et al., MICCAI 2023), written here with torch/MONAI operations:

1. The moving image is resampled once through the initial mapping ``T0`` (the SAM affine) onto each
   level's feature grid over the fixed lungs' box. Features per voxel: MIND-SSC of both images
   (:func:`regsam.register.deformable.mind_ssc`), optionally followed by SAM embedding features
   (PCA-reduced, unit length, weighted by ``weight_sam``).
2. Features are box-averaged over a control cell (``control_stride`` feature voxels). For every control
   point and every candidate displacement ``d`` (a cube of ``(2 R + 1)^3`` steps of one feature voxel)
   the cost is the mean squared feature difference between the fixed cell and the moving cell at ``d``.
3. Coupled convex optimisation: alternately smooth the current field (``v``) and let every control point
   take ``argmin_d cost(d) + theta |d - v|^2`` with ``theta`` growing; the smoothing is done separately
   inside and outside the fixed lungs (normalised convolution), so the lungs can slide along the chest
   wall. The last smoothed field is the level's answer (continuous, not quantised to the candidates).
4. The next level searches a smaller cube on a finer grid around it (the moving features are warped by
   the field found so far).

The result is a residual ``r`` in the convention of :mod:`regsam.register.deformable`: the mapping is
``x -> T0(x + r(x))``; :func:`capture_motion` returns it as a world displacement image on the last
level's grid, ready for ``refine_deformable(..., initial_residual=...)``.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from regsam.errors import InputError
from regsam.io.geometry import antialias, bin_shrink, seen_box
from regsam.io.transforms import TransformLike, as_transform
from regsam.register import torch_fields as tf
from regsam.register.deformable import HU_RANGE, mind_ssc

#: Cost (in units of the mean cost) added at the edge of the search cube, growing with |d|^2: breaks ties
#: towards zero motion where features are flat, far too small to move a real minimum.
TIE_BREAK = 0.01
#: Refine the last coupling round's choices below the candidate step (parabola per axis): 0.74 -> 0.58 mm mean TRE
#: on a held-out thorax pair with 38 mm motion (capture stage alone).
SUBVOXEL = True


@dataclass(frozen=True)
class CaptureSettings:
    """Search settings, one entry per level (coarsest first); distances in mm.

    ``feature_spacing_mm``: feature grid; ``control_stride``: feature voxels per control cell;
    ``radius``: candidate steps (feature voxels) each way per axis; ``smoothing_mm``: Gaussian sigma of
    the coupling's smoothing; ``coupling``: the growing ``theta`` (per squared feature voxel, costs
    normalised to mean 1); ``box_margin_mm``: margin around the lungs' box; ``weight_sam``: SAM feature
    weight against MIND (0 leaves them out); ``sam_levels``: how many coarse levels use them.
    """

    feature_spacing_mm: tuple[float, ...] = (4.0, 2.0)
    control_stride: tuple[int, ...] = (2, 2)
    radius: tuple[int, ...] = (6, 2)
    smoothing_mm: tuple[float, ...] = (10.0, 6.0)
    coupling: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5)
    box_margin_mm: float = 20.0
    weight_sam: float = 0.5
    sam_levels: int = 1
    mind_radius: int = 1
    mind_dilation: int = 1

    def __post_init__(self) -> None:
        n = len(self.feature_spacing_mm)
        if not (len(self.control_stride) == len(self.radius) == len(self.smoothing_mm) == n) or n == 0:
            raise InputError(
                "capture settings: feature_spacing_mm, control_stride, radius and smoothing_mm need one entry per level"
            )
        if min(self.feature_spacing_mm) <= 0 or min(self.control_stride) < 1 or min(self.radius) < 1:
            raise InputError("capture settings: spacings must be positive, strides and radii >= 1")
        if self.weight_sam < 0 or not self.coupling:
            raise InputError("capture settings: weight_sam must be >= 0 and coupling non-empty")


def normalised_ct(image: sitk.Image) -> sitk.Image:
    lo, hi = HU_RANGE
    return (sitk.Clamp(sitk.Cast(image, sitk.sitkFloat32), sitk.sitkFloat32, lo, hi) - lo) / (hi - lo)


def box_grid(fixed: sitk.Image, lungs: sitk.Image | None, spacing: float, margin_mm: float) -> sitk.Image:
    """An axis-aligned grid of ``spacing`` mm over the lungs' bounding box plus ``margin_mm`` (clipped to the image)."""
    size = np.array(fixed.GetSize())
    lo, hi = np.zeros(3), size - 1.0
    if lungs is not None:
        stats = sitk.LabelShapeStatisticsImageFilter()
        stats.Execute(sitk.Cast(lungs != 0, sitk.sitkUInt8))
        if stats.HasLabel(1):
            x, y, z, sx, sy, sz = stats.GetBoundingBox(1)  # in the mask's own grid
            corners = [lungs.TransformIndexToPhysicalPoint([int(a), int(b), int(c)])
                       for a in (x, x + sx - 1) for b in (y, y + sy - 1) for c in (z, z + sz - 1)]
            index = np.array([fixed.TransformPhysicalPointToContinuousIndex(p) for p in corners])
            margin = margin_mm / np.array(fixed.GetSpacing())
            lo = np.maximum(index.min(axis=0) - margin, 0.0)
            hi = np.minimum(index.max(axis=0) + margin, size - 1.0)
    extent = (hi - lo) * np.array(fixed.GetSpacing())
    n = np.maximum(np.round(extent / spacing).astype(int) + 1, 4)
    origin = fixed.TransformContinuousIndexToPhysicalPoint(lo.tolist())
    return tf.empty_like_grid(n, origin, extent / (n - 1), fixed.GetDirection())


def _seen_region(image: sitk.Image, grid: sitk.Image, transform: sitk.Transform, margin_mm: float) -> sitk.Image:
    """The part of ``image`` that ``grid`` sees through a linear ``transform`` (grid corners mapped, plus a margin).

    Smoothing a full-resolution CT costs seconds; the lungs' box through an affine is a fraction of it.
    """
    if not transform.IsLinear():
        return image
    lo, hi = seen_box(image, grid, transform, margin_mm / np.array(image.GetSpacing()))
    return sitk.RegionOfInterest(image, (hi - lo + 1).tolist(), lo.tolist())


def ct_on_grid(image: sitk.Image, grid: sitk.Image, transform: sitk.Transform, dev: torch.device) -> torch.Tensor:
    """The CT (HU; normalised by :func:`normalised_ct`) seen through ``transform`` (grid -> image) on ``grid``, as
    a (1, 1, D, H, W) tensor.

    Only the region the grid sees is read; where ``grid`` is coarser than the image it is block-averaged and
    Gaussian-smoothed first (anti-aliasing).
    """
    spacing = np.array(grid.GetSpacing())
    region = _seen_region(image, grid, transform, 3.0 * float(spacing.max()))
    # block averages up to half the grid spacing leave the Gaussian most of the work (whole blocks up to the full
    # spacing: 0.43 -> 0.48 mm on a 2 mm pair), yet make a 0.7 mm scan 8x smaller before it
    smooth = antialias(bin_shrink(normalised_ct(region), spacing / 2.0), spacing)
    on = sitk.Resample(smooth, grid, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return tf.image_to_tensor(on, dev)


def mind_on_grid(image: sitk.Image, grid: sitk.Image, transform: sitk.Transform, radius: int, dilation: int,
                 dev: torch.device) -> torch.Tensor:
    """MIND-SSC (1, 12, D, H, W) of :func:`ct_on_grid`."""
    return mind_ssc(ct_on_grid(image, grid, transform, dev), radius, dilation)


def _level_features(
    fixed, moving, grid, t0, sam, use_sam: bool, cfg: CaptureSettings, dev
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, C, D, H, W) fixed and moving (through ``t0``) features on ``grid``: MIND-SSC [+ weighted SAM]."""
    feats = [mind_on_grid(image, grid, transform, cfg.mind_radius, cfg.mind_dilation, dev)
             for image, transform in ((fixed, sitk.Transform()), (moving, t0))]
    if use_sam and sam is not None:
        (ff, f_geo), (mf, m_geo) = sam
        scale = float(np.sqrt(cfg.weight_sam))
        feats[0] = torch.cat([feats[0], scale * tf.sample_world(ff, f_geo, grid).to(dev)[None]], dim=1)
        feats[1] = torch.cat([feats[1], scale * tf.sample_world(mf, m_geo, grid, transform=t0).to(dev)[None]], dim=1)
    return feats[0], feats[1]


def _cost_volume(
    fixed_f: torch.Tensor, moving_f: torch.Tensor, stride: int, radius: int
) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Mean squared difference of cell-averaged features for every candidate and control point.

    Returns (cost (K, N) normalised to mean 1, candidates (K, 3) in feature voxels z, y, x, control shape).
    The moving cells are split into ``stride^3`` phase grids, so that every candidate is a contiguous
    shift of one of them (strided windows and an (N, K) layout were 20x slower on CPU).
    """
    # both sides pad their far ends the same way (replicate), so an unmoved cell costs exactly 0 at d = 0
    pad = [p for n in reversed(fixed_f.shape[2:]) for p in (0, (-n) % stride)]
    pooled_f = F.avg_pool3d(F.pad(fixed_f, pad, mode="replicate"), stride, stride=stride)
    cells = F.avg_pool3d(F.pad(moving_f, [0, stride - 1] * 3, mode="replicate"), stride, stride=1)
    shape = tuple(pooled_f.shape[2:])
    padded = F.pad(cells, [radius] * 6, mode="replicate")
    phases = {(a, b, c): padded[:, :, a::stride, b::stride, c::stride].contiguous()
              for a in range(stride) for b in range(stride) for c in range(stride)}
    steps = torch.arange(-radius, radius + 1)
    candidates = torch.cartesian_prod(steps, steps, steps)  # z, y, x; x fastest
    width = 2 * radius + 1
    cost = torch.empty((width, width, width, 1) + shape, dtype=torch.float32, device=fixed_f.device)
    # the x shifts c, c + stride, ... of one phase are one strided view: a batch of candidates per operation (3-10x
    # faster on a busy CPU than one at a time, same sums); one buffer serves all batches (no page faults)
    batch = len(range(0, width, stride))
    diff = torch.empty((batch,) + tuple(pooled_f.shape[1:]), dtype=pooled_f.dtype, device=fixed_f.device)
    for oz, oy, c in itertools.product(range(width), range(width), range(stride)):
        phase = phases[(oz % stride, oy % stride, c)][0]
        count = len(range(c, width, stride))
        rows = phase[:, oz // stride : oz // stride + shape[0], oy // stride : oy // stride + shape[1]]
        windows = rows.unfold(3, shape[2], 1)[:, :, :, :count].permute(3, 0, 1, 2, 4)  # (count, C, D, H, W)
        torch.sub(windows, pooled_f, out=diff[:count]).square_()
        cost[oz, oy, c::stride] = torch.mean(diff[:count], dim=1, keepdim=True)
    cost = cost.reshape(len(candidates), -1)
    cost /= cost.mean().clamp_min(1e-12)
    # where the features are flat (air, identical images) every candidate costs the same: prefer no motion
    steps2 = (candidates.to(cost.dtype) ** 2).sum(dim=1, keepdim=True).to(cost.device)
    cost += TIE_BREAK * steps2 / max(radius, 1) ** 2
    return cost, candidates.to(fixed_f.dtype).to(fixed_f.device), shape


def _to_control(field: torch.Tensor, shape: tuple) -> torch.Tensor:
    """A feature-grid field (1, 3, D, H, W) averaged onto the control cells ``shape``."""
    return F.adaptive_avg_pool3d(field, shape)


def _region_smooth(field: torch.Tensor, inside: torch.Tensor | None, sigma_vox: float) -> torch.Tensor:
    """Gaussian smoothing of (1, 3, D, H, W), separately inside and outside ``inside`` (1, 1, D, H, W) when given."""
    if inside is None:
        return tf.gaussian_blur(field, [sigma_vox] * 3)
    out = torch.zeros_like(field)
    for region in (inside, 1.0 - inside):
        num = tf.gaussian_blur(field * region, [sigma_vox] * 3)
        den = tf.gaussian_blur(region, [sigma_vox] * 3).clamp_min(1e-3)
        out = out + region * num / den
    return out


def _subvoxel(total: torch.Tensor, best: torch.Tensor, width: int, raw: torch.Tensor) -> torch.Tensor:
    """Parabola through the cost at the argmin and its two neighbours along each axis: (n, 3) offsets in [-0.5, 0.5].

    ``total`` is (K, n) over a cube of ``width^3`` candidates ordered z, y, x (x fastest); at the cube's faces
    the offset is 0, and so it is where the data cost ``raw`` (K, n) is 0 at the argmin (an exact match).
    """
    column = torch.arange(total.shape[1], device=total.device)
    c0 = total[best, column]
    exact = raw[best, column] <= 1e-6
    index = torch.stack([best // (width * width), (best // width) % width, best % width], dim=1)
    offsets = torch.zeros((total.shape[1], 3), dtype=total.dtype, device=total.device)
    for axis, stride in enumerate((width * width, width, 1)):
        inner = (index[:, axis] > 0) & (index[:, axis] < width - 1)
        lo = total[(best - stride).clamp(0, total.shape[0] - 1), column]
        hi = total[(best + stride).clamp(0, total.shape[0] - 1), column]
        curvature = lo - 2.0 * c0 + hi
        # an exact match (cost 0: an unmoved image) is not refined; its neighbours' asymmetry is not a shift
        usable = inner & (curvature > 1e-9) & ~exact
        step = torch.where(usable, 0.5 * (lo - hi) / curvature.clamp_min(1e-9), torch.zeros_like(c0))
        offsets[:, axis] = step.clamp(-0.5, 0.5)
    return offsets


def _couple(cost: torch.Tensor, candidates: torch.Tensor, shape: tuple, start: torch.Tensor, inside, sigma_vox: float,
            coupling: tuple[float, ...]) -> torch.Tensor:
    """Coupled convex optimisation on the control grid; returns the smooth field (1, 3, *shape), control voxels.

    The last round refines each choice below the candidate step (:func:`_subvoxel`).
    """
    d2 = (candidates**2).sum(dim=1)
    width = round(len(candidates) ** (1 / 3))
    field = start
    chunk = 16384  # rows of the (N, K) sums at a time: bounded memory
    # one (K, chunk) buffer for every round and chunk: a fresh 100 MB-sized sum each time costs page faults
    buffer = torch.empty((cost.shape[0], min(chunk, cost.shape[1])), dtype=cost.dtype, device=cost.device)
    for round_, theta in enumerate(coupling):
        last = round_ == len(coupling) - 1
        smooth = _region_smooth(field, inside, sigma_vox)
        v = smooth.flatten(2)[0].T  # (N, 3)
        chosen = torch.empty_like(v)
        for a in range(0, len(v), chunk):
            part = cost[:, a : a + chunk]  # (K, n)
            if theta > 0:  # cost + theta |d - v|^2 without the |v|^2 that every candidate shares
                out = buffer if part.shape[1] == buffer.shape[1] else None
                part = torch.add(part, theta * d2[:, None], out=out)
                part.addmm_(candidates, v[a : a + chunk].T, alpha=-2.0 * theta)
            best = part.argmin(dim=0)
            refine = _subvoxel(part, best, width, cost[:, a : a + chunk]) if last and SUBVOXEL else 0.0
            chosen[a : a + chunk] = candidates[best] + refine
        field = chosen.T.reshape((1, 3) + shape)
    return _region_smooth(field, inside, sigma_vox)


def capture_motion(
    fixed: sitk.Image,
    moving: sitk.Image,
    initial: TransformLike | None = None,
    *,
    lungs: sitk.Image | None = None,
    sam_features: tuple | None = None,
    settings: CaptureSettings | None = None,
    device: torch.device | str = "cpu",
) -> tuple[sitk.Image, dict]:
    """Find the large residual motion of ``x -> T0(x + r(x))`` by discrete search (see the module docstring).

    Args:
        fixed, moving: 3D CT volumes (HU).
        initial: ``T0`` (fixed -> moving), e.g. the SAM affine; identity when ``None``.
        lungs: fixed-image lung mask (any grid): the search box and the sliding surface; whole image without.
        sam_features: ``((fixed_feat, fixed_geometry), (moving_feat, moving_geometry))``, features (C, D, H, W)
            float tensors of unit vectors on their geometry's grid (e.g. PCA-reduced fine SAM embeddings).
        settings: :class:`CaptureSettings` (default settings when ``None``).

    Returns:
        ``(residual, info)``: ``residual`` a ``sitkVectorFloat64`` world displacement (mm) on the last level's
        grid (lungs' box), ``info`` the settings, grids and timings.
    """
    cfg = settings or CaptureSettings()
    dev = torch.device(device)
    t0 = sitk.Transform() if initial is None else as_transform(initial)
    info: dict = {"settings": asdict(cfg), "levels": []}
    residual_mm = None  # (1, 3, D, H, W) local mm on the previous level grid
    grid = None
    t_unfold_rounds: list[int] = []
    for level, spacing in enumerate(cfg.feature_spacing_mm):
        t_level = time.perf_counter()
        grid = box_grid(fixed, lungs, spacing, cfg.box_margin_mm)
        vox = tf.spacing_zyx(grid, dev)
        use_sam = level < cfg.sam_levels
        fixed_f, moving_f = _level_features(fixed, moving, grid, t0, sam_features, use_sam, cfg, dev)
        t_features = time.perf_counter() - t_level
        start_vox = None
        if residual_mm is not None:
            residual_mm = tf.resize_local_mm(residual_mm, tf.grid_shape(grid))
            start_vox = residual_mm / vox
            moving_f = tf.make_warp(padding_mode="border")(moving_f, start_vox)
        stride, radius = cfg.control_stride[level], cfg.radius[level]
        t = time.perf_counter()
        cost, candidates, shape = _cost_volume(fixed_f, moving_f, stride, radius)
        t_cost = time.perf_counter() - t
        del moving_f
        inside = None
        if lungs is not None:
            control = tf.corner_aligned_grid(grid, size_xyz=shape[::-1])
            lung_f = sitk.Cast(lungs != 0, sitk.sitkFloat32)
            mask = sitk.Resample(lung_f, control, sitk.Transform(), sitk.sitkLinear, 0.0)
            inside = (tf.image_to_tensor(mask, dev) > 0.5).float()
        sigma_vox = cfg.smoothing_mm[level] / (spacing * stride)
        zero = torch.zeros((1, 3) + shape, device=dev)
        field = _couple(cost, candidates, shape, zero, inside, sigma_vox, cfg.coupling)
        del cost
        # the coupling's sliding seam and the discrete choices can fold in places: smooth only there (on the
        # control grid, 8x cheaper than on the feature grid; trilinear upsampling keeps det J positive)
        control_mm = (spacing * stride,) * 3
        total = field * (spacing * stride) + (0.0 if residual_mm is None else _to_control(residual_mm, shape))
        unfolded, rounds = tf.unfold_locally(total, control_mm)
        field = field + (unfolded - total) / (spacing * stride)
        t_unfold_rounds.append(rounds)
        # control cells -> feature voxels (cell centres sit half a cell in; trilinear upsampling keeps them close)
        step_mm = F.interpolate(field, size=tf.grid_shape(grid), mode="trilinear", align_corners=True) * vox
        residual_mm = step_mm if residual_mm is None else residual_mm + step_mm
        info["levels"].append({
            "grid_size": list(grid.GetSize()), "spacing_mm": [float(s) for s in grid.GetSpacing()],
            "control_shape_zyx": list(shape), "candidates": int(len(candidates)),
            "mean_step_mm": float(step_mm.norm(dim=1).mean()), "seconds": time.perf_counter() - t_level,
            "features_s": t_features, "cost_s": t_cost,
        })
    info["unfold_rounds"] = t_unfold_rounds
    return tf.local_mm_to_field(residual_mm, grid), info


__all__ = ["CaptureSettings", "box_grid", "capture_motion", "ct_on_grid", "mind_on_grid", "normalised_ct"]
