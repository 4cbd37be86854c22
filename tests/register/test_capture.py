"""Large-motion capture and sliding on full-thorax CT: ``regsam.register.capture`` and the default SAM method.

The full chest is ``lidc_idri_0314_chest`` (held out of every training set), resampled to 4 mm so the
tests stay small; motions are planted with exact ground truth.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from regsam.data.masks import threshold_masks
from regsam.data.simulate import SimulationConfig, simulate_case
from regsam.io.transforms import folding_share, map_points
from regsam.register import torch_fields as tf
from regsam.register.api import register
from regsam.register.capture import CaptureSettings, capture_motion

SPACING = 4.0


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """One torch thread (fixture in conftest.py)."""


@pytest.mark.slow
def test_planted_30mm_lung_base_motion_is_recovered(thorax4):
    """Parametric breathing with 30 mm at the lung base and sliding lungs: the default method ends below 2 mm."""
    pair = simulate_case(thorax4, SimulationConfig(seed=3, motion="parametric", amplitude_mm=30.0, sliding=True,
                                                   n_points=150, n_body_points=0, noise_hu=10.0))
    before = np.linalg.norm(pair.moving_points - pair.fixed_points, axis=1)
    assert before.max() > 20.0, before.max()  # the lung base really moves
    result = register(pair.fixed, pair.moving)
    assert result.method == "sam"
    error = np.linalg.norm(map_points(result.displacement, pair.fixed_points) - pair.moving_points, axis=1)
    large = before > 15.0
    assert error.mean() < 2.0, (error.mean(), before.mean())
    assert error[large].mean() < 2.5, error[large].mean()
    assert folding_share(result.displacement) == 0.0


def _sliding_pair(ct: sitk.Image, shift_mm: float) -> tuple[sitk.Image, np.ndarray, np.ndarray]:
    """fixed(x) = ct(x + u(x)), u = +shift along z inside the lungs and -shift outside: a pure sliding jump."""
    _, lungs = threshold_masks(ct)
    inside = sitk.GetArrayFromImage(lungs) > 0
    u = np.zeros(inside.shape + (3,))
    u[..., 2] = np.where(inside, shift_mm, -shift_mm)
    field = sitk.GetImageFromArray(u, isVector=True)
    field.CopyInformation(ct)
    fixed = sitk.Resample(ct, ct, sitk.DisplacementFieldTransform(field), sitk.sitkLinear, -1024.0)
    return fixed, inside, u


@pytest.mark.slow
def test_opposite_tangential_motion_inside_and_outside_the_lungs(thorax4):
    """+5 mm head-feet inside the lungs, -5 mm in the chest wall: recovered on both sides of the lung surface.

    Points are taken along the side walls (middle half of the lungs' height, where head-feet motion is
    tangential to the surface): 6+ mm deep inside the lungs, and 6-20 mm outside them in the body. A +-12 mm
    search at the coarse level (7^3 instead of 13^3 candidates) covers the +-5 mm and keeps the test short.
    """
    shift = 5.0
    fixed, inside, _ = _sliding_pair(thorax4, shift)
    body, lungs = threshold_masks(fixed)
    depth_in = ndimage.distance_transform_edt(inside) * SPACING
    depth_out = ndimage.distance_transform_edt(~inside) * SPACING
    z_rows = np.flatnonzero(inside.any(axis=(1, 2)))
    mid = np.zeros_like(inside)
    lo, hi = np.percentile(z_rows, [25, 75]).astype(int)
    mid[lo:hi] = True
    in_pts = np.argwhere(mid & (depth_in >= 6.0))
    out_pts = np.argwhere(mid & (depth_out >= 6.0) & (depth_out <= 20.0) & (sitk.GetArrayFromImage(body) > 0))
    result = {}
    for sliding in (True, False):
        residual, info = capture_motion(fixed, thorax4, None, lungs=lungs if sliding else None,
                                        settings=CaptureSettings(weight_sam=0.0, radius=(3, 2)))
        local = tf.field_to_local_mm(sitk.Resample(residual, fixed, sitk.Transform(), sitk.sitkLinear, 0.0,
                                                   sitk.sitkVectorFloat64, True))
        uz = local[0, 0].numpy()  # channel 0 = z (the grid is LPS-aligned)
        result[sliding] = (np.abs(uz[tuple(in_pts.T)] - shift).mean(), np.abs(uz[tuple(out_pts.T)] + shift).mean())
    inside_error, outside_error = result[True]
    assert inside_error < 1.5 and outside_error < 1.5, result
    # without the sliding surface the smooth coupling drags the two sides towards each other
    assert result[False][0] + result[False][1] > inside_error + outside_error, result


def test_capture_settings_are_checked():
    from regsam.errors import InputError

    with pytest.raises(InputError, match="one entry per level"):
        CaptureSettings(feature_spacing_mm=(4.0, 2.0), radius=(6,))
    with pytest.raises(InputError, match="positive"):
        CaptureSettings(feature_spacing_mm=(0.0, 2.0))


def test_local_unfolding_keeps_valid_motion_and_removes_folds():
    """A sharp but valid shear stays; a folding kink is smoothed until det J > 0, only around it."""
    shape = (24, 24, 24)
    field = torch.zeros((1, 3) + shape)
    field[0, 0, :, :, 12:] = 3.0  # shear jump along x of the z-component: det J stays 1
    field[0, 2, 10:14, 10:14, 10:14] = torch.tensor([0.0, 3.0, -3.0, 0.0]).view(1, 1, 4)  # x-component folds
    assert float(tf.jacobian_det_local(field, (1.0, 1.0, 1.0)).min()) <= 0
    fixed_field, rounds = tf.unfold_locally(field, (1.0, 1.0, 1.0), min_det=0.2)
    assert 0 < rounds < 30
    assert float(tf.jacobian_det_local(fixed_field, (1.0, 1.0, 1.0)).min()) >= 0.2
    assert torch.equal(fixed_field[0, 0, 2:6, 2:6, :8], field[0, 0, 2:6, 2:6, :8])  # far from the kink: untouched
