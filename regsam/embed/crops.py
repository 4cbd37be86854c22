"""Two-view crop geometry for SAM training.

A *view* is an affine sampling grid of a scan: view voxel ``v = (i, j, k)`` (x, y, z order, as
SimpleITK indexes) sits at world point ``A_view @ [v, 1]`` (mm, LPS), with
``A_view = [R * diag(spacing_view) | origin_view]``. Both views of a pair are sampled from the same
scan with :func:`torch.nn.functional.grid_sample`, each with its own random rescale (its spacing is
``base_spacing_mm * s``, ``s ~ U(scale_range)``) and position, so a world point ``p`` lies at view
index ``A_1^-1 p`` in view 1 and ``A_2^-1 p`` in view 2: positives are exact by construction.

Tensors follow torch's (B, C, D, H, W) = (B, C, z, y, x) layout; all index triples and affines are
(x, y, z). Everything geometric is float64 numpy; only the final grids are cast to float32.

Augmentations that keep positives exact (they change intensities or the view's affine, never the
bookkeeping): per-view rotation (``rotation_deg``), thick-slice simulation (``thick_slice_prob``: the view
reads the scan as if it had been acquired with ``t``-mm axial slices, slab-averaged and linearly
interpolated along world z, like the 5-8 mm scans of the training data), and intensity changes.

*Parts* (for the ACE and Adam objectives): :func:`split_grid` cuts a view into a ``(gx, gy, gz)`` grid of
sub-views with the same spacing and orientation; :class:`TwoViewSampler` draws them from view 1 (each with
its own intensity augmentation) when ``part_grids`` asks for them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter

from regsam.embed.affines import apply_affine, image_affine, normalized_grid, voxel_centres
from regsam.embed.preprocess import HU_WINDOW, normalize_hu, resample_standard
from regsam.errors import InputError
from regsam.io.images import read_image


# ------------------------------------------------------------------ scans
@dataclass
class Scan:
    """A training scan, preprocessed once: LPS, isotropic spacing, intensities in [-1, 1].

    Attributes:
        name: file name or label.
        volume: (1, 1, D, H, W) float32.
        index_to_world: 4x4, voxel (x, y, z) -> mm.
        foreground_lo / foreground_hi: (3,) world-mm corners (x, y, z) of the box holding voxels above the
            foreground threshold (SAM crops the background before sampling views).
    """

    name: str
    volume: torch.Tensor
    index_to_world: np.ndarray
    foreground_lo: np.ndarray
    foreground_hi: np.ndarray

    @property
    def size_xyz(self) -> tuple[int, int, int]:
        d, h, w = self.volume.shape[2:]
        return int(w), int(h), int(d)

    @property
    def world_to_index(self) -> np.ndarray:
        return np.linalg.inv(self.index_to_world)

    def box_world(self) -> tuple[np.ndarray, np.ndarray]:
        """World-mm (x, y, z) min and max over the 8 corner voxel centres."""
        corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=np.float64)
        corners *= np.array(self.size_xyz, dtype=np.float64) - 1
        world = apply_affine(self.index_to_world, corners)
        return world.min(axis=0), world.max(axis=0)


def load_scan(
    source: str | os.PathLike | sitk.Image,
    spacing_mm: float = 2.0,
    hu_window: Sequence[float] = HU_WINDOW,
    foreground_hu: float = -500.0,
    name: str | None = None,
) -> Scan:
    """Read (if needed), reorient to LPS, resample to ``spacing_mm`` and normalise a CT for training.

    Raises:
        InputError: unreadable file, not a 3D volume, or no voxel above ``foreground_hu``.
    """
    if isinstance(source, sitk.Image):
        image, label = source, name or "image"
    else:
        image, label = read_image(source), name or os.path.basename(str(source))
    resampled = resample_standard(image, spacing_mm, label)
    hu = sitk.GetArrayViewFromImage(resampled)
    fg = np.argwhere(hu > foreground_hu)  # (n, 3) z, y, x
    if len(fg) == 0:
        raise InputError(f"{label}: no voxel above {foreground_hu} HU; is it a CT in HU?")
    affine = image_affine(resampled)
    corners = np.array([fg.min(axis=0)[::-1], fg.max(axis=0)[::-1]], dtype=np.float64)
    corner_world = apply_affine(affine, corners)
    volume = torch.from_numpy(np.ascontiguousarray(normalize_hu(hu, hu_window)))[None, None]
    return Scan(label, volume, affine, corner_world.min(axis=0), corner_world.max(axis=0))


# ------------------------------------------------------------------ view geometry
@dataclass
class CropConfig:
    """Crop and augmentation constants (SAM values where SAM has one; see sam_chest.yaml)."""

    #: view size in voxels (x, y, z); SAM: 96 x 96 x 32
    size: tuple[int, int, int] = (96, 96, 32)
    #: nominal view spacing (mm); SAM: 2 mm
    base_spacing_mm: float = 2.0
    #: each view's spacing is base_spacing_mm * U(scale_range); SAM: 0.8-1.2
    scale_range: tuple[float, float] = (0.8, 1.2)
    #: each view is rotated about its seed point by up to this angle (degrees, random axis); SAM: 0 (none)
    rotation_deg: float = 0.0
    #: spacing (mm) the scans are resampled to once before views are drawn from them
    scan_spacing_mm: float = 1.0
    #: voxels above this HU define the foreground box the shared seed point is drawn from; SAM: -500
    foreground_hu: float = -500.0
    #: Gaussian blur sigma range (mm), drawn per view; SAM: 0-4 mm
    blur_sigma_mm: tuple[float, float] = (0.0, 4.0)
    #: log-gamma range on [0, 1]-scaled intensities (regsam addition, SAM: none)
    log_gamma: tuple[float, float] = (-0.3, 0.3)
    #: contrast factor range (regsam addition, SAM: none)
    contrast: tuple[float, float] = (0.9, 1.1)
    #: brightness shift range in HU (regsam addition, SAM: none)
    brightness_hu: tuple[float, float] = (-50.0, 50.0)
    #: Gaussian noise std range in HU; SAM: 0-0.001 of its 0-255 scale (~0 HU)
    noise_std_hu: tuple[float, float] = (0.0, 20.0)
    hu_window: tuple[float, float] = HU_WINDOW
    #: probability that a view is read as a thick-slice acquisition (regsam addition, SAM: none)
    thick_slice_prob: float = 0.0
    #: slice thickness = spacing range (mm, along world z) of the simulated acquisition
    thick_slice_mm: tuple[float, float] = (3.0, 8.0)

    @classmethod
    def from_dict(cls, values: dict) -> "CropConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            raise InputError(f"crops: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
        out = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
        if len(out.size) != 3 or min(out.size) < 1:
            raise InputError(f"crops.size must be 3 positive voxel counts (x, y, z), got {out.size}")
        if not 0 < out.scale_range[0] <= out.scale_range[1]:
            raise InputError(f"crops.scale_range must be 0 < lo <= hi, got {out.scale_range}")
        if not 0.0 <= out.rotation_deg <= 90.0:
            raise InputError(f"crops.rotation_deg must be in [0, 90], got {out.rotation_deg}")
        if not 0.0 <= out.thick_slice_prob <= 1.0:
            raise InputError(f"crops.thick_slice_prob must be in [0, 1], got {out.thick_slice_prob}")
        if len(out.thick_slice_mm) != 2 or not 0 < out.thick_slice_mm[0] <= out.thick_slice_mm[1]:
            raise InputError(f"crops.thick_slice_mm must be 0 < lo <= hi, got {out.thick_slice_mm}")
        return out


@dataclass
class ViewGeometry:
    """One view: ``size`` voxels (x, y, z) and the 4x4 index -> world-mm affine."""

    size: tuple[int, int, int]
    index_to_world: np.ndarray
    scale: float = 1.0

    @property
    def world_to_index(self) -> np.ndarray:
        return np.linalg.inv(self.index_to_world)

    def to_world(self, index: np.ndarray) -> np.ndarray:
        """(N, 3) view indices (x, y, z) -> (N, 3) world mm."""
        return apply_affine(self.index_to_world, index)

    def to_index(self, world: np.ndarray) -> np.ndarray:
        """(N, 3) world mm -> (N, 3) continuous view indices (x, y, z)."""
        return apply_affine(self.world_to_index, world)

    def contains(self, world: np.ndarray, margin: float = 0.0) -> np.ndarray:
        """(N,) bool: world points inside the view's voxel-centre box (shrunk by ``margin`` voxels)."""
        idx = self.to_index(world)
        return ((idx >= margin) & (idx <= np.array(self.size) - 1 - margin)).all(axis=1)


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """A rotation by an angle ~ U(0, ``max_deg``) degrees about a uniformly random axis (identity if 0)."""
    if max_deg <= 0:
        return np.eye(3)
    axis = rng.normal(size=3)
    axis /= max(np.linalg.norm(axis), 1e-12)
    angle = np.deg2rad(rng.uniform(0.0, max_deg))
    k = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return np.eye(3) + math.sin(angle) * k + (1.0 - math.cos(angle)) * (k @ k)


