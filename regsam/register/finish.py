"""Continuous finish of the capture residual: a few Adam steps on MIND-SSC over the lungs' box.

The capture stage (:mod:`regsam.register.capture`) chooses displacements from a discrete set (2 mm steps at its
finest level, refined by a parabola), so it leaves a few tenths of a millimetre everywhere, which is most of the
error on small motion. This stage adds a smooth correction ``c`` to the capture residual ``r``:

    x  ->  T0(x + r(x) + c(x))

found by Adam on the mean squared difference of MIND-SSC descriptors (computed once per image, on one grid over
the lungs' box from :func:`regsam.register.capture.ct_on_grid`; optionally with the CT's local contrast as one
more channel), weighted by the similarity mask (body within a margin of the lungs), plus a diffusion penalty on
``c``. With a sliding mask ``c`` is two fields, one inside the lungs and one outside, each regularised on its own
(:class:`regsam.register.deformable.FieldParametrisation`); the capture residual keeps its own sliding seam since
``c`` is added to it. Nothing in the loop touches the full-resolution image: the grid's spacing grows until it holds
at most ``max_voxels``, ``c`` lives on a control grid ``control_ratio`` times coarser, and the steps stop once the
loss stops improving.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from regsam.errors import InputError
from regsam.io.transforms import TransformLike, as_transform, check_displacement_field
from regsam.register import torch_fields as tf
from regsam.register.capture import box_grid, ct_on_grid
from regsam.register.deformable import FieldParametrisation, local_contrast, mask_on, mind_ssc, optimise_level


@dataclass(frozen=True)
class FinishSettings:
    """Settings of :func:`finish_motion` (distances in mm).

    ``spacing_mm``: finest grid of the similarity (coarser when the lungs' box would exceed ``max_voxels``);
    ``control_ratio``: the correction's control grid is this many times coarser; ``iterations``: most Adam
    steps, stopped earlier once the loss improves by less than ``tolerance`` (relative) over 10 steps;
    ``lr``: Adam step (voxels of the grid); ``weight_smooth``: diffusion penalty (MONAI, normalised);
    ``mind_radius``/``mind_dilation``: MIND-SSC patch radius and neighbour distance (grid voxels);
    ``box_margin_mm``: margin around the lungs' box (as the capture's); ``weight_intensity``: weight of one more
    channel, the CT's local contrast (:func:`~regsam.register.deformable.local_contrast`, box of
    ``intensity_window`` grid voxels; 0 leaves it out).
    """

    # 1.5 mm / 3 M voxels and the local-contrast channel (weight 4, 3 voxels): on pairs from CTs outside the held-out
    # set (sample CT and pyradiomics_lung1: three 2 mm sample-CT pairs, six full thoraxes), 0.30 -> 0.26 mm and
    # 0.55 -> 0.50 mm against 2 mm / 1.5 M voxels with MIND-SSC alone, at about twice the finish's time.
    # 200 k points instead of 50 k (session 9, same tuning pairs): 6-14 % lower TRE on every pair for ~1.4 x the
    # finish's time; 400 k gained 3 % more for 1.4 x again, fewer steps or PCA-reduced descriptors lost more
    spacing_mm: float = 1.5
    max_voxels: int = 3_000_000
    max_points: int = 200_000
    control_ratio: int = 2
    iterations: int = 40
    lr: float = 0.06
    weight_smooth: float = 4.0
    tolerance: float = 0.002
    mind_radius: int = 1
    mind_dilation: int = 2
    box_margin_mm: float = 20.0
    weight_intensity: float = 4.0
    intensity_window: int = 3

    def __post_init__(self) -> None:
        if not self.spacing_mm > 0 or self.max_voxels < 64 or self.box_margin_mm < 0:
            raise InputError("finish settings: spacing_mm must be > 0, max_voxels >= 64, box_margin_mm >= 0")
        if min(self.control_ratio, self.mind_radius, self.mind_dilation) < 1 or self.iterations < 0:
            raise InputError("finish settings: control_ratio, mind_radius, mind_dilation >= 1 and iterations >= 0")
        if not self.lr > 0 or self.weight_smooth < 0 or self.tolerance < 0 or self.weight_intensity < 0:
            raise InputError("finish settings: lr must be > 0, weight_smooth, tolerance and weight_intensity >= 0")
        if self.intensity_window < 3 or self.intensity_window % 2 == 0:
            raise InputError("finish settings: intensity_window must be odd and >= 3")


def _descriptors(image: sitk.Image, grid: sitk.Image, transform: sitk.Transform, cfg: FinishSettings,
                 dev: torch.device) -> torch.Tensor:
    """(1, 12 [+1], D, H, W): MIND-SSC of the CT on ``grid`` [and its weighted local contrast]."""
    ct = ct_on_grid(image, grid, transform, dev)
    mind = mind_ssc(ct, cfg.mind_radius, cfg.mind_dilation)
    if cfg.weight_intensity <= 0:
        return mind
    return torch.cat([mind, float(np.sqrt(cfg.weight_intensity)) * local_contrast(ct, cfg.intensity_window)], dim=1)


def _capped_grid(fixed: sitk.Image, lungs: sitk.Image | None, cfg: FinishSettings) -> sitk.Image:
    """The lungs' box at ``spacing_mm``, or coarser so that it holds at most ``max_voxels``."""
    grid = box_grid(fixed, lungs, cfg.spacing_mm, cfg.box_margin_mm)
    count = float(np.prod(grid.GetSize()))
    if count <= cfg.max_voxels:
        return grid
    return box_grid(fixed, lungs, cfg.spacing_mm * (count / cfg.max_voxels) ** (1 / 3), cfg.box_margin_mm)


