"""Image grids: empty grid images, index <-> world conversion, anti-aliasing before coarser sampling.

A grid is a SimpleITK image's geometry: size (x, y, z voxels), origin (mm, world LPS), spacing (mm) and
direction (3x3, columns = world directions of the index axes x, y, z). The world point of the continuous
index ``i`` (x, y, z) is ``origin + direction @ (spacing * i)``, as ``TransformContinuousIndexToPhysicalPoint``
computes it, here for many points at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk


def direction_matrix(image: sitk.Image) -> np.ndarray:
    """3x3 direction matrix (columns = world directions of the index axes x, y, z)."""
    return np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)


def empty_like_grid(size_xyz: Sequence[int], origin, spacing, direction) -> sitk.Image:
    """A uint8 image carrying only a grid (size x, y, z; origin/spacing mm; direction, 3x3 or 9 values)."""
    ref = sitk.Image([int(s) for s in size_xyz], sitk.sitkUInt8)
    ref.SetOrigin([float(v) for v in origin])
    ref.SetSpacing([float(v) for v in spacing])
    ref.SetDirection([float(v) for v in np.asarray(direction, dtype=np.float64).ravel()])
    return ref


def grid_of(image: sitk.Image) -> sitk.Image:
    """An empty uint8 image with ``image``'s grid (size, origin, spacing, direction) and none of its voxels."""
    ref = sitk.Image([int(s) for s in image.GetSize()], sitk.sitkUInt8)
    ref.CopyInformation(image)
    return ref


def index_to_world(image: sitk.Image, index_xyz: np.ndarray) -> np.ndarray:
    """Continuous indices (..., 3), x, y, z order -> world points (..., 3) mm."""
    index = np.asarray(index_xyz, dtype=np.float64)
    return np.asarray(image.GetOrigin()) + (index * np.asarray(image.GetSpacing())) @ direction_matrix(image).T


def world_to_index(image: sitk.Image, points_mm: np.ndarray) -> np.ndarray:
    """World points (..., 3) mm -> continuous indices (..., 3), x, y, z order (inverse of :func:`index_to_world`)."""
    points = np.asarray(points_mm, dtype=np.float64)
    inverse = np.linalg.inv(direction_matrix(image))
    return ((points - np.asarray(image.GetOrigin())) @ inverse.T) / np.asarray(image.GetSpacing())


def voxel_world_points(grid: sitk.Image) -> np.ndarray:
    """World coordinates (mm) of every voxel centre, shape (D, H, W, 3) in x, y, z order."""
    nx, ny, nz = grid.GetSize()
    kk, jj, ii = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    return index_to_world(grid, np.stack([ii, jj, kk], axis=-1))


def seen_box(
    image: sitk.Image, grid: sitk.Image, transform: sitk.Transform, margin_vox
) -> tuple[np.ndarray, np.ndarray]:
    """The index box ``(lo, hi)`` (x, y, z, inclusive ints) of ``image`` that the voxels of ``grid`` map into through
    a linear ``transform`` (grid -> image; the grid's 8 corners mapped), widened by ``margin_vox`` (voxels of
    ``image``, one value or x, y, z) and clipped to ``image``."""
    size = np.array(grid.GetSize())
    corners = [grid.TransformIndexToPhysicalPoint([int(a), int(b), int(c)])
               for a in (0, size[0] - 1) for b in (0, size[1] - 1) for c in (0, size[2] - 1)]
    index = np.array([image.TransformPhysicalPointToContinuousIndex(transform.TransformPoint(p)) for p in corners])
    top = np.array(image.GetSize()) - 1
    lo = np.clip(np.floor(index.min(axis=0) - margin_vox), 0, top).astype(int)
    hi = np.clip(np.ceil(index.max(axis=0) + margin_vox), 0, top).astype(int)
    return lo, hi


def bin_shrink(image: sitk.Image, spacing) -> sitk.Image:
    """Average whole blocks of voxels up to ``spacing`` (x, y, z mm): a cheap first step of anti-aliasing a
    sub-millimetre CT (a 0.7 mm full thorax: ~0.3 s instead of seconds of Gaussian smoothing at full resolution)."""
    factors = [max(1, int(target // own)) for target, own in zip(spacing, image.GetSpacing())]
    return sitk.BinShrink(image, factors) if max(factors) > 1 else image


def antialias(image: sitk.Image, spacing: np.ndarray) -> sitk.Image:
    """Gaussian pre-smoothing (mm) before sampling ``image`` at a coarser ``spacing`` (x, y, z mm)."""
    own = np.array(image.GetSpacing())
    sigma = 0.5 * np.sqrt(np.maximum(spacing**2 - own**2, 0.0))
    if np.all(sigma < 0.3 * own):
        return image
    return sitk.SmoothingRecursiveGaussian(image, [float(max(s, 1e-3)) for s in sigma])
