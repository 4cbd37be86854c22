"""One entry point for every registration method.

:data:`METHODS` is a plain dict: method name -> function with the signature::

    fn(fixed: sitk.Image, moving: sitk.Image, *, preset: str | None,
       fixed_mask: sitk.Image | None, moving_mask: sitk.Image | None, **options) -> RegistrationResult

A new method is added by writing such a function and putting it in the dict
(``METHODS["sam"] = register_sam``), usually below in this module with a lazy import
of the method's module, so that importing ``regsam.register.api`` stays cheap
(itk-elastix alone takes ~20 s to load). Method functions receive images that
:func:`register` has already validated (3D scalar volumes, masks non-empty and on
their image's grid, fields of view overlapping); they return a
:class:`~regsam.register.result.RegistrationResult` whose displacement lies on the
fixed grid and maps fixed ``x`` to moving ``x + u(x)``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from regsam.errors import InputError
from regsam.io.images import check_volume, read_image, same_grid
from regsam.register.result import RegistrationResult

MethodFunction = Callable[..., RegistrationResult]


def _elastix(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    preset: str | None = None,
    fixed_mask: sitk.Image | None = None,
    moving_mask: sitk.Image | None = None,
    **options,
) -> RegistrationResult:
    """Elastix (itk-elastix), presets ``lung`` (default) and ``fast``; options: see ``register_elastix``."""
    from regsam.register.elastix import register_elastix

    return register_elastix(fixed, moving, preset=preset, fixed_mask=fixed_mask, moving_mask=moving_mask, **options)


#: Method name -> registration function (see the module docstring for the signature).
METHODS: dict[str, MethodFunction] = {
    "elastix": _elastix,
}


# ------------------------------------------------------------------ validation
def world_bounds(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned world bounding box (mm) of the image's voxels, including their half-voxel borders."""
    size = np.array(image.GetSize(), dtype=np.float64)
    corners = np.array(np.meshgrid(*[[-0.5, s - 0.5] for s in size], indexing="ij")).reshape(3, -1).T
    points = np.array([image.TransformContinuousIndexToPhysicalPoint(c.tolist()) for c in corners])
    return points.min(axis=0), points.max(axis=0)


def check_overlap(fixed: sitk.Image, moving: sitk.Image) -> None:
    """Raise :class:`InputError` unless the two images' world bounding boxes intersect."""
    f_lo, f_hi = world_bounds(fixed)
    m_lo, m_hi = world_bounds(moving)
    lo, hi = np.maximum(f_lo, m_lo), np.minimum(f_hi, m_hi)
    if np.any(hi <= lo):

        def box(a, b):
            return "[" + ", ".join(f"{x:.0f}..{y:.0f}" for x, y in zip(a, b)) + "]"

        raise InputError(
            f"fixed and moving fields of view do not overlap in world space (fixed {box(f_lo, f_hi)} mm, "
            f"moving {box(m_lo, m_hi)} mm); check the images' origins"
        )


def check_mask(mask: sitk.Image, image: sitk.Image, name: str) -> sitk.Image:
    """Validate a mask against its image: 3D scalar, same grid, at least one non-zero voxel."""
    if mask.GetDimension() != 3:
        raise InputError(f"{name} is {mask.GetDimension()}D; a 3D mask is required")
    if mask.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{name} has {mask.GetNumberOfComponentsPerPixel()} components per voxel; a scalar mask is required")
    if not same_grid(mask, image):
        raise InputError(
            f"{name} is not on its image's grid (mask size {mask.GetSize()}, spacing "
            f"{tuple(round(s, 4) for s in mask.GetSpacing())}; image size {image.GetSize()}, spacing "
            f"{tuple(round(s, 4) for s in image.GetSpacing())}, or origin/direction differ)"
        )
    if not np.any(sitk.GetArrayViewFromImage(mask)):
        raise InputError(f"{name} is empty (no non-zero voxel)")
    return mask


def _load(value, name: str) -> sitk.Image:
    if isinstance(value, sitk.Image):
        return check_volume(value, name)
    if isinstance(value, (str, os.PathLike)):
        return read_image(value, name=f"{name} {value}")
    raise InputError(f"{name}: expected a SimpleITK image or a file path, got {type(value).__name__}")


