"""Image reading, orientation and resampling."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from regsam.errors import InputError
from regsam.io.images import read_image, read_raw_volume, resample_to_spacing, to_lps, write_image, write_nifti_gz


def _volume(size=(12, 10, 8), spacing=(0.8, 0.9, 2.0), origin=(-50.0, 20.0, -300.0)) -> sitk.Image:
    data = (np.arange(np.prod(size)).reshape(size[::-1]) % 2000 - 1000).astype(np.int16)
    image = sitk.GetImageFromArray(data)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def _assert_same_image(a: sitk.Image, b: sitk.Image, atol: float = 1e-4) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=atol)
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=atol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=atol)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha", ".nrrd"])
def test_read_image_formats(tmp_path: Path, suffix: str) -> None:
    image = _volume()
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    path = write_image(image, tmp_path / f"ct{suffix}")
    _assert_same_image(read_image(path), image)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def _write_dicom_series(image: sitk.Image, folder: Path) -> None:
    """One CT slice per file with the tags a reader needs to rebuild the geometry."""
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125." + time.strftime("%H%M%S")
    direction = image.GetDirection()
    shared = [
        ("0008|0060", "CT"),
        ("0020|000d", uid + ".1"),
        ("0020|000e", uid + ".2"),
        ("0020|0037", "\\".join(f"{v:.6f}" for v in direction[0:7:3] + direction[1:8:3])),
        ("0028|1052", "0"),  # rescale intercept
        ("0028|1053", "1"),  # rescale slope
    ]
    for z in range(image.GetDepth()):
        slice_ = image[:, :, z]
        for tag, value in shared:
            slice_.SetMetaData(tag, value)
        position = image.TransformIndexToPhysicalPoint((0, 0, z))
        slice_.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in position))
        slice_.SetMetaData("0020|0013", str(z + 1))
        slice_.SetMetaData("0008|0018", f"{uid}.3.{z + 1}")
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(slice_)


def test_read_dicom_series(tmp_path: Path) -> None:
    image = _volume(spacing=(0.7, 0.7, 2.5))
    _write_dicom_series(image, tmp_path / "series")
    _assert_same_image(read_image(tmp_path / "series"), image)


def test_read_image_rejects_bad_input(tmp_path: Path) -> None:
    sitk.WriteImage(sitk.Image([8, 8], sitk.sitkInt16), str(tmp_path / "flat.nii.gz"))
    sitk.WriteImage(sitk.Image([4, 4, 4, 3], sitk.sitkInt16), str(tmp_path / "dyn.nii.gz"))
    nan = sitk.GetImageFromArray(np.full((4, 4, 4), np.nan, dtype=np.float32))
    sitk.WriteImage(nan, str(tmp_path / "nan.mha"))
    (tmp_path / "junk.nii.gz").write_bytes(b"\x00garbage" * 10)
    (tmp_path / "empty").mkdir()
    cases = {
        "flat.nii.gz": "2D",
        "dyn.nii.gz": "4D",
        "nan.mha": "NaN",
        "junk.nii.gz": "cannot read",
        "absent.nii.gz": "not found",
        "empty": "no DICOM series",
    }
    for name, message in cases.items():
        with pytest.raises(InputError, match=message) as info:
            read_image(tmp_path / name)
        assert name in str(info.value)


def test_to_lps_keeps_physical_positions() -> None:
    image = _volume()
    # RAS-style storage: first two axes flipped, as from a NIfTI written by RAS tools.
    image.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    lps = to_lps(image)
    np.testing.assert_allclose(lps.GetDirection(), np.eye(3).ravel())
    rng = np.random.default_rng(0)
    for index in rng.integers(0, image.GetSize(), size=(20, 3)).tolist():
        point = image.TransformIndexToPhysicalPoint(index)
        new_index = lps.TransformPhysicalPointToIndex(point)
        np.testing.assert_allclose(lps.TransformIndexToPhysicalPoint(new_index), point, atol=1e-6)
        assert lps[new_index] == image[index]


def test_resample_to_spacing_keeps_centre() -> None:
    image = _volume(size=(40, 30, 20), spacing=(0.75, 0.75, 2.5))
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    out = resample_to_spacing(image, 1.5)
    assert out.GetSpacing() == (1.5, 1.5, 1.5)
    assert out.GetSize() == (20, 15, 33)
    assert out.GetDirection() == image.GetDirection()

    def centre(img: sitk.Image) -> np.ndarray:
        return np.array(img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in img.GetSize()]))

    np.testing.assert_allclose(centre(out), centre(image), atol=1e-9)


def test_read_raw_volume_shape_and_byte_order(tmp_path: Path) -> None:
    data = (np.arange(4 * 3 * 2) * 300 - 2000).reshape(2, 3, 4)  # (z, y, x), x fastest on disk
    data.astype(">i2").tofile(tmp_path / "big.img")
    data.astype("<i2").tofile(tmp_path / "little.img")
    for name, dtype in (("big.img", ">i2"), ("little.img", "<i2")):
        image = read_raw_volume(tmp_path / name, (4, 3, 2), (0.97, 0.97, 2.5), dtype=dtype)
        assert image.GetSize() == (4, 3, 2) and image.GetSpacing() == (0.97, 0.97, 2.5)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), data)
        assert image[3, 0, 0] == data[0, 0, 3]  # x is the fastest axis
    (tmp_path / "cut.img").write_bytes((tmp_path / "little.img").read_bytes()[:-2])
    with pytest.raises(InputError, match="truncated"):
        read_raw_volume(tmp_path / "cut.img", (4, 3, 2), (1.0, 1.0, 1.0))
    with pytest.raises(InputError, match="not found"):
        read_raw_volume(tmp_path / "absent.img", (4, 3, 2), (1.0, 1.0, 1.0))


def test_write_nifti_gz_is_the_same_nifti_as_simpleitk(tmp_path: Path) -> None:
    import gzip

    rng = np.random.default_rng(0)
    field = sitk.GetImageFromArray(rng.normal(size=(5, 6, 7, 3)).astype(np.float32), isVector=True)
    field.SetOrigin((1.0, -2.0, 3.5))
    field.SetSpacing((0.8, 1.2, 2.5))
    field.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    for image, name in ((field, "disp.nii.gz"), (sitk.VectorIndexSelectionCast(field, 0), "warped.nii.gz")):
        ours, theirs = tmp_path / name, tmp_path / f"sitk_{name}"
        write_nifti_gz(image, ours)
        sitk.WriteImage(image, str(theirs), True)
        assert gzip.open(ours).read() == gzip.open(theirs).read()  # same NIfTI bytes, only the deflate differs
        back = sitk.ReadImage(str(ours))
        assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disp.nii.gz", "sitk_disp.nii.gz", "sitk_warped.nii.gz",
                                                          "warped.nii.gz"]
    with pytest.raises(InputError):
        write_nifti_gz(field, tmp_path / "disp.mha")


@pytest.mark.parametrize("block", [64, 1000, 2165, 1 << 20])
def test_write_nifti_gz_blocks_form_one_gzip_member(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int) -> None:
    import gzip
    import zlib

    import regsam.io.images as images

    monkeypatch.setattr(images, "_GZ_BLOCK", block)  # many blocks with a short last one, two exact halves, one block
    image = _volume(size=(17, 13, 9))
    write_nifti_gz(image, tmp_path / "a.nii.gz")
    packed = (tmp_path / "a.nii.gz").read_bytes()
    member = zlib.decompressobj(31)
    raw = member.decompress(packed)
    assert member.eof and member.unused_data == b""  # a single member: readers that stop after one read it all
    assert raw == gzip.open(tmp_path / "a.nii.gz").read()
    _assert_same_image(sitk.ReadImage(str(tmp_path / "a.nii.gz")), image)
