"""The one place where a CT becomes network input (training and inference both go through here).

Steps: check the volume, reorient to LPS and resample to isotropic ``spacing_mm``
(:func:`regsam.io.images.standardize`), clip HU to a window and scale it to [-1, 1]
(:func:`normalize_hu`), pad at the high end of every axis to a multiple of the network stride with
the value of air.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
import torch

from regsam.errors import InputError
from regsam.io.geometry import empty_like_grid
from regsam.io.images import check_volume, standardize

#: HU window mapped to [-1, 1]; -1024 HU (air) -> -1, +1024 HU -> +1 (bone and contrast saturate)
HU_WINDOW: tuple[float, float] = (-1024.0, 1024.0)
#: default isotropic network spacing (SAM: 2 mm)
DEFAULT_SPACING_MM = 2.0


def normalize_hu(values: np.ndarray | torch.Tensor, window: Sequence[float] = HU_WINDOW):
    """Clip HU to ``window`` and scale linearly to [-1, 1]; works on numpy arrays and tensors of any shape."""
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise InputError(f"HU window must be increasing, got {tuple(window)}")
    centre, half = (lo + hi) / 2.0, (hi - lo) / 2.0
    if isinstance(values, torch.Tensor):
        return (values.float().clamp(lo, hi) - centre) / half
    return ((np.clip(values.astype(np.float32, copy=False), lo, hi) - centre) / half).astype(np.float32, copy=False)


def resample_standard(image: sitk.Image, spacing_mm: float = DEFAULT_SPACING_MM, name: str = "image") -> sitk.Image:
    """:func:`check_volume`, then LPS + isotropic ``spacing_mm`` resampling (float32, HU)."""
    check_volume(image, name)
    if not spacing_mm or spacing_mm <= 0:
        raise InputError(f"spacing_mm must be positive, got {spacing_mm}")
    return standardize(image, float(spacing_mm))


def preprocess(
    image: sitk.Image,
    spacing_mm: float = DEFAULT_SPACING_MM,
    stride: int = 16,
    min_size: int = 0,
    hu_window: Sequence[float] = HU_WINDOW,
    name: str = "image",
) -> tuple[torch.Tensor, sitk.Image]:
    """Turn a CT into a network input tensor and the grid it lives on.

    Args:
        image: 3D CT in HU, any orientation and spacing.
        spacing_mm: isotropic voxel size of the network input (mm).
        stride: pad every axis to a multiple of this (the network's :attr:`~SAMEmbedder.stride`).
        min_size: smallest accepted extent in voxels at ``spacing_mm`` (before padding) along every axis.
        hu_window: HU range mapped to [-1, 1].
        name: what to call the image in error messages.

    Returns:
        ``(tensor, geometry)``: tensor (1, 1, D, H, W) float32 in [-1, 1], D, H, W multiples of ``stride``;
        geometry a uint8 reference image with the tensor's grid (size (W, H, D), origin, spacing
        ``spacing_mm``, LPS direction). Voxel ``(i, j, k)`` (x, y, z) of the geometry is tensor element
        ``[0, 0, k, j, i]``. Padding (value -1, air) is added at the high end of each axis, so the geometry's
        origin is that of the resampled image. The un-padded size (x, y, z) is stored in the geometry's
        metadata (see :func:`valid_size`).

    Raises:
        InputError: not a 3D scalar volume, NaNs, or smaller than ``min_size`` voxels along an axis.
    """
    resampled = resample_standard(image, spacing_mm, name)
    size = np.array(resampled.GetSize())
    if min_size and (size < min_size).any():
        extent = size * float(spacing_mm)
        raise InputError(
            f"{name} is {' x '.join(f'{e:.0f}' for e in extent)} mm; the embedder needs at least "
            f"{min_size * spacing_mm:.0f} mm ({min_size} voxels at {spacing_mm:g} mm) along every axis"
        )
    array = normalize_hu(sitk.GetArrayViewFromImage(resampled), hu_window)  # (D, H, W)
    padded_shape = [int(-(-s // stride) * stride) for s in array.shape]
    tensor = torch.full([1, 1, *padded_shape], -1.0, dtype=torch.float32)
    tensor[0, 0, : array.shape[0], : array.shape[1], : array.shape[2]] = torch.from_numpy(np.ascontiguousarray(array))
    geometry = empty_like_grid(padded_shape[::-1], resampled.GetOrigin(), resampled.GetSpacing(), resampled.GetDirection())
    geometry.SetMetaData(VALID_SIZE_KEY, " ".join(str(int(s)) for s in size))
    return tensor, geometry


#: metadata key of a geometry image holding the un-padded size "x y z"
VALID_SIZE_KEY = "regsam_valid_size"


def valid_size(geometry: sitk.Image) -> tuple[int, int, int]:
    """The un-padded size (x, y, z) recorded by :func:`preprocess` (the full size if none was recorded)."""
    if geometry.HasMetaDataKey(VALID_SIZE_KEY):
        return tuple(int(v) for v in geometry.GetMetaData(VALID_SIZE_KEY).split())  # type: ignore[return-value]
    return tuple(int(v) for v in geometry.GetSize())  # type: ignore[return-value]
