"""Voxel-grid affines: index (x, y, z) -> world mm (LPS) maps of SimpleITK grids and crops, and grid_sample coordinates.

Kept apart from :mod:`regsam.embed.crops` (training views, which import MONAI) so that matching and registration
read them without MONAI's import cost.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
import torch


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


__all__ = ["apply_affine", "grid_affine", "image_affine", "normalized_grid", "scale_affine", "voxel_centres"]
