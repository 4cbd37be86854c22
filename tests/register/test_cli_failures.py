"""``regsam register``: every failure is one line on stderr, the right exit code, and no output folder.

Bad input (an option the method does not take, NaN voxels, a truncated file) exits with 2; a method
that fails inside exits with 1 and names the method and the cause (for elastix, its log's error line).
Images: the real chest crop resampled to 3 mm (61 x 51 x 56 voxels).
"""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("ITK_GLOBAL_DEFAULT_THREADER", "Pool")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from regsam.cli import main  # noqa: E402
from regsam.io.images import resample_to_spacing  # noqa: E402
from regsam.register.methods import METHODS  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")


@pytest.fixture(scope="module")
def ct3_path(chest_crop_path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ct3") / "ct3.nii.gz"
    sitk.WriteImage(resample_to_spacing(sitk.ReadImage(str(chest_crop_path)), 3.0), str(path))
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ITK_GLOBAL_DEFAULT_THREADER": "Pool"}
    return subprocess.run([sys.executable, "-m", "regsam.cli", "register", *args], capture_output=True, text=True, env=env)


def assert_one_line(proc: subprocess.CompletedProcess, code: int, *words: str) -> str:
    line = proc.stderr.strip()
    assert proc.returncode == code, proc.stderr[-800:]
    assert len(line.splitlines()) == 1 and line.startswith("regsam: error: "), proc.stderr[-800:]
    assert "Traceback" not in line and all(w in line for w in words), line
    return line


# ------------------------------------------------------------------ exit 2: bad input
@pytest.mark.parametrize(
    "extra,words",
    [
        (["--method", "elastix", "--device", "cpu"], ["--method elastix does not take --device"]),
        (["--method", "convexadam", "--stages", "affine"], ["--method convexadam does not take --stages"]),
        (["--method", "sam", "--moving-mask", "MASK"], ["'sam' does not use a moving mask"]),
        (["--method", "demons"], ["unknown registration method 'demons'"]),
        (["--method", "sam+elastix", "--preset", "accurate"], ["unknown sam+elastix preset 'accurate'"]),
    ],
    ids=["device-elastix", "stages-convexadam", "moving-mask-sam", "unknown-method", "unknown-preset"],
)
def test_unsupported_option_is_one_line_exit_2(ct3_path, tmp_path, extra, words):
    extra = [str(ct3_path) if e == "MASK" else e for e in extra]
    proc = run_cli(str(ct3_path), str(ct3_path), "--out", str(tmp_path / "out"), *extra)
    assert_one_line(proc, 2, *words)
    assert not (tmp_path / "out").exists()


def test_nan_nifti_is_one_line_exit_2_and_nan_value_replaces(chest_crop_path, ct3_path, tmp_path):
    real = nib.load(str(ct3_path))
    data = np.asarray(real.dataobj, dtype=np.float32)
    data[20:23, 20:23, 20:23] = np.nan
    nib.save(nib.Nifti1Image(data, real.affine), str(tmp_path / "nan.nii.gz"))
    proc = run_cli(str(tmp_path / "nan.nii.gz"), str(ct3_path), "--out", str(tmp_path / "out"))
    assert_one_line(proc, 2, "nan.nii.gz", "NaN or infinite", "27 voxels", "--nan-value")
    assert not (tmp_path / "out").exists()

    code = main(["register", str(tmp_path / "nan.nii.gz"), str(ct3_path), "--out", str(tmp_path / "out"),
                 "--method", "elastix", "--preset", "fast", "--stages", "affine", "--nan-value", "-1024"])
    assert code == 0
    warped_from = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "warped.nii.gz")))
    assert np.isfinite(warped_from).all()
    assert '"nan_value": -1024.0' in (tmp_path / "out" / "summary.json").read_text()


def test_truncated_nifti_is_one_line_exit_2(ct3_path, tmp_path):
    (tmp_path / "cut.nii.gz").write_bytes(ct3_path.read_bytes()[:4096])
    proc = run_cli(str(ct3_path), str(tmp_path / "cut.nii.gz"), "--out", str(tmp_path / "out"))
    assert_one_line(proc, 2, "moving image", "cut.nii.gz", "truncated")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ exit 1: the method fails inside
def test_method_failing_inside_is_one_line_exit_1(ct3_path, tmp_path, monkeypatch, capsys):
    """Real elastix failing for real: its B-spline stage starts 400 mm away, so no sample lands in the moving image."""
    from regsam.register.elastix import register_elastix

    far = sitk.TranslationTransform(3, (400.0, 0.0, 0.0))

    def far_away(fixed, moving, **kwargs):
        return register_elastix(fixed, moving, stages="bspline", initial_transform=far, **kwargs)

    monkeypatch.setitem(METHODS, "elastix", dataclasses.replace(METHODS["elastix"], run=far_away))
    code = main(["register", str(ct3_path), str(ct3_path), "--out", str(tmp_path / "out"), "--method", "elastix",
                 "--preset", "fast"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith("regsam: error: method 'elastix' failed: elastix bspline stage failed: ")
    assert "Too many samples map outside moving image buffer" in err  # the error line of elastix's log
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary folder either


def test_elastix_stages_given_as_one_string(ct3_path):
    from regsam.register.api import register

    result = register(ct3_path, ct3_path, method="elastix", preset="fast", stages="affine",
                      overrides={"MaximumNumberOfIterations": 20})
    assert [s["name"] for s in result.extras["elastix"]["stages"]] == ["affine"]
    with pytest.raises(Exception, match="unknown elastix stage\\(s\\) demons; choose from affine, bspline"):
        register(ct3_path, ct3_path, method="elastix", preset="fast", stages="affine,demons")
