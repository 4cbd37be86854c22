"""The regsam case format: one registration pair with its ground truth.

A case is a folder::

    fixed.nii.gz, moving.nii.gz        the image pair (any 3D CT)
    fixed_points.csv, moving_points.csv row i of one corresponds to row i of the other (x,y,z mm, world LPS)
    fixed_points_NAME.csv / moving_points_NAME.csv   optional extra point sets (e.g. ``body``)
    fixed_mask.nii.gz, moving_mask.nii.gz            optional masks (lungs or body, non-zero inside)
    gt_disp.nii.gz                     optional true displacement field on the fixed grid, mm, fixed -> moving
    meta.json                          free-form description (source, spacing, seed, ...)

Registration maps a fixed point ``x`` to its moving point ``x + u(x)``; TRE is
measured between the mapped fixed points and ``moving_points.csv``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from regsam.errors import InputError
from regsam.io.atomic import atomic_dir
from regsam.io.images import read_image
from regsam.io.landmarks import read_points_csv, write_points_csv
from regsam.io.transforms import write_displacement_field

DEFAULT_POINT_SET = "points"


@dataclass
class Case:
    """A case folder, validated. Paths are absolute; point sets map name -> (fixed, moving) arrays (N, 3)."""

    path: Path
    fixed: Path
    moving: Path
    point_sets: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    fixed_mask: Path | None = None
    moving_mask: Path | None = None
    gt_disp: Path | None = None
    meta: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name


def _point_set_name(file_name: str) -> str | None:
    if not (file_name.startswith("fixed_points") and file_name.endswith(".csv")):
        return None
    stem = file_name[len("fixed_points") : -len(".csv")]
    if stem == "":
        return DEFAULT_POINT_SET
    return stem[1:] if stem.startswith("_") else None


def load_case(path: str | os.PathLike) -> Case:
    """Open and validate a case folder.

    Raises:
        InputError: missing images, unpaired or unequal-length point files, unreadable meta.json.
    """
    root = Path(path).resolve()
    if not root.is_dir():
        raise InputError(f"case folder not found: {root}")
    for image_name in ("fixed.nii.gz", "moving.nii.gz"):
        if not (root / image_name).is_file():
            raise InputError(f"case {root.name}: missing {image_name}")
    point_sets: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for fixed_file in sorted(root.glob("fixed_points*.csv")):
        name = _point_set_name(fixed_file.name)
        if name is None:
            continue
        moving_file = root / fixed_file.name.replace("fixed_", "moving_", 1)
        if not moving_file.is_file():
            raise InputError(f"case {root.name}: {fixed_file.name} has no matching {moving_file.name}")
        fixed_pts, moving_pts = read_points_csv(fixed_file), read_points_csv(moving_file)
        if len(fixed_pts) != len(moving_pts):
            raise InputError(
                f"case {root.name}: {fixed_file.name} has {len(fixed_pts)} points "
                f"but {moving_file.name} has {len(moving_pts)}"
            )
        point_sets[name] = (fixed_pts, moving_pts)
    meta: dict = {}
    if (root / "meta.json").is_file():
        try:
            meta = json.loads((root / "meta.json").read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"case {root.name}: meta.json is not valid JSON ({exc.msg})") from None

    def optional(file_name: str) -> Path | None:
        return root / file_name if (root / file_name).is_file() else None

    return Case(
        path=root,
        fixed=root / "fixed.nii.gz",
        moving=root / "moving.nii.gz",
        point_sets=point_sets,
        fixed_mask=optional("fixed_mask.nii.gz"),
        moving_mask=optional("moving_mask.nii.gz"),
        gt_disp=optional("gt_disp.nii.gz"),
        meta=meta,
    )


def _write_image_or_copy(image: sitk.Image | str | os.PathLike, target: Path) -> None:
    if not isinstance(image, sitk.Image):
        if str(image).endswith(".nii.gz"):
            shutil.copyfile(image, target)
            return
        # Bytes of .mha/.nrrd/.nii or a DICOM folder copied under a .nii.gz name are unreadable: convert.
        image = read_image(image)
    sitk.WriteImage(image, str(target), True)


def write_case(
    out: str | os.PathLike,
    fixed: sitk.Image | str | os.PathLike,
    moving: sitk.Image | str | os.PathLike,
    fixed_points: np.ndarray | None = None,
    moving_points: np.ndarray | None = None,
    extra_point_sets: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    fixed_mask: sitk.Image | None = None,
    moving_mask: sitk.Image | None = None,
    gt_disp: sitk.Image | None = None,
    meta: dict | None = None,
) -> Case:
    """Write a complete case folder atomically (nothing appears at ``out`` until all files are written)."""
    sets: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if fixed_points is not None or moving_points is not None:
        if fixed_points is None or moving_points is None:
            raise InputError("write_case: fixed_points and moving_points must be given together")
        sets[DEFAULT_POINT_SET] = (fixed_points, moving_points)
    sets.update(extra_point_sets or {})
    for name, (f, m) in sets.items():
        if len(f) != len(m):
            raise InputError(f"point set '{name}': {len(f)} fixed points but {len(m)} moving points")
    with atomic_dir(out) as tmp:
        _write_image_or_copy(fixed, tmp / "fixed.nii.gz")
        _write_image_or_copy(moving, tmp / "moving.nii.gz")
        for name, (f, m) in sets.items():
            suffix = "" if name == DEFAULT_POINT_SET else f"_{name}"
            write_points_csv(f, tmp / f"fixed_points{suffix}.csv")
            write_points_csv(m, tmp / f"moving_points{suffix}.csv")
        for image, file_name in ((fixed_mask, "fixed_mask.nii.gz"), (moving_mask, "moving_mask.nii.gz")):
            if image is not None:
                sitk.WriteImage(sitk.Cast(image > 0, sitk.sitkUInt8), str(tmp / file_name), True)
        if gt_disp is not None:
            write_displacement_field(gt_disp, tmp / "gt_disp.nii.gz")
        (tmp / "meta.json").write_text(json.dumps(meta or {}, indent=2, default=str) + "\n")
    return load_case(out)
