"""``regsam warp`` and ``regsam transform-points`` against SimpleITK on a real CT crop."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from regsam.io.images import resample_to_spacing
from regsam.io.landmarks import read_points, write_points_csv
from regsam.io.transforms import transform_to_field, write_affine, write_displacement_field

SHIFT = (3.0, -5.0, 8.0)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "regsam.cli", *args], capture_output=True, text=True)


@pytest.fixture()
def ct_and_field(chest_crop_path, tmp_path):
    ct = resample_to_spacing(sitk.ReadImage(str(chest_crop_path)), 3.0)
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    field = transform_to_field(sitk.TranslationTransform(3, SHIFT), ct)
    result = tmp_path / "result"
    result.mkdir()
    write_displacement_field(field, result / "disp.nii.gz")
    return ct, result


def test_warp_matches_sitk_resample_and_keeps_labels(ct_and_field, tmp_path):
    ct, result = ct_and_field
    proc = _cli("warp", str(tmp_path / "ct.nii.gz"), "--transform", str(result), "--out", str(tmp_path / "w.nii.gz"))
    assert proc.returncode == 0, proc.stderr
    expected = sitk.Resample(ct, ct, sitk.TranslationTransform(3, SHIFT), sitk.sitkLinear, -1024.0)
    warped = sitk.ReadImage(str(tmp_path / "w.nii.gz"))
    diff = np.abs(sitk.GetArrayFromImage(warped).astype(float) - sitk.GetArrayFromImage(expected))
    assert diff.max() < 1.0

    labels = sitk.Cast(ct > -400, sitk.sitkUInt8) * 3
    sitk.WriteImage(labels, str(tmp_path / "labels.nii.gz"))
    proc = _cli("warp", str(tmp_path / "labels.nii.gz"), "--transform", str(result), "--out", str(tmp_path / "wl.nii.gz"), "--interpolator", "nearest")
    assert proc.returncode == 0, proc.stderr
    warped_labels = sitk.ReadImage(str(tmp_path / "wl.nii.gz"))
    assert warped_labels.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayFromImage(warped_labels))) <= {0, 3}


def test_transform_points_field_and_tfm_agree(ct_and_field, tmp_path):
    ct, result = ct_and_field
    centre = np.array(ct.TransformContinuousIndexToPhysicalPoint([s / 2 for s in ct.GetSize()]))
    pts = centre + np.random.default_rng(1).uniform(-20, 20, size=(25, 3))
    write_points_csv(pts, tmp_path / "fixed.csv")
    write_affine(sitk.TranslationTransform(3, SHIFT), tmp_path / "shift.tfm")
    for transform, out in ((result, "a.csv"), (tmp_path / "shift.tfm", "b.fcsv")):
        proc = _cli("transform-points", str(tmp_path / "fixed.csv"), "--transform", str(transform), "--out", str(tmp_path / out))
        assert proc.returncode == 0, proc.stderr
        np.testing.assert_allclose(read_points(tmp_path / out), pts + np.array(SHIFT), atol=1e-3)


def test_apply_bad_input_gives_one_line_and_exit_2(ct_and_field, tmp_path):
    _, result = ct_and_field
    proc = _cli("warp", str(tmp_path / "missing.nii.gz"), "--transform", str(result), "--out", str(tmp_path / "x.nii.gz"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "missing.nii.gz" in proc.stderr
    assert not (tmp_path / "x.nii.gz").exists()
    (tmp_path / "nan.csv").write_text("x,y,z\n1,2,nan\n")
    proc = _cli("transform-points", str(tmp_path / "nan.csv"), "--transform", str(result), "--out", str(tmp_path / "y.csv"))
    assert proc.returncode == 2 and "NaN" in proc.stderr
    assert not (tmp_path / "y.csv").exists()
    (tmp_path / "ok.csv").write_text("x,y,z\n1,2,3\n")
    proc = _cli("transform-points", str(tmp_path / "ok.csv"), "--transform", str(tmp_path), "--out", str(tmp_path / "y.csv"))
    assert proc.returncode == 2 and "disp.nii.gz" in proc.stderr
