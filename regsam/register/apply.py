"""Applying a registration result: ``regsam warp`` and ``regsam transform-points``.

A transform is given as a registration output folder (``disp.nii.gz`` inside),
a displacement field file, or an ITK linear transform file (``.tfm``/``.txt``/``.h5``/``.mat``).
All of them map FIXED points to MOVING points, so images in moving space are
pulled onto the fixed grid and fixed-space points are pushed into moving space.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from regsam.errors import InputError
from regsam.io.geometry import grid_of
from regsam.io.images import AIR_HU, read_image, write_image
from regsam.io.landmarks import read_points, write_points
from regsam.io.transforms import map_points, read_affine, read_displacement_field, warp_image

DISP_FILE = "disp.nii.gz"
_AFFINE_SUFFIXES = (".tfm", ".txt", ".h5", ".hdf5", ".mat")


def load_transform(path: str | os.PathLike) -> sitk.Image | sitk.Transform:
    """A displacement field (from a result folder or field file) or a linear transform, fixed -> moving."""
    path = Path(path)
    if path.is_dir():
        if not (path / DISP_FILE).is_file():
            raise InputError(f"{path}: not a registration result folder (no {DISP_FILE})")
        return read_displacement_field(path / DISP_FILE)
    if not path.exists():
        raise InputError(f"transform not found: {path}")
    if path.name.lower().endswith(_AFFINE_SUFFIXES):
        return read_affine(path)
    return read_displacement_field(path)


def _reference_grid(transform: sitk.Image | sitk.Transform, reference: str | os.PathLike | None) -> sitk.Image:
    if reference is not None:
        return read_image(reference, name=f"reference image {reference}")
    if isinstance(transform, sitk.Image):
        return grid_of(transform)
    raise InputError("a linear transform carries no grid: give --reference (the fixed image)")


def warp_file(
    image: str | os.PathLike,
    transform: str | os.PathLike,
    out: str | os.PathLike,
    interpolator: str = "linear",
    reference: str | os.PathLike | None = None,
) -> Path:
    """Warp a moving-space image onto the fixed grid and write it (atomically).

    Args:
        interpolator: ``"linear"`` for intensities, ``"nearest"`` for labels and masks, or ``"bspline"``.
        reference: fixed image giving the output grid; default the displacement field's grid.
    """
    moving = read_image(image, name=f"image {image}")
    tx = load_transform(transform)
    grid = _reference_grid(tx, reference)
    is_label = interpolator == "nearest"
    default = 0.0 if is_label else AIR_HU
    warped = warp_image(moving, grid, tx, interpolator=interpolator, default_value=default)
    if is_label:
        warped = sitk.Cast(warped, moving.GetPixelID())
    return write_image(warped, out)


def transform_points_file(
    points: str | os.PathLike,
    transform: str | os.PathLike,
    out: str | os.PathLike,
    reference: str | os.PathLike | None = None,
) -> Path:
    """Map fixed-space points to moving space (``x + u(x)``) and write them in the format of ``out``'s extension.

    Args:
        reference: image that voxel-index point files (DIR-Lab ``_xyz.txt``, elastix ``index``) refer to.
    """
    ref = read_image(reference, name=f"reference image {reference}") if reference else None
    fixed_pts = read_points(points, reference=ref)
    if len(fixed_pts) == 0:
        raise InputError(f"{points}: no points")
    moved = map_points(load_transform(transform), fixed_pts)
    return write_points(np.asarray(moved), out, reference=ref)