def sample_view_pair(scan: Scan, config: CropConfig, rng: np.random.Generator) -> tuple[ViewGeometry, ViewGeometry]:
    """Draw two overlapping views of ``scan`` (SAM's scheme).

    A seed point is drawn uniformly from the scan's foreground box; each view gets its own scale
    ``s ~ U(scale_range)`` (spacing ``base_spacing_mm * s``, size fixed in voxels) and is placed at a
    uniformly random position that contains the seed point, kept inside the scan where the scan is
    larger than the view. The two views therefore always share at least the seed point.
    """
    size = np.array(config.size, dtype=np.float64)
    scan_lo, scan_hi = scan.box_world()
    seed = rng.uniform(scan.foreground_lo, scan.foreground_hi)
    direction = scan.index_to_world[:3, :3] / np.linalg.norm(scan.index_to_world[:3, :3], axis=0, keepdims=True)
    views = []
    for _ in range(2):
        scale = float(rng.uniform(*config.scale_range))
        spacing = config.base_spacing_mm * scale
        extent = (size - 1) * spacing  # centre-to-centre extent along each view axis
        rotation = direction @ _rotation(rng, config.rotation_deg)
        # position of the seed inside the view, as a fraction of the extent, per axis
        frac = rng.uniform(0.0, 1.0, size=3)
        # keep the view inside the scan along axes where it fits (axis-aligned views only)
        if config.rotation_deg <= 0:
            lo_frac = np.clip((seed - (scan_hi - extent)) / np.maximum(extent, 1e-9), 0.0, 1.0)
            hi_frac = np.clip((seed - scan_lo) / np.maximum(extent, 1e-9), 0.0, 1.0)
            fits = extent <= (scan_hi - scan_lo)
            frac = np.where(fits & (lo_frac <= hi_frac), lo_frac + frac * (hi_frac - lo_frac), frac)
        # world = seed + R diag(spacing) (index - frac * (size - 1))
        affine = np.eye(4)
        affine[:3, :3] = rotation * spacing
        affine[:3, 3] = seed - affine[:3, :3] @ (frac * (size - 1))
        views.append(ViewGeometry(tuple(int(s) for s in config.size), affine, scale))
    return views[0], views[1]


