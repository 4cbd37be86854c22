"""Body and lung masks of a chest CT.

Two sources:

* **Thresholds + connected components** (no labels needed). Works on whole-body
  scans (outside air around the patient, scanner field-of-view padding) and on
  crops that lie completely inside the body (the lungs may touch the crop border):

  1. *outside air*: in every axial slice, air (HU < ``air_hu``) components that touch
     the slice border and look like air outside the patient (median HU below
     ``outside_median_hu``, or containing field-of-view padding < -1500 HU).
     Lung parenchyma (about -850 HU with vessels) touching a crop border is kept inside.
  2. *lungs*: 3D components (6-connected) of the remaining air. Components that are
     almost pure gas (median below ``outside_median_hu``: trachea alone, bowel gas)
     are dropped unless nothing else is left; of the rest the largest is kept, plus
     any other component with at least ``min_fraction`` of its size (the second lung).
     Vessels are filled by per-slice hole filling and a small closing.
  3. *body*: the largest 3D component of everything that is not outside air,
     holes filled per axial slice, united with the lungs.

* **TotalSegmentator labels** (``labels`` argument): lungs are the lobe labels
  (10-14 by default, see :data:`regsam.data.fetch.SAMPLE_CT_LUNG_LABELS`); the body is
  the threshold body united with every labelled voxel.

All masks are ``sitkUInt8`` images (1 inside) on the CT's grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from regsam.data.fetch import SAMPLE_CT_LUNG_LABELS
from regsam.errors import InputError
from regsam.io.images import check_volume, same_grid

#: HU below which a voxel counts as air / aerated lung.
AIR_HU = -400.0
#: median HU of a border-touching air region below which it is outside air (lungs are about -850).
OUTSIDE_MEDIAN_HU = -960.0
#: HU of scanner field-of-view padding (-2048, -3024 ...).
FOV_PADDING_HU = -1500.0


def _to_image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(reference)
    return image


def _fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    out = np.empty_like(mask)
    for k in range(mask.shape[0]):
        out[k] = ndimage.binary_fill_holes(mask[k]) if mask[k].any() else mask[k]
    return out


def _fraction_below(values: np.ndarray, labels: np.ndarray, threshold: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per label 0..n: voxel count and fraction of voxels below ``threshold`` (bincount, fast)."""
    flat = labels.ravel()
    counts = np.bincount(flat, minlength=n + 1).astype(np.float64)
    below = np.bincount(flat, weights=(values.ravel() < threshold), minlength=n + 1)
    return counts, below / np.maximum(counts, 1.0)


def _outside_air(hu: np.ndarray, air_hu: float, outside_median_hu: float) -> np.ndarray:
    """Per axial slice: border-touching air regions that look like air outside the patient."""
    outside = np.zeros(hu.shape, dtype=bool)
    structure = np.ones((3, 3), dtype=bool)
    for k in range(hu.shape[0]):
        air = hu[k] < air_hu
        if not air.any():
            continue
        labels, n = ndimage.label(air, structure=structure)
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        border = border[border > 0]
        if border.size == 0:
            continue
        # median below the threshold <=> more than half of the voxels below it
        _, mostly_gas = _fraction_below(hu[k], labels, outside_median_hu, n)
        _, padding = _fraction_below(hu[k], labels, FOV_PADDING_HU, n)
        chosen = border[(mostly_gas[border] > 0.5) | (padding[border] > 0)]
        if chosen.size:
            outside[k] = np.isin(labels, chosen)
    return outside


def _closing(mask: np.ndarray, spacing: Sequence[float], radius_mm: float) -> np.ndarray:
    """Binary closing with a ball of ``radius_mm``, computed on the mask's bounding box only."""
    radius = [max(0, int(round(radius_mm / s))) for s in spacing]  # x, y, z
    if max(radius) == 0 or not mask.any():
        return mask
    pad = np.array(radius[::-1]) + 1  # z, y, x
    nz = tuple(np.nonzero(mask.any(axis=other))[0] for other in ((1, 2), (0, 2), (0, 1)))
    box = tuple(slice(int(a[0]), int(a[-1]) + 1) for a in nz)
    sub = np.pad(mask[box], [(int(p), int(p)) for p in pad])
    closed = sitk.BinaryMorphologicalClosing(sitk.GetImageFromArray(sub.astype(np.uint8)), radius, sitk.sitkBall)
    closed_array = sitk.GetArrayFromImage(closed).astype(bool)
    inner = tuple(slice(int(p), int(p) + (b.stop - b.start)) for p, b in zip(pad, box))
    out = mask.copy()
    out[box] |= closed_array[inner]
    return out


def _lungs_from_air(
    hu: np.ndarray, inside_air: np.ndarray, outside_median_hu: float, min_fraction: float
) -> np.ndarray:
    labels, n = ndimage.label(inside_air)
    if n == 0:
        return np.zeros(hu.shape, dtype=bool)
    sizes, gas_fraction = _fraction_below(hu, labels, outside_median_hu, n)
    ids = np.arange(1, n + 1)
    sizes, gas_fraction = sizes[1:], gas_fraction[1:]
    parenchyma = ids[gas_fraction <= 0.5]
    candidates = parenchyma if parenchyma.size else ids
    cand_sizes = sizes[candidates - 1]
    keep = candidates[cand_sizes >= min_fraction * cand_sizes.max()]
    return np.isin(labels, keep)


