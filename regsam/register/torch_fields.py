"""The one place where SimpleITK geometry meets torch tensors.

Conventions
-----------
* A scalar image becomes a tensor ``(1, 1, D, H, W)`` whose array is
  ``sitk.GetArrayFromImage(image)``: tensor axis 2, 3, 4 = image index z, y, x.
* A displacement field (``sitkVectorFloat64`` on a grid; world LPS vectors in mm, fixed ``x`` ->
  moving ``x + u(x)``) has two tensor forms, both ``(1, 3, D, H, W)`` with channel ``k`` along tensor
  axis ``2 + k`` (i.e. channels are the grid's **z, y, x** index axes):

  - *local mm*: the displacement in mm projected on the grid axes (``D^T u``, reordered z, y, x);
  - *voxel ddf*: local mm divided by the grid spacing of each axis. This is what
    :class:`monai.networks.blocks.Warp` expects: ``Warp()(image, ddf)`` samples ``image`` at voxel
    ``i + ddf[:, :, i]`` with channel ``k`` displacing along tensor spatial axis ``k``
    (``align_corners=True``: voxel centres at integer indices). Checked by
    ``tests/register/test_deformable.py`` with a planted shift along each axis separately.

* Grids used for optimisation are *corner-aligned* with the fixed grid
  (:func:`corner_aligned_grid`): same origin, direction and first/last voxel centres, only the
  number of voxels (and hence the spacing) differs. Every fixed voxel centre therefore lies inside
  such a grid, fields interpolate onto the fixed grid without extrapolation, and a tensor moves
  between two of these grids with ``F.interpolate(..., mode="trilinear", align_corners=True)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from scipy import ndimage

from regsam.devices import DeviceLike
from regsam.errors import InputError
from regsam.io.geometry import direction_matrix, empty_like_grid, voxel_world_points
from regsam.io.transforms import TransformLike, check_displacement_field, transform_to_field


# ------------------------------------------------------------------ geometry
def corner_aligned_grid(
    reference: sitk.Image, spacing_mm: float | Sequence[float] | None = None, size_xyz: Sequence[int] | None = None
) -> sitk.Image:
    """A grid spanning the same first/last voxel centres as ``reference`` (empty uint8 image).

    Give either ``spacing_mm`` (target spacing, rounded so the extent is kept; at least 4 voxels per
    axis) or ``size_xyz`` (voxel counts, x, y, z). Origin and direction are ``reference``'s.
    """
    n_ref = np.array(reference.GetSize(), dtype=np.int64)
    h_ref = np.array(reference.GetSpacing(), dtype=np.float64)
    extent = (n_ref - 1) * h_ref
    if size_xyz is None:
        if spacing_mm is None:
            raise InputError("corner_aligned_grid needs spacing_mm or size_xyz")
        target = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
        if np.any(target <= 0):
            raise InputError(f"grid spacing must be positive, got {spacing_mm}")
        size = np.maximum(np.round(extent / target).astype(np.int64) + 1, np.minimum(n_ref, 4))
    else:
        size = np.asarray(size_xyz, dtype=np.int64)
        if size.shape != (3,) or np.any(size < 2):
            raise InputError(f"grid size must be 3 values >= 2, got {size_xyz}")
    spacing = np.where(size > 1, extent / np.maximum(size - 1, 1), h_ref)
    return empty_like_grid(size, reference.GetOrigin(), spacing, reference.GetDirection())


def pooled_geometry(reference: sitk.Image, shape_zyx: Sequence[int]) -> sitk.Image:
    """Grid of a (D, H, W) array that tiles ``reference``'s field of view in equal blocks (average pooling).

    Used for feature maps given without geometry: block ``k`` covers reference voxels
    ``[k * f, (k + 1) * f)`` with ``f = N / n`` per axis, its centre is the block's centre.
    """
    n_ref = np.array(reference.GetSize(), dtype=np.float64)
    n = np.array(list(shape_zyx)[::-1], dtype=np.float64)
    if n.shape != (3,) or np.any(n < 1):
        raise InputError(f"feature shape must be (D, H, W) with positive sizes, got {tuple(shape_zyx)}")
    factor = n_ref / n
    spacing = np.array(reference.GetSpacing()) * factor
    origin = np.array(reference.TransformContinuousIndexToPhysicalPoint(((factor - 1.0) / 2.0).tolist()))
    return empty_like_grid(n.astype(np.int64), origin, spacing, reference.GetDirection())


def grid_shape(grid: sitk.Image) -> tuple[int, int, int]:
    """(D, H, W) = (z, y, x) voxel counts of a grid."""
    return tuple(int(s) for s in grid.GetSize()[::-1])  # type: ignore[return-value]


def spacing_zyx(grid: sitk.Image, device: DeviceLike = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Grid spacing (mm) as a (1, 3, 1, 1, 1) tensor in channel order z, y, x."""
    return torch.tensor(grid.GetSpacing()[::-1], dtype=dtype, device=torch.device(device)).view(1, 3, 1, 1, 1)