class _PointSampler:
    """The similarity's sample points (voxels of ``grid`` inside the mask, at most ``max_points``, evenly strided) and
    the correction there: stands in for :class:`~regsam.register.deformable.FieldParametrisation` in its optimiser, so a
    step costs O(points) instead of O(grid)."""

    def __init__(self, grid: sitk.Image, mask: sitk.Image | None, param, max_points: int, dev: torch.device):
        shape = tf.grid_shape(grid)
        inside = mask_on(mask, grid, dev)
        everywhere = torch.ones(int(np.prod(shape)), dtype=torch.bool, device=dev)
        flat = torch.nonzero(everywhere if inside is None else inside.flatten() > 0)[:, 0]
        self.flat = flat[:: max(1, int(np.ceil(len(flat) / max_points)))]
        zyx = torch.stack(torch.unravel_index(self.flat, shape)).to(torch.float32)  # (3, N) voxel indices z, y, x
        self.index = zyx[None]
        self.shape, self.param = shape, param
        # grid_sample's normalised coordinates (x, y, z; corners at -1, 1) hold for every corner-aligned grid on the box
        top = (torch.tensor(shape, device=dev)[:, None] - 1).clamp_min(1)
        self.norm = (2.0 * zyx / top - 1.0).flip(0).T[None, :, None, None]
        self.blend = None if param.mask is None else self.take(param.blend_on(grid))

    def take(self, volume: torch.Tensor) -> torch.Tensor:
        """(1, C, D, H, W) on the grid -> (1, C, N) at the points."""
        return volume.flatten(2)[:, :, self.flat]

    def at_points(self, field: torch.Tensor) -> torch.Tensor:
        """A (1, C, ...) field on any corner-aligned grid over the box -> (1, C, N) at the points (trilinear)."""
        out = F.grid_sample(field, self.norm, mode="bilinear", padding_mode="border", align_corners=True)
        return out[:, :, :, 0, 0]

    def smooth(self, theta: torch.Tensor) -> torch.Tensor:
        return self.param.smooth(theta)

    def ddf(self, theta: torch.Tensor, grid: sitk.Image) -> torch.Tensor:
        """The correction (1, 3, N) at the points, voxels of ``grid``."""
        parts = self.at_points(self.smooth(theta)).split(3, dim=1)  # one sampling pass for both fields
        return parts[0] if self.blend is None else self.blend * parts[0] + (1.0 - self.blend) * parts[1]


def _point_warp(volume: torch.Tensor, grid: sitk.Image):
    """A function (1, 3, N) voxel positions z, y, x on ``grid`` -> (1, C, N) of ``volume`` there (trilinear, border)."""
    top = (torch.tensor(tf.grid_shape(grid), dtype=volume.dtype, device=volume.device) - 1).clamp_min(1)[None, :, None]

    def warp(zyx: torch.Tensor) -> torch.Tensor:
        norm = (2.0 * zyx / top - 1.0).flip(1).transpose(1, 2)[:, :, None, None]
        return F.grid_sample(volume, norm, mode="bilinear", padding_mode="border", align_corners=True)[:, :, :, 0, 0]

    return warp


