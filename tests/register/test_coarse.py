"""regsam.fit.smooth: smooth dense fields from sparse, noisy correspondences with outliers."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from regsam.errors import InputError
from regsam.io.transforms import folding_share, map_points, transform_to_field
from regsam.fit.smooth import field_from_fit, fit_smooth_field, fit_smooth_residual


def reference_grid(direction=None) -> sitk.Image:
    """A chest-sized fixed grid: 46 x 40 x 44 voxels of 4 mm (180 x 156 x 172 mm)."""
    ref = sitk.Image([46, 40, 44], sitk.sitkUInt8)
    ref.SetSpacing((4.0, 4.0, 4.0))
    ref.SetOrigin((-90.0, -80.0, 400.0))
    if direction is not None:
        ref.SetDirection(direction)
    return ref


def centre_of(ref: sitk.Image) -> np.ndarray:
    return np.array(ref.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in ref.GetSize()]))


def breathing(points: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """A smooth breathing-like residual (mm): up to ~10 mm cranio-caudal near the base, some AP motion."""
    q = points - centre
    g1 = np.exp(-np.sum((q - [30, 10, -50]) ** 2, axis=1) / (2 * 45.0**2))
    g2 = np.exp(-np.sum((q - [-40, -20, -30]) ** 2, axis=1) / (2 * 40.0**2))
    u = np.zeros_like(q)
    u[:, 2] = 9.0 * g1 + 7.0 * g2
    u[:, 1] = -4.0 * g1 + 3.0 * g2
    u[:, 0] = 2.5 * np.sin(q[:, 2] / 40.0)
    return u


def planted_affine(centre: np.ndarray) -> sitk.AffineTransform:
    aff = sitk.AffineTransform(3)
    aff.SetMatrix((1.03, 0.02, 0.0, -0.01, 0.98, 0.03, 0.0, 0.02, 1.02))
    aff.SetCenter(centre.tolist())
    aff.SetTranslation((5.0, -8.0, 12.0))
    return aff


def inside_points(ref: sitk.Image, n: int, rng: np.random.Generator) -> np.ndarray:
    index = rng.uniform(0, np.array(ref.GetSize()) - 1, size=(n, 3))
    return np.array([ref.TransformContinuousIndexToPhysicalPoint(i.tolist()) for i in index])


@pytest.mark.parametrize("rotated", [False, True])
def test_recovers_planted_deformation_from_500_noisy_correspondences(rotated):
    direction = sitk.VersorTransform((0.2, 0.1, 1.0), 0.5).GetMatrix() if rotated else None
    ref = reference_grid(direction)
    centre = centre_of(ref)
    affine = planted_affine(centre)
    rng = np.random.default_rng(0)

    def truth(p):
        return map_points(affine, p) + breathing(p, centre)

    fixed, held_out = inside_points(ref, 500, rng), inside_points(ref, 300, rng)
    moving = truth(fixed) + rng.normal(0.0, 0.8, size=fixed.shape)  # ~1.4 mm noise per correspondence
    bad = rng.choice(500, 50, replace=False)  # 10 % gross mismatches
    moving[bad] += rng.normal(0.0, 15.0, size=(50, 3))

    field = fit_smooth_field(fixed, moving, ref, affine)

    assert field.GetPixelID() == sitk.sitkVectorFloat64 and field.GetSize() == ref.GetSize()
    assert np.allclose(field.GetDirection(), ref.GetDirection()) and np.allclose(field.GetOrigin(), ref.GetOrigin())
    err = np.linalg.norm(map_points(field, held_out) - truth(held_out), axis=1)
    before = np.linalg.norm(map_points(affine, held_out) - truth(held_out), axis=1)
    assert before.mean() > 3.0
    assert err.mean() < 1.0 and np.percentile(err, 95) < 2.0, (err.mean(), np.percentile(err, 95))
    assert folding_share(field) == 0.0


def test_outliers_are_downweighted_and_fit_is_exact_on_an_affine():
    ref = reference_grid()
    centre = centre_of(ref)
    affine = planted_affine(centre)
    rng = np.random.default_rng(1)
    fixed = inside_points(ref, 200, rng)
    moving = map_points(affine, fixed)
    bad = rng.choice(200, 20, replace=False)
    moving[bad] += rng.normal(0.0, 20.0, size=(20, 3))

    fit = fit_smooth_residual(fixed, moving, ref, affine)
    assert np.all(fit.weights[bad] < 0.05)
    assert np.all(np.delete(fit.weights, bad) > 0.9)
    # no residual left: the field is the affine's own displacement (fixed x -> affine(x))
    field = field_from_fit(fit, affine)
    expected = sitk.GetArrayFromImage(transform_to_field(affine, ref))
    assert np.abs(sitk.GetArrayFromImage(field) - expected).max() < 0.05
    assert np.allclose(fit.evaluate(fixed[:5]), 0.0, atol=0.05)


def test_identity_affine_and_weights():
    """affine=None means identity: the field itself must carry the whole (here: a constant 4 mm) motion."""
    ref = reference_grid()
    rng = np.random.default_rng(2)
    fixed = inside_points(ref, 100, rng)
    moving = fixed + np.array([4.0, -2.0, 1.0])
    weights = rng.uniform(0.2, 1.0, size=100)
    field = fit_smooth_field(fixed, moving, ref, None, weights=weights)
    arr = sitk.GetArrayFromImage(field)
    assert np.allclose(arr, [4.0, -2.0, 1.0], atol=0.05)


def test_bad_inputs():
    ref = reference_grid()
    rng = np.random.default_rng(3)
    pts = inside_points(ref, 30, rng)
    with pytest.raises(InputError, match="rows must correspond"):
        fit_smooth_field(pts, pts[:-1], ref)
    with pytest.raises(InputError, match="at least"):
        fit_smooth_field(pts[:5], pts[:5], ref)
    with pytest.raises(InputError, match="at least"):  # all points outside the fixed grid
        fit_smooth_field(pts + 1000.0, pts + 1000.0, ref)
    with pytest.raises(InputError, match="weights"):
        fit_smooth_field(pts, pts, ref, weights=np.ones(3))
    with pytest.raises(InputError, match="reference"):
        fit_smooth_field(pts, pts, "not an image")
