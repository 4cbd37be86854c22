"""One entry point for every registration method.

:data:`METHODS` (from :mod:`regsam.register.methods`) is a plain dict: method name ->
:class:`~regsam.register.methods.MethodSpec`, whose ``run`` has the signature::

    run(fixed: sitk.Image, moving: sitk.Image, *, preset: str | None,
        fixed_mask: sitk.Image | None, moving_mask: sitk.Image | None, **options) -> RegistrationResult

A new method is added by writing such a function and registering a ``MethodSpec`` (its presets,
options and masks) in ``regsam/register/methods.py``. :func:`register` refuses a preset, option or
mask the method does not take (:class:`~regsam.errors.InputError`), and hands the method images it
has already validated (3D scalar volumes, masks non-empty and on their image's grid, fields of view
overlapping); the method returns a :class:`~regsam.register.result.RegistrationResult` whose
displacement lies on the fixed grid and maps fixed ``x`` to moving ``x + u(x)``. A method that
fails inside raises :class:`~regsam.register.methods.MethodFailure`, one line naming it and the cause.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from regsam.errors import InputError
from regsam.io.images import FLOAT_PIXEL_IDS, check_volume, read_image, replace_nonfinite, same_grid
from regsam.register.methods import DEFAULT_METHOD, METHODS, MethodFailure, MethodSpec, get_method, resolve_preset
from regsam.register.result import RegistrationResult

__all__ = ["METHODS", "MethodFailure", "MethodSpec", "register", "resolve_preset", "run_register_command"]


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
        raise InputError(
            f"{name} has {mask.GetNumberOfComponentsPerPixel()} components per voxel; a scalar mask is required"
        )
    if not same_grid(mask, image):
        raise InputError(
            f"{name} is not on its image's grid (mask size {mask.GetSize()}, spacing "
            f"{tuple(round(s, 4) for s in mask.GetSpacing())}; image size {image.GetSize()}, spacing "
            f"{tuple(round(s, 4) for s in image.GetSpacing())}, or origin/direction differ)"
        )
    if not np.any(sitk.GetArrayViewFromImage(mask)):
        raise InputError(f"{name} is empty (no non-zero voxel)")
    return mask


def _load(value: object, name: str, nan_value: float | None = None) -> sitk.Image:
    if isinstance(value, sitk.Image):
        scalar_float = value.GetPixelID() in FLOAT_PIXEL_IDS and value.GetDimension() == 3
        if nan_value is not None and scalar_float:
            value = replace_nonfinite(value, nan_value)
        return check_volume(value, name)
    if isinstance(value, (str, os.PathLike)):
        return read_image(value, name=f"{name} {value}", nan_value=nan_value)
    raise InputError(f"{name}: expected a SimpleITK image or a file path, got {type(value).__name__}")


def _cause(exc: BaseException) -> str:
    """One line saying why a method failed: ITK's ``Description:`` line, else the message's first line."""
    text = str(exc).strip()
    match = re.search(r"Description:\s*(.+)", text)
    line = match.group(1).strip() if match else next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if not isinstance(exc, RuntimeError) or not line:
        line = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return line[:300]


# ------------------------------------------------------------------ entry points
def register(
    fixed: sitk.Image | str | os.PathLike,
    moving: sitk.Image | str | os.PathLike,
    method: str = DEFAULT_METHOD,
    preset: str | None = None,
    fixed_mask: sitk.Image | str | os.PathLike | None = None,
    moving_mask: sitk.Image | str | os.PathLike | None = None,
    nan_value: float | None = None,
    **options: object,
) -> RegistrationResult:
    """Register ``moving`` onto ``fixed`` with ``method``; images and masks may be given as paths.

    Args:
        method: a key of :data:`METHODS`.
        preset: one of the method's presets (``METHODS[method].presets``; default its ``default_preset``).
        fixed_mask, moving_mask: masks (non-zero inside) on their image's grid; only those the method
            uses (``METHODS[method].uses_masks``) are accepted.
        nan_value: replace NaN/inf voxels of the images by this value (HU) instead of refusing them.
        options: the method's own options (``METHODS[method].options``; see its ``register_*`` function).

    Returns:
        The method's :class:`RegistrationResult`; its timings gain ``load`` (reading and
        validating inputs) and ``total`` (everything, this call included).

    Raises:
        InputError: unknown method or preset, an option or mask the method does not take, images
            that are not 3D scalar volumes or hold NaN/inf voxels, masks that are empty or not on
            their image's grid, or fields of view that do not overlap.
        MethodFailure: the method failed inside (one line: the method and the cause).
    """
    start = time.perf_counter()
    spec = get_method(method)
    spec.check_call(preset, options, {"fixed": fixed_mask, "moving": moving_mask})
    fixed_img = _load(fixed, "fixed image", nan_value)
    moving_img = _load(moving, "moving image", nan_value)
    fixed_mask_img = (
        check_mask(_load(fixed_mask, "fixed mask"), fixed_img, "fixed mask") if fixed_mask is not None else None
    )
    moving_mask_img = (
        check_mask(_load(moving_mask, "moving mask"), moving_img, "moving mask") if moving_mask is not None else None
    )
    check_overlap(fixed_img, moving_img)
    load_s = time.perf_counter() - start
    try:
        masks = {f"{which}_mask": image for which, image in (("fixed", fixed_mask_img), ("moving", moving_mask_img))
                 if which in spec.uses_masks}  # a method gets only the masks it uses
        result = spec.run(fixed_img, moving_img, preset=preset, **masks, **options)
    except (InputError, MethodFailure):
        raise
    except Exception as exc:  # noqa: BLE001 - any failure inside a method becomes one line naming it
        raise MethodFailure(f"method '{method}' failed: {_cause(exc)}") from exc
    if result.displacement.GetSize() != fixed_img.GetSize() or not np.allclose(
        result.displacement.GetOrigin(), fixed_img.GetOrigin(), atol=1e-3
    ):
        raise MethodFailure(f"method '{method}' returned a displacement field that is not on the fixed grid")
    timings = {"load": load_s}
    timings.update({k: v for k, v in result.timings.items() if k not in ("load", "total")})
    timings["total"] = time.perf_counter() - start
    result.timings = timings
    return result


def run_register_command(
    fixed_path: str | os.PathLike,
    moving_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    method: str = DEFAULT_METHOD,
    preset: str | None = None,
    fixed_mask_path: str | os.PathLike | None = None,
    moving_mask_path: str | os.PathLike | None = None,
    options: Mapping[str, object] | None = None,
    nan_value: float | None = None,
) -> Path:
    """``regsam register``: read the inputs, register, write the result folder atomically; prints nothing.

    Returns:
        ``out_dir`` (disp.nii.gz, warped.nii.gz, affine.tfm if any, summary.json, method artifacts).

    Raises:
        InputError: bad input (see :func:`register`); nothing is written.
        MethodFailure: the method failed inside; nothing is written.
    """
    options = dict(options or {})
    get_method(method).check_call(
        preset, options, {"fixed": fixed_mask_path or None, "moving": moving_mask_path or None}
    )
    fixed_mask = read_image(fixed_mask_path, name=f"fixed mask {fixed_mask_path}") if fixed_mask_path else None
    result = register(
        fixed_path, moving_path, method=method, preset=preset, fixed_mask=fixed_mask, moving_mask=moving_mask_path,
        nan_value=nan_value, **options,
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
        "nan_value": nan_value,
    }
    return result.save(out_dir, summary_extra={"command": command}, fixed_mask=fixed_mask)

