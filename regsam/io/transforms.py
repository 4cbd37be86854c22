"""Displacement fields, affine transforms, and applying them to points and images.

Convention (the same as elastix/transformix and ``sitk.DisplacementFieldTransform``):
a displacement field ``u`` is a 3D ``sitkVectorFloat64`` image with 3 components on
the FIXED image grid; it maps a fixed point ``x`` (mm, world LPS) to the moving
point ``x + u(x)``. Hence ``sitk.Resample(moving, fixed, T)`` warps the moving
image onto the fixed grid, and mapping fixed landmarks through ``T`` predicts the
moving landmarks. Outside the field's grid the displacement is zero (ITK behaviour).

NIfTI and vector fields (checked with SimpleITK 2.5 / ITK 5.4):

* SimpleITK/ITK write a vector image to ``.nii``/``.nii.gz`` with intent code 1007
  (``NIFTI_INTENT_VECTOR``) and store the LPS components unchanged; reading such a
  file back gives the same LPS vectors. So regsam's own ``.nii.gz`` fields are
  faithful for ITK, SimpleITK, elastix and ANTs. Tools that read raw NIfTI data and
  assume RAS vectors (nibabel-based code, FSL, NiftyReg, MONAI's NibabelReader)
  see x and y with flipped sign.
* ITK reads a file with intent 1006 (``NIFTI_INTENT_DISPLACEMENT_VECTOR``) as RAS
  vectors and negates x and y to give LPS. Such fields come from non-ITK tools.
* An image read from an intent-1006 file keeps ``intent_code=1006`` in its metadata,
  and ``sitk.WriteImage`` then fails ("RAS conversion requires pixel to be 3-component
  vector"). :func:`read_displacement_field` and :func:`write_displacement_field`
  therefore drop the image metadata; the written file is an ordinary intent-1007
  LPS field.
* NIfTI stores origin and direction as float32: geometry survives to ~1e-5 mm.
  ``.mha`` and ``.nrrd`` keep it to double precision.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
import SimpleITK as sitk

from regsam.errors import InputError
from regsam.io.atomic import atomic_path
from regsam.io.geometry import direction_matrix
from regsam.io.images import AIR_HU, same_grid
from regsam.io.landmarks import as_points
from regsam.util import last_line

#: A spatial mapping fixed -> moving: any SimpleITK transform, or a displacement field image.
TransformLike = Union[sitk.Transform, sitk.Image]

INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "bspline": sitk.sitkBSpline,
}
_TRANSFORM_SUFFIXES = (".tfm", ".txt", ".h5", ".hdf5", ".mat")
_UNSIGNED = {sitk.sitkUInt8, sitk.sitkUInt16, sitk.sitkUInt32, sitk.sitkUInt64}


# --- displacement fields -------------------------------------------------------------


def check_displacement_field(field: sitk.Image, name: str = "displacement field") -> sitk.Image:
    """Validate a displacement field and return a metadata-free ``sitkVectorFloat64`` copy.

    Raises:
        InputError: not a 3D image with 3 components per voxel, or NaN/infinite vectors.
    """
    _field_vectors(field, name)
    if field.GetPixelID() == sitk.sitkVectorFloat64:
        out = sitk.Image(field)  # a copy: callers may hand it to DisplacementFieldTransform, which empties it
    else:
        out = sitk.Cast(field, sitk.sitkVectorFloat64)
    for key in out.GetMetaDataKeys():
        out.EraseMetaData(key)
    return out


def _field_vectors(field: sitk.Image, name: str = "displacement field") -> np.ndarray:
    """The (z, y, x, 3) array view of a displacement field, once it is known to be a finite 3D 3-vector image."""
    if not isinstance(field, sitk.Image):
        raise InputError(f"{name}: expected a SimpleITK vector image, got {type(field).__name__}")
    if field.GetDimension() != 3:
        raise InputError(f"{name} is {field.GetDimension()}D; a 3D displacement field is required")
    if field.GetNumberOfComponentsPerPixel() != 3:
        raise InputError(
            f"{name} has {field.GetNumberOfComponentsPerPixel()} components per voxel; a displacement field needs 3"
        )
    vectors = sitk.GetArrayViewFromImage(field)
    if np.issubdtype(vectors.dtype, np.floating) and not np.isfinite(vectors).all():
        raise InputError(f"{name} contains NaN or infinite displacements")
    return vectors


def read_displacement_field(path: str | os.PathLike) -> sitk.Image:
    """Read a displacement field (``.nii.gz``, ``.mha``, ``.nrrd`` ...) as a 3D ``sitkVectorFloat64`` image (mm, LPS).

    Raises:
        InputError: missing or unreadable file, not a 3D 3-component field, or non-finite values.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"displacement field not found: {path}")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"{path}: cannot read displacement field ({last_line(exc, 'unknown error', 160)})") from None
    return check_displacement_field(image, str(path))


