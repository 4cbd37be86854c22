"""Elastix method: transform direction, accuracy on planted motion, affine recovery.

The test pairs are built from the real chest CT crop (1.5 mm) with a known
smooth mapping ``phi`` (fixed ``x`` -> moving ``phi(x)``): the moving image is the
CT resampled to 3 mm, the fixed image is ``CT(phi(x))`` sampled on the same 3 mm
grid. Ground truth for a fixed point ``p`` is therefore exactly ``phi(p)``.
"""

from __future__ import annotations

import os

os.environ.setdefault("ITK_GLOBAL_DEFAULT_THREADER", "Pool")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from regsam.io.images import resample_to_spacing  # noqa: E402
from regsam.register.api import register  # noqa: E402
from regsam.register.elastix import (  # noqa: E402
    CONFIG_DIR,
    PRESETS,
    elastix_linear_to_sitk,
    read_parameter_map,
    read_transform_parameter_object,
    transformix_points,
)
from regsam.register.result import RegistrationResult  # noqa: E402

SPACING_MM = 3.0

# itk's SWIG modules warn on import under Python 3.12+ style checks; not our concern.
pytestmark = pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")


# ------------------------------------------------------------------ planted motion helpers
def voxel_centres(image: sitk.Image) -> np.ndarray:
    """World coordinates (N, 3) of all voxel centres, x fastest."""
    size = image.GetSize()
    zyx = np.stack(np.meshgrid(*[np.arange(s) for s in reversed(size)], indexing="ij"), -1).reshape(-1, 3)
    return index_to_world(image, zyx[:, ::-1].astype(float))


def index_to_world(image: sitk.Image, index_xyz: np.ndarray) -> np.ndarray:
    origin = np.array(image.GetOrigin())
    spacing = np.array(image.GetSpacing())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return origin + (np.asarray(index_xyz) * spacing) @ direction.T


class Breathing:
    """Smooth breathing-like displacement: mostly along z, growing linearly towards the inferior end.

    ``u_z`` is 0 at the superior end of the grid and ``amplitude`` (x 0.8-1) at the inferior end;
    small anterior (``-y``) and lateral components vanish at the y and x borders, so every
    ``x + u(x)`` stays inside the CT.
    """

    def __init__(self, grid: sitk.Image, amplitude_mm: float):
        pts = voxel_centres(grid)
        self.lo, self.hi = pts.min(axis=0), pts.max(axis=0)
        self.amplitude = amplitude_mm

    def __call__(self, points: np.ndarray) -> np.ndarray:
        n = np.clip((np.asarray(points, float) - self.lo) / (self.hi - self.lo), 0.0, 1.0)
        inferior = 1.0 - n[:, 2]  # LPS: z grows superiorly
        u = np.zeros((len(n), 3))
        u[:, 2] = self.amplitude * inferior * (0.8 + 0.2 * np.cos(2 * np.pi * (n[:, 0] - 0.5)))
        u[:, 1] = -0.25 * self.amplitude * inferior * np.sin(np.pi * n[:, 1])
        u[:, 0] = 0.08 * self.amplitude * inferior * np.sin(2 * np.pi * n[:, 0])
        return u


def field_on(grid: sitk.Image, displacement_fn) -> sitk.Image:
    u = displacement_fn(voxel_centres(grid))
    size = grid.GetSize()
    arr = u.reshape(size[2], size[1], size[0], 3)
    out = sitk.GetImageFromArray(arr, isVector=True)
    out.CopyInformation(grid)
    return out


def structure_points(fixed: sitk.Image, n: int = 300, margin_mm: float = 9.0, seed: int = 0) -> np.ndarray:
    """Landmark-like points: off-grid positions at strong edges, at least ``margin_mm`` inside the grid."""
    rng = np.random.default_rng(seed)
    grad = sitk.GetArrayFromImage(sitk.GradientMagnitude(sitk.SmoothingRecursiveGaussian(fixed, 1.5)))
    m = int(np.ceil(margin_mm / min(fixed.GetSpacing())))
    inner = np.zeros(grad.shape, bool)
    inner[m:-m, m:-m, m:-m] = True
    candidates = np.argwhere(inner & (grad > np.percentile(grad[inner], 80)))
    pick = candidates[rng.choice(len(candidates), size=min(n, len(candidates)), replace=False)][:, ::-1].astype(float)
    pick += rng.uniform(-0.5, 0.5, pick.shape)
    return index_to_world(fixed, pick)


