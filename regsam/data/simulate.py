"""Breathing-pair simulator: a realistic 4DCT-like pair with exact ground truth from one real CT.

Design
------
The real CT is the **moving** image, unchanged apart from added scanner noise. The
**fixed** image is made by pulling the CT through a smooth map defined on the fixed grid::

    phi(x) = R (x + u(x) - c) + c + t            (R, t: optional rigid offset about the image centre c)
    fixed(x) = CT(phi(x)) (+ lung density change, + noise)

so ``gt_disp(x) = phi(x) - x`` is the true fixed -> moving displacement *by construction*
(no field inversion, no approximation): ``sitk.Resample(moving, fixed,
sitk.DisplacementFieldTransform(gt_disp))`` reproduces the fixed image up to noise and the
lung density change, and ``moving_points = fixed_points + gt_disp(fixed_points)`` exactly.

Phases: diagnostic chest CTs (and the sample CT) are full-inspiration breath-holds, so the
moving image is the **inhale** phase and the fixed image an **exhale-like** phase: the lungs in
the fixed image are pushed up by the diaphragm, ``u`` points from the exhale position of a
tissue point to its inhale position (mostly towards the feet, -z in LPS, largest at the lung base).

Motion ``u`` (computed on a coarse grid, ``field_spacing_mm``, then smoothed and linearly
upsampled to the image grid):

* ``parametric``: head-feet ``-A h^1.3`` (``h`` = 0 at the lung apex, 1 at the lung base, A =
  ``amplitude_mm``, default 15 mm), anterior-posterior chest-wall expansion up to ``0.2 A``
  (largest at the anterior lung surface, none at the spine) and lateral expansion up to ``0.1 A``,
  both growing towards the base.
* ``landmarks``: a real DIR-Lab pair (T00 = inhale, T50 = exhale). The displacements
  ``T00 - T50`` sit at the T50 (exhale) positions; DIR-Lab's slice index grows towards the feet,
  so z is flipped into LPS. The T00 cloud is fitted to the CT's lungs per axis (scale + shift mapping
  its 5th/95th coordinate percentiles onto those of the lung-mask voxels; landmarks are spread
  through the lungs, so percentiles match better than raw bounding boxes); the vectors keep their
  length in mm (``amplitude_mm`` rescales them so that the 99th percentile of lung ``|u_z|`` equals it)
  and are interpolated with two-scale Gaussian (Nadaraya-Watson) weights (12 mm, and 40 mm so the
  field extrapolates smoothly beyond the cloud).

Outside the lungs the motion fades to ``outside_weight`` (default 0.3) of the lung model with a
Gaussian of the distance to the lungs (15 mm); the distance counts head-feet steps at 0.3, so the
abdomen under the diaphragm follows the diaphragm for several cm.

``sliding=True`` makes the lungs slide along the chest wall: the smooth lung model moves every fixed
voxel whose image lies in the moving lungs; outside them the tissue next to the lung surface takes only
the normal part of the lung motion (no gap, no overlap: the liver follows the diaphragm) and the
tangential part jumps to zero (the ribs do not follow the lungs' head-feet glide), fading with distance
as above. The two smooth fields are built and checked separately and joined on the image grid, so the
jump is one voxel wide; the lung density change uses the smooth lung motion's det J.
The blended field is smoothed (``smoothing_mm``); if the Jacobian determinant is not above
``min_jacobian`` everywhere (checked on the coarse grid and on the final image-grid field with
``sitk.DisplacementFieldJacobianDeterminant``) the field is smoothed more / scaled down and rebuilt.

Lung density: a fixed voxel of volume dV holds the tissue of moving volume det J(x) dV, so
conservation of mass gives ``rho_fixed(x) = rho_moving(phi(x)) * det J(x)`` with
``rho = (HU + 1000) / 1000``. It is applied inside the (warped) lung mask only, never making a voxel
denser than water unless it already was (vessels are incompressible).

Noise: independent white Gaussian noise of ``noise_hu`` std on both images inside the scanner
field of view. Everything random comes from ``numpy.random.default_rng(seed)`` streams.

Images are int16 HU on the (optionally resampled, LPS-reoriented) CT grid; fixed voxels whose
``phi(x)`` leaves the CT are air (-1024). ``gt_disp`` is VectorFloat64, rounded to multiples of
2^-12 mm *before* it is used (so it stays exact and compresses ~3x better). Masks are warped with
nearest neighbour. Runtime: ~35-45 s for the full 512x512x133 sample CT on 2 cores (plus ~25-45 s
for write_case to gzip the 0.8 GB field), ~16 s at 2 mm.

Points: ``n_points`` lung points at distinctive places (high local intensity spread: vessels and
their branchings) at least 5 mm inside the fixed lung mask and spread out (minimum distance),
plus ``n_body_points`` in the body away from the lungs (bone and organ edges).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from regsam.data.case import Case, write_case
from regsam.data.masks import FOV_PADDING_HU, chest_masks
from regsam.errors import InputError
from regsam.io.geometry import direction_matrix, empty_like_grid, index_to_world, voxel_world_points
from regsam.io.images import AIR_HU, check_volume, read_image, standardize
from regsam.io.landmarks import read_dirlab_xyz

MOTIONS = ("parametric", "landmarks")
#: default peak diaphragm (head-feet) motion of the parametric model, mm
DEFAULT_AMPLITUDE_MM = 15.0
#: quantisation step of the ground-truth field (mm); makes the float64 field compress ~3x
FIELD_QUANTUM_MM = 2.0**-12
SLIDING_NOTE = ("inside the fixed lungs the smooth lung motion; outside, next to the lung surface, only its normal part "
                "(the tangential motion jumps: the lungs slide along the chest wall), fading to outside_weight of it")
PHASES = {
    "moving": "inhale: the source CT (a full-inspiration breath-hold), unchanged except noise",
    "fixed": "exhale-like: simulated by pulling the source CT through gt_disp (diaphragm up, lungs denser)",
}


@dataclass
class SimulationConfig:
    """What to simulate. Only ``seed`` .. ``spacing_mm`` are exposed on the command line."""

    seed: int = 0
    #: ``"parametric"`` (diaphragm/chest-wall model) or ``"landmarks"`` (driven by a DIR-Lab pair)
    motion: str = "parametric"
    #: (T00 = inhale, T50 = exhale) DIR-Lab ``_xyz.txt`` files, for ``motion="landmarks"``
    motion_landmarks: tuple[Path, Path] | None = None
    #: voxel spacing (mm) of the scan the landmark files index
    motion_spacing: tuple[float, float, float] | None = None
    #: (translation mm, rotation degrees) of an extra rigid misalignment, random direction/axis
    rigid_offset: tuple[float, float] | None = None
    #: peak head-feet lung motion (mm); None: 15 mm (parametric) or as in the landmark pair
    amplitude_mm: float | None = None
    #: std of the Gaussian scanner noise added to each image (HU)
    noise_hu: float = 20.0
    #: resample the CT to this spacing (mm; one number: isotropic, or x, y, z) first; None keeps its grid
    spacing_mm: float | tuple[float, float, float] | None = None
    #: motion outside the lungs, as a fraction of the lung motion, far from the lungs
    outside_weight: float = 0.3
    #: the lungs slide along the chest wall: the tangential motion jumps at the lung surface
    sliding: bool = False
    #: spacing of the grid the motion is computed on (mm)
    field_spacing_mm: float = 4.0
    #: Gaussian smoothing of the blended field (mm)
    smoothing_mm: float = 6.0
    #: smallest allowed Jacobian determinant of the final field
    min_jacobian: float = 0.05
    n_points: int = 300
    n_body_points: int = 100


@dataclass
class SimulatedPair:
    """An in-memory simulated case (images on the same grid; points (N, 3) mm LPS)."""

    fixed: sitk.Image
    moving: sitk.Image
    gt_disp: sitk.Image  # VectorFloat64 on the fixed grid, fixed -> moving
    fixed_points: np.ndarray
    moving_points: np.ndarray
    fixed_points_body: np.ndarray
    moving_points_body: np.ndarray
    fixed_mask: sitk.Image  # lungs in the fixed image
    moving_mask: sitk.Image  # lungs in the moving image
    fixed_body: sitk.Image
    moving_body: sitk.Image
    jacobian: sitk.Image  # det J of gt_disp, float32
    meta: dict = field(default_factory=dict)

    def transform(self) -> sitk.DisplacementFieldTransform:
        """A fresh transform of ``gt_disp`` (the constructor takes its image, so it copies)."""
        return sitk.DisplacementFieldTransform(sitk.Image(self.gt_disp))


# ----------------------------------------------------------------------------- validation
def _validate(config: SimulationConfig) -> SimulationConfig:
    if config.motion not in MOTIONS:
        raise InputError(f"unknown motion '{config.motion}'; use one of {', '.join(MOTIONS)}")
    if config.motion == "landmarks":
        if not config.motion_landmarks or len(config.motion_landmarks) != 2:
            raise InputError("landmark-driven motion needs two DIR-Lab files (--motion-landmarks T00 T50)")
        if config.motion_spacing is None:
            raise InputError("--motion-landmarks needs --motion-spacing SX,SY,SZ (voxel spacing of the landmarks' scan, mm)")
        spacing = tuple(float(s) for s in config.motion_spacing)
        if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
            raise InputError(f"motion spacing must be three positive numbers (mm), got {config.motion_spacing}")
        for p in config.motion_landmarks:
            if not Path(p).is_file():
                raise InputError(f"landmark file not found: {p}")
    elif config.motion_landmarks:
        raise InputError("motion landmarks were given but motion is 'parametric'; use motion 'landmarks'")
    if config.amplitude_mm is not None and not (np.isfinite(config.amplitude_mm) and 0 < config.amplitude_mm <= 60):
        raise InputError(f"amplitude must be in (0, 60] mm, got {config.amplitude_mm}")
    if not (np.isfinite(config.noise_hu) and config.noise_hu >= 0):
        raise InputError(f"noise must be >= 0 HU, got {config.noise_hu}")
    if config.spacing_mm is not None:
        spacing = np.atleast_1d(np.asarray(config.spacing_mm, dtype=np.float64))
        if spacing.size not in (1, 3) or not (np.all(np.isfinite(spacing)) and np.all(spacing > 0)):
            raise InputError(f"spacing must be a positive number of mm (or three), got {config.spacing_mm}")
    if config.rigid_offset is not None:
        if len(config.rigid_offset) != 2 or not all(np.isfinite(config.rigid_offset)):
            raise InputError(f"rigid offset must be (mm, degrees), got {config.rigid_offset}")
        mm, deg = config.rigid_offset
        if mm < 0 or not (0 <= abs(deg) <= 45):
            raise InputError(f"rigid offset must have translation >= 0 mm and |rotation| <= 45 degrees, got {config.rigid_offset}")
    if not 0 <= config.outside_weight <= 1:
        raise InputError(f"outside_weight must be in [0, 1], got {config.outside_weight}")
    if config.field_spacing_mm <= 0 or config.smoothing_mm < 0:
        raise InputError("field_spacing_mm must be > 0 and smoothing_mm >= 0")
    if config.n_points < 1 or config.n_body_points < 0:
        raise InputError("n_points must be >= 1 and n_body_points >= 0")
    return config


# ----------------------------------------------------------------------------- grids
def _coarse_grid(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """A grid of ``spacing_mm`` in the image's axes covering the image plus one voxel each side."""
    extent = (np.array(image.GetSize()) - 1) * np.array(image.GetSpacing())
    size = np.ceil(extent / spacing_mm).astype(int) + 3
    origin = np.array(image.GetOrigin()) - direction_matrix(image) @ np.full(3, spacing_mm)
    return empty_like_grid(size, origin, (spacing_mm,) * 3, image.GetDirection())