def write_displacement_field(field: sitk.Image, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write a displacement field atomically; the format follows the extension.

    Float32 fields stay float32, anything else is written as float64. NIfTI output
    holds LPS vectors with intent 1007, exactly what ``sitk.ReadImage`` returns (module docstring).
    """
    clean = check_displacement_field(field)
    if field.GetPixelID() == sitk.sitkVectorFloat32:
        clean = sitk.Cast(clean, sitk.sitkVectorFloat32)
    path = Path(path)
    with atomic_path(path) as tmp:
        try:
            sitk.WriteImage(clean, str(tmp), compress)
        except RuntimeError as exc:
            reason = last_line(exc, "unknown error", 160)
            raise InputError(f"{path}: cannot write displacement field ({reason})") from None
    return path


# --- affine (linear) transforms --------------------------------------------------------


def _check_linear(transform: sitk.Transform, name: str) -> sitk.Transform:
    if not isinstance(transform, sitk.Transform):
        raise InputError(f"{name}: expected a SimpleITK transform, got {type(transform).__name__}")
    if transform.GetDimension() != 3:
        raise InputError(f"{name}: {transform.GetDimension()}D transform; a 3D transform is required")
    if not transform.IsLinear():
        raise InputError(
            f"{name}: {transform.GetName()} is not linear; use a displacement field for non-linear transforms"
        )
    return transform


def _check_transform_suffix(path: Path) -> None:
    if path.suffix.lower() not in _TRANSFORM_SUFFIXES:
        raise InputError(f"{path}: unknown transform file type (expected one of {', '.join(_TRANSFORM_SUFFIXES)})")


def read_affine(path: str | os.PathLike) -> sitk.Transform:
    """Read a 3D linear ITK transform file (``.tfm``/``.txt``/``.h5``) as its concrete SimpleITK type.

    A composite holding a single transform is unwrapped. The transform maps fixed
    points to moving points (ITK convention), like a displacement field.

    Raises:
        InputError: missing/unreadable file (an elastix ``TransformParameters.txt`` is not an
            ITK transform file), or a transform that is not 3D and linear.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"transform file not found: {path}")
    _check_transform_suffix(path)
    try:
        transform = sitk.ReadTransform(str(path))
    except RuntimeError as exc:
        raise InputError(f"{path}: not an ITK transform file ({last_line(exc, 'unknown error', 160)})") from None
    transform = transform.Downcast()
    if isinstance(transform, sitk.CompositeTransform) and transform.GetNumberOfTransforms() == 1:
        transform = transform.GetNthTransform(0).Downcast()
    return _check_linear(transform, str(path))


def write_affine(transform: sitk.Transform, path: str | os.PathLike) -> Path:
    """Write a 3D linear transform atomically as an ITK transform file (``.tfm``/``.txt``/``.h5``)."""
    path = Path(path)
    _check_transform_suffix(path)
    _check_linear(transform, "transform")
    with atomic_path(path) as tmp:
        sitk.WriteTransform(transform, str(tmp))
    return path


# --- applying transforms -------------------------------------------------------------


def field_transform(field: sitk.Image) -> sitk.DisplacementFieldTransform:
    """A ``sitk.DisplacementFieldTransform`` (linear interpolation) for ``field``; ``field`` stays intact.

    The SimpleITK constructor takes over (empties) the image it is given, so it gets a copy.
    """
    return sitk.DisplacementFieldTransform(check_displacement_field(field))


