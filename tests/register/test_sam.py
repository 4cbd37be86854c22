"""``--method sam`` with the shipped embedder on a real CT the embedder never saw in training.

The held-out scan is ``totalseg/aorta_ct_cropped`` (see regsam/weights/MODEL_CARD.md).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from regsam.bench.tre import map_and_score
from regsam.data.masks import body_mask
from regsam.embed.correspondences import find_correspondences
from regsam.embed.model import DEFAULT_WEIGHTS
from regsam.io.images import resample_to_spacing
from regsam.io.transforms import folding_share, transform_to_field

pytestmark = pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="shipped embedder weights not present")


@pytest.fixture(scope="module")
def held_out_ct(shared_data):
    ct = sitk.ReadImage(str(shared_data / "totalseg" / "aorta_ct_cropped.nii.gz"), sitk.sitkFloat32)
    return resample_to_spacing(ct, 2.0)


@pytest.fixture(scope="module")
def embedder():
    from regsam.embed.model import load_embedder

    return load_embedder(device="cpu")


def _central_points(image: sitk.Image, n: int, seed: int, margin: float = 0.25) -> np.ndarray:
    size = np.array(image.GetSize())
    idx = np.random.default_rng(seed).uniform(margin, 1 - margin, size=(n, 3)) * (size - 1)
    return np.array([image.TransformContinuousIndexToPhysicalPoint(i.tolist()) for i in idx])


@pytest.mark.slow
def test_sam_affine_recovers_planted_affine(held_out_ct, embedder):
    from regsam.embed.inference import embed_image
    from regsam.register import sam
    from regsam.fit.affine import fit_affine_ransac

    fixed = held_out_ct
    centre = np.array(fixed.TransformContinuousIndexToPhysicalPoint([s / 2 for s in fixed.GetSize()]))
    planted = sitk.AffineTransform(3)
    planted.SetCenter(centre.tolist())
    angle = np.deg2rad(6.0)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    planted.SetMatrix((rot * 1.03).ravel().tolist())
    planted.SetTranslation([8.0, -6.0, 10.0])
    # moving(y) = fixed(planted^-1 y): fixed point x appears in moving at planted(x)
    moving = sitk.Resample(fixed, fixed, planted.GetInverse(), sitk.sitkLinear, -1024.0)
    landmarks = _central_points(fixed, 60, seed=3)
    truth = np.array([planted.TransformPoint(p.tolist()) for p in landmarks])

    fe, me = embed_image(embedder, fixed), embed_image(embedder, moving)
    corr = find_correspondences(fe, me, body_mask(fixed), sam.PRESETS["fast"])
    keep = np.flatnonzero(corr.valid)
    fit = fit_affine_ransac(corr.fixed[keep], corr.moving[keep], weights=corr.score[keep], threshold_mm=6.0)
    recovered = np.array([fit.transform.TransformPoint(p.tolist()) for p in landmarks])
    errors = np.linalg.norm(recovered - truth, axis=1)
    assert np.linalg.norm(landmarks - truth, axis=1).mean() > 10.0
    assert errors.mean() < 1.0, f"mean affine error {errors.mean():.2f} mm"


@pytest.mark.slow
def test_each_sam_stage_lowers_tre_on_a_simulated_breathing_pair(held_out_ct, embedder):
    from regsam.data.simulate import SimulationConfig, simulate_case
    from regsam.embed.inference import embed_image
    from regsam.register import sam
    from regsam.fit.affine import fit_affine_ransac
    from regsam.fit.smooth import fit_smooth_field
    from regsam.register.deformable import refine_deformable

    pair = simulate_case(held_out_ct, SimulationConfig(seed=2, motion="parametric", amplitude_mm=15.0))
    fixed, moving = pair.fixed, pair.moving
    f_pts, m_pts = pair.fixed_points, pair.moving_points
    cfg = sam.PRESETS["fast"]

    def tre(field) -> float:
        return float(map_and_score(field, f_pts, m_pts).mean())

    initial = float(np.linalg.norm(f_pts - m_pts, axis=1).mean())
    fe, me = embed_image(embedder, fixed), embed_image(embedder, moving)
    corr = find_correspondences(fe, me, body_mask(fixed), cfg)
    keep = np.flatnonzero(corr.valid)
    fit = fit_affine_ransac(corr.fixed[keep], corr.moving[keep], weights=corr.score[keep], threshold_mm=cfg.ransac_threshold_mm)
    affine_tre = tre(transform_to_field(fit.transform, fixed))
    corr.inlier[keep[fit.inliers]] = True
    coarse = fit_smooth_field(
        corr.fixed[corr.inlier], corr.moving[corr.inlier], fixed, fit.transform, weights=corr.score[corr.inlier],
        smoothing_mm=cfg.coarse_smoothing_mm, grid_spacing_mm=cfg.coarse_grid_mm,
    )
    coarse_tre = tre(coarse)
    ff, mf = sam.shared_pca_features(fe.fine, me.fine, cfg.feature_components)
    refined = refine_deformable(
        fixed, moving, coarse, preset=cfg.deformable, fixed_mask=pair.fixed_mask,
        fixed_features=ff, moving_features=mf, fixed_feature_geometry=fe.fine_geometry, moving_feature_geometry=me.fine_geometry,
        iterations=(40, 25),  # fewer than the preset's (80, 50): enough to show the stage's gain, half the time
    )
    deformable_tre = tre(refined.field)
    assert initial > 3.0
    assert affine_tre < initial
    assert coarse_tre < affine_tre
    assert deformable_tre < coarse_tre
    assert folding_share(refined.field) == 0.0


def test_sam_bad_input_is_one_line_exit_2(chest_crop_path, tmp_path):
    empty = sitk.Image(sitk.ReadImage(str(chest_crop_path)).GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(sitk.ReadImage(str(chest_crop_path)))
    sitk.WriteImage(empty, str(tmp_path / "empty.nii.gz"))
    cmd = [sys.executable, "-m", "regsam.cli", "register", str(chest_crop_path), str(chest_crop_path), "--out", str(tmp_path / "out"), "--method", "sam"]
    proc = subprocess.run(cmd + ["--fixed-mask", str(tmp_path / "empty.nii.gz")], capture_output=True, text=True)
    assert proc.returncode == 2 and "empty" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = subprocess.run(cmd + ["--stages", "affine,warp"], capture_output=True, text=True)
    assert proc.returncode == 2 and "warp" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_register_sam_end_to_end_without_masks(held_out_ct):
    """The whole fast preset (affine + capture + finish) through the public API, no masks given: the automatic lung mask
    bounds the search and is the sliding surface; the result beats the smooth coarse fit of the matches on a
    simulated breathing pair and does not fold."""
    from regsam.data.simulate import SimulationConfig, simulate_case
    from regsam.register.api import register

    pair = simulate_case(held_out_ct, SimulationConfig(seed=5, motion="parametric", amplitude_mm=12.0))
    initial = float(np.linalg.norm(pair.fixed_points - pair.moving_points, axis=1).mean())
    coarse = register(pair.fixed, pair.moving, method="sam", stages="affine,coarse")
    result = register(pair.fixed, pair.moving, method="sam")
    coarse_tre = float(np.linalg.norm(coarse.map_points(pair.fixed_points) - pair.moving_points, axis=1).mean())
    final_tre = float(np.linalg.norm(result.map_points(pair.fixed_points) - pair.moving_points, axis=1).mean())
    assert initial > 3.0 and final_tre < coarse_tre < initial, (initial, coarse_tre, final_tre)
    assert final_tre < 1.0
    assert result.extras["stages"] == ["affine", "capture", "finish"] and result.extras["masks"]["lungs"] == "automatic"
    assert 0 < result.extras["finish"]["iterations"] <= 40 and result.extras["finish"]["points"] > 0
    assert result.extras["capture"]["sliding"] is True
    assert folding_share(result.displacement) == 0.0
    assert "correspondences.csv" in result.artifacts and result.affine is not None
