"""Displacement fields and transforms: file round trips, conventions, composition, Jacobians."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import map_coordinates

from regsam.errors import InputError
from regsam.io.transforms import (
    compose_fields,
    field_transform,
    folding_share,
    jacobian_determinant,
    map_points,
    read_affine,
    read_displacement_field,
    transform_to_field,
    warp_image,
    write_affine,
    write_displacement_field,
)


def _grid(size=(24, 20, 16), spacing=(1.5, 1.25, 2.5), origin=(-40.3, 12.7, -310.9), angle_deg=25.0) -> sitk.Image:
    """A reference grid with an oblique, left-handed direction, as scanners sometimes produce."""
    image = sitk.Image(list(size), sitk.sitkUInt8)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    a = np.deg2rad(angle_deg)
    image.SetDirection((np.cos(a), -np.sin(a), 0.0, np.sin(a), np.cos(a), 0.0, 0.0, 0.0, -1.0))
    return image


def _smooth_field(reference: sitk.Image, amplitude: float = 4.0, seed: int = 0) -> sitk.Image:
    """A smooth random displacement field (mm) on ``reference``'s grid."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(scale=amplitude, size=(4, 4, 4, 3))
    shape = reference.GetSize()[::-1]
    zoom = [np.linspace(0, 3, n) for n in shape]
    grid = np.meshgrid(*zoom, indexing="ij")
    data = np.stack([map_coordinates(coarse[..., c], grid, order=3) for c in range(3)], axis=-1)
    field = sitk.GetImageFromArray(data, isVector=True)
    field.CopyInformation(reference)
    return field


def _inside_points(reference: sitk.Image, n: int = 50, seed: int = 1, margin: float = 2.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    size = np.array(reference.GetSize(), dtype=float)
    index = rng.uniform(margin, size - 1 - margin, size=(n, 3))
    return np.array([reference.TransformContinuousIndexToPhysicalPoint(i.tolist()) for i in index])


@pytest.mark.parametrize(("suffix", "atol"), [(".nii.gz", 1e-3), (".mha", 1e-9), (".nrrd", 1e-9)])
def test_field_round_trip_maps_points_identically(tmp_path: Path, suffix: str, atol: float) -> None:
    reference = _grid()
    field = _smooth_field(reference)
    points = _inside_points(reference)
    before = [sitk.DisplacementFieldTransform(sitk.Image(field)).TransformPoint(p) for p in points.tolist()]
    path = write_displacement_field(field, tmp_path / f"disp{suffix}")
    back = read_displacement_field(path)
    assert back.GetPixelID() == sitk.sitkVectorFloat64 and back.GetSize() == field.GetSize()
    after = [sitk.DisplacementFieldTransform(sitk.Image(back)).TransformPoint(p) for p in points.tolist()]
    # NIfTI keeps origin/direction in float32 (~1e-5 mm); the vectors themselves are exact.
    np.testing.assert_allclose(after, before, atol=atol)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(field))
    plain = sitk.ReadImage(str(path))  # what any SimpleITK user sees
    np.testing.assert_array_equal(sitk.GetArrayFromImage(plain), sitk.GetArrayFromImage(field))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left


def test_nifti_field_holds_lps_vectors_with_vector_intent(tmp_path: Path) -> None:
    field = _smooth_field(_grid())
    path = write_displacement_field(field, tmp_path / "disp.nii.gz")
    nifti = nib.load(path)
    assert nifti.header.get_intent()[0] == "vector"  # 1007, not 1006 (which ITK treats as RAS)
    raw = np.asanyarray(nifti.dataobj)[:, :, :, 0, :]  # (x, y, z, component)
    np.testing.assert_array_equal(raw.transpose(2, 1, 0, 3), sitk.GetArrayFromImage(field))


