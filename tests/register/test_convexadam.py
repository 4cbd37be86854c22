"""regsam.register.convexadam: ConvexAdam's voxel output in regsam's mm field convention, on tiny real CT crops."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

pytest.importorskip("convexAdam", reason="convexadam==0.2.0 is not installed")

from regsam.errors import InputError  # noqa: E402
from regsam.io.transforms import folding_share, map_points  # noqa: E402
from regsam.register import torch_fields as tf  # noqa: E402
from regsam.register.api import METHODS, register  # noqa: E402
from regsam.register.convexadam import PRESETS, register_convexadam  # noqa: E402

SPACING = 4.0
FAST = {"spacing_mm": SPACING, "selected_niter": 30}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs with one torch thread (fixture in conftest.py)."""


@pytest.mark.parametrize(
    "axis,orientation", [(0, None), (1, None), (2, None), (0, "RAS")], ids=["x", "y", "z", "x-on-RAS-grid"]
)
def test_planted_shift_along_each_axis(ct4, axis, orientation):
    """fixed(x) = moving(x + s) with s along one world axis: the field must be +s there and 0 on the other axes.

    A swapped axis order or sign would put the 8 mm on another component or flip it. The RAS case
    runs on a grid whose x and y index axes point opposite to world x and y (direction diag(-1, -1, 1)).
    """
    moving = ct4 if orientation is None else sitk.DICOMOrient(ct4, orientation)
    shift = np.zeros(3)
    shift[axis] = 8.0
    fixed = sitk.Resample(moving, moving, sitk.TranslationTransform(3, shift.tolist()), sitk.sitkLinear, -1024.0)

    result = register_convexadam(fixed, moving, preset="lung", **FAST)

    inner = sitk.GetArrayFromImage(result.displacement)[6:-6, 6:-6, 6:-6].reshape(-1, 3)
    median = np.median(inner, axis=0)
    assert np.abs(median - shift).max() < 1.0, median
    assert result.displacement.GetSize() == fixed.GetSize()
    assert np.allclose(result.displacement.GetDirection(), fixed.GetDirection())


def test_method_through_the_api_on_planted_breathing(ct4, tmp_path):
    """A smooth planted motion (up to ~10 mm): register(method="convexadam") lowers TRE a lot, no folding."""
    moving = ct4
    centre = np.array(moving.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in moving.GetSize()]))

    def u(points):
        q = points - centre
        g = np.exp(-np.sum((q - [20, 10, -40]) ** 2, axis=1) / (2 * 40.0**2))
        out = np.zeros_like(q)
        out[:, 2] = 9.0 * g + 2.0
        out[:, 1] = -4.0 * g
        out[:, 0] = 2.0 * np.sin(q[:, 2] / 35.0)
        return out

    arr = u(tf.world_points(moving).reshape(-1, 3)).reshape(tuple(moving.GetSize()[::-1]) + (3,))
    planted = sitk.GetImageFromArray(arr, isVector=True)
    planted.CopyInformation(moving)
    fixed = sitk.Resample(moving, moving, sitk.DisplacementFieldTransform(planted), sitk.sitkLinear, -1024.0)
    rng = np.random.default_rng(0)
    body = np.argwhere(sitk.GetArrayFromImage(fixed)[4:-4, 4:-4, 4:-4] > -500) + 4
    pick = body[rng.choice(len(body), 200, replace=False)]
    points = np.array([fixed.TransformIndexToPhysicalPoint([int(i) for i in p[::-1]]) for p in pick])
    truth = points + u(points)

    assert "convexadam" in METHODS
    result = register(fixed, moving, method="convexadam", preset="lung", **FAST)

    before = np.linalg.norm(points - truth, axis=1).mean()
    after = np.linalg.norm(map_points(result.displacement, points) - truth, axis=1).mean()
    assert before > 4.0 and after < 0.4 * before, (before, after)
    assert result.method == "convexadam" and result.preset == "lung" and result.affine is None
    assert {"load", "resample", "convexadam", "field", "warp", "total"} <= set(result.timings)
    assert folding_share(result.displacement) == 0.0
    extras = result.extras["convexadam"]
    assert extras["settings"]["grid_sp"] == 4 and extras["settings"]["ic"] is True
    assert extras["working_grid"]["spacing_mm"] == pytest.approx([SPACING] * 3, abs=0.1)
    out = result.save(tmp_path / "out")
    assert (out / "disp.nii.gz").is_file() and (out / "summary.json").is_file()


def test_masks_and_odd_sizes(ct4):
    """Both masks: ConvexAdam's own masking runs; one mask: ignored with a note. Odd sizes are padded internally."""
    crop = ct4[:-1, 1:, :-3]  # sizes not multiples of grid_sp
    shift = (0.0, 0.0, 6.0)
    fixed = sitk.Resample(crop, crop, sitk.TranslationTransform(3, shift), sitk.sitkLinear, -1024.0)
    mask_f = sitk.Cast(fixed > -500, sitk.sitkUInt8)
    mask_m = sitk.Cast(crop > -500, sitk.sitkUInt8)
    both = register_convexadam(fixed, crop, fixed_mask=mask_f, moving_mask=mask_m, **FAST)
    assert both.extras["convexadam"]["masks_used"] is True
    inside = sitk.GetArrayFromImage(both.displacement)[sitk.GetArrayFromImage(mask_f) > 0]
    assert abs(np.median(inside[:, 2]) - 6.0) < 1.0
    one = register_convexadam(fixed, crop, fixed_mask=mask_f, preset="fast", spacing_mm=SPACING, selected_niter=5)
    assert one.extras["convexadam"]["masks_used"] is False and "both" in one.extras["convexadam"]["mask_note"]


def test_bad_options(ct4):
    with pytest.raises(InputError, match="unknown convexadam preset"):
        register_convexadam(ct4, ct4, preset="nope")
    with pytest.raises(InputError, match="unknown convexadam option"):
        register_convexadam(ct4, ct4, bogus=3)
    with pytest.raises(InputError, match="selected_smooth"):
        register_convexadam(ct4, ct4, selected_smooth=2)
    with pytest.raises(InputError, match="too small"):
        register_convexadam(ct4, ct4, spacing_mm=40.0)
    assert set(PRESETS) == {"lung", "default", "fast"}