def threshold_masks(
    ct: sitk.Image,
    air_hu: float = AIR_HU,
    outside_median_hu: float = OUTSIDE_MEDIAN_HU,
    min_fraction: float = 0.15,
    closing_mm: float = 2.0,
    working_spacing_mm: float = 1.4,
) -> tuple[sitk.Image, sitk.Image]:
    """Return ``(body, lungs)`` masks of a CT in HU from thresholds and connected components.

    Axes finer than ``working_spacing_mm`` are first averaged down by an integer factor
    (``BinShrink``; 0.7 mm -> 1.4 mm) and the masks repeated back onto the CT grid,
    which keeps a 512x512 scan at a few seconds.

    Raises:
        InputError: not a 3D scalar image, or no aerated lung found.
    """
    check_volume(ct, "CT")
    factors = [max(1, int(round(working_spacing_mm / s))) for s in ct.GetSpacing()]
    work = sitk.BinShrink(sitk.Cast(ct, sitk.sitkFloat32), factors) if max(factors) > 1 else ct
    hu = sitk.GetArrayFromImage(work).astype(np.float32)
    outside = _outside_air(hu, air_hu, outside_median_hu)
    inside_air = (hu < air_hu) & ~outside
    lungs = _lungs_from_air(hu, inside_air, outside_median_hu, min_fraction)
    if not lungs.any():
        raise InputError(
            "no aerated lung found in the CT (no air below -400 HU inside the body); is it a chest CT in HU?"
        )
    lungs = _fill_holes_per_slice(lungs)
    lungs = _closing(lungs, work.GetSpacing(), closing_mm)
    lungs = _fill_holes_per_slice(lungs)

    not_outside = ~outside & (hu > FOV_PADDING_HU)
    labels, n = ndimage.label(not_outside)
    if n > 1:
        sizes = np.bincount(labels.ravel())[1:]
        not_outside = labels == (int(np.argmax(sizes)) + 1)
    body = _fill_holes_per_slice(not_outside) | lungs
    if work is ct:
        return _to_image(body, ct), _to_image(lungs, ct)
    return _upsample_mask(body, factors, ct), _upsample_mask(lungs, factors, ct)


def body_mask(image: sitk.Image) -> sitk.Image:
    """The body (or, for a non-chest image, everything denser than air): where the fixed points are matched from."""
    try:
        body, _ = threshold_masks(image)
    except InputError:
        # Not a chest CT with aerated lungs: use everything denser than air.
        body = sitk.Cast(image > -500, sitk.sitkUInt8)
    if not np.any(sitk.GetArrayViewFromImage(body)):
        raise InputError("fixed image: no body voxels found (nothing denser than air)")
    return body


def _upsample_mask(mask: np.ndarray, factors: Sequence[int], reference: sitk.Image) -> sitk.Image:
    """Undo ``BinShrink``: repeat each coarse voxel over the fine voxels it averaged (edge rows repeat the last)."""
    out = mask
    for axis, f in zip((2, 1, 0), factors):  # factors are x, y, z; array axes are z, y, x
        out = np.repeat(out, f, axis=axis)
    size = reference.GetSize()[::-1]
    pad = [(0, max(0, n - m)) for n, m in zip(size, out.shape)]
    out = np.pad(out, pad, mode="edge")[: size[0], : size[1], : size[2]]
    return _to_image(out, reference)


def _labels_on_grid(labels: sitk.Image, ct: sitk.Image) -> sitk.Image:
    if labels.GetDimension() != 3 or labels.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("label image must be a 3D scalar image")
    if same_grid(labels, ct):
        return labels
    return sitk.Resample(labels, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0, labels.GetPixelID())


def lung_mask_from_labels(labels: sitk.Image, lung_labels: Sequence[int] = SAMPLE_CT_LUNG_LABELS) -> sitk.Image:
    """Lung mask (``sitkUInt8``) from an organ label image (TotalSegmentator lobes 10-14 by default).

    Raises:
        InputError: the label image holds none of ``lung_labels``.
    """
    array = sitk.GetArrayViewFromImage(labels)
    lungs = np.isin(array, np.asarray(list(lung_labels)))
    if not lungs.any():
        raise InputError(f"label image has no lung labels {tuple(lung_labels)} (TotalSegmentator lobes are 10-14)")
    return _to_image(lungs, labels)


def chest_masks(
    ct: sitk.Image,
    labels: sitk.Image | None = None,
    lung_labels: Sequence[int] = SAMPLE_CT_LUNG_LABELS,
) -> tuple[sitk.Image, sitk.Image]:
    """Return ``(body, lungs)`` masks on the CT grid: from ``labels`` when given, else from thresholds.

    ``labels`` may be on another grid; it is resampled (nearest neighbour) onto the CT's.
    """
    check_volume(ct, "CT")
    if labels is None:
        return threshold_masks(ct)
    labels = _labels_on_grid(labels, ct)
    lungs = lung_mask_from_labels(labels, lung_labels)
    try:
        body, _ = threshold_masks(ct)
    except InputError:
        body = sitk.Image(lungs)
    body_array = sitk.GetArrayFromImage(body).astype(bool)
    body_array |= sitk.GetArrayViewFromImage(labels) > 0
    body_array = _fill_holes_per_slice(body_array)
    return _to_image(body_array, ct), lungs


def dice(a: sitk.Image, b: sitk.Image) -> float:
    """Dice overlap of two masks on the same grid (non-zero = inside)."""
    x = sitk.GetArrayViewFromImage(a) > 0
    y = sitk.GetArrayViewFromImage(b) > 0
    total = int(x.sum()) + int(y.sum())
    return 1.0 if total == 0 else 2.0 * float((x & y).sum()) / total
