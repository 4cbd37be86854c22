"""regsam.register.api (validation, METHODS, run_register_command) and RegistrationResult save/load."""

from __future__ import annotations

import json
import os

os.environ.setdefault("ITK_GLOBAL_DEFAULT_THREADER", "Pool")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from regsam import __version__  # noqa: E402
from regsam.errors import InputError  # noqa: E402
from regsam.register.api import METHODS, MethodSpec, register, run_register_command  # noqa: E402
from regsam.register.result import RegistrationResult  # noqa: E402

# itk's SWIG modules warn on import under Python 3.12+ style checks; not our concern.
pytestmark = pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")


def volume(size=(20, 18, 16), spacing=(2.0, 2.0, 2.5), origin=(0.0, 0.0, 0.0), seed=0) -> sitk.Image:
    rng = np.random.default_rng(seed)
    arr = rng.normal(-500.0, 200.0, size[::-1]).astype(np.float32)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def shift_field(grid: sitk.Image, shift=(1.5, -2.0, 3.0)) -> sitk.Image:
    arr = np.broadcast_to(np.array(shift, dtype=np.float64), grid.GetSize()[::-1] + (3,)).copy()
    field = sitk.GetImageFromArray(arr, isVector=True)
    field.CopyInformation(grid)
    return field


def identity_method(fixed, moving, *, preset=None, fixed_mask=None, moving_mask=None, **options):
    """A stand-in registration method: zero displacement."""
    result = RegistrationResult(
        displacement=shift_field(fixed, (0.0, 0.0, 0.0)),
        warped=sitk.Cast(fixed, sitk.sitkFloat32),
        method="identity",
        preset=preset,
        timings={"solve": 0.01},
        extras={"options": dict(options), "got_fixed_mask": fixed_mask is not None, "got_moving_mask": moving_mask is not None},
    )
    return result


def stand_in(name, run, options=(), presets=("p", "q"), uses_masks=("fixed", "moving")) -> MethodSpec:
    """A registry entry for a stand-in method (default preset ``q``)."""
    return MethodSpec(
        name=name, run=run, presets=presets, default_preset=presets[-1], options=frozenset(options),
        uses_masks=frozenset(uses_masks), summary="test stand-in",
    )


@pytest.fixture
def identity(monkeypatch):
    monkeypatch.setitem(METHODS, "identity", stand_in("identity", identity_method, options=("alpha",)))
    return "identity"


# ------------------------------------------------------------------ METHODS / register
def test_methods_is_a_plain_dict_with_elastix():
    assert type(METHODS) is dict
    assert "elastix" in METHODS and callable(METHODS["elastix"])


def test_register_dispatches_to_a_new_method_and_adds_timings(identity, tmp_path):
    fixed, moving = volume(), volume(seed=1)
    sitk.WriteImage(moving, str(tmp_path / "moving.nii.gz"))
    mask = sitk.Cast(fixed > -500, sitk.sitkUInt8)
    result = register(fixed, tmp_path / "moving.nii.gz", method=identity, preset="p", fixed_mask=mask, alpha=2)
    assert result.method == "identity" and result.preset == "p"
    assert result.extras == {"options": {"alpha": 2}, "got_fixed_mask": True, "got_moving_mask": False}
    assert list(result.timings) == ["load", "solve", "total"]
    assert result.timings["total"] >= result.timings["load"]


def test_unknown_method_is_an_input_error():
    with pytest.raises(InputError, match="unknown registration method 'nope'"):
        register(volume(), volume(), method="nope")


def test_2d_image_is_an_input_error(identity):
    flat = sitk.Image([20, 18], sitk.sitkFloat32)
    with pytest.raises(InputError, match="moving image is 2D"):
        register(volume(), flat, method=identity)


def test_missing_file_is_an_input_error(identity, tmp_path):
    with pytest.raises(InputError, match="not found"):
        register(tmp_path / "nope.nii.gz", volume(), method=identity)


