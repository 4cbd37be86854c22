"""``--method sam+elastix``: the SAM affine starts elastix's B-spline stage, SAM matches join it as corresponding points.

The pair comes from the held-out CT ``totalseg/aorta_ct_cropped`` (see regsam/weights/MODEL_CARD.md)
at 3 mm through the repository's breathing simulator (``regsam.data.simulate``; 20 mm breathing)
with a large rigid offset (40 mm, 20 degrees): ground truth is exact at the simulator's lung and
body landmarks. On this pair elastix's own ``lung`` preset loses the affine (mean TRE ~42 mm).
"""

from __future__ import annotations

import os

os.environ.setdefault("ITK_GLOBAL_DEFAULT_THREADER", "Pool")

import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from regsam.embed.model import DEFAULT_WEIGHTS  # noqa: E402
from regsam.errors import InputError  # noqa: E402
from regsam.io.images import resample_to_spacing  # noqa: E402
from regsam.register.api import METHODS, register  # noqa: E402
from regsam.register.result import linear_to_matrix  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="shipped embedder weights not present"),
    pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning"),
]


@pytest.fixture(scope="module")
def held_out_ct(shared_data) -> sitk.Image:
    return sitk.ReadImage(str(shared_data / "totalseg" / "aorta_ct_cropped.nii.gz"), sitk.sitkFloat32)


@pytest.fixture(scope="module")
def offset_pair(held_out_ct):
    from regsam.data.simulate import SimulationConfig, simulate_case

    config = SimulationConfig(
        seed=2, motion="parametric", amplitude_mm=20.0, rigid_offset=(40.0, 20.0), spacing_mm=3.0,
        n_points=100, n_body_points=50,
    )
    return simulate_case(held_out_ct, config)


@pytest.fixture(scope="module")
def result(offset_pair, one_thread):
    return register(offset_pair.fixed, offset_pair.moving, method="sam+elastix", preset="fast")


@pytest.fixture(scope="module")
def saved(result, tmp_path_factory):
    return result.save(tmp_path_factory.mktemp("sam_elastix") / "run")