def test_nifti_displacement_intent_is_ras_and_rewritable(tmp_path: Path) -> None:
    """A non-ITK field (intent 1006, RAS vectors) reads as LPS and can be written again."""
    lps = np.array([1.0, 2.0, 3.0])
    ras_data = np.broadcast_to(lps * [-1, -1, 1], (5, 4, 3, 1, 3)).astype(np.float64)
    header = nib.Nifti1Header()
    header.set_intent("displacement vector")
    nib.save(nib.Nifti1Image(ras_data, np.diag([-1.0, -1.0, 1.0, 1.0]), header), tmp_path / "ras.nii.gz")
    field = read_displacement_field(tmp_path / "ras.nii.gz")
    np.testing.assert_allclose(sitk.GetArrayFromImage(field)[1, 2, 3], lps)
    # Plain sitk.WriteImage of an image read from such a file fails; ours must not.
    with pytest.raises(RuntimeError, match="RAS conversion"):
        sitk.WriteImage(sitk.ReadImage(str(tmp_path / "ras.nii.gz")), str(tmp_path / "plain.nii.gz"))
    again = read_displacement_field(write_displacement_field(field, tmp_path / "again.nii.gz"))
    np.testing.assert_allclose(sitk.GetArrayFromImage(again)[1, 2, 3], lps)


def test_float32_field_is_written_as_float32(tmp_path: Path) -> None:
    field = sitk.Cast(_smooth_field(_grid()), sitk.sitkVectorFloat32)
    path = write_displacement_field(field, tmp_path / "disp.mha")
    assert sitk.ReadImage(str(path)).GetPixelID() == sitk.sitkVectorFloat32
    assert read_displacement_field(path).GetPixelID() == sitk.sitkVectorFloat64


def test_bad_fields_raise_input_error(tmp_path: Path) -> None:
    scalar = sitk.Image([4, 4, 4], sitk.sitkFloat32)
    sitk.WriteImage(scalar, str(tmp_path / "scalar.nii.gz"))
    with pytest.raises(InputError, match="components"):
        read_displacement_field(tmp_path / "scalar.nii.gz")
    data = np.zeros((4, 4, 4, 3))
    data[1, 2, 3, 0] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(data, isVector=True), str(tmp_path / "nan.mha"))
    with pytest.raises(InputError, match="NaN"):
        read_displacement_field(tmp_path / "nan.mha")
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot read"):
        read_displacement_field(tmp_path / "junk.nii.gz")
    with pytest.raises(InputError, match="not found"):
        read_displacement_field(tmp_path / "absent.nii.gz")
    two_d = sitk.Image([4, 4], sitk.sitkVectorFloat64, 2)
    with pytest.raises(InputError, match="2D"):
        write_displacement_field(two_d, tmp_path / "x.nii.gz")
    assert not (tmp_path / "x.nii.gz").exists()


def _affine() -> sitk.AffineTransform:
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((1.06, 0.08, -0.02, -0.05, 0.94, 0.03, 0.01, 0.04, 1.1))
    affine.SetTranslation((3.5, -2.25, 6.0))
    affine.SetCenter((-30.0, 20.0, -330.0))
    return affine


@pytest.mark.parametrize("suffix", [".tfm", ".txt", ".h5"])
def test_affine_round_trip(tmp_path: Path, suffix: str) -> None:
    affine = _affine()
    back = read_affine(write_affine(affine, tmp_path / f"affine{suffix}"))
    assert isinstance(back, sitk.AffineTransform)
    points = _inside_points(_grid())
    np.testing.assert_allclose(map_points(back, points), map_points(affine, points), atol=1e-9)


def test_affine_files_that_are_not_linear_itk_transforms(tmp_path: Path) -> None:
    sitk.WriteTransform(sitk.BSplineTransform(3), str(tmp_path / "bspline.tfm"))
    with pytest.raises(InputError, match="not linear"):
        read_affine(tmp_path / "bspline.tfm")
    (tmp_path / "TransformParameters.0.txt").write_text('(Transform "EulerTransform")\n(NumberOfParameters 6)\n')
    with pytest.raises(InputError, match="not an ITK transform file"):
        read_affine(tmp_path / "TransformParameters.0.txt")
    with pytest.raises(InputError, match="unknown transform file type"):
        write_affine(_affine(), tmp_path / "affine.json")