def as_transform(transform: TransformLike) -> sitk.Transform:
    """A SimpleITK transform for a transform or a displacement field image (fixed -> moving)."""
    if isinstance(transform, sitk.Image):
        return field_transform(transform)
    if isinstance(transform, sitk.Transform):
        if transform.GetDimension() != 3:
            raise InputError(f"{transform.GetDimension()}D transform; a 3D transform is required")
        return transform
    raise InputError(f"expected a SimpleITK transform or displacement field image, got {type(transform).__name__}")


def transform_to_field(transform: TransformLike, reference: sitk.Image) -> sitk.Image:
    """Dense displacement field ``T(x) - x`` (mm) of ``transform`` on the grid of ``reference``.

    Returns:
        ``sitkVectorFloat64`` image with the size, origin, spacing and direction of ``reference``.
    """
    if not isinstance(reference, sitk.Image) or reference.GetDimension() != 3:
        raise InputError("reference must be a 3D SimpleITK image (its grid is used)")
    return sitk.TransformToDisplacementField(
        as_transform(transform),
        sitk.sitkVectorFloat64,
        reference.GetSize(),
        reference.GetOrigin(),
        reference.GetSpacing(),
        reference.GetDirection(),
    )


def map_points(transform: TransformLike, points: np.ndarray) -> np.ndarray:
    """Map mm world points (N, 3) through ``transform`` (fixed -> moving); returns (N, 3) float64 mm."""
    pts = as_points(points)
    t = as_transform(transform)
    return np.array([t.TransformPoint(p) for p in pts.tolist()], dtype=np.float64).reshape(-1, 3)


def warp_image(
    moving: sitk.Image,
    reference: sitk.Image,
    transform: TransformLike,
    interpolator: str = "linear",
    default_value: float | None = None,
) -> sitk.Image:
    """Resample ``moving`` onto the grid of ``reference``: ``out(x) = moving(T(x))``.

    Args:
        transform: fixed -> moving transform or displacement field on any grid.
        interpolator: ``linear``, ``nearest`` (labels, masks) or ``bspline`` (cubic).
        default_value: value outside ``moving``; ``None`` means air (-1024 HU) for signed and
            float images and 0 for unsigned ones (masks).

    Returns:
        Image on the reference grid with the pixel type of ``moving``.
    """
    if interpolator not in INTERPOLATORS:
        raise InputError(f"unknown interpolator {interpolator!r} (expected one of {', '.join(INTERPOLATORS)})")
    for image, label in ((moving, "moving image"), (reference, "reference image")):
        if not isinstance(image, sitk.Image) or image.GetDimension() != 3:
            raise InputError(f"{label} must be a 3D SimpleITK image")
    if default_value is None:
        default_value = 0.0 if moving.GetPixelID() in _UNSIGNED else AIR_HU
    return sitk.Resample(
        moving,
        reference,
        as_transform(transform),
        INTERPOLATORS[interpolator],
        float(default_value),
        moving.GetPixelID(),
    )


def compose_fields(first: sitk.Image, second: TransformLike) -> sitk.Image:
    """Compose two mappings into one displacement field on ``first``'s grid.

    With ``first`` = u1 and ``second`` = T2 (a transform or a field u2), the result is

        u(x) = u1(x) + [T2(x + u1(x)) - (x + u1(x))]      (= u1(x) + u2(x + u1(x)) for a field),

    i.e. a point ``x`` goes through ``first`` and the result through ``second``:
    ``x -> T2(x + u1(x))``. If ``first`` maps A -> B and ``second`` maps B -> C, the
    result maps A -> C, and warping a C image with it equals warping it by ``second``
    onto B and then that by ``first`` onto A. Where ``x + u1(x)`` leaves the grid
    of a field ``second``, u2 counts as zero.
    """
    t1 = field_transform(first)
    # CompositeTransform applies its transforms last-to-first, so t1 acts first.
    composite = sitk.CompositeTransform([as_transform(second), t1])
    return transform_to_field(composite, first)


# --- Jacobian ---------------------------------------------------------------------------


#: Voxels per slab of the Jacobian computation; bounds its memory to ~200 MB.
_JACOBIAN_SLAB_VOXELS = 1_000_000


