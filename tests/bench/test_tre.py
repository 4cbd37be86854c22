"""TRE and Jacobian summaries, checked against published DIR-Lab numbers and analytic fields."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from regsam.bench.tre import map_and_score, summarize_errors, target_registration_error
from regsam.errors import InputError
from regsam.io.landmarks import read_dirlab_xyz
from regsam.io.transforms import jacobian_summary, transform_to_field

# Castillo et al. 2009 (DIR-Lab 4DCT, 300 landmarks T00 vs T50): spacing (mm), identity mean (SD) TRE.
DIRLAB = {
    1: ((0.97, 0.97, 2.5), 3.89, 2.78),
    2: ((1.16, 1.16, 2.5), 4.34, 3.90),
    3: ((1.15, 1.15, 2.5), 6.94, 4.05),
    4: ((1.13, 1.13, 2.5), 9.83, 4.86),
    5: ((1.10, 1.10, 2.5), 7.48, 5.51),
}


@pytest.mark.parametrize("case", sorted(DIRLAB))
def test_dirlab_identity_tre_matches_published(dirlab_landmarks: Path, case: int) -> None:
    spacing, mean, sd = DIRLAB[case]
    fixed = read_dirlab_xyz(dirlab_landmarks / f"Case{case}_300_T00_xyz.txt", spacing)
    moving = read_dirlab_xyz(dirlab_landmarks / f"Case{case}_300_T50_xyz.txt", spacing)
    identity = sitk.Transform(3, sitk.sitkIdentity)
    summary = summarize_errors(map_and_score(identity, fixed, moving))
    assert summary["n"] == 300
    assert summary["mean"] == pytest.approx(mean, abs=0.01)
    assert summary["std"] == pytest.approx(sd, abs=0.01)


def test_summary_of_known_errors() -> None:
    errors = np.array([0.5, 1.0, 1.5, 2.0, 3.0, 10.0])
    summary = summarize_errors(errors)
    assert summary == {
        "n": 6,
        "mean": pytest.approx(3.0),
        "median": pytest.approx(1.75),
        "std": pytest.approx(np.sqrt(((errors - 3.0) ** 2).sum() / 5)),
        "p95": pytest.approx(3.0 + 0.75 * 7.0),  # linear between the 5th and 6th of 6 values
        "max": 10.0,
        "pct_under_2mm": pytest.approx(50.0),  # 2.0 itself is not under 2 mm
    }
    assert all(type(v) is float for k, v in summary.items() if k != "n") and type(summary["n"]) is int
    json.dumps(summary)
    assert summarize_errors([1.25])["std"] == 0.0


def test_summary_rejects_empty_and_nan() -> None:
    with pytest.raises(InputError, match="empty"):
        summarize_errors([])
    with pytest.raises(InputError, match="NaN"):
        summarize_errors([1.0, np.nan])


def test_tre_is_euclidean_per_row() -> None:
    predicted = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0], [-3.0, 0.0, 4.0]])
    np.testing.assert_allclose(target_registration_error(predicted, np.zeros((3, 3))), [0.0, 3.0, 5.0])
    with pytest.raises(InputError, match="rows must correspond"):
        target_registration_error(predicted, np.zeros((2, 3)))
    with pytest.raises(InputError, match="rows must correspond"):
        map_and_score(sitk.TranslationTransform(3), predicted, np.zeros((2, 3)))


def _reference() -> sitk.Image:
    reference = sitk.Image([32, 28, 20], sitk.sitkInt16)
    reference.SetSpacing((1.2, 1.2, 2.5))
    reference.SetOrigin((-20.0, -16.0, -25.0))
    reference.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    return reference


def test_translation_field_scores_zero_on_translated_points() -> None:
    reference = _reference()
    shift = np.array([2.5, -4.0, 7.5])
    field = transform_to_field(sitk.TranslationTransform(3, shift.tolist()), reference)
    rng = np.random.default_rng(0)
    index = rng.uniform(1, np.array(reference.GetSize()) - 2, size=(40, 3))
    fixed = np.array([reference.TransformContinuousIndexToPhysicalPoint(i.tolist()) for i in index])
    errors = map_and_score(field, fixed, fixed + shift)
    np.testing.assert_allclose(errors, 0.0, atol=1e-9)
    # The opposite sign (moving -> fixed) is off by twice the shift: guards the field's direction.
    np.testing.assert_allclose(map_and_score(field, fixed, fixed - shift), 2 * np.linalg.norm(shift), rtol=1e-9)


def test_jacobian_summary_of_scaling_field() -> None:
    reference = _reference()
    scaling = sitk.ScaleTransform(3, (1.1, 1.2, 0.8))
    summary = jacobian_summary(transform_to_field(scaling, reference))
    assert summary["folding_share"] == 0.0
    for key in ("jac_min", "jac_max", "jac_mean"):
        assert summary[key] == pytest.approx(1.1 * 1.2 * 0.8, rel=1e-9)
    assert summary["jac_std"] == pytest.approx(0.0, abs=1e-9)
    assert set(summary) == {"folding_share", "jac_min", "jac_max", "jac_mean", "jac_std"}
    json.dumps(summary)


def test_jacobian_summary_inside_mask_on_another_grid() -> None:
    reference = _reference()
    # Compress along the first voxel axis in its upper half: det 0.5 there, 1 elsewhere (plus a seam).
    idx = np.arange(reference.GetSize()[0], dtype=float)
    step = np.where(idx >= 16, -0.5 * (idx - 16) * 1.2, 0.0)
    direction = np.array(reference.GetDirection()).reshape(3, 3)
    shape = reference.GetSize()[::-1] + (3,)
    data = np.broadcast_to(step[None, None, :, None] * direction[:, 0], shape).copy()
    field = sitk.GetImageFromArray(data, isVector=True)
    field.CopyInformation(reference)
    # A mask of half the resolution covering the compressed half only.
    mask = sitk.Image([16, 14, 10], sitk.sitkUInt8)
    mask.SetSpacing((2.4, 2.4, 5.0))
    mask.SetDirection(reference.GetDirection())
    mask.SetOrigin(reference.TransformContinuousIndexToPhysicalPoint((0.5, 0.5, 0.5)))
    mask[9:, :, :] = 1  # voxel-axis index >= 18 on the fine grid
    summary = jacobian_summary(field, mask)
    assert summary["jac_min"] == pytest.approx(0.5) and summary["jac_max"] == pytest.approx(0.5)
    whole = jacobian_summary(field)
    assert whole["jac_max"] == pytest.approx(1.0) and whole["jac_min"] == pytest.approx(0.5)