def test_transform_to_field_matches_affine(tmp_path: Path) -> None:
    reference = _grid()
    affine = _affine()
    field = transform_to_field(affine, reference)
    assert field.GetPixelID() == sitk.sitkVectorFloat64
    assert field.GetDirection() == pytest.approx(reference.GetDirection())
    points = _inside_points(reference, n=200)
    np.testing.assert_allclose(map_points(field, points), map_points(affine, points), atol=0.01)
    # Linear interpolation of an affine field is exact up to rounding.
    np.testing.assert_allclose(map_points(field, points), map_points(affine, points), atol=1e-6)


def test_field_transform_leaves_field_intact() -> None:
    field = _smooth_field(_grid())
    before = sitk.GetArrayFromImage(field)
    transform = field_transform(field)
    assert isinstance(transform, sitk.DisplacementFieldTransform)
    assert field.GetSize() == (24, 20, 16)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(field), before)


def test_warp_real_ct_by_translation(chest_crop_path: Path) -> None:
    ct = sitk.ReadImage(str(chest_crop_path))
    shift = sitk.TranslationTransform(3, (3.0, -1.5, 4.5))  # 2, -1, 3 voxels of 1.5 mm
    warped = warp_image(ct, ct, shift)
    expected = sitk.Resample(ct, ct, shift, sitk.sitkLinear, -1024.0, ct.GetPixelID())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(warped), sitk.GetArrayFromImage(expected))
    assert warped.GetPixelID() == ct.GetPixelID()
    # fixed x samples moving at x + t: out[z, y, x] = ct[z + 3, y - 1, x + 2]; air outside.
    out, src = sitk.GetArrayFromImage(warped), sitk.GetArrayFromImage(ct)
    np.testing.assert_array_equal(out[:-3, 1:, :-2], src[3:, :-1, 2:])
    assert (out[-3:] == -1024).all()
    # The same translation as a dense field gives the same image where the field is defined.
    as_field = warp_image(ct, ct, transform_to_field(shift, ct))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(as_field)[:-3, 1:, :-2], out[:-3, 1:, :-2])


def test_warp_image_interpolators_and_mask_default(chest_crop_path: Path) -> None:
    ct = sitk.ReadImage(str(chest_crop_path))
    mask = sitk.Cast(ct > -500, sitk.sitkUInt8)
    shift = sitk.TranslationTransform(3, (0.75, 0.0, 30.0))
    warped_mask = warp_image(mask, ct, shift, interpolator="nearest")
    assert set(np.unique(sitk.GetArrayFromImage(warped_mask))) <= {0, 1}  # 0 (not -1024) outside
    cubic = warp_image(ct, ct, shift, interpolator="bspline")
    expected = sitk.Resample(ct, ct, shift, sitk.sitkBSpline, -1024.0, ct.GetPixelID())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(cubic), sitk.GetArrayFromImage(expected))
    with pytest.raises(InputError, match="unknown interpolator"):
        warp_image(ct, ct, shift, interpolator="cubic")


def test_compose_fields_equals_sequential_mapping() -> None:
    first_grid = _grid()
    second_grid = _grid(size=(30, 26, 22), spacing=(1.7, 1.6, 2.2), origin=(-50.0, 0.0, -300.0), angle_deg=-10)
    first, second = _smooth_field(first_grid, seed=3), _smooth_field(second_grid, seed=4)
    composed = compose_fields(first, second)
    assert composed.GetSize() == first.GetSize() and composed.GetOrigin() == first.GetOrigin()
    # On the first field's voxel centres the composed field is exact ...
    rng = np.random.default_rng(5)
    index = rng.integers(2, np.array(first_grid.GetSize()) - 2, size=(60, 3))
    points = np.array([first_grid.TransformIndexToPhysicalPoint(i.tolist()) for i in index])
    sequential = map_points(second, map_points(first, points))
    np.testing.assert_allclose(map_points(composed, points), sequential, atol=1e-9)
    # ... and order matters: second-then-first is a different mapping.
    assert np.abs(map_points(first, map_points(second, points)) - sequential).max() > 0.1