def mean_abs_diff(a: sitk.Image, b: sitk.Image, margin: int = 3) -> float:
    inner = (slice(margin, -margin),) * 3
    return float(np.abs(sitk.GetArrayFromImage(a)[inner] - sitk.GetArrayFromImage(b)[inner]).mean())


@pytest.fixture(scope="module")
def ct(chest_crop_path) -> sitk.Image:
    return sitk.Cast(sitk.ReadImage(str(chest_crop_path)), sitk.sitkFloat32)


@pytest.fixture(scope="module")
def breathing_case(ct) -> dict:
    """Fixed/moving 3 mm pair with planted breathing motion (mean ~10 mm at the points)."""
    moving = resample_to_spacing(ct, SPACING_MM)
    motion = Breathing(moving, amplitude_mm=28.0)
    true_field = field_on(moving, motion)
    fixed = sitk.Resample(ct, moving, sitk.DisplacementFieldTransform(sitk.Image(true_field)), sitk.sitkLinear, -1024.0)
    points = structure_points(fixed)
    return {"fixed": fixed, "moving": moving, "motion": motion, "points": points, "truth": points + motion(points)}


@pytest.fixture(scope="module")
def fast_result(breathing_case) -> RegistrationResult:
    return register(breathing_case["fixed"], breathing_case["moving"], method="elastix", preset="fast")


def tre(result: RegistrationResult, case: dict, interpolation: str = "linear") -> np.ndarray:
    return np.linalg.norm(result.map_points(case["points"], interpolation=interpolation) - case["truth"], axis=1)


# ------------------------------------------------------------------ presets
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_files_parse_and_describe_the_intended_pipeline(preset):
    maps = [read_parameter_map(CONFIG_DIR / name) for name in PRESETS[preset].files]
    assert [m["Transform"][0] for m in maps] == ["AffineTransform", "BSplineTransform"]
    bspline = maps[1]
    assert bspline["Metric"] == ["AdvancedNormalizedCorrelation", "TransformBendingEnergyPenalty"]
    assert bspline["ErodeMask"] == ["false"]
    assert bspline["WriteResultImage"] == ["false"]
    if preset == "lung":
        assert maps[0]["NumberOfResolutions"] == ["4"] and bspline["NumberOfResolutions"] == ["4"]
        assert [float(v) for v in bspline["FinalGridSpacingInPhysicalUnits"]] == [10.0] * 3


# ------------------------------------------------------------------ (a) transform direction
def test_displacement_agrees_with_transformix_on_fixed_points(fast_result, breathing_case, tmp_path):
    fixed, moving = breathing_case["fixed"], breathing_case["moving"]
    field = fast_result.displacement
    assert field.GetPixelID() == sitk.sitkVectorFloat64
    assert field.GetSize() == fixed.GetSize()
    assert np.allclose(field.GetOrigin(), fixed.GetOrigin()) and np.allclose(field.GetSpacing(), fixed.GetSpacing())
    assert np.allclose(field.GetDirection(), fixed.GetDirection())

    # A real transformix run on the saved TransformParameters files, independent of the field.
    fast_result.save(tmp_path / "run")
    parameter_object = read_transform_parameter_object(tmp_path / "run" / "elastix")
    rng = np.random.default_rng(1)
    on_grid = index_to_world(fixed, rng.integers(5, np.array(fixed.GetSize()) - 5, size=(60, 3)).astype(float))
    off_grid = breathing_case["points"][:60]
    expected = transformix_points(parameter_object, moving, np.vstack([on_grid, off_grid]))
    expected_on, expected_off = expected[:60], expected[60:]

    # Voxel centres: the field holds transformix's exact values (float32 rounding only).
    assert np.abs(fast_result.map_points(on_grid) - expected_on).max() < 0.05
    # Between voxels: cubic interpolation of the field reproduces the B-spline transform.
    assert np.abs(fast_result.map_points(off_grid, interpolation="cubic") - expected_off).max() < 0.05
    # Linear interpolation (the benchmark's) is close too: the B-spline is smooth on the 3 mm grid.
    assert np.abs(fast_result.map_points(off_grid) - expected_off).max() < 0.05
    # And the mapping really goes fixed -> moving: the points move with the planted motion.
    assert np.linalg.norm(expected_off - breathing_case["truth"][:60], axis=1).mean() < 1.5


