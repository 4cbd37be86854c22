"""regsam.register.torch_fields.extend_over: a box field continued over a larger image without folds."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from regsam.io.transforms import folding_share
from regsam.register import torch_fields as tf


def _box_field() -> tuple[sitk.Image, sitk.Image]:
    """A 4 mm box field whose x-motion waves along x (3 mm amplitude, 24 mm period: valid, det J >= 0.2 inside),
    and a 1 mm image reaching 20 mm beyond the box in z, as a lungs' box inside a full thorax."""
    box = tf.empty_like_grid((12, 12, 8), (0.0, 0.0, 0.0), (4.0, 4.0, 4.0), np.eye(3).ravel())
    x = np.arange(12) * 4.0
    u = np.zeros((8, 12, 12, 3))
    u[..., 0] = 3.0 * np.sin(2 * np.pi * x / 24.0)[None, None, :]
    field = sitk.GetImageFromArray(u, isVector=True)
    field.CopyInformation(box)
    image = tf.empty_like_grid((45, 45, 49), (0.0, 0.0, -20.0), (1.0, 1.0, 1.0), np.eye(3).ravel())
    return field, image


def test_extension_keeps_the_box_continues_linearly_and_does_not_fold():
    field, image = _box_field()
    nearest = sitk.Resample(field, image, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64, True)
    assert folding_share(nearest) > 0  # the nearest-voxel steps below the box fold on the 1 mm grid
    grown, rounds = tf.extend_over(field, image)
    assert rounds == 0  # a face that does not fold needs no smoothing
    assert grown.GetSpacing() == field.GetSpacing() and grown.GetDirection() == field.GetDirection()
    on = sitk.Resample(grown, image, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64, True)
    assert folding_share(on) == 0.0
    values, plain = sitk.GetArrayFromImage(on), sitk.GetArrayFromImage(nearest)
    inside = slice(20, 49)  # z >= 0 mm: inside the box (x, y within it too)
    np.testing.assert_allclose(values[inside, :44, :44], plain[inside, :44, :44], atol=1e-9)
    # below the box: the bottom face's motion, linear along x (not nearest-voxel steps)
    np.testing.assert_allclose(values[0], values[20], atol=1e-9)
    x = np.arange(12) * 4.0
    expected = np.interp(np.arange(44.0), x, 3.0 * np.sin(2 * np.pi * x / 24.0))
    np.testing.assert_allclose(values[0, 10, :44, 0], expected, atol=1e-9)


def test_a_field_that_folds_only_between_its_voxels_is_unfolded():
    """x-motion alternating +-1.5 mm from one 2 mm voxel to the next along x: central differences see no change
    inside (det J = 1), but the linear interpolant folds in every other cell (slope -1.5 per mm). The cell-corner
    check finds it; the field extended and resampled onto a 1 mm grid does not fold."""
    box = tf.empty_like_grid((10, 10, 10), (0.0, 0.0, 0.0), (2.0, 2.0, 2.0), np.eye(3).ravel())
    u = np.zeros((10, 10, 10, 3))
    u[..., 0] = 1.5 * (-1.0) ** np.arange(10)
    field = sitk.GetImageFromArray(u, isVector=True)
    field.CopyInformation(box)
    local = tf.field_to_local_mm(field, dtype=torch.float64)
    assert float(tf.jacobian_det_local(local, (2.0, 2.0, 2.0))[..., 1:-1].min()) > 0.99
    assert float(tf.cell_corner_det_min(local, (2.0, 2.0, 2.0)).min()) < 0
    image = tf.empty_like_grid((19, 19, 19), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), np.eye(3).ravel())
    plain = sitk.Resample(field, image, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64, True)
    assert folding_share(plain) > 0
    grown, rounds = tf.extend_over(field, image)
    assert rounds > 0
    on = sitk.Resample(grown, image, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64, True)
    assert folding_share(on) == 0.0
