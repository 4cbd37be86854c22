"""regsam.fit.affine.fit_affine_ransac: planted affine transforms with outliers."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from regsam.errors import InputError
from regsam.io.transforms import map_points, warp_image
from regsam.fit.affine import AffineFit, fit_affine_ransac


def planted_affine(
    angle_deg: float = 10.0, shift=(30.0, -12.0, 8.0), scale=(1.05, 0.97, 1.03), centre=(10.0, -20.0, 30.0)
) -> sitk.AffineTransform:
    """Rotation about an oblique axis + anisotropic scale + shift about ``centre`` (mm)."""
    rot = sitk.VersorTransform((0.3, 0.8, 0.5), np.deg2rad(angle_deg))
    matrix = np.array(rot.GetMatrix()).reshape(3, 3) @ np.diag(scale)
    t = sitk.AffineTransform(3)
    t.SetMatrix(matrix.ravel().tolist())
    t.SetCenter(centre)
    t.SetTranslation(shift)
    return t


def corrupt(moving: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """Replace a share of the rows with gross outliers (10-60 mm off)."""
    out = moving.copy()
    bad = rng.choice(len(out), int(round(share * len(out))), replace=False)
    direction = rng.normal(size=(len(bad), 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    out[bad] += direction * rng.uniform(10.0, 60.0, size=(len(bad), 1))
    mask = np.zeros(len(out), bool)
    mask[bad] = True
    return out, mask


def test_planted_affine_with_40_percent_outliers_is_recovered():
    rng = np.random.default_rng(1)
    truth = planted_affine()
    fixed = rng.uniform([-150, -120, -100], [150, 120, 200], size=(300, 3))
    moving_true = map_points(truth, fixed)
    moving, outlier = corrupt(moving_true, 0.4, rng)

    fit = fit_affine_ransac(fixed, moving, threshold_mm=3.0, seed=0)

    assert isinstance(fit, AffineFit) and isinstance(fit.transform, sitk.AffineTransform)
    err = np.linalg.norm(map_points(fit.transform, fixed) - moving_true, axis=1)
    assert err.max() < 0.1, err.max()
    assert np.array_equal(fit.inliers, ~outlier)
    assert fit.n_inliers == int((~outlier).sum())
    assert fit.residuals_mm.shape == (300,) and np.all(fit.residuals_mm[~outlier] < 1e-6)
    assert np.allclose(fit.matrix[:3, :3], np.array(fit.transform.GetMatrix()).reshape(3, 3))
    # the 4x4 matrix maps fixed to moving as well
    assert np.allclose(fixed @ fit.matrix[:3, :3].T + fit.matrix[:3, 3], moving_true, atol=1e-6)


def test_weights_and_noise_and_determinism():
    rng = np.random.default_rng(2)
    truth = planted_affine(angle_deg=-6.0, shift=(-5.0, 20.0, 3.0))
    fixed = rng.uniform(-100, 100, size=(200, 3))
    moving_true = map_points(truth, fixed)
    moving, outlier = corrupt(moving_true + rng.normal(0, 0.5, size=fixed.shape), 0.3, rng)
    weights = np.where(outlier, 0.2, 1.0)  # scores: outliers tend to score low
    a = fit_affine_ransac(fixed, moving, weights=weights, seed=5)
    b = fit_affine_ransac(fixed, moving, weights=weights, seed=5)
    assert np.array_equal(a.matrix, b.matrix)
    err = np.linalg.norm(map_points(a.transform, fixed) - moving_true, axis=1)
    assert err.mean() < 0.2 and err.max() < 0.5
    assert a.inliers[~outlier].mean() > 0.98 and not a.inliers[outlier].any()


def test_real_ct_points_with_planted_affine(chest_crop_path):
    """Points inside a real chest CT (body voxels), moved by a planted affine + 0.7 mm noise + 35% outliers."""
    ct = sitk.ReadImage(str(chest_crop_path))
    arr = sitk.GetArrayViewFromImage(ct)
    rng = np.random.default_rng(3)
    zyx = np.argwhere(arr > -400)
    pick = zyx[rng.choice(len(zyx), 400, replace=False)]
    fixed = np.array([ct.TransformIndexToPhysicalPoint([int(i) for i in p[::-1]]) for p in pick])
    centre = ct.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in ct.GetSize()])
    truth = planted_affine(angle_deg=8.0, shift=(6.0, -10.0, 8.0), scale=(0.96, 1.04, 1.02), centre=centre)
    moving_true = map_points(truth, fixed)
    moving, outlier = corrupt(moving_true + rng.normal(0, 0.7, size=fixed.shape), 0.35, rng)

    fit = fit_affine_ransac(fixed, moving, threshold_mm=4.0, seed=0)

    err = np.linalg.norm(map_points(fit.transform, fixed) - moving_true, axis=1)
    assert err.mean() < 0.3 and err.max() < 0.8, (err.mean(), err.max())
    assert fit.inliers[outlier].mean() < 0.05 and fit.inliers[~outlier].mean() > 0.95
    # usable directly in sitk.Resample(moving, fixed, T): a moving image made from the truth comes back
    small = sitk.Resample(
        sitk.Cast(ct, sitk.sitkFloat32), [40, 34, 37], sitk.Transform(), sitk.sitkLinear, ct.GetOrigin(), [4.5] * 3,
        ct.GetDirection(), -1024.0,
    )
    moving_img = sitk.Resample(small, small, truth.GetInverse(), sitk.sitkLinear, -1024.0)  # moving(T(x)) = small(x)
    back = sitk.GetArrayFromImage(warp_image(moving_img, small, fit.transform))
    ideal = sitk.GetArrayFromImage(warp_image(moving_img, small, truth))
    inner = (slice(8, -8),) * 3
    unregistered = np.abs(sitk.GetArrayFromImage(moving_img)[inner] - ideal[inner])
    assert np.median(np.abs(back[inner] - ideal[inner])) < 0.1 * np.median(unregistered)


def test_bad_inputs_raise_input_error():
    rng = np.random.default_rng(0)
    pts = rng.uniform(-50, 50, size=(20, 3))
    with pytest.raises(InputError, match="rows must correspond"):
        fit_affine_ransac(pts, pts[:-1])
    with pytest.raises(InputError, match=r"\(N, 3\)"):
        fit_affine_ransac(pts[:, :2], pts[:, :2])
    with pytest.raises(InputError, match="at least"):
        fit_affine_ransac(pts[:5], pts[:5])
    with pytest.raises(InputError, match="weights"):
        fit_affine_ransac(pts, pts, weights=-np.ones(20))
    bad = pts.copy()
    bad[3, 1] = np.nan
    with pytest.raises(InputError, match="NaN"):
        fit_affine_ransac(bad, pts)
    flat = pts.copy()
    flat[:, 2] = 0.0  # coplanar: no 3D affine
    with pytest.raises(InputError, match="coplanar|degenerate"):
        fit_affine_ransac(flat, flat)
    # pure noise: no consensus
    with pytest.raises(InputError, match="no affine consensus"):
        fit_affine_ransac(pts, rng.uniform(-50, 50, size=(20, 3)), threshold_mm=0.5, min_inliers=10)
