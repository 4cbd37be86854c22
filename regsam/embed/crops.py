"""Two-view crop geometry for SAM training.

A *view* is an affine sampling grid of a scan: view voxel ``v = (i, j, k)`` (x, y, z order, as
SimpleITK indexes) sits at world point ``A_view @ [v, 1]`` (mm, LPS), with
``A_view = [R * diag(spacing_view) | origin_view]``. Both views of a pair are sampled from the same
scan with :func:`torch.nn.functional.grid_sample`, each with its own random rescale (its spacing is
``base_spacing_mm * s``, ``s ~ U(scale_range)``) and position, so a world point ``p`` lies at view
index ``A_1^-1 p`` in view 1 and ``A_2^-1 p`` in view 2: positives are exact by construction.

Tensors follow torch's (B, C, D, H, W) = (B, C, z, y, x) layout; all index triples and affines are
(x, y, z). Everything geometric is float64 numpy; only the final grids are cast to float32.
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

from regsam.embed.preprocess import HU_WINDOW, normalize_hu, resample_standard
from regsam.errors import InputError
from regsam.io.images import read_image


# ------------------------------------------------------------------ affine helpers
def grid_affine(origin: Sequence[float], spacing: Sequence[float], direction: Sequence[float]) -> np.ndarray:
    """4x4 float64 matrix mapping a voxel index (x, y, z) to world mm: ``origin + D diag(spacing) index``."""
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(direction, dtype=np.float64).reshape(3, 3) @ np.diag(np.asarray(spacing, dtype=np.float64))
    affine[:3, 3] = np.asarray(origin, dtype=np.float64)
    return affine


def image_affine(image: sitk.Image) -> np.ndarray:
    """Index (x, y, z) -> world mm affine of a SimpleITK image (same as ``TransformContinuousIndexToPhysicalPoint``)."""
    return grid_affine(image.GetOrigin(), image.GetSpacing(), image.GetDirection())


def apply_affine(affine: np.ndarray | torch.Tensor, points):
    """Apply a 4x4 affine to (..., 3) points (numpy or torch, any leading shape)."""
    if isinstance(points, torch.Tensor):
        a = torch.as_tensor(affine, dtype=points.dtype, device=points.device)
        return points @ a[:3, :3].T + a[:3, 3]
    a = np.asarray(affine, dtype=np.float64)
    return np.asarray(points, dtype=np.float64) @ a[:3, :3].T + a[:3, 3]


def scale_affine(affine: np.ndarray, factor: float) -> np.ndarray:
    """Affine of a level ``factor`` times coarser (level voxel ``i`` = voxel ``factor * i``)."""
    out = np.array(affine, dtype=np.float64, copy=True)
    out[:3, :3] *= float(factor)
    return out


def normalized_grid(index: torch.Tensor, size_xyz: Sequence[int]) -> torch.Tensor:
    """Continuous voxel indices (..., 3) (x, y, z) -> grid_sample coordinates in [-1, 1] (``align_corners=True``)."""
    size = torch.as_tensor([max(int(s) - 1, 1) for s in size_xyz], dtype=index.dtype, device=index.device)
    return 2.0 * index / size - 1.0


def voxel_centres(size_xyz: Sequence[int], dtype=torch.float64, device=None) -> torch.Tensor:
    """All voxel indices of a grid as a (z, y, x, 3) tensor holding (x, y, z) triples."""
    nx, ny, nz = (int(s) for s in size_xyz)
    z, y, x = torch.meshgrid(
        torch.arange(nz, dtype=dtype, device=device),
        torch.arange(ny, dtype=dtype, device=device),
        torch.arange(nx, dtype=dtype, device=device),
        indexing="ij",
    )
    return torch.stack((x, y, z), dim=-1)


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
    #: random rotation of each view about its centre (degrees, per axis); SAM: 0 (none)
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
    if max_deg <= 0:
        return np.eye(3)
    ax, ay, az = np.deg2rad(rng.uniform(-max_deg, max_deg, size=3))
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


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


def sample_view(scan: Scan, view: ViewGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample ``scan`` on ``view``: intensities (1, 1, z, y, x) (air, -1, outside the scan) and a bool mask
    (1, 1, z, y, x) of voxels inside the scan."""
    grid = view_sampling_grid(view, scan)
    # sample (volume + 1) with zero padding so that outside the scan reads as air (-1)
    values = F.grid_sample(scan.volume + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=True) - 1.0
    valid = (grid.abs() <= 1.0 + 1e-6).all(dim=-1)[:, None]
    return values, valid


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
        ``scan_id``: (B,) int64 index into ``scans``.
    """

    scans: list[Scan]
    config: CropConfig
    seed: int = 0
    augment: bool = True
    rng: np.random.Generator = field(init=False)
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        if not self.scans:
            raise InputError("no training scans")
        self.rng = np.random.default_rng(self.seed)
        self.generator = torch.Generator().manual_seed(int(self.seed))

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        n = len(self.scans)
        ids = self.rng.choice(n, size=batch_size, replace=batch_size > n)
        keys = ("view1", "view2", "valid1", "valid2", "affine1", "affine2", "scan_to_index", "scan_size", "scan_id")
        parts: dict[str, list] = {k: [] for k in keys}
        for scan_id in ids:
            scan = self.scans[int(scan_id)]
            geoms = sample_view_pair(scan, self.config, self.rng)
            for v, geom in enumerate(geoms, start=1):
                values, valid = sample_view(scan, geom)
                if self.augment:
                    values = augment_intensity(values, self.config, self.config.base_spacing_mm * geom.scale, self.generator)
                parts[f"view{v}"].append(values)
                parts[f"valid{v}"].append(valid)
                parts[f"affine{v}"].append(torch.from_numpy(geom.index_to_world)[None])
            parts["scan_to_index"].append(torch.from_numpy(scan.world_to_index)[None])
            parts["scan_size"].append(torch.tensor([scan.size_xyz], dtype=torch.int64))
            parts["scan_id"].append(torch.tensor([int(scan_id)], dtype=torch.int64))
        return {k: torch.cat(v) for k, v in parts.items()}

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.generator.set_state(state["generator"])
