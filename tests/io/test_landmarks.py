"""Landmark file formats: round trips, coordinate systems, voxel indices, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from regsam.errors import InputError
from regsam.io.landmarks import (
    SLICER_SCHEMA,
    read_dirlab_xyz,
    read_elastix_points,
    read_fcsv,
    read_points,
    read_slicer_json,
    read_transformix_output,
    write_dirlab_xyz,
    write_points,
)

RNG = np.random.default_rng(7)
POINTS = RNG.uniform(-300, 300, size=(12, 3))


@pytest.fixture()
def oblique_reference() -> sitk.Image:
    """A small grid with a rotated, axis-flipped direction and an off-zero origin."""
    image = sitk.Image([40, 30, 20], sitk.sitkInt16)
    image.SetSpacing((0.8, 1.1, 2.5))
    image.SetOrigin((-120.5, 33.25, -410.0))
    angle = np.deg2rad(20)
    c, s = np.cos(angle), np.sin(angle)
    image.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, -1.0))
    return image


@pytest.mark.parametrize("name", ["pts.csv", "pts.txt", "pts.pts", "pts.mrk.json", "pts.fcsv"])
def test_round_trip_mm_formats(tmp_path: Path, name: str) -> None:
    path = write_points(POINTS, tmp_path / name)
    back = read_points(path)
    assert back.dtype == np.float64 and back.shape == POINTS.shape
    np.testing.assert_allclose(back, POINTS, atol=1e-6)


def test_dirlab_round_trip_through_oblique_reference(tmp_path: Path, oblique_reference: sitk.Image) -> None:
    one_based = np.array([[1, 1, 1], [40, 30, 20], [17, 5, 9], [3, 28, 14]])
    src = tmp_path / "Case9_300_T00_xyz.txt"
    src.write_text("\r\n".join("\t".join(str(v) for v in row) for row in one_based) + "\r\n")
    points = read_points(src, reference=oblique_reference)
    expected = [oblique_reference.TransformIndexToPhysicalPoint([int(v) - 1 for v in row]) for row in one_based]
    np.testing.assert_allclose(points, expected, atol=1e-9)

    out = write_points(points, tmp_path / "copy_xyz.txt", reference=oblique_reference)
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    assert rows == [[str(v) for v in row] for row in one_based]  # integers, like DIR-Lab's files

    off_centre = points + np.array([0.3, -0.2, 0.7])  # not on voxel centres: decimals survive
    write_dirlab_xyz(off_centre, tmp_path / "frac_xyz.txt", oblique_reference)
    np.testing.assert_allclose(read_dirlab_xyz(tmp_path / "frac_xyz.txt", oblique_reference), off_centre, atol=1e-5)


def test_dirlab_spacing_reference_means_origin_zero(tmp_path: Path) -> None:
    path = tmp_path / "a_xyz.txt"
    path.write_text("1 1 1\n11 21 3\n")
    np.testing.assert_allclose(read_dirlab_xyz(path, (0.97, 0.97, 2.5)), [[0, 0, 0], [9.7, 19.4, 5.0]])


def test_elastix_index_file_uses_reference_geometry(tmp_path: Path, oblique_reference: sitk.Image) -> None:
    index = [[0, 0, 0], [39, 29, 19], [12, 7, 3]]
    path = tmp_path / "fixed_index.txt"
    path.write_text("index\n3\n" + "\n".join(" ".join(map(str, row)) for row in index) + "\n")
    expected = [oblique_reference.TransformIndexToPhysicalPoint(row) for row in index]
    np.testing.assert_allclose(read_elastix_points(path, oblique_reference), expected, atol=1e-9)
    np.testing.assert_allclose(read_points(path, oblique_reference), expected, atol=1e-9)
    # Like elastix, a file without the header line holds indices.
    bare = tmp_path / "bare.txt"
    bare.write_text("3\n" + "\n".join(" ".join(map(str, row)) for row in index) + "\n")
    np.testing.assert_allclose(read_elastix_points(bare, oblique_reference), expected, atol=1e-9)
    with pytest.raises(InputError, match="voxel indices"):
        read_elastix_points(path)


def test_elastix_point_file_header_and_count(tmp_path: Path) -> None:
    path = write_points(POINTS[:3], tmp_path / "p.txt")
    lines = path.read_text().splitlines()
    assert lines[0] == "point" and lines[1] == "3" and len(lines) == 5


def test_real_elastix_point_files(shared_data: Path) -> None:
    for name in ("3DCT_lung_baseline_landmarks.txt", "3DCT_lung_groundtruth_point.txt"):
        points = read_points(shared_data / "elastix_3dct_lung" / name)
        assert points.shape == (100, 3)
    first = read_points(shared_data / "elastix_3dct_lung" / "3DCT_lung_baseline_landmarks.txt")[0]
    np.testing.assert_allclose(first, [-36.351, -36.974, -1204.5])


TRANSFORMIX_LINES = (
    "Point\t0\t; InputIndex = [ 74 63 65 ]\t; InputPoint = [ -36.351000 -36.974000 -1204.500000 ]\t"
    "; OutputIndexFixed = [ 72 59 72 ]\t; OutputPoint = [ -40.797123 -47.211000 -1168.900000 ]\t"
    "; Deformation = [ -4.446123 -10.237000 35.600000 ]\n"
    "Point\t1\t; InputIndex = [ 111 78 41 ]\t; InputPoint = [ 98.883000 -26.046000 -1324.500000 ]\t"
    "; OutputIndexFixed = [ 110 73 48 ]\t; OutputPoint = [ 95.1 -45.0 -1301.5 ]\t"
    "; Deformation = [ -3.783 -18.954 23.0 ]\n"
)


def test_transformix_output_parsing(tmp_path: Path) -> None:
    path = tmp_path / "outputpoints.txt"
    path.write_text(TRANSFORMIX_LINES)
    out = read_transformix_output(path)
    np.testing.assert_allclose(out["input_point"], [[-36.351, -36.974, -1204.5], [98.883, -26.046, -1324.5]])
    np.testing.assert_allclose(out["output_point"][0], [-40.797123, -47.211, -1168.9])
    np.testing.assert_allclose(out["deformation"][1], [-3.783, -18.954, 23.0])
    np.testing.assert_array_equal(out["input_index"][1], [111, 78, 41])
    assert out["output_index_fixed"].shape == (2, 3)
    np.testing.assert_allclose(read_points(path), out["output_point"])
    # Any .txt starting with "Point" is transformix output, whatever its name.
    renamed = tmp_path / "mapped.txt"
    renamed.write_text(TRANSFORMIX_LINES)
    np.testing.assert_allclose(read_points(renamed), out["output_point"])
    write_points(POINTS, renamed)  # writing replaces it with an elastix point file
    np.testing.assert_allclose(read_points(renamed), POINTS, atol=1e-6)
    with pytest.raises(InputError, match="written by transformix"):
        write_points(POINTS, tmp_path / "outputpoints.txt")


def test_transformix_without_deformation_column(tmp_path: Path) -> None:
    path = tmp_path / "outputpoints.txt"
    path.write_text("Point 0 ; InputPoint = [ 1 2 3 ] ; OutputPoint = [ 1.5 2 2 ]\n")
    np.testing.assert_allclose(read_transformix_output(path)["deformation"], [[0.5, 0.0, -1.0]])


def _slicer_doc(system: str | None, positions: list[list[float]]) -> dict:
    markup = {"type": "Fiducial", "controlPoints": [{"id": str(i), "position": p} for i, p in enumerate(positions)]}
    if system is not None:
        markup["coordinateSystem"] = system
    return {"@schema": SLICER_SCHEMA, "markups": [markup]}


def test_slicer_json_ras_is_converted(tmp_path: Path) -> None:
    positions = [[10.0, -20.0, 30.0], [-1.5, 2.5, -3.5]]
    lps = np.array([[-10.0, 20.0, 30.0], [1.5, -2.5, -3.5]])
    for system, expected in (("RAS", lps), ("LPS", positions), (None, positions)):
        path = tmp_path / f"{system}.mrk.json"
        path.write_text(json.dumps(_slicer_doc(system, positions)))
        np.testing.assert_allclose(read_slicer_json(path), expected)


def test_slicer_json_written_in_lps_with_schema(tmp_path: Path) -> None:
    doc = json.loads(write_points(POINTS[:2], tmp_path / "f.mrk.json").read_text())
    assert doc["@schema"] == SLICER_SCHEMA and "markups-schema-v1.0.3.json" in doc["@schema"]
    markup = doc["markups"][0]
    assert markup["type"] == "Fiducial" and markup["coordinateSystem"] == "LPS" and markup["coordinateUnits"] == "mm"
    np.testing.assert_allclose([p["position"] for p in markup["controlPoints"]], POINTS[:2])
    assert all(p["positionStatus"] == "defined" for p in markup["controlPoints"])


@pytest.mark.parametrize(
    ("system_line", "sign"),
    [("# CoordinateSystem = RAS", -1), ("# CoordinateSystem = 0", -1), ("# CoordinateSystem = LPS", 1),
     ("# CoordinateSystem = 1", 1), (None, -1)],
)
def test_fcsv_coordinate_systems(tmp_path: Path, system_line: str | None, sign: int) -> None:
    lines = ["# Markups fiducial file version = 4.11"]
    if system_line:
        lines.append(system_line)
    lines += [
        "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID",
        "1,10.5,-20.25,30,0,0,0,1,1,1,0,F-1,,",
        '2,-1,2,-3,0,0,0,1,1,1,0,"F,2",a note,',
    ]
    path = tmp_path / "f.fcsv"
    path.write_text("\n".join(lines) + "\n")
    expected = np.array([[10.5, -20.25, 30.0], [-1.0, 2.0, -3.0]]) * [sign, sign, 1]
    np.testing.assert_allclose(read_fcsv(path), expected)


def test_fcsv_written_in_lps(tmp_path: Path) -> None:
    text = write_points(POINTS[:2], tmp_path / "f.fcsv").read_text().splitlines()
    assert text[0] == "# Markups fiducial file version = 4.11"
    assert text[1] == "# CoordinateSystem = LPS"
    assert text[2] == "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"
    assert len(text[3].split(",")) == 14


BAD_FILES = {
    "nan.csv": ("x,y,z\n1,2,3\nnan,2,3\n", "NaN"),
    "short.csv": ("x,y,z\n1,2\n", "not three numbers"),
    "count.txt": ("point\n3\n1 2 3\n4 5 6\n", "count line says 3"),
    "columns.txt": ("point\n2\n1 2 3\n4 5\n", "expected 3 coordinates"),
    "nocount.txt": ("point\n1 2 3\n", "number of points"),
    "nan.pts": ("point\n1\n1 nan 3\n", "NaN"),
    "words_xyz.txt": ("1 2 3\n4 5\n", "DIR-Lab"),
    "outputpoints.txt": ("Point 0 ; InputPoint = [ 1 2 ] ; OutputPoint = [ 1 2 3 ]\n", "2 values"),
    "junk.mrk.json": ("{not json", "not valid JSON"),
    "empty.mrk.json": ('{"markups": []}', "controlPoints"),
    "unplaced.mrk.json": (
        '{"markups": [{"type": "Fiducial", "controlPoints": [{"position": [1, 2, 3], "positionStatus": "undefined"}]}]}',
        "no defined 3D position",
    ),
    "short.fcsv": ("# CoordinateSystem = LPS\n1,2,3\n", "expected x,y,z"),
    "system.fcsv": ("# CoordinateSystem = XYZ\n1,2,3,4\n", "unknown coordinate system"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_files_raise_input_error_naming_the_file(tmp_path: Path, name: str) -> None:
    text, message = BAD_FILES[name]
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InputError, match=message) as info:
        read_points(path, reference=(1.0, 1.0, 1.0))
    assert name in str(info.value)


def test_missing_unknown_and_reference_less_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        read_points(tmp_path / "absent.csv")
    with pytest.raises(InputError, match="unknown landmark format"):
        read_points(tmp_path / "points.xlsx")
    (tmp_path / "c_xyz.txt").write_text("1 2 3\n")
    with pytest.raises(InputError, match="reference"):
        read_points(tmp_path / "c_xyz.txt")


def test_failed_write_leaves_no_file(tmp_path: Path) -> None:
    bad = POINTS.copy()
    bad[3, 1] = np.nan
    for name in ("a.csv", "a.txt", "a.mrk.json", "a.fcsv"):
        with pytest.raises(InputError, match="NaN"):
            write_points(bad, tmp_path / name)
    with pytest.raises(InputError, match=r"\(N, 3\)"):
        write_points(np.zeros((4, 2)), tmp_path / "b.csv")
    assert list(tmp_path.iterdir()) == []