def _world_points(grid: sitk.Image) -> np.ndarray:
    """World coordinates of every voxel, array shape (nz, ny, nx, 3) in x, y, z order."""
    return voxel_world_points(grid)


def _vector_image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float64), isVector=True)
    image.CopyInformation(reference)
    return image


def _upsample_linear(coarse: np.ndarray, grid: sitk.Image, target: sitk.Image) -> np.ndarray:
    """Trilinear interpolation of a (nz, ny, nx, C) array on ``grid`` at every voxel of ``target``.

    Both grids share their direction, so trilinear interpolation separates into three 1D passes
    (what ``sitk.Resample`` with ``sitkLinear`` computes, several times faster).
    """
    direction = direction_matrix(grid)
    offset = direction.T @ (np.array(target.GetOrigin()) - np.array(grid.GetOrigin()))
    out = coarse
    for k, axis in ((2, 0), (1, 1), (0, 2)):  # (x, y, z) index k -> array axis
        n_fine = target.GetSize()[k]
        c = (offset[k] + np.arange(n_fine) * target.GetSpacing()[k]) / grid.GetSpacing()[k]
        n_coarse = out.shape[axis]
        i0 = np.clip(np.floor(c).astype(int), 0, n_coarse - 2)
        t = np.clip(c - i0, 0.0, 1.0)
        shape = [1] * out.ndim
        shape[axis] = n_fine
        t = t.reshape(shape)
        out = np.take(out, i0, axis=axis) * (1.0 - t) + np.take(out, i0 + 1, axis=axis) * t
    return out