def view_sampling_grid(view: ViewGeometry, scan: Scan) -> torch.Tensor:
    """grid_sample grid (1, z, y, x, 3) (float32, ``align_corners=True``) that samples ``scan`` on ``view``."""
    index = voxel_centres(view.size)  # (z, y, x, 3) float64
    scan_index = apply_affine(torch.from_numpy(scan.world_to_index @ view.index_to_world), index)
    return normalized_grid(scan_index, scan.size_xyz).to(torch.float32)[None]


def _sample_world(scan: Scan, world: torch.Tensor) -> torch.Tensor:
    """Scan intensities at world points (z, y, x, 3) (mm, float64) -> (1, 1, z, y, x); air (-1) outside."""
    scan_index = apply_affine(torch.from_numpy(scan.world_to_index), world)
    grid = normalized_grid(scan_index, scan.size_xyz).to(torch.float32)[None]
    return F.grid_sample(scan.volume + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=True) - 1.0


def sample_thick_slices(scan: Scan, view: ViewGeometry, thickness_mm: float, phase: float) -> torch.Tensor:
    """``scan`` on ``view`` as a ``thickness_mm`` axial acquisition would show it: (1, 1, z, y, x).

    Slices (slab averages over ``thickness_mm`` along world z, 3-point rule) are centred on world z
    ``z_k = (k + phase) * thickness_mm``, ``phase`` in [0, 1); each view voxel interpolates linearly between
    the two slices around its world z (what resampling a thick-slice scan to 2 mm does at inference).
    """
    t = float(thickness_mm)
    world = apply_affine(torch.from_numpy(view.index_to_world), voxel_centres(view.size))  # (z, y, x, 3)
    pos = world[..., 2] / t - float(phase)
    below = torch.floor(pos)
    frac = (pos - below).to(torch.float32)[None, None]
    out = torch.zeros((1, 1, *world.shape[:3]), dtype=torch.float32)
    for k, weight in ((below, 1.0 - frac), (below + 1.0, frac)):
        slab = torch.zeros_like(out)
        for offset in (-1.0 / 3.0, 0.0, 1.0 / 3.0):
            shifted = world.clone()
            shifted[..., 2] = (k + float(phase) + offset) * t
            slab += _sample_world(scan, shifted) / 3.0
        out += weight * slab
    return out