def test_empty_mask_is_an_input_error(identity):
    fixed = volume()
    empty = sitk.Image(fixed.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(fixed)
    with pytest.raises(InputError, match="fixed mask is empty"):
        register(fixed, volume(), method=identity, fixed_mask=empty)
    with pytest.raises(InputError, match="moving mask is empty"):
        register(fixed, volume(), method=identity, moving_mask=empty)


def test_mask_on_another_grid_is_an_input_error(identity):
    fixed = volume()
    mask = sitk.Cast(volume(spacing=(1.0, 1.0, 1.0)) > -500, sitk.sitkUInt8)
    with pytest.raises(InputError, match="fixed mask is not on its image's grid"):
        register(fixed, volume(), method=identity, fixed_mask=mask)


def test_non_overlapping_fields_of_view_are_an_input_error(identity):
    far = volume(origin=(0.0, 0.0, 500.0))
    with pytest.raises(InputError, match="do not overlap"):
        register(volume(), far, method=identity)
    # A small overlap is enough.
    register(volume(), volume(origin=(0.0, 0.0, 36.0)), method=identity)


def test_method_returning_a_field_off_the_fixed_grid_is_caught(monkeypatch):
    def bad(fixed, moving, **kwargs):
        return RegistrationResult(shift_field(moving), sitk.Cast(moving, sitk.sitkFloat32), "bad")

    monkeypatch.setitem(METHODS, "bad", stand_in("bad", bad))
    with pytest.raises(RuntimeError, match="not on the fixed grid"):
        register(volume(), volume(size=(10, 10, 10)), method="bad")


# ------------------------------------------------------------------ RegistrationResult
def test_map_points_and_warp_follow_the_fixed_to_moving_convention():
    fixed = volume(size=(30, 30, 30), spacing=(1.0, 1.0, 1.0))
    shift = (2.0, -1.0, 3.0)
    # moving(y) = fixed(y - shift): the structure at fixed x is found at moving x + shift.
    moving = sitk.Resample(fixed, fixed, sitk.TranslationTransform(3, [-s for s in shift]), sitk.sitkLinear, -1024.0)
    result = RegistrationResult(shift_field(fixed, shift), sitk.Cast(fixed, sitk.sitkFloat32), "test")
    pts = np.array([[10.2, 11.7, 12.1], [20.0, 5.5, 14.0]])
    assert np.allclose(result.map_points(pts), pts + shift)
    assert np.allclose(result.map_points(pts, interpolation="cubic"), pts + shift)
    warped = result.warp(moving)
    inner = (slice(5, -5),) * 3
    assert np.allclose(sitk.GetArrayFromImage(warped)[inner], sitk.GetArrayFromImage(fixed)[inner], atol=1e-3)
    with pytest.raises(InputError, match="interpolation"):
        result.map_points(pts, interpolation="quintic")


def _result_with_everything(fixed: sitk.Image) -> RegistrationResult:
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((1.01, 0.02, 0.0, 0.0, 0.99, 0.0, 0.0, 0.01, 1.0))
    affine.SetTranslation((1.0, 2.0, 3.0))
    affine.SetCenter((10.0, 10.0, 10.0))
    return RegistrationResult(
        displacement=shift_field(fixed, (0.123456, -2.5, 3.25)),
        warped=sitk.Cast(fixed, sitk.sitkFloat32),
        method="elastix",
        preset="fast",
        timings={"affine": 1.5, "bspline": 2.25, "total": 4.0},
        affine=affine,
        extras={"elastix": {"stages": [{"name": "affine"}]}},
        artifacts={"elastix/TransformParameters.0.txt": "(Transform \"AffineTransform\")\n"},
    )


def test_save_and_load_round_trip(tmp_path):
    fixed = volume()
    result = _result_with_everything(fixed)
    mask = sitk.Cast(fixed > -500, sitk.sitkUInt8)
    out = result.save(tmp_path / "run", summary_extra={"command": {"fixed": "f.nii.gz"}}, fixed_mask=mask)
    assert sorted(p.name for p in out.iterdir()) == ["affine.tfm", "disp.nii.gz", "elastix", "summary.json", "warped.nii.gz"]
    assert (out / "elastix" / "TransformParameters.0.txt").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers

    loaded = RegistrationResult.load(out)
    assert loaded.method == "elastix" and loaded.preset == "fast"
    assert loaded.timings == result.timings
    assert loaded.extras == result.extras
    assert loaded.displacement.GetPixelID() == sitk.sitkVectorFloat64
    assert np.allclose(sitk.GetArrayFromImage(loaded.displacement), sitk.GetArrayFromImage(result.displacement), atol=1e-5)
    assert np.allclose(loaded.displacement.GetOrigin(), fixed.GetOrigin(), atol=1e-4)
    assert np.allclose(loaded.displacement.GetSpacing(), fixed.GetSpacing(), atol=1e-4)
    assert np.array_equal(sitk.GetArrayFromImage(loaded.warped), sitk.GetArrayFromImage(result.warped))
    pts = np.array([[5.0, 6.0, 7.0], [30.0, 20.0, 10.0]])
    assert np.allclose(loaded.map_points(pts), result.map_points(pts), atol=1e-5)
    assert np.allclose(
        [loaded.affine.TransformPoint(p) for p in pts.tolist()], [result.affine.TransformPoint(p) for p in pts.tolist()]
    )

    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "elastix" and summary["preset"] == "fast"
    assert summary["timings"] == {"affine": 1.5, "bspline": 2.25, "total": 4.0}
    assert summary["peak_memory_mb"]["max"] > 0
    assert summary["folding_share"] == 0.0
    assert summary["jac_min"] == pytest.approx(1.0) and summary["jac_max"] == pytest.approx(1.0)
    assert summary["jac_mean"] == pytest.approx(1.0)
    assert summary["jacobian"]["mask"]["jac_mean"] == pytest.approx(1.0)
    assert summary["fixed_grid"]["size"] == list(fixed.GetSize())
    assert summary["fixed_grid"]["spacing"] == list(fixed.GetSpacing())
    assert summary["versions"]["regsam"] == __version__
    assert summary["command"] == {"fixed": "f.nii.gz"}
    assert np.allclose(np.array(summary["affine_matrix"])[:3, 3], np.array(result.affine.TransformPoint((0.0, 0.0, 0.0))))


def test_failed_save_leaves_no_folder(tmp_path):
    result = _result_with_everything(volume())
    result.artifacts["../escape.txt"] = "x"
    with pytest.raises(ValueError):
        result.save(tmp_path / "run")
    assert list(tmp_path.iterdir()) == []


def test_load_rejects_a_folder_that_is_not_a_result(tmp_path):
    with pytest.raises(InputError, match="not found"):
        RegistrationResult.load(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "summary.json").write_text("{}")
    with pytest.raises(InputError, match="missing disp.nii.gz"):
        RegistrationResult.load(tmp_path / "half")


# ------------------------------------------------------------------ run_register_command with elastix
def test_run_register_command_writes_a_complete_result_folder(chest_crop_path, tmp_path, capfd):
    from regsam.io.images import resample_to_spacing

    ct = sitk.Cast(sitk.ReadImage(str(chest_crop_path)), sitk.sitkFloat32)
    moving = resample_to_spacing(ct, 4.0)
    fixed = sitk.Resample(ct, moving, sitk.TranslationTransform(3, (3.0, -2.0, 4.0)), sitk.sitkLinear, -1024.0)
    body = sitk.Cast(sitk.BinaryThreshold(fixed, -500.0, 5000.0), sitk.sitkUInt8)
    for name, image in (("fixed", fixed), ("moving", moving), ("mask", body)):
        sitk.WriteImage(image, str(tmp_path / f"{name}.nii.gz"))
    options = {"overrides": {"MaximumNumberOfIterations": 60}}
    out = run_register_command(
        tmp_path / "fixed.nii.gz",
        tmp_path / "moving.nii.gz",
        tmp_path / "out",
        method="elastix",
        preset="fast",
        fixed_mask_path=tmp_path / "mask.nii.gz",
        moving_mask_path=None,
        options=options,
    )
    assert out == tmp_path / "out"
    assert capfd.readouterr().out == ""
    names = {p.name for p in out.iterdir()}
    assert {"disp.nii.gz", "warped.nii.gz", "affine.tfm", "summary.json", "elastix"} <= names
    assert {p.name for p in (out / "elastix").iterdir()} >= {"TransformParameters.0.txt", "TransformParameters.1.txt"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "elastix" and summary["preset"] == "fast"
    assert {"load", "affine", "bspline", "total"} <= set(summary["timings"])
    assert 0.0 <= summary["folding_share"] < 0.01
    assert summary["jac_min"] <= summary["jac_mean"] <= summary["jac_max"]
    assert "mask" in summary["jacobian"]
    assert summary["command"]["options"] == options
    assert summary["command"]["fixed_mask"].endswith("mask.nii.gz")
    assert summary["extras"]["elastix"]["fixed_mask"] is True
    loaded = RegistrationResult.load(out)
    shift = loaded.map_points(np.array([fixed.TransformContinuousIndexToPhysicalPoint((22.0, 19.0, 21.0))]))
    shift -= np.array(fixed.TransformContinuousIndexToPhysicalPoint((22.0, 19.0, 21.0)))
    assert np.linalg.norm(shift - np.array([3.0, -2.0, 4.0])) < 1.5


def test_run_register_command_bad_input_leaves_no_output(tmp_path):
    sitk.WriteImage(volume(), str(tmp_path / "fixed.nii.gz"))
    sitk.WriteImage(volume(origin=(500.0, 0.0, 0.0)), str(tmp_path / "moving.nii.gz"))
    with pytest.raises(InputError, match="do not overlap"):
        run_register_command(tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz", tmp_path / "out", "elastix", None, None, None, {})
    assert not (tmp_path / "out").exists()