def _shrink_factors(image: sitk.Image, target_mm: float) -> list[int]:
    return [max(1, int(round(target_mm / s))) for s in image.GetSpacing()]


# ----------------------------------------------------------------------------- motion models
def _lung_frame(lung_xyz: np.ndarray) -> dict[str, float]:
    lo = lung_xyz.min(axis=0)
    hi = lung_xyz.max(axis=0)
    return {"x_min": lo[0], "x_max": hi[0], "y_ant": lo[1], "y_post": hi[1], "z_base": lo[2], "z_apex": hi[2]}


def _parametric_motion(points: np.ndarray, lung_xyz: np.ndarray, amplitude: float) -> tuple[np.ndarray, dict]:
    f = _lung_frame(lung_xyz)
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    h = np.clip((f["z_apex"] - z) / max(f["z_apex"] - f["z_base"], 1.0), 0.0, 1.0)
    ant = np.clip((f["y_post"] - y) / max(f["y_post"] - f["y_ant"], 1.0), 0.0, 1.0)
    mid = 0.5 * (f["x_min"] + f["x_max"])
    half = max(0.5 * (f["x_max"] - f["x_min"]), 1.0)
    lat = np.clip((x - mid) / half, -1.0, 1.0)
    grow = 0.4 + 0.6 * h
    u = np.empty(points.shape, dtype=np.float64)
    u[..., 2] = -amplitude * h**1.3  # inhale position is lower: towards the feet (-z in LPS)
    u[..., 1] = -0.2 * amplitude * ant * grow  # anterior chest wall moves anterior (-y) on inhale
    u[..., 0] = 0.1 * amplitude * lat * grow  # lungs widen: left (+x) lung further left
    info = {"lung_z_range_mm": [float(f["z_base"]), float(f["z_apex"])], "amplitude_mm": amplitude}
    return u, info


def read_landmark_motion(
    t00: str | os.PathLike, t50: str | os.PathLike, spacing
) -> tuple[np.ndarray, np.ndarray]:
    """Read a DIR-Lab pair as (inhale T00 points, exhale T50 points), mm, axes turned to LPS.

    DIR-Lab indices are x towards the patient's left and y towards the back (as LPS) but z
    (slice) towards the feet, so z is negated. Positions are relative (origin is arbitrary).
    """
    inhale = read_dirlab_xyz(t00, tuple(float(s) for s in spacing))
    exhale = read_dirlab_xyz(t50, tuple(float(s) for s in spacing))
    if len(inhale) != len(exhale):
        raise InputError(f"{Path(t00).name} has {len(inhale)} landmarks but {Path(t50).name} has {len(exhale)}")
    if len(inhale) < 10:
        raise InputError(f"{Path(t00).name}: {len(inhale)} landmarks; at least 10 are needed to drive the motion")
    flip = np.array([1.0, 1.0, -1.0])
    return inhale * flip, exhale * flip


