"""read_image checks NIfTI data as stored: truncated files and NaN/inf voxels (which SimpleITK reads as 0) are refused."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from regsam.errors import InputError
from regsam.io.images import read_image


@pytest.fixture(scope="module")
def real_nifti(chest_crop_path) -> nib.Nifti1Image:
    """The real chest crop (int16 HU) as nibabel reads it."""
    return nib.load(str(chest_crop_path))


def _float_with_nan(real_nifti: nib.Nifti1Image, folder: Path, name: str = "ct_nan.nii.gz") -> tuple[Path, np.ndarray]:
    data = np.asarray(real_nifti.dataobj, dtype=np.float32)
    bad = [(10, 20, 30), (60, 50, 40), (0, 0, 0)]
    data[bad[0]] = np.nan
    data[bad[1]] = np.inf
    data[bad[2]] = -np.inf
    path = folder / name
    nib.save(nib.Nifti1Image(data, real_nifti.affine), str(path))
    return path, np.array(bad)


def test_simpleitk_alone_reads_nan_nifti_voxels_as_zero(real_nifti, tmp_path):
    """The failure being guarded against: without the check the NaN voxels silently become 0 (water)."""
    path, bad = _float_with_nan(real_nifti, tmp_path)
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))  # (z, y, x)
    assert np.isfinite(array).all()
    assert [array[k, j, i] for i, j, k in bad] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_nan_and_inf_voxels_in_nifti_are_refused(real_nifti, tmp_path, suffix):
    path, _ = _float_with_nan(real_nifti, tmp_path, f"ct_nan{suffix}")
    with pytest.raises(InputError, match=r"contains NaN or infinite values \(3 voxels; .*--nan-value") as info:
        read_image(path)
    assert path.name in str(info.value) and "\n" not in str(info.value)


def test_nan_value_replaces_exactly_the_bad_voxels(real_nifti, tmp_path):
    path, bad = _float_with_nan(real_nifti, tmp_path)
    image = read_image(path, nan_value=-1024.0)
    array = sitk.GetArrayFromImage(image)
    expected = np.asarray(real_nifti.dataobj, dtype=np.float32).transpose(2, 1, 0).copy()
    for i, j, k in bad:
        expected[k, j, i] = -1024.0
    np.testing.assert_array_equal(array, expected)
    # the geometry is SimpleITK's own reading of the file
    plain = sitk.ReadImage(str(path))
    assert image.GetOrigin() == plain.GetOrigin() and image.GetDirection() == plain.GetDirection()


def test_nan_value_applies_to_other_formats_and_must_be_finite(tmp_path):
    array = np.full((6, 5, 4), 7.0, dtype=np.float32)
    array[1, 2, 3] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "nan.mha"))
    with pytest.raises(InputError, match="NaN"):
        read_image(tmp_path / "nan.mha")
    fixed = sitk.GetArrayFromImage(read_image(tmp_path / "nan.mha", nan_value=0.0))
    assert fixed[1, 2, 3] == 0.0 and np.count_nonzero(fixed == 7.0) == array.size - 1
    with pytest.raises(InputError, match="finite"):
        read_image(tmp_path / "nan.mha", nan_value=float("nan"))


@pytest.mark.parametrize("suffix,keep", [(".nii.gz", 4096), (".nii", 100_000)], ids=["gz-cut-at-4kB", "nii-cut"])
def test_truncated_nifti_is_refused(chest_crop_path, tmp_path, suffix, keep):
    raw = gzip.decompress(Path(chest_crop_path).read_bytes())
    whole = Path(chest_crop_path).read_bytes() if suffix == ".nii.gz" else raw
    (tmp_path / f"cut{suffix}").write_bytes(whole[:keep])
    with pytest.raises(InputError, match="truncated image file .*header announces") as info:
        read_image(tmp_path / f"cut{suffix}")
    assert "\n" not in str(info.value)
    # the intact file reads as before
    (tmp_path / f"whole{suffix}").write_bytes(whole)
    image = read_image(tmp_path / f"whole{suffix}")
    assert image.GetSize() == sitk.ReadImage(str(chest_crop_path)).GetSize()


def test_float_nifti_without_nan_and_int_nifti_read_unchanged(real_nifti, chest_crop_path, tmp_path):
    data = np.asarray(real_nifti.dataobj, dtype=np.float32)
    nib.save(nib.Nifti1Image(data, real_nifti.affine), str(tmp_path / "float.nii.gz"))
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(read_image(tmp_path / "float.nii.gz")), data.transpose(2, 1, 0)
    )
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(read_image(chest_crop_path)), sitk.GetArrayFromImage(sitk.ReadImage(str(chest_crop_path)))
    )
