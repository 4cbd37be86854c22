"""Landmark (point set) files.

In memory a point set is a float64 array of shape (N, 3): world coordinates in
mm, LPS, as SimpleITK reports them. The regsam exchange format is a CSV with
header ``x,y,z``.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from regsam.errors import InputError
from regsam.io.atomic import atomic_path


def _as_points(points: np.ndarray, name: str = "points") -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise InputError(f"{name}: expected an (N, 3) array of x,y,z, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise InputError(f"{name}: contains NaN or infinite coordinates")
    return arr


def read_points_csv(path: str | os.PathLike) -> np.ndarray:
    """Read a CSV with header ``x,y,z`` (mm, world LPS) into an (N, 3) array."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"landmark file not found: {path}")
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip().lower() for h in next(reader)]
        except StopIteration:
            raise InputError(f"{path}: empty landmark file") from None
        try:
            cols = [header.index(c) for c in ("x", "y", "z")]
        except ValueError:
            raise InputError(f"{path}: header must contain x,y,z, got {','.join(header)}") from None
        rows = []
        for line_no, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            try:
                rows.append([float(row[c]) for c in cols])
            except (ValueError, IndexError):
                raise InputError(f"{path}:{line_no}: not three numbers: {','.join(row)}") from None
    return _as_points(np.array(rows, dtype=np.float64).reshape(-1, 3), str(path))


def write_points_csv(points: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an (N, 3) array of mm world points as CSV with header ``x,y,z``."""
    arr = _as_points(points)
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            fh.write("x,y,z\n")
            for x, y, z in arr:
                fh.write(f"{x:.6f},{y:.6f},{z:.6f}\n")
    return path


def read_dirlab_xyz(path: str | os.PathLike, reference) -> np.ndarray:
    """Read a DIR-Lab ``_xyz.txt`` file (1-based voxel indices ``x y z`` per row) as mm world points.

    Args:
        reference: the image the indices refer to (a ``SimpleITK.Image``, its geometry is used),
            or a voxel spacing ``(sx, sy, sz)`` in mm, meaning origin 0 and identity direction
            (DIR-Lab's documented ``mm = (index - 1) * spacing``).
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise InputError(f"landmark file not found: {path}")
    try:
        index = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise InputError(f"{path}: not a DIR-Lab landmark file ({exc})") from None
    if index.ndim != 2 or index.shape[1] != 3:
        raise InputError(f"{path}: expected 3 columns (x y z voxel indices), got shape {index.shape}")
    zero_based = index - 1.0
    if isinstance(reference, sitk.Image):
        points = [reference.TransformContinuousIndexToPhysicalPoint(row.tolist()) for row in zero_based]
        return _as_points(np.array(points).reshape(-1, 3), str(path))
    spacing = np.asarray(reference, dtype=np.float64).reshape(3)
    return _as_points(zero_based * spacing, str(path))
