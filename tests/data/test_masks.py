"""Body and lung masks from thresholds vs TotalSegmentator labels, on real CTs."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from regsam.data.masks import chest_masks, dice, lung_mask_from_labels, threshold_masks
from regsam.errors import InputError
from regsam.io.images import standardize


@pytest.fixture(scope="module")
def sample_ct_3mm():
    from regsam.data.fetch import fetch_sample_ct

    try:
        paths = fetch_sample_ct()
    except InputError as exc:
        pytest.skip(f"sample CT not cached and not downloadable: {exc}")
    ct = standardize(sitk.ReadImage(str(paths["ct"])), 3.0)
    labels = standardize(sitk.ReadImage(str(paths["labels"])), 3.0, sitk.sitkNearestNeighbor, pixel_type=None)
    return ct, labels


def _array(mask: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(mask) > 0


def test_threshold_lungs_match_totalsegmentator(sample_ct_3mm):
    ct, labels = sample_ct_3mm
    body, lungs = threshold_masks(ct)
    reference = lung_mask_from_labels(labels)
    assert dice(lungs, reference) > 0.85
    lung, body_a = _array(lungs), _array(body)
    assert body_a[lung].mean() > 0.999  # the body contains the lungs
    assert 0.2 < body_a.mean() < 0.8  # and is neither empty nor the whole box (outside air, FOV padding excluded)
    volume_l = lung.sum() * np.prod(ct.GetSpacing()) / 1e6
    assert 2.5 < volume_l < 6.0


def test_masks_from_labels(sample_ct_3mm):
    ct, labels = sample_ct_3mm
    body, lungs = chest_masks(ct, labels)
    assert dice(lungs, lung_mask_from_labels(labels)) == 1.0
    body_a = _array(body)
    assert body_a[_array(lungs)].all()
    assert body_a[sitk.GetArrayViewFromImage(labels) > 0].all()


def test_labels_on_another_grid_are_resampled(sample_ct_3mm):
    ct, labels = sample_ct_3mm
    coarse = standardize(labels, 6.0, sitk.sitkNearestNeighbor, pixel_type=None)
    _, lungs = chest_masks(ct, coarse)
    assert lungs.GetSize() == ct.GetSize()
    assert dice(lungs, lung_mask_from_labels(labels)) > 0.8


def test_crop_inside_body(chest_crop_path):
    """A crop with no outside air: lungs touching the crop border are still lungs, the body is the whole crop."""
    ct = standardize(sitk.ReadImage(str(chest_crop_path)))
    body, lungs = threshold_masks(ct)
    lung, body_a = _array(lungs), _array(body)
    assert body_a.mean() > 0.95
    assert body_a[lung].all()
    hu = sitk.GetArrayFromImage(ct)
    assert 0.15 < lung.mean() < 0.6
    assert np.median(hu[lung]) < -700  # aerated
    assert np.median(hu[~lung]) > -200  # soft tissue, blood, bone


def test_no_lungs_is_an_input_error(sample_ct_3mm):
    ct, labels = sample_ct_3mm
    soft = sitk.Image(ct.GetSize(), sitk.sitkFloat32) + 40.0  # a water phantom: no air at all
    soft.CopyInformation(ct)
    with pytest.raises(InputError, match="no aerated lung"):
        threshold_masks(soft)
    liver_only = sitk.Cast(labels == 5, sitk.sitkUInt8) * 5
    with pytest.raises(InputError, match="no lung labels"):
        chest_masks(ct, liver_only)


def test_two_dimensional_image_is_an_input_error():
    with pytest.raises(InputError, match="3D"):
        threshold_masks(sitk.Image([32, 32], sitk.sitkFloat32))