def _tre(points: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return np.linalg.norm(points - truth, axis=1)


# ------------------------------------------------------------------ (1) accuracy and field direction
@pytest.mark.slow
def test_recovers_large_offset_and_field_agrees_with_transformix(result, saved, offset_pair):
    from regsam.register.elastix import read_transform_parameter_object, transformix_points

    pair = offset_pair
    lung0 = _tre(pair.fixed_points, pair.moving_points)
    body0 = _tre(pair.fixed_points_body, pair.moving_points_body)
    lung = _tre(result.map_points(pair.fixed_points), pair.moving_points)
    body = _tre(result.map_points(pair.fixed_points_body), pair.moving_points_body)
    assert lung0.mean() > 30.0 and body0.mean() > 30.0
    assert lung.mean() < 1.5 and np.percentile(lung, 95) < 3.0, f"lung TRE {lung.mean():.2f} mm"
    assert body.mean() < 2.5, f"body TRE {body.mean():.2f} mm"
    assert result.jacobian_stats()["grid"]["folding_share"] < 1e-3

    field = result.displacement
    assert field.GetSize() == pair.fixed.GetSize() and np.allclose(field.GetOrigin(), pair.fixed.GetOrigin())
    # An independent transformix run on the saved TransformParameters files (SAM affine, then B-spline).
    parameter_object = read_transform_parameter_object(saved / "elastix")
    assert parameter_object.GetNumberOfParameterMaps() == 2
    rng = np.random.default_rng(1)
    index = rng.integers(4, np.array(pair.fixed.GetSize()) - 4, size=(40, 3))
    on_grid = np.array([pair.fixed.TransformIndexToPhysicalPoint(i.tolist()) for i in index])
    off_grid = pair.fixed_points[:40]
    expected = transformix_points(parameter_object, pair.moving, np.vstack([on_grid, off_grid]))
    assert np.abs(result.map_points(on_grid) - expected[:40]).max() < 0.05
    assert np.abs(result.map_points(off_grid, interpolation="cubic") - expected[40:]).max() < 0.05
    # transformix maps fixed points to moving space: they land on the true moving points.
    assert _tre(expected[40:], pair.moving_points[:40]).mean() < 1.5

    assert {p.name for p in saved.iterdir()} >= {"disp.nii.gz", "warped.nii.gz", "affine.tfm", "summary.json", "correspondences.csv", "elastix"}
    assert result.method == "sam+elastix" and result.preset == "fast"
    assert {"load", "embed", "match", "affine", "bspline", "field", "warp", "total"} <= set(result.timings)


# ------------------------------------------------------------------ (2) the SAM affine and points reach elastix
@pytest.mark.slow
def test_sam_affine_is_the_initial_transform_and_the_inliers_are_the_points(result, saved):
    from regsam.io.landmarks import read_elastix_points
    from regsam.io.transforms import read_affine
    from regsam.register.elastix import POINTS_METRIC, elastix_linear_to_sitk, read_parameter_map
    from regsam.register.sam_elastix import PRESETS

    sam_matrix = np.array(result.extras["affine"]["matrix"])
    assert np.allclose(linear_to_matrix(read_affine(saved / "affine.tfm")), sam_matrix, atol=1e-6)
    # elastix ran only its B-spline stage, started from the SAM affine (TransformParameters.0).
    assert [s["name"] for s in result.extras["elastix"]["stages"]] == ["bspline"]
    assert result.extras["elastix"]["initial_transform"] is True
    initial = read_parameter_map(saved / "elastix" / "TransformParameters.0.txt")
    bspline = read_parameter_map(saved / "elastix" / "TransformParameters.1.txt")
    assert initial["Transform"] == ["AffineTransform"] and bspline["Transform"] == ["BSplineTransform"]
    assert bspline["InitialTransformParameterFileName"] == ["TransformParameters.0.txt"]
    assert np.allclose(linear_to_matrix(elastix_linear_to_sitk(initial)), sam_matrix, atol=1e-6)

    # The affine inliers of correspondences.csv are the point files elastix read.
    rows = np.loadtxt(saved / "correspondences.csv", delimiter=",", skiprows=1).reshape(-1, 9)
    inliers = rows[rows[:, 8] == 1]
    assert 8 <= len(inliers) == result.extras["correspondences"]["to_elastix"] < len(rows)
    assert np.all(inliers[:, 7] == 1)  # only cycle-checked matches
    assert np.abs(read_elastix_points(saved / "elastix" / "fixed_points.txt") - inliers[:, :3]).max() < 1e-3
    assert np.abs(read_elastix_points(saved / "elastix" / "moving_points.txt") - inliers[:, 3:6]).max() < 1e-3
    log = (saved / "elastix" / "elastix_bspline.log").read_text()
    assert re.search(rf'\(Metric "AdvancedNormalizedCorrelation" "TransformBendingEnergyPenalty" "{POINTS_METRIC}"\)', log)
    assert f"Number of specified points: {len(inliers)}" in log
    weights = re.search(r"\(Metric2RelativeWeight ([^)]*)\)", log).group(1).split()
    assert [float(w) for w in weights] == list(PRESETS["fast"].points_weights)


# ------------------------------------------------------------------ (3) bad input through the CLI
def test_bad_input_is_one_line_exit_2(held_out_ct, tmp_path):
    ct = resample_to_spacing(held_out_ct, 4.0)
    blank = sitk.Image(ct.GetSize(), sitk.sitkInt16)  # a water block: nothing for SAM to match
    blank.CopyInformation(ct)
    sitk.WriteImage(ct, str(tmp_path / "fixed.nii.gz"))
    sitk.WriteImage(blank, str(tmp_path / "blank.nii.gz"))
    cmd = [sys.executable, "-m", "regsam.cli", "register", str(tmp_path / "fixed.nii.gz")]
    options = ["--out", str(tmp_path / "out"), "--method", "sam+elastix", "--preset", "fast"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    proc = subprocess.run(cmd + [str(tmp_path / "blank.nii.gz")] + options, capture_output=True, text=True, env=env)
    assert proc.returncode == 2, proc.stderr[-500:]
    assert "correspondences" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = subprocess.run(cmd + [str(tmp_path / "fixed.nii.gz")] + options + ["--stages", "bspline"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "affine stage" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ pieces
def test_method_registered_and_bench_accepts_it(held_out_ct):
    from regsam.bench.runner import parse_methods

    assert callable(METHODS["sam+elastix"])
    assert [s.label for s in parse_methods("sam+elastix,sam+elastix:fast,elastix:lung")] == ["sam+elastix", "sam+elastix:fast", "elastix:lung"]
    with pytest.raises(InputError, match="unknown method 'sam-elastix'"):
        parse_methods("sam-elastix")
    small = resample_to_spacing(held_out_ct, 6.0)
    with pytest.raises(InputError, match="unknown sam\\+elastix preset 'accurate'"):
        register(small, small, method="sam+elastix", preset="accurate")
    with pytest.raises(InputError, match="unknown sam\\+elastix stage"):
        register(small, small, method="sam+elastix", stages="affine,coarse")


def test_linear_transform_as_elastix_parameter_map_round_trip():
    from regsam.register.elastix import elastix_linear_to_sitk, linear_to_parameter_map

    fixed = sitk.Image([10, 12, 14], sitk.sitkFloat32)
    fixed.SetDirection(sitk.Euler3DTransform((0, 0, 0), 0.3, 0.2, 0.1).GetMatrix())
    fixed.SetOrigin((1.0, -2.0, 3.0))
    affine = sitk.AffineTransform(3)
    affine.SetCenter((19.0, -180.0, 660.0))
    affine.SetMatrix([1.04, 0.02, 0.0, -0.03, 0.97, 0.03, 0.01, 0.0, 1.02])
    affine.SetTranslation((5.0, -4.0, 7.0))
    transforms = [affine, sitk.Euler3DTransform((10.0, 20.0, 30.0), 0.1, -0.2, 0.05, (3.0, 2.0, 1.0)), sitk.TranslationTransform(3, (4.0, -3.0, 6.5))]
    points = np.random.default_rng(0).uniform(-200, 700, size=(20, 3))
    for transform in transforms:
        pmap = linear_to_parameter_map(transform, fixed)
        back = elastix_linear_to_sitk(pmap)
        expected = np.array([transform.TransformPoint(p) for p in points.tolist()])
        assert np.abs(np.array([back.TransformPoint(p) for p in points.tolist()]) - expected).max() < 1e-9
    # elastix writes the direction matrix column by column.
    assert np.allclose(np.array(pmap["Direction"], float).reshape(3, 3).T.ravel(), fixed.GetDirection())
    assert pmap["Size"] == ["10", "12", "14"]
    with pytest.raises(InputError, match="not linear"):
        linear_to_parameter_map(sitk.BSplineTransformInitializer(fixed, [3, 3, 3]), fixed)
    generic = linear_to_parameter_map(sitk.Transform(affine), fixed)  # e.g. as read from a .tfm file
    assert generic["TransformParameters"] == linear_to_parameter_map(affine, fixed)["TransformParameters"]


def test_points_metric_weights_one_per_resolution():
    from regsam.register.elastix import CONFIG_DIR, POINTS_METRIC, add_points_metric, read_parameter_map

    pmap = read_parameter_map(CONFIG_DIR / "lung_bspline.txt")
    assert add_points_metric(pmap, (0.5, 0.25, 0.0, 0.0)) == 2
    assert pmap["Metric"][-1] == POINTS_METRIC
    assert [float(v) for v in pmap["Metric2RelativeWeight"]] == [0.5, 0.25, 0.0, 0.0]
    pmap = read_parameter_map(CONFIG_DIR / "fast_bspline.txt")
    add_points_metric(pmap, 0.3)
    assert [float(v) for v in pmap["Metric2RelativeWeight"]] == [0.3] * 3
    with pytest.raises(InputError, match="one per resolution"):
        add_points_metric(read_parameter_map(CONFIG_DIR / "fast_bspline.txt"), (1.0, 0.5))
    with pytest.raises(InputError, match="MultiMetricMultiResolutionRegistration"):
        add_points_metric(read_parameter_map(CONFIG_DIR / "fast_affine.txt"), 0.5)  # a single-metric stage