def _fit_cloud(cloud: np.ndarray, lung_xyz: np.ndarray, q: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis scale and shift taking the cloud's q/100-q percentiles onto the lung voxels'."""
    c_lo, c_hi = np.percentile(cloud, [q, 100 - q], axis=0)
    t_lo, t_hi = np.percentile(lung_xyz, [q, 100 - q], axis=0)
    scale = (t_hi - t_lo) / np.maximum(c_hi - c_lo, 1e-6)
    shift = t_lo - scale * c_lo
    return scale, shift


def _nadaraya_watson(sites: np.ndarray, values: np.ndarray, points: np.ndarray, sigmas=(12.0, 40.0), far_weight=1e-3) -> np.ndarray:
    """Two-scale Gaussian-weighted average of ``values`` at ``points`` (chunked)."""
    flat = points.reshape(-1, 3)
    out = np.empty((flat.shape[0], values.shape[1]))
    chunk = 20000
    for start in range(0, flat.shape[0], chunk):
        p = flat[start : start + chunk]
        d2 = ((p[:, None, :] - sites[None, :, :]) ** 2).sum(-1)
        w = np.exp(-d2 / (2 * sigmas[0] ** 2)) + far_weight * np.exp(-d2 / (2 * sigmas[1] ** 2))
        total = w.sum(1, keepdims=True)
        # Beyond both scales fall back to the nearest landmark (no division by ~0).
        nearest = values[np.argmin(d2, axis=1)]
        ok = total[:, 0] > 1e-200
        out[start : start + chunk] = np.where(ok[:, None], (w @ values) / np.maximum(total, 1e-300), nearest)
    return out.reshape(points.shape[:-1] + (values.shape[1],))


def _landmark_motion(points: np.ndarray, lung_xyz: np.ndarray, config: SimulationConfig) -> tuple[np.ndarray, dict]:
    t00, t50 = config.motion_landmarks
    inhale, exhale = read_landmark_motion(t00, t50, config.motion_spacing)
    disp = inhale - exhale  # exhale (fixed) position -> inhale (moving) position
    scale, shift = _fit_cloud(inhale, lung_xyz)
    sites = exhale * scale + shift
    # The interpolant is smooth on a 12 mm scale: evaluate it on every other coarse point, upsample linearly.
    sub = _nadaraya_watson(sites, disp, points[::2, ::2, ::2])
    coords = np.meshgrid(*(np.arange(n) / 2.0 for n in points.shape[:3]), indexing="ij")
    u = np.stack([ndimage.map_coordinates(sub[..., k], coords, order=1, mode="nearest") for k in range(3)], axis=-1)
    lengths = np.linalg.norm(disp, axis=1)
    info = {
        "landmarks": [str(Path(t00)), str(Path(t50))],
        "landmark_spacing_mm": [float(s) for s in config.motion_spacing],
        "landmark_mean_displacement_mm": float(lengths.mean()),
        "landmark_max_displacement_mm": float(lengths.max()),
        "fit_scale": scale.tolist(),
        "fit_shift_mm": shift.tolist(),
        "fit": "per-axis scale+shift mapping the T00 cloud's 5th/95th percentiles onto the lung voxels'; z flipped (DIR-Lab slices run head->feet)",
    }
    return u, info


# ----------------------------------------------------------------------------- motion helpers
def _outside_weight_map(lung_coarse: np.ndarray, spacing: float, outside_weight: float, length_mm=15.0, z_factor=0.3) -> np.ndarray:
    """1 in the lungs, fading smoothly to ``outside_weight``; head-feet distance counts ``z_factor``."""
    if not lung_coarse.any():
        return np.full(lung_coarse.shape, outside_weight)
    dist = ndimage.distance_transform_edt(~lung_coarse, sampling=(spacing * z_factor, spacing, spacing))
    return outside_weight + (1.0 - outside_weight) * np.exp(-((dist / length_mm) ** 2))


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    a = math.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * (k @ k)


def _random_unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v)


def _min_jacobian(field: sitk.Image) -> tuple[float, sitk.Image]:
    jac = sitk.DisplacementFieldJacobianDeterminant(field)
    return float(sitk.GetArrayViewFromImage(jac).min()), jac


# ----------------------------------------------------------------------------- points
def _pick_spread(candidates: np.ndarray, weights: np.ndarray, n: int, min_dist: float, rng: np.random.Generator) -> np.ndarray:
    """Pick up to ``n`` candidates, favouring high weights, at least ``min_dist`` apart (relaxed if needed)."""
    if len(candidates) == 0 or n == 0:
        return np.zeros((0, 3))
    # weighted random order (Efraimidis-Spirakis keys)
    keys = np.log(rng.random(len(candidates))) / np.maximum(weights, 1e-12)
    order = np.argsort(-keys)
    ordered = candidates[order]
    chosen: list[np.ndarray] = []
    used = np.zeros(len(ordered), dtype=bool)
    dist = min_dist
    while len(chosen) < n and dist > 0.5:
        for i in np.nonzero(~used)[0]:
            p = ordered[i]
            if chosen and np.min(np.sum((np.asarray(chosen) - p) ** 2, axis=1)) < dist * dist:
                continue
            chosen.append(p)
            used[i] = True
            if len(chosen) >= n:
                break
        dist *= 0.7
    return np.asarray(chosen).reshape(-1, 3)


class _PointSampler:
    """Distinctive points (high local intensity spread) on a ~2 mm copy of the fixed image."""

    def __init__(self, fixed_clean: sitk.Image, lungs: sitk.Image, body: sitk.Image, moving_grid: sitk.Image, transform: sitk.Transform):
        factors = _shrink_factors(fixed_clean, 2.0)
        image = sitk.BinShrink(sitk.Cast(fixed_clean, sitk.sitkFloat32), factors)
        self.image = image
        self.hu = sitk.GetArrayFromImage(image)
        sigma = 2.0
        mean = sitk.SmoothingRecursiveGaussian(image, sigma)
        mean_sq = sitk.SmoothingRecursiveGaussian(image * image, sigma)
        self.spread = np.sqrt(np.maximum(sitk.GetArrayFromImage(mean_sq - mean * mean), 0.0))
        lung_small = sitk.BinShrink(sitk.Cast(lungs, sitk.sitkFloat32), factors) > 0.5
        body_small = sitk.BinShrink(sitk.Cast(body, sitk.sitkFloat32), factors) > 0.5

        def signed(mask: sitk.Image) -> np.ndarray:  # mm, positive inside
            if not np.any(sitk.GetArrayViewFromImage(mask)):
                return np.full(self.hu.shape, -np.inf)
            return sitk.GetArrayFromImage(
                sitk.SignedMaurerDistanceMap(mask, insideIsPositive=True, squaredDistance=False, useImageSpacing=True)
            )

        self.lung_depth = signed(lung_small)
        self.body_depth = signed(body_small)
        self.moving_grid = moving_grid
        self.transform = transform

    def sample(self, ok: np.ndarray, n: int, min_dist: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        empty = np.zeros((0, 3)), np.zeros((0, 3))
        if n == 0 or not ok.any():
            return empty
        idx = np.argwhere(ok)
        values = self.spread[ok]
        top = values >= np.percentile(values, 80)
        idx, values = idx[top], values[top]
        if len(idx) > 50000:
            keep = rng.choice(len(idx), 50000, replace=False)
            idx, values = idx[keep], values[keep]
        world = index_to_world(self.image, idx[:, ::-1])
        fixed_pts = _pick_spread(world, values, n, min_dist, rng)
        moving_pts = np.array([self.transform.TransformPoint(p.tolist()) for p in fixed_pts]).reshape(-1, 3)
        # keep pairs whose moving point lies inside the moving image
        grid = self.moving_grid
        cont = np.array([grid.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in moving_pts]).reshape(-1, 3)
        inb = np.all((cont >= 0) & (cont <= np.array(grid.GetSize()) - 1), axis=1)
        return fixed_pts[inb], moving_pts[inb]


# ----------------------------------------------------------------------------- sliding
def _outward_normals(inside: np.ndarray, spacing: float, smoothing_mm: float = 6.0) -> np.ndarray:
    """Unit outward normals (nz, ny, nx, 3; x, y, z order, grid axes) of a mask, from a smoothed signed distance."""
    outside_d = ndimage.distance_transform_edt(~inside, sampling=spacing)
    inside_d = ndimage.distance_transform_edt(inside, sampling=spacing)
    signed = ndimage.gaussian_filter(outside_d - inside_d, smoothing_mm / spacing, mode="nearest")
    grad = np.stack(np.gradient(signed, spacing)[::-1], axis=-1)  # array axes z, y, x -> components x, y, z
    return grad / np.maximum(np.linalg.norm(grad, axis=-1, keepdims=True), 1e-6)


def _sliding_outside_motion(u_in: np.ndarray, lung_fixed: np.ndarray, grid: sitk.Image, outside_weight: float,
                            length_mm: float = 15.0, z_factor: float = 0.3) -> np.ndarray:
    """Motion of the tissue outside the lungs when the lungs slide along the chest wall (coarse grid, mm).

    Next to the lung surface the outside tissue takes only the *normal* part of the lung motion (no gap, no
    overlap: the diaphragm and the liver under it follow the lung base, the ribs do not follow the lungs'
    head-feet glide); with distance it fades to ``outside_weight`` of the lung model (as the non-sliding model).
    The world axes are the grid axes up to the grid's direction, which :func:`simulate_case` keeps LPS-aligned.
    """
    direction = direction_matrix(grid)
    normals = _outward_normals(lung_fixed, float(grid.GetSpacing()[0])) @ direction.T  # grid axes -> world
    normal_part = np.sum(u_in * normals, axis=-1, keepdims=True) * normals
    spacing = float(grid.GetSpacing()[0])
    dist = ndimage.distance_transform_edt(~lung_fixed, sampling=(spacing * z_factor, spacing, spacing))
    near = np.exp(-((dist / length_mm) ** 2))[..., None]
    return near * normal_part + (1.0 - near) * outside_weight * u_in


def _pull_mask(mask: np.ndarray, grid: sitk.Image, displacement: np.ndarray) -> np.ndarray:
    """Fixed-space mask {x : x + u(x) inside ``mask``} of a coarse-grid mask and displacement (linear, > 0.5)."""
    transform = sitk.DisplacementFieldTransform(_vector_image(displacement, grid))
    pulled = sitk.Resample(sitk.Cast(_mask_image(mask, grid), sitk.sitkFloat32), grid, transform, sitk.sitkLinear, 0.0)
    return sitk.GetArrayFromImage(pulled) > 0.5


# ----------------------------------------------------------------------------- field construction
@dataclass
class _Rigid:
    rotation: np.ndarray
    translation: np.ndarray
    centre: np.ndarray
    info: dict | None

    def apply(self, points: np.ndarray, u: np.ndarray) -> np.ndarray:
        """The full map's displacement phi(x) - x for motion ``u`` at ``points`` (..., 3)."""
        return (points + u - self.centre) @ self.rotation.T + self.centre + self.translation - points


def _rigid_part(ct: sitk.Image, config: SimulationConfig, rng: np.random.Generator) -> _Rigid:
    if config.rigid_offset is None:
        return _Rigid(np.eye(3), np.zeros(3), np.zeros(3), None)
    mm, deg = (float(v) for v in config.rigid_offset)
    translation = mm * _random_unit(rng)
    axis = _random_unit(rng)
    centre = np.array(ct.TransformContinuousIndexToPhysicalPoint(((np.array(ct.GetSize()) - 1) / 2.0).tolist()))
    info = {"translation_mm": translation.tolist(), "rotation_axis": axis.tolist(), "rotation_deg": deg, "centre_mm": centre.tolist(),
            "map": "fixed x -> R (x + u(x) - centre) + centre + translation"}
    return _Rigid(_rotation(axis, deg), translation, centre, info)


def _lung_motion(ct: sitk.Image, lungs: sitk.Image, config: SimulationConfig) -> tuple[sitk.Image, np.ndarray, np.ndarray, dict]:
    """The lung motion model on a coarse grid: (grid, moving-lung mask there, u (nz, ny, nx, 3) mm, info)."""
    h = float(config.field_spacing_mm)
    grid = _coarse_grid(ct, h)
    lung_coarse_img = sitk.Resample(sitk.Cast(lungs, sitk.sitkFloat32), grid, sitk.Transform(), sitk.sitkLinear, 0.0) > 0.5
    lung_coarse = sitk.GetArrayFromImage(lung_coarse_img).astype(bool)
    if lung_coarse.sum() < 20:
        raise InputError(f"the lungs in this CT are too small to simulate breathing (fewer than 20 voxels of {h:g} mm)")
    pts = _world_points(grid)
    lung_xyz = pts[lung_coarse]
    if config.motion == "parametric":
        amplitude = float(config.amplitude_mm or DEFAULT_AMPLITUDE_MM)
        u_lung, motion_info = _parametric_motion(pts, lung_xyz, amplitude)
    else:
        u_lung, motion_info = _landmark_motion(pts, lung_xyz, config)
        if config.amplitude_mm is not None:
            p99 = float(np.percentile(np.abs(u_lung[lung_coarse][:, 2]), 99))
            u_lung *= config.amplitude_mm / max(p99, 1e-6)
            motion_info["rescaled_by"] = config.amplitude_mm / max(p99, 1e-6)
    return grid, lung_coarse, u_lung, motion_info


@dataclass
class _Field:
    image: sitk.Image  # fixed -> moving displacement on the CT grid (VectorFloat64, quantised)
    jacobian: sitk.Image  # det J of ``image`` (float32)
    tissue_jacobian: sitk.Image  # det J of the smooth lung motion (the lung density change), == jacobian without sliding
    fixed_lungs: np.ndarray | None  # sliding only: fixed-grid lung mask (bool, array order), else None
    min_jacobian: float
    history: list
    scale: float
    smoothing_mm: float


def _full_field(coarse: np.ndarray, grid: sitk.Image, ct: sitk.Image) -> sitk.Image:
    arr = _upsample_linear(coarse, grid, ct)
    np.round(arr / FIELD_QUANTUM_MM, out=arr)
    arr *= FIELD_QUANTUM_MM
    return _vector_image(arr, ct)


def _sliding_field(ct, lungs, grid, pts, u_in, lung_coarse, rigid, config, smoothing_mm) -> tuple[sitk.Image, sitk.Image, np.ndarray, float]:
    """Inside the fixed lungs the smooth lung motion, outside :func:`_sliding_outside_motion`: the tangential motion jumps."""
    lung_fixed = _pull_mask(lung_coarse, grid, u_in)
    u_out = _sliding_outside_motion(u_in, lung_fixed, grid, config.outside_weight)
    # 4 mm more smoothing than the lung motion: the normal part turns fast at the costophrenic angles
    # (DIR-Lab case 3-5 motion at 30-38 mm folded there with the same smoothing; det J >= 0.2 with 10 mm)
    sigma = (smoothing_mm + 4.0) / grid.GetSpacing()[0]
    u_out = ndimage.gaussian_filter(u_out, sigma=(sigma,) * 3 + (0,), mode="nearest")
    inside = _full_field(rigid.apply(pts, u_in), grid, ct)
    # u_out is used outside the lungs only (inside them its normals, from a distance ridge, are meaningless)
    out_jacobian = _min_jacobian(_vector_image(u_out, grid))[1]  # kept alive: an array view needs its image
    out_min = float(sitk.GetArrayFromImage(out_jacobian)[~lung_fixed].min())
    tissue_min, tissue_jac = _min_jacobian(inside)
    # the fixed lungs on the CT grid: where the lung motion lands inside the moving lungs
    lung_img = sitk.Resample(sitk.Cast(lungs, sitk.sitkFloat32), ct, sitk.DisplacementFieldTransform(sitk.Image(inside)),
                             sitk.sitkLinear, 0.0)
    lungs_f = sitk.GetArrayFromImage(lung_img) > 0.5
    arr = sitk.GetArrayFromImage(_full_field(rigid.apply(pts, u_out), grid, ct))
    arr[lungs_f] = sitk.GetArrayViewFromImage(inside)[lungs_f]
    return _vector_image(arr, ct), tissue_jac, lungs_f, min(out_min, tissue_min)


def _breathing_field(ct: sitk.Image, lungs: sitk.Image, config: SimulationConfig, rigid: _Rigid) -> tuple[_Field, dict]:
    """Blend, smooth and check the Jacobian of the motion; rebuild gentler (more smoothing, smaller) until it passes."""
    grid, lung_coarse, u_lung, motion_info = _lung_motion(ct, lungs, config)
    h = float(grid.GetSpacing()[0])
    pts = _world_points(grid)
    weight = None if config.sliding else _outside_weight_map(lung_coarse, h, config.outside_weight)[..., None]
    scale, smoothing = 1.0, float(config.smoothing_mm)
    history = []
    for attempt in range(12):
        u = u_lung * scale if weight is None else weight * u_lung * scale
        if smoothing > 0:
            u = ndimage.gaussian_filter(u, sigma=(smoothing / h,) * 3 + (0,), mode="nearest")
        coarse_min, _ = _min_jacobian(_vector_image(u, grid))
        if coarse_min <= max(0.2, config.min_jacobian):
            history.append({"scale": scale, "smoothing_mm": smoothing, "coarse_min_jacobian": coarse_min})
            if attempt % 2 == 0:
                smoothing = smoothing * 1.5 + 2.0
            else:
                scale *= 0.8
            continue
        if config.sliding:
            image, tissue_jac, lungs_f, min_jac = _sliding_field(ct, lungs, grid, pts, u, lung_coarse, rigid, config, smoothing)
            _, jacobian = _min_jacobian(image)
        else:
            image = _full_field(rigid.apply(pts, u), grid, ct)
            min_jac, jacobian = _min_jacobian(image)
            tissue_jac, lungs_f = jacobian, None
        history.append({"scale": scale, "smoothing_mm": smoothing, "coarse_min_jacobian": coarse_min, "min_jacobian": min_jac})
        if min_jac > config.min_jacobian:
            return _Field(image, jacobian, tissue_jac, lungs_f, min_jac, history, scale, smoothing), motion_info
        scale *= 0.8
    raise InputError("could not build a folding-free breathing field for this CT (min det J stayed <= "
                     f"{config.min_jacobian}); try a smaller amplitude")


# ----------------------------------------------------------------------------- images
def _warp_masks(ct, body, lungs, transform, fixed_lungs: np.ndarray | None) -> tuple[np.ndarray, sitk.Image]:
    """Fixed lungs (bool array) and body (image): the CT's masks pulled through the map (nearest neighbour)."""
    label_arr = sitk.GetArrayFromImage(body).astype(np.uint8)
    label_arr[sitk.GetArrayViewFromImage(lungs) > 0] = 2
    warped = sitk.GetArrayFromImage(
        sitk.Resample(_mask_image(label_arr, ct), ct, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    )
    lung_f = warped == 2 if fixed_lungs is None else fixed_lungs
    return lung_f, _mask_image((warped >= 1) | lung_f, ct)


def _conserve_lung_mass(f_arr: np.ndarray, lung_f: np.ndarray, tissue_jacobian: sitk.Image) -> None:
    """In place: rho_fixed = rho_moving(phi) * det J inside the fixed lungs, never denser than max(rho_moving, water)."""
    jac_arr = sitk.GetArrayViewFromImage(tissue_jacobian)
    rho_m = np.maximum(f_arr[lung_f] + 1000.0, 0.0) / 1000.0
    rho_f = np.minimum(rho_m * jac_arr[lung_f], np.maximum(rho_m, 1.0))
    f_arr[lung_f] = rho_f * 1000.0 - 1000.0


def _noisy(array: np.ndarray, reference: sitk.Image, noise_hu: float, rng: np.random.Generator) -> sitk.Image:
    """White Gaussian scanner noise inside the field of view; int16 HU image on ``reference``'s grid."""
    out = array.astype(np.float32, copy=True)
    if noise_hu > 0:
        fov = out > FOV_PADDING_HU
        out[fov] += rng.standard_normal(int(fov.sum()), dtype=np.float32) * np.float32(noise_hu)
    image = sitk.GetImageFromArray(np.clip(np.rint(out), -32768, 32767).astype(np.int16))
    image.CopyInformation(reference)
    return image


def _motion_numbers(ct: sitk.Image, field_img: sitk.Image, lung_f: np.ndarray) -> dict:
    disp = sitk.GetArrayViewFromImage(field_img)
    lung_disp = disp[lung_f]
    norms = np.linalg.norm(lung_disp, axis=1)
    lung_z = np.array([ct.TransformIndexToPhysicalPoint([0, 0, int(k)])[2] for k in range(ct.GetSize()[2])])
    zz = np.broadcast_to(lung_z[:, None, None], lung_f.shape)[lung_f]
    lo, hi = np.percentile(zz, [100 / 3, 200 / 3])
    return {
        "lung_max_displacement_mm": float(norms.max()),
        "lung_mean_displacement_mm": float(norms.mean()),
        "lung_p99_abs_uz_mm": float(np.percentile(np.abs(lung_disp[:, 2]), 99)),
        "lung_mean_abs_uz_mm": {"inferior_third": float(np.abs(lung_disp[zz < lo, 2]).mean()),
                                 "superior_third": float(np.abs(lung_disp[zz > hi, 2]).mean())},
    }


# ----------------------------------------------------------------------------- main entry
def simulate_case(ct: sitk.Image, config: SimulationConfig | None = None, labels: sitk.Image | None = None) -> SimulatedPair:
    """Simulate an exhale-like fixed image from an inhale CT (the moving image) with exact ground truth.

    Args:
        ct: 3D chest CT in HU (any orientation; it is reoriented to LPS).
        config: see :class:`SimulationConfig`.
        labels: optional TotalSegmentator-style label image of ``ct`` (lung lobes 10-14) for the masks.

    Raises:
        InputError: not a 3D scalar image, no lungs found, bad configuration or landmark files.
    """
    t_start = time.perf_counter()
    config = _validate(config or SimulationConfig())
    check_volume(ct, "CT")
    ct = standardize(ct, config.spacing_mm)
    if labels is not None:
        if labels.GetDimension() != 3 or labels.GetNumberOfComponentsPerPixel() != 1:
            raise InputError("label image must be a 3D scalar image")
        labels = standardize(labels, None, sitk.sitkNearestNeighbor, pixel_type=None)
    body, lungs = chest_masks(ct, labels)
    seeds = np.random.SeedSequence(int(config.seed)).spawn(5)
    rng_rigid, rng_noise_f, rng_noise_m, rng_points, rng_body = (np.random.default_rng(s) for s in seeds)

    rigid = _rigid_part(ct, config, rng_rigid)
    motion, motion_info = _breathing_field(ct, lungs, config, rigid)
    field_img = motion.image
    transform = sitk.DisplacementFieldTransform(sitk.Image(field_img))

    # warp the CT (linear) and its masks; lung density change; noise
    f_arr = sitk.GetArrayFromImage(sitk.Resample(ct, ct, transform, sitk.sitkLinear, AIR_HU, sitk.sitkFloat32))
    lung_f, fixed_body = _warp_masks(ct, body, lungs, transform, motion.fixed_lungs)
    fixed_lungs = _mask_image(lung_f, ct)
    _conserve_lung_mass(f_arr, lung_f, motion.tissue_jacobian)
    fixed_density = sitk.GetImageFromArray(f_arr)
    fixed_density.CopyInformation(ct)
    fixed = _noisy(f_arr, ct, config.noise_hu, rng_noise_f)
    del f_arr
    moving = _noisy(sitk.GetArrayViewFromImage(ct), ct, config.noise_hu, rng_noise_m)

    # landmarks: distinctive lung points, and body points away from the lungs
    sampler = _PointSampler(fixed_density, fixed_lungs, fixed_body, ct, transform)
    fixed_pts, moving_pts = sampler.sample((sampler.lung_depth >= 5.0) & (sampler.hu >= -800.0), config.n_points, 8.0, rng_points)
    if len(fixed_pts) < min(config.n_points, 10):
        raise InputError(f"only {len(fixed_pts)} lung landmarks could be placed; the lungs in this CT are too small")
    body_ok = (sampler.body_depth >= 5.0) & (sampler.lung_depth <= -10.0)
    fixed_body_pts, moving_body_pts = sampler.sample(body_ok, config.n_body_points, 15.0, rng_body)
    del sampler

    identity_tre = np.linalg.norm(moving_pts - fixed_pts, axis=1)
    meta = {
        "generator": "regsam.data.simulate",
        "phases": PHASES,
        "seed": int(config.seed),
        "motion": config.motion,
        "motion_info": motion_info,
        "amplitude_mm": config.amplitude_mm if config.amplitude_mm is not None else motion_info.get("amplitude_mm"),
        "outside_weight": config.outside_weight,
        "sliding": SLIDING_NOTE if config.sliding else None,
        "noise_hu": config.noise_hu,
        "rigid_offset": rigid.info,
        "spacing_mm": list(ct.GetSpacing()),
        "size": list(ct.GetSize()),
        "field_spacing_mm": float(config.field_spacing_mm),
        "field_attempts": motion.history,
        "field_scale": motion.scale,
        "smoothing_mm": motion.smoothing_mm,
        **_motion_numbers(ct, field_img, lung_f),
        "min_jacobian": float(motion.min_jacobian),
        "lung_mean_jacobian": float(sitk.GetArrayViewFromImage(motion.tissue_jacobian)[lung_f].mean()),
        "n_points": int(len(fixed_pts)),
        "n_body_points": int(len(fixed_body_pts)),
        "mean_identity_tre_mm": float(identity_tre.mean()),
        "max_identity_tre_mm": float(identity_tre.max()),
        "mean_identity_tre_body_mm": float(np.linalg.norm(moving_body_pts - fixed_body_pts, axis=1).mean()) if len(fixed_body_pts) else None,
        "density": "inside the fixed lung mask rho_fixed = rho_moving(x+u) * detJ (rho = (HU+1000)/1000), never above max(rho_moving, 1)",
        "masks": "lungs from labels" if labels is not None else "lungs from thresholds",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    return SimulatedPair(
        fixed=fixed, moving=moving, gt_disp=field_img,
        fixed_points=fixed_pts, moving_points=moving_pts,
        fixed_points_body=fixed_body_pts, moving_points_body=moving_body_pts,
        fixed_mask=fixed_lungs, moving_mask=sitk.Cast(lungs, sitk.sitkUInt8),
        fixed_body=fixed_body, moving_body=sitk.Cast(body, sitk.sitkUInt8),
        jacobian=motion.jacobian, meta=meta,
    )


def _mask_image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(reference)
    return image


def simulate_case_from_file(
    ct_path: str | os.PathLike,
    out_path: str | os.PathLike,
    config: SimulationConfig | None = None,
    body_label_image: str | os.PathLike | sitk.Image | None = None,
) -> Case:
    """Read a CT (and optional label image), simulate a breathing pair and write it as a case folder."""
    config = _validate(config or SimulationConfig())
    ct = read_image(ct_path, "CT")
    labels = None
    if body_label_image is not None:
        labels = body_label_image if isinstance(body_label_image, sitk.Image) else read_image(body_label_image, "label image")
    pair = simulate_case(ct, config, labels)
    meta = dict(pair.meta)
    meta["source_ct"] = str(Path(ct_path).resolve())
    if body_label_image is not None and not isinstance(body_label_image, sitk.Image):
        meta["source_labels"] = str(Path(body_label_image).resolve())
    extra = {}
    if len(pair.fixed_points_body):
        extra["body"] = (pair.fixed_points_body, pair.moving_points_body)
    return write_case(
        out_path, pair.fixed, pair.moving, pair.fixed_points, pair.moving_points,
        extra_point_sets=extra, fixed_mask=pair.fixed_mask, moving_mask=pair.moving_mask,
        gt_disp=pair.gt_disp, meta=meta,
    )