def finish_motion(
    fixed: sitk.Image,
    moving: sitk.Image,
    initial: TransformLike | None,
    residual: sitk.Image | None,
    *,
    lungs: sitk.Image | None = None,
    similarity_mask: sitk.Image | None = None,
    sliding: bool = True,
    settings: FinishSettings | None = None,
    device: torch.device | str = "cpu",
) -> tuple[sitk.Image, dict]:
    """Refine the capture residual ``r`` of ``x -> T0(x + r(x))`` (see the module docstring).

    Args:
        fixed, moving: 3D CT volumes (HU).
        initial: ``T0`` (fixed -> moving), e.g. the SAM affine; identity when ``None``.
        residual: ``r``, a world displacement image (mm, any grid; continued flat beyond it), e.g. from
            :func:`regsam.register.capture.capture_motion`; zero when ``None``.
        lungs: fixed-image lung mask (any grid): the box and, with ``sliding``, the sliding surface.
        similarity_mask: where the similarity counts (any grid, non-zero inside); the whole box when ``None``.
        settings: :class:`FinishSettings` (defaults when ``None``).

    Returns:
        ``(residual, info)``: ``r + c`` as a ``sitkVectorFloat64`` world displacement (mm) on the finish grid
        (lungs' box), folds smoothed locally; ``info`` the settings, grid, steps, losses and timings.
    """
    cfg = settings or FinishSettings()
    dev = torch.device(device)
    t_start = time.perf_counter()
    t0 = sitk.Transform() if initial is None else as_transform(initial)
    grid = _capped_grid(fixed, lungs, cfg)
    vox = tf.spacing_zyx(grid, dev)
    fixed_f = _descriptors(fixed, grid, sitk.Transform(), cfg, dev)
    moving_f = _descriptors(moving, grid, t0, cfg, dev)
    r_vox = torch.zeros((1, 3) + tf.grid_shape(grid), device=dev)
    if residual is not None:  # nearest-neighbour extrapolation: a residual on a smaller box continues flat beyond it
        start = sitk.Resample(check_displacement_field(residual, "capture residual"), grid, sitk.Transform(),
                              sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64, True)
        r_vox = tf.field_to_local_mm(start, dev) / vox
    t_features = time.perf_counter() - t_start

    loop = {"lr": cfg.lr, "tolerance": cfg.tolerance or None, "param_smoothing": 0, "integration_steps": 7,
            "diffeomorphic": False}
    param = FieldParametrisation(loop, lungs if sliding else None, dev)
    control = tf.grid_shape(tf.corner_aligned_grid(grid, float(min(grid.GetSpacing())) * cfg.control_ratio))
    theta = torch.zeros((1, param.channels) + control, device=dev, requires_grad=True)
    points = _PointSampler(grid, similarity_mask, param, cfg.max_points, dev)
    fixed_at = points.take(fixed_f)  # (1, C, N)
    r_at = points.take(r_vox) + points.index  # where the capture sends each point (voxels of the grid)
    warp = _point_warp(moving_f, grid)
    from monai.losses import DiffusionLoss  # monai's import is slow; deformable defers it the same way

    regulariser = DiffusionLoss(normalize=True)

    def loss_fn(c_at: torch.Tensor, smooth: torch.Tensor) -> torch.Tensor:
        sim = ((warp(r_at + c_at) - fixed_at) ** 2).sum(dim=1).mean()
        return sim + cfg.weight_smooth * sum(regulariser(part) for part in smooth.split(3, dim=1))

    t = time.perf_counter()
    losses, steps = optimise_level({"grid": grid}, theta, points, loop, loss_fn, cfg.iterations)
    t_optimise = time.perf_counter() - t
    with torch.no_grad():
        correction = param.ddf(theta, grid) * vox
        total, rounds = tf.unfold_locally(r_vox * vox + correction, tuple(float(s) for s in grid.GetSpacing()[::-1]))
    info = {"settings": asdict(cfg), "grid_size": list(grid.GetSize()),
            "spacing_mm": [float(s) for s in grid.GetSpacing()],
            "control_size": list(control[::-1]), "iterations": steps, "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None, "points": int(len(points.flat)),
            "mean_correction_mm": float(correction.norm(dim=1).mean()),
            "unfold_rounds": rounds, "features_s": t_features, "optimise_s": t_optimise,
            "seconds": time.perf_counter() - t_start}
    return tf.local_mm_to_field(total, grid), info


__all__ = ["FinishSettings", "finish_motion"]