# ------------------------------------------------------------------ (b) fast preset accuracy
def test_fast_preset_recovers_planted_breathing_motion(fast_result, breathing_case):
    initial = np.linalg.norm(breathing_case["truth"] - breathing_case["points"], axis=1)
    after = tre(fast_result, breathing_case)
    assert 8.0 < initial.mean() < 15.0
    assert after.mean() < 0.2 * initial.mean()
    assert after.mean() < 1.5 and np.percentile(after, 95) < 3.0
    fixed, moving = breathing_case["fixed"], breathing_case["moving"]
    assert fast_result.warped.GetPixelID() == sitk.sitkFloat32
    assert mean_abs_diff(fast_result.warped, fixed) < 0.5 * mean_abs_diff(moving, fixed)
    assert fast_result.jacobian_stats()["grid"]["folding_share"] < 1e-3
    assert fast_result.method == "elastix" and fast_result.preset == "fast"
    assert {"load", "setup", "affine", "bspline", "field", "warp", "total"} <= set(fast_result.timings)
    assert fast_result.affine is not None
    stages = fast_result.extras["elastix"]["stages"]
    assert [s["name"] for s in stages] == ["affine", "bspline"]
    assert all(s["final_metric"] is not None and s["final_metric"] < -0.9 for s in stages)


# ------------------------------------------------------------------ (c) lung preset accuracy
@pytest.mark.slow
def test_lung_preset_reaches_under_2mm_on_breathing_motion(breathing_case):
    result = register(breathing_case["fixed"], breathing_case["moving"], method="elastix", preset="lung")
    initial = np.linalg.norm(breathing_case["truth"] - breathing_case["points"], axis=1)
    after = tre(result, breathing_case)
    assert 8.0 < initial.mean() < 15.0
    assert after.mean() < 2.0
    assert result.jacobian_stats()["grid"]["folding_share"] < 1e-3
    assert result.extras["elastix"]["bspline_grid_size"] is not None


# ------------------------------------------------------------------ (d) affine stage
def _planted_affine() -> sitk.AffineTransform:
    rotation = sitk.Euler3DTransform((0.0, 0.0, 0.0), 0.04, -0.03, 0.06)
    matrix = np.array(rotation.GetMatrix()).reshape(3, 3) @ np.array([[1.04, 0.02, 0.0], [0.0, 0.97, 0.03], [0.01, 0.0, 1.02]])
    affine = sitk.AffineTransform(3)
    affine.SetCenter((19.0, -180.0, 660.0))
    affine.SetMatrix(matrix.ravel().tolist())
    affine.SetTranslation((5.0, -4.0, 7.0))
    return affine


def _planted_rigid() -> sitk.Transform:
    return sitk.Euler3DTransform((19.0, -180.0, 660.0), -0.05, 0.03, 0.04, (-6.0, 3.0, 5.0))


@pytest.mark.parametrize(
    ("elastix_transform", "planted"),
    [("AffineTransform", _planted_affine), ("EulerTransform", _planted_rigid), ("TranslationTransform", None)],
)
def test_affine_stage_recovers_planted_linear_transform(ct, elastix_transform, planted):
    moving = resample_to_spacing(ct, SPACING_MM)
    truth = planted() if planted else sitk.TranslationTransform(3, (4.5, -3.0, 6.5))
    fixed = sitk.Resample(ct, moving, truth, sitk.sitkLinear, -1024.0)
    result = register(
        fixed, moving, method="elastix", preset="lung", stages=("affine",),
        stage_overrides={"affine": {"Transform": elastix_transform}},
    )
    assert result.affine is not None and set(result.timings) >= {"affine", "total"}
    points = structure_points(fixed, n=100, margin_mm=15.0)
    expected = np.array([truth.TransformPoint(p) for p in points.tolist()])
    from_affine = np.array([result.affine.TransformPoint(p) for p in points.tolist()])
    assert np.linalg.norm(from_affine - expected, axis=1).max() < 1.0
    # The sitk affine converted from elastix's parameters equals transformix's field.
    assert np.abs(result.map_points(points) - from_affine).max() < 0.01