def world_points(grid: sitk.Image) -> np.ndarray:
    """World coordinates (mm) of every voxel centre, shape (D, H, W, 3) in x, y, z (LPS) order."""
    return voxel_world_points(grid)


# ------------------------------------------------------------------ images
def image_to_tensor(image: sitk.Image, device: DeviceLike = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Scalar image -> tensor (1, 1, D, H, W) (array axes z, y, x)."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("image_to_tensor expects a scalar image")
    arr = sitk.GetArrayFromImage(image)
    return torch.from_numpy(np.ascontiguousarray(arr)).to(device=torch.device(device), dtype=dtype)[None, None]


# ------------------------------------------------------------------ fields
def field_to_local_mm(
    field: sitk.Image, device: DeviceLike = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """World displacement field -> (1, 3, D, H, W) mm along the grid's index axes, channels z, y, x."""
    clean = check_displacement_field(field)
    arr = sitk.GetArrayViewFromImage(clean)  # (d, h, w, 3) world x, y, z
    local = arr @ direction_matrix(clean)  # row vectors: u^T D = (D^T u)^T -> components along index x, y, z
    local = np.ascontiguousarray(local[..., ::-1].transpose(3, 0, 1, 2))  # channels z, y, x
    return torch.from_numpy(local).to(device=torch.device(device), dtype=dtype)[None]


def local_mm_to_field(local: torch.Tensor, reference: sitk.Image) -> sitk.Image:
    """(1, 3, D, H, W) mm along index axes (z, y, x channels) -> ``sitkVectorFloat64`` world field on ``reference``."""
    arr = local.detach().to("cpu", torch.float64).numpy().reshape((3,) + tuple(local.shape[-3:]))
    if arr.shape[1:] != grid_shape(reference):
        raise InputError(
            f"field tensor shape {arr.shape[1:]} does not match the reference grid {grid_shape(reference)}"
        )
    xyz = arr[::-1].transpose(1, 2, 3, 0)  # (d, h, w, 3) along index x, y, z
    world = xyz @ direction_matrix(reference).T
    out = sitk.GetImageFromArray(np.ascontiguousarray(world), isVector=True)
    out.CopyInformation(reference)
    return out


def field_to_ddf(field: sitk.Image, device: DeviceLike = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """World field (mm) -> MONAI Warp DDF (1, 3, D, H, W) in voxels of the field's own grid."""
    return field_to_local_mm(field, device, dtype) / spacing_zyx(field, device, dtype)


def ddf_to_field(ddf: torch.Tensor, reference: sitk.Image) -> sitk.Image:
    """MONAI Warp DDF (1, 3, D, H, W, voxels of ``reference``) -> world field (mm) on ``reference``."""
    return local_mm_to_field(ddf.detach() * spacing_zyx(reference, ddf.device, ddf.dtype), reference)


def transform_to_local_mm(
    transform: TransformLike | None, grid: sitk.Image, device: DeviceLike = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Displacement ``T(x) - x`` of any transform/field on ``grid`` as local mm (zeros for ``None``)."""
    if transform is None:
        return torch.zeros((1, 3) + grid_shape(grid), device=torch.device(device), dtype=dtype)
    return field_to_local_mm(transform_to_field(transform, grid), device, dtype)


def resize_local_mm(local: torch.Tensor, shape_zyx: Sequence[int]) -> torch.Tensor:
    """Move a local-mm field between two corner-aligned grids (trilinear, align_corners=True)."""
    if tuple(local.shape[-3:]) == tuple(shape_zyx):
        return local
    return F.interpolate(local, size=tuple(int(s) for s in shape_zyx), mode="trilinear", align_corners=True)


# ------------------------------------------------------------------ warping
def make_warp(mode: str = "bilinear", padding_mode: str = "border"):
    """``monai.networks.blocks.Warp`` (its 'using PyTorch native grid_sample' warning silenced)."""
    from monai.networks.blocks import Warp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Warp(mode=mode, padding_mode=padding_mode)


def make_dvf2ddf(num_steps: int = 7, padding_mode: str = "border"):
    """``monai.networks.blocks.DVF2DDF`` (scaling and squaring of a stationary velocity field, voxel units)."""
    from monai.networks.blocks import DVF2DDF

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DVF2DDF(num_steps=num_steps, mode="bilinear", padding_mode=padding_mode)


def sample_world(
    values: torch.Tensor,
    source: sitk.Image,
    target: sitk.Image,
    transform: TransformLike | None = None,
    padding_mode: str = "border",
) -> torch.Tensor:
    """Resample a tensor living on grid ``source`` onto grid ``target`` through world coordinates.

    ``out[:, k, j, i] = values at T(x_ijk)`` (trilinear), where ``x_ijk`` is a ``target`` voxel centre
    and ``T`` the optional fixed -> moving transform/field (identity when ``None``).

    Args:
        values: (C, D, H, W) or (1, C, D, H, W) with (D, H, W) = ``source``'s (z, y, x) size.
        padding_mode: ``grid_sample`` padding outside ``source`` (``border``, ``zeros``, ``reflection``).

    Returns:
        (C, D', H', W') tensor on ``target``'s grid, same device/dtype as ``values``.
    """
    vol = values if values.dim() == 5 else values[None]
    if vol.dim() != 5 or tuple(vol.shape[-3:]) != grid_shape(source):
        raise InputError(
            f"values of shape {tuple(values.shape)} do not lie on a grid of (D, H, W) = {grid_shape(source)}"
        )
    points = world_points(target)  # (d, h, w, 3)
    if transform is not None:
        disp = sitk.GetArrayFromImage(transform_to_field(transform, target))
        points = points + disp
    inv = np.linalg.inv(direction_matrix(source) * np.array(source.GetSpacing())[None, :])
    index = (points - np.array(source.GetOrigin())) @ inv.T  # continuous index x, y, z
    size = np.array(source.GetSize(), dtype=np.float64)
    norm = 2.0 * index / np.maximum(size - 1.0, 1.0) - 1.0  # align_corners=True; grid_sample wants (x, y, z)
    grid = torch.from_numpy(norm).to(device=vol.device, dtype=vol.dtype)[None]
    out = F.grid_sample(vol, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)
    return out[0]


def gaussian_blur(volume: torch.Tensor, sigma_vox: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, D, H, W) with per-axis sigma (voxels, z, y, x); replicate padding."""
    out = volume
    for axis, sigma in enumerate(sigma_vox):
        if sigma <= 0:
            continue
        radius = max(1, int(math.ceil(3.0 * sigma)))
        x = torch.arange(-radius, radius + 1, device=volume.device, dtype=volume.dtype)
        kernel = torch.exp(-0.5 * (x / sigma) ** 2)
        kernel = kernel / kernel.sum()
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        weight = kernel.view(shape).repeat(out.shape[1], 1, 1, 1, 1)
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), weight, groups=out.shape[1])
    return out


def jacobian_det_local(local: torch.Tensor, spacing_mm: Sequence[float]) -> torch.Tensor:
    """det J of ``x -> x + u(x)`` for a local-mm field (1, 3, D, H, W) (channels z, y, x) -> (D, H, W).

    Central differences inside, one-sided at the borders (``torch.gradient``); ``spacing_mm`` in z, y, x.
    """
    grads = [torch.gradient(local[0, k], spacing=tuple(float(s) for s in spacing_mm)) for k in range(3)]
    j = [[grads[k][m] + (1.0 if k == m else 0.0) for m in range(3)] for k in range(3)]
    return (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
            - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
            + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))


def cell_corner_det_min(local: torch.Tensor, spacing_mm: Sequence[float]) -> torch.Tensor:
    """Smallest det J over the 8 corners of each grid cell of the trilinear interpolant of ``x -> x + u(x)``.

    ``local``: (1, 3, D, H, W) local-mm field (channels z, y, x); ``spacing_mm`` in z, y, x. At a cell corner the
    interpolant's derivative along an axis is the one-sided difference along the cell edge through that corner, so
    this sees folds that central differences (:func:`jacobian_det_local`) average away, e.g. a field that
    alternates from voxel to voxel. Returns (D - 1, H - 1, W - 1).
    """
    u = local[0]
    sz, sy, sx = (float(s) for s in spacing_mm)
    d_z = (u[:, 1:] - u[:, :-1]) / sz  # (3, D-1, H, W): z-edges
    d_y = (u[:, :, 1:] - u[:, :, :-1]) / sy
    d_x = (u[..., 1:] - u[..., :-1]) / sx
    for axis, d_axis in enumerate((d_z, d_y, d_x)):  # J = I + du/dx: the identity once, not per corner
        d_axis[axis] += 1.0
    d, h, w = (n - 1 for n in u.shape[1:])
    worst = None
    for a in (0, 1):
        for b in (0, 1):
            for c in (0, 1):
                cols = (d_z[:, :, b:b + h, c:c + w], d_y[:, a:a + d, :, c:c + w], d_x[:, a:a + d, b:b + h, :])
                j = [[cols[m][k] for m in range(3)] for k in range(3)]
                det = (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
                       - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
                       + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))
                worst = det if worst is None else torch.minimum(worst, det)
    return worst


def _folded_voxels(local: torch.Tensor, spacing_mm: Sequence[float], min_det: float,
                   cell_min_det: float | None) -> torch.Tensor:
    """(1, 1, D, H, W) mask of the voxels with det J < ``min_det`` or bounding a cell with a corner det J below
    ``cell_min_det``."""
    bad = (jacobian_det_local(local, spacing_mm) < min_det)[None, None].to(local.dtype)
    if cell_min_det is not None and min(local.shape[2:]) > 1:
        cell_bad = (cell_corner_det_min(local, spacing_mm) < cell_min_det)[None, None].to(local.dtype)
        # voxel v bounds cells v-1 and v along each axis
        corner_bad = F.max_pool3d(F.pad(cell_bad, (1, 1, 1, 1, 1, 1)), 2, stride=1)
        bad = torch.maximum(bad, corner_bad)
    return bad


def unfold_locally(local: torch.Tensor, spacing_mm: Sequence[float], min_det: float = 0.2, max_rounds: int = 30,
                   sigma_vox: float = 1.0, cell_min_det: float | None = None,
                   open_faces: Sequence[bool] = (False,) * 6) -> tuple[torch.Tensor, int]:
    """Smooth a local-mm field only where det J < ``min_det`` (and 2 voxels around), until no voxel is left.

    Unlike smoothing the whole field, this keeps sharp but valid motion elsewhere (sliding lungs). With
    ``cell_min_det`` the corners of every cell count too (:func:`cell_corner_det_min`): use it on a field that will
    be linearly resampled onto a finer grid. ``open_faces`` (z-, z+, y-, y+, x-, x+): faces where ``local`` is a
    crop of a larger field, whose outermost voxels are not judged (their differences lack a neighbour).
    Returns (field, rounds used); the field may still fold if ``max_rounds`` did not suffice.
    """
    judged = torch.ones((1, 1) + tuple(local.shape[2:]), dtype=local.dtype, device=local.device)
    for axis in range(3):
        for end, is_open in ((0, open_faces[2 * axis]), (-1, open_faces[2 * axis + 1])):
            if is_open:
                judged.select(2 + axis, end).zero_()
    out = local
    for rounds in range(max_rounds):
        bad = _folded_voxels(out, spacing_mm, min_det, cell_min_det) * judged
        if not bool(bad.any()):
            return out, rounds
        region = F.max_pool3d(bad, 5, stride=1, padding=2) > 0
        out = torch.where(region, gaussian_blur(out, [sigma_vox] * 3), out)
    return out, max_rounds


def _open_faces(crop: tuple[slice, ...], shape: tuple[int, ...]) -> list[bool]:
    """(z-, z+, y-, y+, x-, x+): whether each face of ``crop`` lies inside a field of ``shape`` (not on its border)."""
    return [open_face for c, n in zip(crop, shape) for open_face in (c.start > 0, c.stop < n)]


def unfold_in_parts(local: torch.Tensor, spacing_mm: Sequence[float], min_det: float = 0.2, max_rounds: int = 30,
                    sigma_vox: float = 1.0, cell_min_det: float | None = None, crop_margin: int = 8
                    ) -> tuple[torch.Tensor, int]:
    """:func:`unfold_locally` run on a crop around each group of folded voxels instead of the whole field.

    One check of the whole field, then each group's crop (``crop_margin`` voxels around it) is unfolded on its own
    and checked again with its neighbours; for a large field with a few scattered folds this costs a fraction of
    the whole-field rounds. Returns (field, rounds used, counted over the passes).
    """
    shape = tuple(local.shape[2:])
    bad = _folded_voxels(local, spacing_mm, min_det, cell_min_det)[0, 0]
    out, used = local, 0
    while bool(bad.any()) and used < max_rounds:
        groups, _ = ndimage.label(F.max_pool3d(bad[None, None], 5, stride=1, padding=2)[0, 0].cpu().numpy() > 0)
        crops = [tuple(slice(max(g.start - crop_margin, 0), min(g.stop + crop_margin, n)) for g, n in zip(box, shape))
                 for box in ndimage.find_objects(groups)]
        out, rounds = out.clone(), 1
        for crop in crops:
            index = (slice(None), slice(None)) + crop
            out[index], r = unfold_locally(out[index], spacing_mm, min_det, max_rounds - used, sigma_vox, cell_min_det,
                                           _open_faces(crop, shape))
            rounds = max(rounds, r)
        used += rounds
        # float like _folded_voxels' mask: max_pool3d (the next pass's grouping) has no bool kernel
        bad = torch.zeros(shape, dtype=local.dtype, device=local.device)
        for crop in crops:  # smoothing a crop can only fold it or its edge: judge each crop again, one voxel wider
            wide = tuple(slice(max(c.start - 1, 0), min(c.stop + 1, n)) for c, n in zip(crop, shape))
            faces = _open_faces(wide, shape)
            part = _folded_voxels(out[(slice(None), slice(None)) + wide], spacing_mm, min_det, cell_min_det)[0, 0]
            inner = tuple(slice(1 if lo else 0, -1 if hi else None) for lo, hi in zip(faces[0::2], faces[1::2]))
            keep = tuple(slice(w.start + (1 if lo else 0), w.stop - (1 if hi else 0))
                         for w, lo, hi in zip(wide, faces[0::2], faces[1::2]))
            bad[keep] = torch.maximum(bad[keep], (part[inner] > 0).to(bad.dtype))
    return out, used


#: :func:`extend_over` smooths cells whose linear interpolant has a corner det J below this (0 would be a fold)
EXTEND_CELL_MIN_DET = 0.05


def extend_over(field: sitk.Image, reference: sitk.Image) -> tuple[sitk.Image, int]:
    """A field on a box (e.g. the lungs') continued over all of ``reference``, for a linear resampling onto it.

    The box's grid grows by whole voxels (same origin lattice, spacing and direction) until it covers
    ``reference``; the new voxels copy the nearest face (replicate padding), and the result is unfolded locally
    (:func:`unfold_locally` with cell corners, only where it or its linear interpolant folds). Elsewhere inside the
    box the values are unchanged.

    Why not ``sitk.Resample(..., useNearestNeighborExtrapolation=True)``: beyond the box it takes the nearest
    *voxel* along every axis, so the field steps by a whole box voxel every few output voxels along the face,
    and on a 1 mm grid those steps fold (seen at the bottom slices of a full-thorax CT below the lungs' box).

    Returns:
        (field on the grown grid, ``sitkVectorFloat64``; unfolding rounds used, 0 when nothing folded).
    """
    size, ref = np.array(field.GetSize()), np.array(reference.GetSize())
    corners = [reference.TransformIndexToPhysicalPoint([int(a), int(b), int(c)])
               for a in (0, ref[0] - 1) for b in (0, ref[1] - 1) for c in (0, ref[2] - 1)]
    index = np.array([field.TransformPhysicalPointToContinuousIndex(p) for p in corners])
    before = np.maximum(np.ceil(-index.min(axis=0)), 0).astype(int) + 1  # x, y, z; one spare voxel each side
    after = np.maximum(np.ceil(index.max(axis=0) - (size - 1)), 0).astype(int) + 1
    pad = [int(n) for axis in range(3) for n in (before[axis], after[axis])]  # F.pad: x first, as the tensor's last
    # float32 is ample for finding folds (1e-5 mm), and halves the work on a full-thorax box
    local = F.pad(field_to_local_mm(field, dtype=torch.float32), pad, mode="replicate")
    spacing = np.array(field.GetSpacing())
    local, rounds = unfold_in_parts(local, tuple(float(s) for s in spacing[::-1]), cell_min_det=EXTEND_CELL_MIN_DET)
    origin = field.TransformContinuousIndexToPhysicalPoint((-before).astype(float).tolist())
    grid = empty_like_grid(size + before + after, origin, spacing, field.GetDirection())
    return local_mm_to_field(local, grid), rounds
