"""The outcome of one registration, and its result folder.

Every method in :data:`regsam.register.api.METHODS` returns a
:class:`RegistrationResult`. Its ``displacement`` is a ``sitkVectorFloat64``
image on the FIXED grid: fixed point ``x`` (mm, world LPS) corresponds to moving
point ``x + u(x)``. This is the convention of elastix/transformix deformation
fields and of :class:`SimpleITK.DisplacementFieldTransform`, so
``sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(u))`` warps the
moving image onto the fixed grid.

A result folder (:meth:`RegistrationResult.save`) holds::

    disp.nii.gz      the displacement field (3 float components, mm, LPS)
    warped.nii.gz    the moving image warped onto the fixed grid (float32)
    affine.tfm       the affine (fixed -> moving) part, when the method has one
    summary.json     method, preset, timings, peak memory, Jacobian statistics, geometry, parameters
    <artifacts>      optional text files of the method (e.g. elastix/TransformParameters.1.txt)
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from regsam import __version__
from regsam.errors import InputError
from regsam.io.atomic import atomic_dir
from regsam.io.geometry import grid_of, world_to_index
from regsam.io.images import AIR_HU, write_nifti_gz
from regsam.io.landmarks import as_points
from regsam.io.transforms import (
    check_displacement_field,
    jacobian_summary,
    map_points,
    read_affine,
    read_displacement_field,
    warp_image,
)
from regsam.util import json_default, last_line

DISP_FILE = "disp.nii.gz"
WARPED_FILE = "warped.nii.gz"
AFFINE_FILE = "affine.tfm"
SUMMARY_FILE = "summary.json"

#: Point-mapping interpolation of the displacement field.
POINT_INTERPOLATIONS = ("linear", "cubic")


# ------------------------------------------------------------------ helpers
def sample_displacement_cubic(displacement: sitk.Image, points: np.ndarray) -> np.ndarray:
    """Displacement u (N, 3) at world points (N, 3) by cubic B-spline interpolation of the field.

    Points outside the grid take the value of the nearest border voxel (constant extrapolation).
    """
    from scipy.ndimage import map_coordinates

    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if len(pts) == 0:
        return np.zeros((0, 3))
    index = world_to_index(displacement, pts)  # continuous (x, y, z) indices
    coords = index[:, ::-1].T  # numpy arrays are (z, y, x)
    arr = sitk.GetArrayViewFromImage(displacement)  # (z, y, x, 3)
    return np.stack(
        [map_coordinates(np.asarray(arr[..., c], dtype=np.float64), coords, order=3, mode="nearest") for c in range(3)],
        axis=1,
    )


def linear_to_matrix(transform: sitk.Transform) -> np.ndarray:
    """4x4 homogeneous matrix (fixed mm -> moving mm) of a 3D linear SimpleITK transform."""
    origin = np.array(transform.TransformPoint((0.0, 0.0, 0.0)))
    out = np.eye(4)
    for axis in range(3):
        unit = [0.0, 0.0, 0.0]
        unit[axis] = 1.0
        out[:3, axis] = np.array(transform.TransformPoint(unit)) - origin
    out[:3, 3] = origin
    return out


def _image_info(image: sitk.Image) -> dict:
    return {
        "size": [int(s) for s in image.GetSize()],
        "spacing": [float(s) for s in image.GetSpacing()],
        "origin": [float(o) for o in image.GetOrigin()],
        "direction": [float(d) for d in image.GetDirection()],
    }


def peak_memory_mb() -> dict:
    """Peak resident memory (MB) of this process, of its waited-for children, and the larger (ru_maxrss)."""
    scale = 1.0 / 1024.0 if sys.platform != "darwin" else 1.0 / (1024.0 * 1024.0)  # kB on Linux, bytes on macOS
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
    return {"self": round(own, 1), "children": round(children, 1), "max": round(max(own, children), 1)}


# ------------------------------------------------------------------ the result
@dataclass
class RegistrationResult:
    """One registration of a moving image onto a fixed image.

    Attributes:
        displacement: ``sitkVectorFloat64`` field on the fixed grid, fixed x -> moving x + u(x), mm.
        warped: the moving image warped onto the fixed grid (float32).
        method: method name (a key of :data:`regsam.register.api.METHODS`).
        preset: the method's preset, if any.
        timings: seconds per stage, e.g. ``{"load": .., "affine": .., "bspline": .., "total": ..}``.
        affine: the affine (or rigid/translation) part fixed -> moving, when the method has one.
        extras: JSON-serialisable information specific to the method (written to summary.json).
        artifacts: text files written into the result folder by :meth:`save`, relative name -> content
            (elastix writes its TransformParameters files and logs here); not read back by :meth:`load`.
    """

    displacement: sitk.Image
    warped: sitk.Image
    method: str
    preset: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    affine: sitk.Transform | None = None
    extras: dict = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.displacement = check_displacement_field(self.displacement)

    # -------------------------------------------------------------- geometry
    @property
    def fixed_grid(self) -> sitk.Image:
        """An empty (uint8) image with the fixed grid's geometry."""
        return grid_of(self.displacement)

    def map_points(self, points: np.ndarray, interpolation: str = "linear") -> np.ndarray:
        """Map fixed points (N, 3, mm, LPS) to moving space, ``x + u(x)`` (N, 3, mm).

        Args:
            interpolation: ``"linear"`` (default; ``sitk.DisplacementFieldTransform``, the same as
                :func:`regsam.io.transforms.map_points` and the benchmark; zero displacement outside
                the fixed grid) or ``"cubic"`` (cubic B-spline interpolation of the field, closer to a
                smooth method's own transform between voxels; nearest border value outside the grid).
        """
        pts = as_points(points)
        if interpolation == "linear":
            return map_points(self.displacement, pts)
        if interpolation == "cubic":
            return pts + sample_displacement_cubic(self.displacement, pts)
        raise InputError(f"interpolation must be one of {', '.join(POINT_INTERPOLATIONS)}, got '{interpolation}'")

    def warp(self, image: sitk.Image, interpolator: str = "linear", default_value: float = AIR_HU) -> sitk.Image:
        """Warp an image in moving space onto the fixed grid.

        Args:
            interpolator: ``"linear"``, ``"nearest"`` (labels, masks) or ``"bspline"``.
            default_value: value outside the moving image (air by default; use 0 for masks).
        """
        return warp_image(image, self.fixed_grid, self.displacement, interpolator, default_value)

    def jacobian_stats(self, mask: sitk.Image | None = None) -> dict:
        """det J of x -> x + u(x): ``{"grid": {...}}`` over the fixed grid, plus ``"mask"`` within ``mask``."""
        out = {"grid": jacobian_summary(self.displacement)}
        if mask is not None:
            out["mask"] = jacobian_summary(self.displacement, mask)
        return out

    # -------------------------------------------------------------- folder
    def summary(self, fixed_mask: sitk.Image | None = None, summary_extra: dict | None = None) -> dict:
        """The content of summary.json (``summary_extra`` adds or replaces top-level keys)."""
        jac = self.jacobian_stats(fixed_mask)
        summary = {
            "method": self.method,
            "preset": self.preset,
            "timings": {k: round(float(v), 4) for k, v in self.timings.items()},
            "peak_memory_mb": peak_memory_mb(),
            **jac["grid"],
            "jacobian": jac,
            "fixed_grid": _image_info(self.displacement),
            "warped_pixel_type": self.warped.GetPixelIDTypeAsString(),
            "affine_matrix": linear_to_matrix(self.affine).tolist() if self.affine is not None else None,
            "files": {
                "displacement": DISP_FILE,
                "warped": WARPED_FILE,
                "affine": AFFINE_FILE if self.affine is not None else None,
                "artifacts": sorted(self.artifacts),
            },
            "extras": self.extras,
            "versions": {
                "regsam": __version__,
                "python": platform.python_version(),
                "simpleitk": sitk.Version_VersionString(),
            },
        }
        summary.update(summary_extra or {})
        return summary

    def save(
        self,
        out_dir: str | os.PathLike,
        summary_extra: dict | None = None,
        fixed_mask: sitk.Image | None = None,
    ) -> Path:
        """Write the result folder atomically (nothing appears at ``out_dir`` until every file is written).

        Args:
            summary_extra: extra top-level keys for summary.json (e.g. ``{"command": {...}}``).
            fixed_mask: optional mask (non-zero inside) on the fixed grid; adds det J statistics within it.

        Returns:
            ``out_dir`` as a Path. An existing folder is replaced.
        """
        out = Path(out_dir)
        text = json.dumps(self.summary(fixed_mask, summary_extra), indent=2, default=json_default) + "\n"
        with atomic_dir(out) as tmp:
            # float32 on disk halves the size; the field is read back as VectorFloat64.
            write_nifti_gz(sitk.Cast(self.displacement, sitk.sitkVectorFloat32), tmp / DISP_FILE)
            write_nifti_gz(sitk.Cast(self.warped, sitk.sitkFloat32), tmp / WARPED_FILE)
            if self.affine is not None:
                sitk.WriteTransform(self.affine, str(tmp / AFFINE_FILE))
            for name, content in self.artifacts.items():
                target = (tmp / name).resolve()
                if tmp.resolve() not in target.parents:
                    raise ValueError(f"artifact name leaves the result folder: {name}")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(content)
            (tmp / SUMMARY_FILE).write_text(text)
        return out

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> RegistrationResult:
        """Read a result folder written by :meth:`save` (artifacts stay on disk).

        Raises:
            InputError: missing folder or files, unreadable images, or an invalid summary.json.
        """
        root = Path(out_dir)
        if not root.is_dir():
            raise InputError(f"registration result folder not found: {root}")
        for name in (DISP_FILE, WARPED_FILE, SUMMARY_FILE):
            if not (root / name).is_file():
                raise InputError(f"{root}: not a registration result folder (missing {name})")
        try:
            summary = json.loads((root / SUMMARY_FILE).read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"{root / SUMMARY_FILE}: not valid JSON ({exc.msg})") from None
        if not isinstance(summary, dict) or "method" not in summary:
            raise InputError(f"{root / SUMMARY_FILE}: not a regsam summary (no 'method')")
        displacement = read_displacement_field(root / DISP_FILE)
        try:
            warped = sitk.ReadImage(str(root / WARPED_FILE))
        except RuntimeError as exc:
            reason = last_line(exc, "unknown error", 160)
            raise InputError(f"{root / WARPED_FILE}: cannot read image ({reason})") from None
        affine = read_affine(root / AFFINE_FILE) if (root / AFFINE_FILE).is_file() else None
        return cls(
            displacement=displacement,
            warped=warped,
            method=str(summary["method"]),
            preset=summary.get("preset"),
            timings={k: float(v) for k, v in summary.get("timings", {}).items()},
            affine=affine,
            extras=dict(summary.get("extras") or {}),
        )