def test_fixed_image_with_a_flipped_direction(ct):
    """A fixed image stored RAS-like (direction diag(-1, -1, 1)): the field stays on its grid, in LPS mm."""
    moving = resample_to_spacing(ct, SPACING_MM)
    truth = sitk.TranslationTransform(3, (4.0, -5.0, 3.0))
    fixed = sitk.DICOMOrient(sitk.Resample(ct, moving, truth, sitk.sitkLinear, -1024.0), "RAS")
    assert fixed.GetDirection()[0] == -1.0
    result = register(fixed, moving, method="elastix", preset="fast", stages=("affine",))
    assert result.displacement.GetDirection() == fixed.GetDirection()
    assert result.displacement.GetOrigin() == fixed.GetOrigin()
    points = structure_points(fixed, n=100, margin_mm=15.0)
    expected = np.array([truth.TransformPoint(p) for p in points.tolist()])
    assert np.linalg.norm(result.map_points(points) - expected, axis=1).max() < 1.0


def test_two_linear_stages_compose_in_elastix_order(ct, tmp_path):
    """A rigid stage followed by an affine stage: the combined sitk affine equals transformix's mapping."""
    moving = resample_to_spacing(ct, SPACING_MM)
    truth = _planted_affine()
    fixed = sitk.Resample(ct, moving, truth, sitk.sitkLinear, -1024.0)
    text = (CONFIG_DIR / "fast_affine.txt").read_text()
    rigid = tmp_path / "rigid.txt"
    rigid.write_text(text.replace('(Transform "AffineTransform")', '(Transform "EulerTransform")'))
    affine = tmp_path / "affine.txt"
    affine.write_text(text.replace("(MaximumNumberOfIterations 250)", "(MaximumNumberOfIterations 150)"))
    result = register(fixed, moving, method="elastix", parameter_files=[rigid, affine])
    assert [s["name"] for s in result.extras["elastix"]["stages"]] == ["rigid", "affine"]
    assert result.preset == "custom"
    points = structure_points(fixed, n=100, margin_mm=15.0)
    from_affine = np.array([result.affine.TransformPoint(p) for p in points.tolist()])
    assert np.abs(result.map_points(points) - from_affine).max() < 0.01
    expected = np.array([truth.TransformPoint(p) for p in points.tolist()])
    assert np.linalg.norm(from_affine - expected, axis=1).max() < 1.0


def test_elastix_affine_parameters_are_row_major_matrix_then_translation():
    pmap = {
        "Transform": ["AffineTransform"],
        "TransformParameters": [str(v) for v in (1.1, 0.1, 0.0, 0.0, 0.9, 0.2, 0.0, 0.0, 1.0, 1.0, 2.0, 3.0)],
        "CenterOfRotationPoint": ["10", "20", "30"],
    }
    t = elastix_linear_to_sitk(pmap)
    x = np.array([15.0, 25.0, 35.0])
    a = np.array([[1.1, 0.1, 0.0], [0.0, 0.9, 0.2], [0.0, 0.0, 1.0]])
    c = np.array([10.0, 20.0, 30.0])
    assert np.allclose(t.TransformPoint(x.tolist()), a @ (x - c) + np.array([1.0, 2.0, 3.0]) + c)


# ------------------------------------------------------------------ masks, options, failure
def test_fixed_mask_is_used_and_bad_options_are_input_errors(breathing_case):
    from regsam.errors import InputError

    fixed, moving = breathing_case["fixed"], breathing_case["moving"]
    body = sitk.Cast(sitk.BinaryThreshold(fixed, -500.0, 5000.0), sitk.sitkUInt8)
    moving_body = sitk.BinaryThreshold(moving, -500.0, 5000.0) * 3  # any non-zero value counts
    result = register(
        fixed,
        moving,
        method="elastix",
        preset="fast",
        fixed_mask=body,
        moving_mask=moving_body,
        stages=("affine",),
        overrides={"MaximumNumberOfIterations": 50},
    )
    assert result.extras["elastix"]["fixed_mask"] is True and result.extras["elastix"]["moving_mask"] is True
    with pytest.raises(InputError, match="unknown elastix preset"):
        register(fixed, moving, method="elastix", preset="nope")
    with pytest.raises(InputError, match="unknown elastix stage"):
        register(fixed, moving, method="elastix", preset="fast", stages=("demons",))


def test_no_elastix_files_in_working_directory(breathing_case, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    register(
        breathing_case["fixed"],
        breathing_case["moving"],
        method="elastix",
        preset="fast",
        stages=("affine",),
        overrides={"MaximumNumberOfIterations": 20},
    )
    assert list(tmp_path.iterdir()) == []
    out, err = capfd.readouterr()
    assert out == ""