def sample_view(scan: Scan, view: ViewGeometry, thickness_mm: float | None = None, phase: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample ``scan`` on ``view``: intensities (1, 1, z, y, x) (air, -1, outside the scan) and a bool mask
    (1, 1, z, y, x) of voxels inside the scan. ``thickness_mm``: read it as a thick-slice acquisition
    (:func:`sample_thick_slices`); the mask and the geometry stay those of ``view``."""
    grid = view_sampling_grid(view, scan)
    valid = (grid.abs() <= 1.0 + 1e-6).all(dim=-1)[:, None]
    if thickness_mm:
        return sample_thick_slices(scan, view, thickness_mm, phase), valid
    # sample (volume + 1) with zero padding so that outside the scan reads as air (-1)
    values = F.grid_sample(scan.volume + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=True) - 1.0
    return values, valid


def split_grid(view: ViewGeometry, grid: Sequence[int]) -> list[ViewGeometry]:
    """Cut ``view`` into a ``(gx, gy, gz)`` grid of sub-views (same spacing and orientation).

    Sub-view ``p = (c * gy + b) * gx + a`` (x fastest, as torch flattens (z, y, x)) covers view voxels
    ``[a * sx, (a + 1) * sx) x [b * sy, ...) x [c * sz, ...)`` with ``(sx, sy, sz) = size / grid``; its voxel
    ``i`` is view voxel ``(a * sx, b * sy, c * sz) + i``, i.e. the same world point.

    Raises:
        InputError: a grid count that does not divide the view size.
    """
    grid = tuple(int(g) for g in grid)
    if len(grid) != 3 or min(grid) < 1 or any(s % g for s, g in zip(view.size, grid)):
        raise InputError(f"part grid {grid} must be 3 positive counts dividing the view size {view.size}")
    sub = tuple(s // g for s, g in zip(view.size, grid))
    parts = []
    for c in range(grid[2]):
        for b in range(grid[1]):
            for a in range(grid[0]):
                affine = np.array(view.index_to_world, copy=True)
                affine[:3, 3] = view.to_world(np.array([[a * sub[0], b * sub[1], c * sub[2]]], dtype=np.float64))[0]
                parts.append(ViewGeometry(sub, affine, view.scale))
    return parts


def hierarchy_grids(size: Sequence[int], levels: int, min_part: int = 16) -> list[tuple[int, int, int]]:
    """Grids of a coarse-to-fine binary decomposition of a ``size`` (x, y, z) view (Adam's hierarchy).

    Level ``l`` (1-based) halves every level-``l-1`` part along its longest side (ties: x, then y, then z), so
    level ``l`` has ``2**l`` parts; e.g. 64 x 64 x 32 -> (2, 1, 1), (2, 2, 1), (4, 2, 1).

    Raises:
        InputError: a part would get a side below ``min_part`` voxels or an odd side would be halved.
    """
    grid, part, out = [1, 1, 1], [int(s) for s in size], []
    for _ in range(int(levels)):
        axis = max(range(3), key=lambda i: (part[i], -i))
        if part[axis] % 2 or part[axis] // 2 < min_part:
            raise InputError(f"cannot split a {tuple(part)} part of a {tuple(size)} view any further (min side {min_part})")
        part[axis] //= 2
        grid[axis] *= 2
        out.append((grid[0], grid[1], grid[2]))
    return out


def grid_key(grid: Sequence[int]) -> str:
    """Batch key of the parts of ``grid``: ``parts_2x2x1`` (with ``_affine`` and ``_valid`` companions)."""
    return "parts_" + "x".join(str(int(g)) for g in grid)


def augment_intensity(view: torch.Tensor, config: CropConfig, spacing_mm: float, generator: torch.Generator) -> torch.Tensor:
    """Random blur, gamma, contrast/brightness and noise on one (1, 1, z, y, x) view in [-1, 1] units."""
    half_window = (config.hu_window[1] - config.hu_window[0]) / 2.0

    def uniform(lo_hi: Sequence[float]) -> float:
        lo, hi = float(lo_hi[0]), float(lo_hi[1])
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    out = view
    sigma_mm = uniform(config.blur_sigma_mm)
    if sigma_mm > 1e-3:
        out = GaussianFilter(3, sigma=sigma_mm / spacing_mm, truncated=3.0)(out)
    gamma = math.exp(uniform(config.log_gamma))
    if abs(gamma - 1.0) > 1e-6:
        out = ((out + 1.0) / 2.0).clamp(0.0, 1.0).pow(gamma) * 2.0 - 1.0
    out = out * uniform(config.contrast) + uniform(config.brightness_hu) / half_window
    noise = uniform(config.noise_std_hu) / half_window
    if noise > 0:
        out = out + noise * torch.randn(out.shape, generator=generator, dtype=out.dtype)
    return out


@dataclass
class TwoViewSampler:
    """Draws batches of view pairs from a list of scans, with its own reproducible random state.

    ``sample(B)`` returns a dict of tensors (B pairs):
        ``view1``, ``view2``: (B, 1, z, y, x) float32 augmented intensities;
        ``valid1``, ``valid2``: (B, 1, z, y, x) bool, voxel inside the scan;
        ``affine1``, ``affine2``: (B, 4, 4) float64 view index (x, y, z) -> world mm;
        ``scan_to_index``: (B, 4, 4) float64 world mm -> scan index; ``scan_size``: (B, 3) scan size (x, y, z);
        ``scan_id``: (B,) int64 index into ``scans``;
        and for every grid ``g`` of ``part_grids`` (key ``k = grid_key(g)``, G = gx * gy * gz parts of view 1,
        ordered as :func:`split_grid` orders them): ``k`` (B, G, 1, z', y', x') float32 intensities, each part
        augmented on its own, ``k + "_valid"`` (B, G, 1, z', y', x') bool and ``k + "_affine"`` (B, G, 4, 4).

    Without ``part_grids`` and with ``thick_slice_prob`` 0 the random streams are those of the plain SAM sampler.
    """

    scans: list[Scan]
    config: CropConfig
    seed: int = 0
    augment: bool = True
    part_grids: tuple[tuple[int, int, int], ...] = ()
    rng: np.random.Generator = field(init=False)
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        if not self.scans:
            raise InputError("no training scans")
        self.part_grids = tuple(tuple(int(g) for g in grid) for grid in self.part_grids)
        self.rng = np.random.default_rng(self.seed)
        self.generator = torch.Generator().manual_seed(int(self.seed))

    def _draw(self, scan: Scan, geom: ViewGeometry) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample (thick slices with ``thick_slice_prob``) and augment one view: values, valid (1, 1, z, y, x)."""
        thickness, phase = None, 0.0
        if self.augment and self.config.thick_slice_prob > 0 and self.rng.uniform() < self.config.thick_slice_prob:
            thickness, phase = float(self.rng.uniform(*self.config.thick_slice_mm)), float(self.rng.uniform())
        values, valid = sample_view(scan, geom, thickness, phase)
        if self.augment:
            values = augment_intensity(values, self.config, self.config.base_spacing_mm * geom.scale, self.generator)
        return values, valid

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        n = len(self.scans)
        ids = self.rng.choice(n, size=batch_size, replace=batch_size > n)
        parts: dict[str, list] = {}
        for scan_id in ids:
            scan = self.scans[int(scan_id)]
            geoms = sample_view_pair(scan, self.config, self.rng)
            for v, geom in enumerate(geoms, start=1):
                values, valid = self._draw(scan, geom)
                parts.setdefault(f"view{v}", []).append(values)
                parts.setdefault(f"valid{v}", []).append(valid)
                parts.setdefault(f"affine{v}", []).append(torch.from_numpy(geom.index_to_world)[None])
            parts.setdefault("scan_to_index", []).append(torch.from_numpy(scan.world_to_index)[None])
            parts.setdefault("scan_size", []).append(torch.tensor([scan.size_xyz], dtype=torch.int64))
            parts.setdefault("scan_id", []).append(torch.tensor([int(scan_id)], dtype=torch.int64))
            for grid in self.part_grids:
                key = grid_key(grid)
                drawn = [self._draw(scan, sub) for sub in split_grid(geoms[0], grid)]
                parts.setdefault(key, []).append(torch.cat([d[0] for d in drawn])[None])
                parts.setdefault(key + "_valid", []).append(torch.cat([d[1] for d in drawn])[None])
                affines = np.stack([sub.index_to_world for sub in split_grid(geoms[0], grid)])
                parts.setdefault(key + "_affine", []).append(torch.from_numpy(affines)[None])
        return {k: torch.cat(v) for k, v in parts.items()}

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.generator.set_state(state["generator"])