# ------------------------------------------------------------------ entry points
def register(
    fixed: sitk.Image | str | os.PathLike,
    moving: sitk.Image | str | os.PathLike,
    method: str = "elastix",
    preset: str | None = None,
    fixed_mask: sitk.Image | str | os.PathLike | None = None,
    moving_mask: sitk.Image | str | os.PathLike | None = None,
    **options,
) -> RegistrationResult:
    """Register ``moving`` onto ``fixed`` with ``method``; images and masks may be given as paths.

    Returns:
        The method's :class:`RegistrationResult`; its timings gain ``load`` (reading and
        validating inputs) and ``total`` (everything, this call included).

    Raises:
        InputError: unknown method, images that are not 3D scalar volumes, masks that are
            empty or not on their image's grid, or fields of view that do not overlap.
    """
    start = time.perf_counter()
    if method not in METHODS:
        raise InputError(f"unknown registration method '{method}' (known: {', '.join(sorted(METHODS))})")
    fixed_img = _load(fixed, "fixed image")
    moving_img = _load(moving, "moving image")
    fixed_mask_img = check_mask(_load(fixed_mask, "fixed mask"), fixed_img, "fixed mask") if fixed_mask is not None else None
    moving_mask_img = (
        check_mask(_load(moving_mask, "moving mask"), moving_img, "moving mask") if moving_mask is not None else None
    )
    check_overlap(fixed_img, moving_img)
    load_s = time.perf_counter() - start
    result = METHODS[method](
        fixed_img, moving_img, preset=preset, fixed_mask=fixed_mask_img, moving_mask=moving_mask_img, **options
    )
    if result.displacement.GetSize() != fixed_img.GetSize() or not np.allclose(
        result.displacement.GetOrigin(), fixed_img.GetOrigin(), atol=1e-3
    ):
        raise RuntimeError(f"method '{method}' returned a displacement field that is not on the fixed grid")
    timings = {"load": load_s}
    timings.update({k: v for k, v in result.timings.items() if k not in ("load", "total")})
    timings["total"] = time.perf_counter() - start
    result.timings = timings
    return result


def run_register_command(
    fixed_path: str | os.PathLike,
    moving_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    method: str = "elastix",
    preset: str | None = None,
    fixed_mask_path: str | os.PathLike | None = None,
    moving_mask_path: str | os.PathLike | None = None,
    options: Mapping | None = None,
) -> Path:
    """``regsam register``: read the inputs, register, write the result folder atomically; prints nothing.

    Returns:
        ``out_dir`` (disp.nii.gz, warped.nii.gz, affine.tfm if any, summary.json, method artifacts).
    """
    options = dict(options or {})
    fixed_mask = read_image(fixed_mask_path, name=f"fixed mask {fixed_mask_path}") if fixed_mask_path else None
    result = register(
        fixed_path, moving_path, method=method, preset=preset, fixed_mask=fixed_mask, moving_mask=moving_mask_path, **options
    )
    command = {
        "fixed": str(Path(fixed_path).resolve()),
        "moving": str(Path(moving_path).resolve()),
        "out": str(Path(out_dir).resolve()),
        "method": method,
        "preset": preset,
        "fixed_mask": str(Path(fixed_mask_path).resolve()) if fixed_mask_path else None,
        "moving_mask": str(Path(moving_mask_path).resolve()) if moving_mask_path else None,
        "options": options,
    }
    return result.save(out_dir, summary_extra={"command": command}, fixed_mask=fixed_mask)


def _convexadam(fixed: sitk.Image, moving: sitk.Image, **kwargs) -> RegistrationResult:
    """ConvexAdam (convexadam==0.2.0), presets ``lung`` (default), ``default``, ``fast``; see ``register_convexadam``."""
    from regsam.register.convexadam import register_convexadam

    return register_convexadam(fixed, moving, **kwargs)


METHODS["convexadam"] = _convexadam


def _sam(fixed: sitk.Image, moving: sitk.Image, **kwargs) -> RegistrationResult:
    """SAM embeddings: affine, coarse and deformable stages, presets ``fast`` (default) and ``accurate``; see ``register_sam``."""
    from regsam.register.sam import register_sam

    return register_sam(fixed, moving, **kwargs)


METHODS["sam"] = _sam


def _sam_elastix(fixed: sitk.Image, moving: sitk.Image, **kwargs) -> RegistrationResult:
    """SAM affine + SAM correspondences -> elastix B-spline, presets ``lung`` (default) and ``fast``; see ``register_sam_elastix``."""
    from regsam.register.sam_elastix import register_sam_elastix

    return register_sam_elastix(fixed, moving, **kwargs)


METHODS["sam+elastix"] = _sam_elastix