def test_compose_field_with_affine_is_exact_everywhere() -> None:
    reference = _grid()
    first = transform_to_field(sitk.TranslationTransform(3, (2.0, -3.0, 1.0)), reference)
    composed = compose_fields(first, _affine())
    points = _inside_points(reference, n=100)
    expected = map_points(_affine(), points + [2.0, -3.0, 1.0])
    np.testing.assert_allclose(map_points(composed, points), expected, atol=1e-6)


def test_jacobian_of_uniform_scaling_on_oblique_grid() -> None:
    reference = _grid()
    scales = (1.2, 0.9, 1.5)
    scaling = sitk.ScaleTransform(3, scales)
    scaling.SetCenter((-30.0, 20.0, -330.0))
    det = sitk.GetArrayFromImage(jacobian_determinant(transform_to_field(scaling, reference)))
    # Every voxel, faces included, and whatever the grid's direction.
    np.testing.assert_allclose(det, np.prod(scales), rtol=1e-9)
    # An anisotropic scaling along world x on a 90-degree rotated grid: where the plain filter is wrong.
    rotated = _grid(angle_deg=90)
    stretch = sitk.ScaleTransform(3, (2.0, 1.0, 1.0))
    field = transform_to_field(stretch, rotated)
    np.testing.assert_allclose(sitk.GetArrayFromImage(jacobian_determinant(field)), 2.0, rtol=1e-9)
    assert sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field))[8, 10, 12] == pytest.approx(1.0)


def test_jacobian_matches_itk_filter_inside_axis_aligned_grid() -> None:
    reference = _grid(angle_deg=0)
    reference.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
    field = _smooth_field(reference, amplitude=6.0)
    ours = sitk.GetArrayFromImage(jacobian_determinant(field))
    itk = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field))
    np.testing.assert_allclose(ours[1:-1, 1:-1, 1:-1], itk[1:-1, 1:-1, 1:-1], atol=1e-12)
    assert jacobian_determinant(field).GetOrigin() == field.GetOrigin()


def test_folding_share_detects_planted_fold() -> None:
    reference = _grid(size=(30, 30, 30), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), angle_deg=0)
    reference.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
    data = np.zeros((30, 30, 30, 3))
    # u_x = -2 (x - 15) in a slab of x: there the mapping mirrors x (det = -1).
    x = np.arange(30, dtype=float)
    fold = (x >= 10) & (x <= 20)
    data[:, :, fold, 0] = -2.0 * (x[fold] - 15.0)
    field = sitk.GetImageFromArray(data, isVector=True)
    field.CopyInformation(reference)
    assert folding_share(transform_to_field(sitk.Transform(3, sitk.sitkIdentity), reference)) == 0.0
    share = folding_share(field)
    assert 9 / 30 <= share <= 11 / 30
    inside = sitk.Image(reference)
    inside[12:18, :, :] = 1
    assert folding_share(field, inside) == 1.0
    outside = sitk.Image(reference)
    outside[0:5, :, :] = 1
    assert folding_share(field, outside) == 0.0
    with pytest.raises(InputError, match="empty"):
        folding_share(field, sitk.Image(reference))


def test_map_points_rejects_bad_inputs() -> None:
    with pytest.raises(InputError, match="3D transform"):
        map_points(sitk.TranslationTransform(2, (1.0, 1.0)), np.zeros((2, 3)))
    with pytest.raises(InputError, match=r"\(N, 3\)"):
        map_points(sitk.TranslationTransform(3), np.zeros((2, 2)))
    with pytest.raises(InputError, match="expected a SimpleITK transform"):
        map_points("identity", np.zeros((2, 3)))