def jacobian_determinant(field: sitk.Image) -> sitk.Image:
    """det(I + du/dx) per voxel (``sitkFloat64`` on the field's grid); <= 0 where the mapping folds.

    Central differences inside, one-sided differences on the outer faces, so an affine
    field gives its exact determinant everywhere. ``sitk.DisplacementFieldJacobianDeterminant``
    is not used: it ignores the image direction (a field scaling x by 2 on a 90-degree
    rotated grid reads det 1) and halves derivatives on the outer faces (zero-flux boundary).
    Derivatives are taken slab by slab in the field's own float type (a 17 M-voxel float64 field in about a second).
    """
    vectors = _field_vectors(field)
    if not np.issubdtype(vectors.dtype, np.floating):
        vectors = vectors.astype(np.float64)
    if min(field.GetSize()) < 2:
        raise InputError(f"displacement field of size {field.GetSize()}: the Jacobian needs at least 2 voxels per axis")
    direction = direction_matrix(field).astype(vectors.dtype)
    rotated = not np.array_equal(direction, np.eye(3))
    spacing_zyx = field.GetSpacing()[::-1]
    det = np.empty(vectors.shape[:3], dtype=np.float64)
    depth = vectors.shape[0]
    step = max(1, _JACOBIAN_SLAB_VOXELS // (vectors.shape[1] * vectors.shape[2]))
    for z0 in range(0, depth, step):
        z1 = min(depth, z0 + step)
        # One halo slice each side keeps central differences at slab joins.
        lo, hi = max(0, z0 - 1), min(depth, z1 + 1)
        # Row vectors u^T D = (D^T u)^T: displacements along the voxel axes. det(I + D^T G) = det(I + G D^T).
        local = vectors[lo:hi] @ direction if rotated else vectors[lo:hi]
        slab = _det_of_slab(local, spacing_zyx)
        det[z0:z1] = slab[z0 - lo : z0 - lo + (z1 - z0)]
    out = sitk.GetImageFromArray(det)
    out.CopyInformation(field)
    return out


def _det_of_slab(local: np.ndarray, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    """det(I + dv/dxi) of a (z, y, x, 3) array of voxel-axis displacements (mm); spacing (z, y, x) mm; >= 2 voxels."""
    # j[c][k] = d v_c / d xi_k (+1 on the diagonal); np.gradient returns the z, y, x derivatives.
    j = []
    for c in range(3):
        d_dz, d_dy, d_dx = np.gradient(local[..., c], *spacing_zyx, edge_order=1)
        row = [d_dx, d_dy, d_dz]
        row[c] += 1.0
        j.append(row)
    # Explicit cofactor expansion: several times faster than np.linalg.det on (..., 3, 3).
    return (
        j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
        - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
        + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
    )


def mask_on_grid(mask: sitk.Image, grid: sitk.Image) -> np.ndarray:
    """Boolean (z, y, x) array of ``mask != 0`` on ``grid``; a mask on another grid is resampled (nearest)."""
    if not isinstance(mask, sitk.Image) or mask.GetDimension() != 3 or mask.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("mask must be a 3D scalar SimpleITK image")
    if not same_grid(mask, grid):
        mask = sitk.Resample(mask, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0, mask.GetPixelID())
    inside = sitk.GetArrayFromImage(mask) != 0
    if not inside.any():
        raise InputError("mask is empty on the displacement field's grid")
    return inside


def folding_share(field: sitk.Image, mask: sitk.Image | None = None) -> float:
    """Share (0-1) of voxels, inside ``mask`` if given, whose Jacobian determinant is <= 0."""
    det = sitk.GetArrayFromImage(jacobian_determinant(field))
    values = det[mask_on_grid(mask, field)] if mask is not None else det.ravel()
    return float(np.mean(values <= 0))


def jacobian_summary(field: sitk.Image, mask: sitk.Image | None = None) -> dict:
    """Jacobian-determinant statistics of a displacement field, inside ``mask`` (non-zero) if given.

    A mask on another grid is resampled onto the field's grid (nearest neighbour).

    Returns:
        floats ``folding_share`` (0-1 share of voxels with det <= 0), ``jac_min``, ``jac_max``,
        ``jac_mean``, ``jac_std`` (population SD).
    """
    det = sitk.GetArrayFromImage(jacobian_determinant(field))
    values = det[mask_on_grid(mask, field)] if mask is not None else det.ravel()
    return {
        "folding_share": float(np.mean(values <= 0)),
        "jac_min": float(values.min()),
        "jac_max": float(values.max()),
        "jac_mean": float(values.mean()),
        "jac_std": float(values.std()),
    }
