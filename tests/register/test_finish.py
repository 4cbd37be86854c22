"""The continuous finish after the capture: ``regsam.register.finish`` on a chest CT with planted motion.

The chest is ``lidc_idri_0314_chest`` at 4 mm (as in test_capture.py); fixed(x) = ct(x + u(x)) with a known
field ``u``, so the true residual of the finish is ``u`` itself.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from regsam.data.masks import threshold_masks
from regsam.errors import InputError
from regsam.io.transforms import folding_share
from regsam.register.finish import FinishSettings, finish_motion

SPACING = 4.0


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """One torch thread (fixture in conftest.py)."""


def _planted(ct: sitk.Image) -> tuple[sitk.Image, np.ndarray, np.ndarray, np.ndarray]:
    """fixed(x) = ct(x + u(x)); u: smooth sub-step head-feet motion inside the lungs, the opposite outside (sliding)."""
    _, lungs = threshold_masks(ct)
    inside = sitk.GetArrayFromImage(lungs) > 0
    y = np.arange(inside.shape[1])[None, :, None]
    u = np.zeros(inside.shape + (3,))
    u[..., 2] = np.where(inside, 1.5 + 1.0 * np.sin(2 * np.pi * y / inside.shape[1]), -1.5)
    field = sitk.GetImageFromArray(u, isVector=True)
    field.CopyInformation(ct)
    fixed = sitk.Resample(ct, ct, sitk.DisplacementFieldTransform(field), sitk.sitkLinear, -1024.0)
    return fixed, u, ndimage.binary_erosion(inside, iterations=2), lungs


def _estimate(residual: sitk.Image, grid: sitk.Image) -> np.ndarray:
    on = sitk.Resample(residual, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64, True)
    return sitk.GetArrayFromImage(on)


@pytest.mark.slow
@pytest.mark.parametrize("weight_intensity", [0.0, 4.0])
def test_finish_recovers_sub_step_motion_and_keeps_a_good_start(thorax4, weight_intensity):
    """From zero, the finish recovers most of a 0.5-2.5 mm motion that a 2 mm candidate grid quantises; from the
    true residual, it stays within a tenth of a voxel (it does not drift where the start is already right); no folds.
    Both with MIND-SSC alone and with the local-contrast channel beside it."""
    fixed, u, deep, lungs = _planted(thorax4)
    settings = FinishSettings(spacing_mm=SPACING, weight_intensity=weight_intensity)
    residual, info = finish_motion(fixed, thorax4, None, None, lungs=lungs, settings=settings)
    error = np.linalg.norm(_estimate(residual, thorax4) - u, axis=-1)
    before = np.linalg.norm(u, axis=-1)
    assert error[deep].mean() < 0.6 * before[deep].mean(), (error[deep].mean(), before[deep].mean())
    assert 0 < info["points"] <= settings.max_points and 0 < info["iterations"] <= settings.iterations

    truth = sitk.GetImageFromArray(u, isVector=True)
    truth.CopyInformation(thorax4)
    kept, _ = finish_motion(fixed, thorax4, None, truth, lungs=lungs, settings=settings)
    drift = np.linalg.norm(_estimate(kept, thorax4) - u, axis=-1)
    assert drift[deep].mean() < 0.1 * SPACING, drift[deep].mean()  # a tenth of a voxel (measured: 0.32 mm)
    assert folding_share(kept) == 0.0


def test_finish_settings_are_checked():
    with pytest.raises(InputError):
        FinishSettings(spacing_mm=0.0)
    with pytest.raises(InputError):
        FinishSettings(control_ratio=0)
    with pytest.raises(InputError):
        FinishSettings(lr=-1.0)
    with pytest.raises(InputError):
        FinishSettings(weight_intensity=-1.0)
    with pytest.raises(InputError):
        FinishSettings(intensity_window=4)
