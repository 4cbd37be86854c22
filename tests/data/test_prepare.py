"""``prepare_dataset`` on synthetic downloads in the exact distributed formats.

DIR-Lab images are written as headerless little-endian int16 with the right byte
count (case 1 at its full 256x256x94 size) next to the REAL DIR-Lab landmark files
from ``../shared/data``; smaller COPDgene/NLST layouts use a manifest override.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from regsam.data.case import load_case
from regsam.data.manifests import load_manifest
from regsam.data.prepare import prepare_dataset, read_dirlab_index
from regsam.errors import InputError

CASE1_SIZE = (256, 256, 94)
CASE1_SPACING = (0.97, 0.97, 2.5)
FLIP_Z = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
# Raw values planted at the first fixed / moving landmark (stored value = HU + 1024).
FIXED_MARK, MOVING_MARK = 3000, 2500


def write_raw(path: Path, size, marks: dict[tuple[int, int, int], int] | None = None, sparse: bool = False) -> None:
    """A headerless little-endian int16 volume, x fastest; ``marks`` maps 1-based (x, y, z) to a stored value."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nbytes = int(np.prod(size)) * 2
    if sparse:  # right byte count without writing the zeros (validation-only tests)
        with open(path, "wb") as fh:
            fh.truncate(nbytes)
        return
    data = np.full(tuple(reversed(size)), 24, dtype="<i2")  # 24 stored = -1000 HU, air
    for (x, y, z), value in (marks or {}).items():
        data[z - 1, y - 1, x - 1] = value
    data.tofile(path)
    assert path.stat().st_size == nbytes


def first_index(path: Path) -> tuple[int, int, int]:
    return tuple(int(v) for v in read_dirlab_index(path)[0])


def make_dirlab_case(root: Path, landmarks_dir: Path, n: int, size, sparse: bool = False) -> Path:
    """Case ``n`` laid out as distributed (``CaseNPack/Images``, ``CaseNPack/ExtremePhases``)."""
    pack = root / f"Case{n}Pack"
    suffix = "_s" if n == 1 else "-ssm"
    for phase, mark in (("T00", FIXED_MARK), ("T50", MOVING_MARK)):
        lm = pack / "ExtremePhases" / f"Case{n}_300_{phase}_xyz.txt"
        lm.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(landmarks_dir / lm.name, lm)
        write_raw(pack / "Images" / f"case{n}_{phase}{suffix}.img", size, {first_index(lm): mark}, sparse=sparse)
    return pack


@pytest.fixture(scope="module")
def prepared_case1(tmp_path_factory, dirlab_landmarks):
    """Full-size case 1 (real landmarks, planted voxels) prepared once for several checks."""
    base = tmp_path_factory.mktemp("dirlab")
    root, out = base / "download", base / "cases"
    make_dirlab_case(root, dirlab_landmarks, 1, CASE1_SIZE)
    cases = prepare_dataset("dirlab4dct", root, out, cases=["1"])
    return root, out, cases


def test_dirlab_case_has_the_right_geometry(prepared_case1):
    root, out, cases = prepared_case1
    assert [c.path.name for c in cases] == ["dirlab4dct_case01"]
    assert sorted(p.name for p in out.iterdir()) == ["dirlab4dct_case01"]
    case = load_case(out / "dirlab4dct_case01")
    for path in (case.fixed, case.moving):
        image = sitk.ReadImage(str(path))
        assert image.GetSize() == CASE1_SIZE
        assert np.allclose(image.GetSpacing(), CASE1_SPACING)
        assert np.allclose(image.GetDirection(), FLIP_Z) and np.allclose(image.GetOrigin(), 0.0)
        assert image.GetPixelID() == sitk.sitkInt16
        assert sitk.GetArrayViewFromImage(image)[0, 0, 0] == 24 - 1024  # stored value -> HU
    meta = case.meta
    assert (meta["dataset"], meta["case"]) == ("dirlab4dct", "case01")
    assert (meta["fixed"]["phase"], meta["moving"]["phase"]) == ("T00", "T50")
    assert meta["fixed"]["image"] == "Case1Pack/Images/case1_T00_s.img"
    assert meta["moving"]["landmarks"] == "Case1Pack/ExtremePhases/Case1_300_T50_xyz.txt"
    assert meta["spacing_mm"] == list(CASE1_SPACING) and meta["initial_mean_tre_mm"] == 3.89


def test_dirlab_landmark_mm_position_finds_the_planted_voxel(prepared_case1, dirlab_landmarks):
    _, out, _ = prepared_case1
    case = load_case(out / "dirlab4dct_case01")
    fixed_points, moving_points = case.point_sets["points"]
    assert fixed_points.shape == moving_points.shape == (300, 3)
    for path, points, mark, file_name in (
        (case.fixed, fixed_points, FIXED_MARK, "Case1_300_T00_xyz.txt"),
        (case.moving, moving_points, MOVING_MARK, "Case1_300_T50_xyz.txt"),
    ):
        image = sitk.ReadImage(str(path))
        index = image.TransformPhysicalPointToIndex(points[0].tolist())
        assert index == tuple(v - 1 for v in first_index(dirlab_landmarks / file_name))
        assert image[index] == mark - 1024
        # mm = (index - 1) * spacing along x, y; z runs superior -> inferior, so it is negated.
        expected = (read_dirlab_index(dirlab_landmarks / file_name) - 1) * CASE1_SPACING * (1, 1, -1)
        assert np.allclose(points, expected, atol=1e-4)


def test_dirlab_identity_tre_equals_the_published_initial_error(prepared_case1):
    _, out, _ = prepared_case1
    case = load_case(out / "dirlab4dct_case01")
    fixed_points, moving_points = case.point_sets["points"]
    tre = np.linalg.norm(fixed_points - moving_points, axis=1).mean()
    assert round(tre, 2) == 3.89 == case.meta["initial_mean_tre_mm"]
    assert case.meta["initial_mean_tre_mm_measured"] == pytest.approx(tre, abs=1e-4)


def test_truncated_image_names_the_file_and_writes_nothing(tmp_path, dirlab_landmarks):
    root, out = tmp_path / "download", tmp_path / "cases"
    make_dirlab_case(root, dirlab_landmarks, 1, CASE1_SIZE, sparse=True)
    t50 = root / "Case1Pack/Images/case1_T50_s.img"
    with open(t50, "r+b") as fh:
        fh.truncate(12_320_768 - 3)
    with pytest.raises(InputError) as err:
        prepare_dataset("dirlab4dct", root, out)
    assert str(err.value) == "dirlab4dct case 1: Case1Pack/Images/case1_T50_s.img is 3 bytes short of 12320768 bytes (truncated?)"
    assert not out.exists()


def test_missing_landmark_file_is_named(tmp_path, dirlab_landmarks):
    root = tmp_path / "download"
    make_dirlab_case(root, dirlab_landmarks, 1, CASE1_SIZE, sparse=True)
    (root / "Case1Pack/ExtremePhases/Case1_300_T50_xyz.txt").unlink()
    with pytest.raises(InputError, match=r"^dirlab4dct case 1: missing landmark file Case1_300_T50_xyz\.txt \(expected at Case1Pack/ExtremePhases/"):
        prepare_dataset("dirlab4dct", root, tmp_path / "cases")
    assert not (tmp_path / "cases").exists()


def test_every_case_is_validated_before_any_is_written(tmp_path, dirlab_landmarks):
    """Case 1 is fine, case 2's T50 landmark file lost a line: nothing at all may be written."""
    root, out = tmp_path / "download", tmp_path / "cases"
    make_dirlab_case(root, dirlab_landmarks, 1, CASE1_SIZE, sparse=True)
    make_dirlab_case(root, dirlab_landmarks, 2, (256, 256, 112), sparse=True)
    lm = root / "Case2Pack/ExtremePhases/Case2_300_T50_xyz.txt"
    lm.write_text("".join(lm.read_text().splitlines(keepends=True)[:-1]))
    out.mkdir()
    with pytest.raises(InputError, match=r"^dirlab4dct case 2: Case2Pack/ExtremePhases/Case2_300_T50_xyz\.txt has 299 landmarks, expected 300$"):
        prepare_dataset("dirlab4dct", root, out)
    assert list(out.iterdir()) == []


def test_oversized_image_and_empty_root_are_input_errors(tmp_path, dirlab_landmarks):
    root = tmp_path / "download"
    with pytest.raises(InputError, match="download folder not found"):
        prepare_dataset("dirlab4dct", root, tmp_path / "cases")
    root.mkdir()
    with pytest.raises(InputError, match=r"no case files found under .* \(expected e\.g\. Case1Pack/Images/case1_T00_s\.img\)"):
        prepare_dataset("dirlab4dct", root, tmp_path / "cases")
    make_dirlab_case(root, dirlab_landmarks, 1, CASE1_SIZE, sparse=True)
    with open(root / "Case1Pack/Images/case1_T00_s.img", "ab") as fh:
        fh.write(b"\0\0")
    with pytest.raises(InputError, match=r"case1_T00_s\.img is 2 bytes longer than 12320768 bytes"):
        prepare_dataset("dirlab4dct", root, tmp_path / "cases")
    with pytest.raises(InputError, match="unknown case 'case12'"):
        prepare_dataset("dirlab4dct", root, tmp_path / "cases", cases=["case12"])


def test_cli_prints_one_line_and_exits_2(tmp_path, dirlab_landmarks):
    root, out = tmp_path / "download", tmp_path / "cases"
    make_dirlab_case(root, dirlab_landmarks, 1, CASE1_SIZE, sparse=True)
    with open(root / "Case1Pack/Images/case1_T50_s.img", "r+b") as fh:
        fh.truncate(12_320_768 - 3)
    result = subprocess.run(
        [sys.executable, "-m", "regsam.cli", "data", "prepare", "dirlab4dct", "--root", str(root), "--out", str(out), "--cases", "1"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Case1Pack/Images/case1_T50_s.img is 3 bytes short of 12320768 bytes" in lines[0]
    assert not out.exists()


# ---------------------------------------------------------------- small synthetic layouts
def small_manifest(name: str, case_ids: dict[str, tuple[int, int, int]]) -> dict:
    """The shipped manifest with the given cases shrunk to small volumes (same names, formats and rules)."""
    manifest = copy.deepcopy(load_manifest(name))
    for entry in manifest["cases"]:
        if entry["id"] in case_ids:
            entry["size"] = list(case_ids[entry["id"]])
            entry["image_bytes"] = int(np.prod(entry["size"])) * 2
    return manifest


def write_xyz(path: Path, index1: np.ndarray, sep: str = "\t", newline: str = "\r\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(sep.join(str(int(v)) for v in row) + newline for row in index1).encode())


def random_index1(rng: np.random.Generator, size, count: int = 300) -> np.ndarray:
    return np.stack([rng.integers(1, s + 1, count) for s in size], axis=1)


def test_dirlab_files_are_found_in_irregular_packs(tmp_path):
    """Case 8 nested as Case8Pack/Case8Deploy with odd capitalisation, case 3 with the ``_s`` image names."""
    size = (20, 16, 10)
    manifest = small_manifest("dirlab4dct", {"case03": size, "case08": size})
    rng = np.random.default_rng(0)
    root = tmp_path / "download"
    deploy = root / "Case8Pack" / "Case8Deploy"
    for phase in ("T00", "T50"):
        write_raw(deploy / "Images" / f"CASE8_{phase}.img", size)
        write_xyz(deploy / "extremePhases" / f"case8_dirLab300_{phase}_xyz.txt", random_index1(rng, size))
        write_raw(root / "Case3Pack/Images" / f"case3_{phase}_s.img", size)
        write_xyz(root / "Case3Pack/ExtremePhases" / f"Case3_300_{phase}_xyz.txt", random_index1(rng, size))
    cases = prepare_dataset("dirlab4dct", root, tmp_path / "cases", manifest=manifest)
    assert [c.path.name for c in cases] == ["dirlab4dct_case03", "dirlab4dct_case08"]
    assert cases[1].meta["fixed"]["image"] == "Case8Pack/Case8Deploy/Images/CASE8_T00.img"
    assert cases[0].meta["moving"]["image"] == "Case3Pack/Images/case3_T50_s.img"
    assert cases[1].meta["initial_mean_tre_mm"] == 14.99


def test_landmark_outside_image_and_wrong_sha256_are_rejected(tmp_path):
    size = (20, 16, 10)
    manifest = small_manifest("dirlab4dct", {"case03": size})
    root = tmp_path / "download"
    index = random_index1(np.random.default_rng(1), size)
    for phase in ("T00", "T50"):
        write_raw(root / "Case3Pack/Images" / f"case3_{phase}-ssm.img", size)
        write_xyz(root / "Case3Pack/ExtremePhases" / f"Case3_300_{phase}_xyz.txt", index)
    bad = index.copy()
    bad[7] = (5, 5, 11)  # z index 11 in a 10-slice image
    write_xyz(root / "Case3Pack/ExtremePhases/Case3_300_T50_xyz.txt", bad)
    with pytest.raises(InputError, match=r"Case3_300_T50_xyz\.txt point 8 \(voxel 5 5 11, 1-based\) lies outside the 20x16x10 image"):
        prepare_dataset("dirlab4dct", root, tmp_path / "cases", cases=["3"], manifest=manifest)
    write_xyz(root / "Case3Pack/ExtremePhases/Case3_300_T50_xyz.txt", index)
    manifest["cases"][2]["fixed"]["image_sha256"] = "0" * 64
    with pytest.raises(InputError, match=r"case3_T00-ssm\.img has sha256 [0-9a-f]{64}, expected 0{64}"):
        prepare_dataset("dirlab4dct", root, tmp_path / "cases", cases=["3"], manifest=manifest)
    assert not (tmp_path / "cases").exists()


def test_copdgene_small_layout(tmp_path):
    size = (24, 20, 12)
    manifest = small_manifest("copdgene", {"copd01": size})
    rng = np.random.default_rng(2)
    root = tmp_path / "COPDgene"
    folder = root / "copd1" / "copd1"  # archives unpack to copdN/copdN/
    fixed_index, moving_index = random_index1(rng, size), random_index1(rng, size)
    write_xyz(folder / "copd1_300_iBH_xyz_r1.txt", fixed_index)
    write_xyz(folder / "copd1_300_eBH_xyz_r1.txt", moving_index, sep="\t ", newline="\n")
    write_raw(folder / "copd1_iBHCT.img", size, {tuple(fixed_index[0]): FIXED_MARK})
    write_raw(folder / "copd1_eBHCT.img", size, {tuple(moving_index[0]): MOVING_MARK})
    (case,) = prepare_dataset("copdgene", root, tmp_path / "cases", manifest=manifest)
    assert case.path.name == "copdgene_copd01"
    fixed = sitk.ReadImage(str(case.fixed))
    assert fixed.GetSize() == size and np.allclose(fixed.GetSpacing(), (0.625, 0.625, 2.5))
    assert np.allclose(fixed.GetDirection(), FLIP_Z)
    fixed_points, moving_points = case.point_sets["points"]
    assert fixed[fixed.TransformPhysicalPointToIndex(fixed_points[0].tolist())] == FIXED_MARK - 1024
    moving = sitk.ReadImage(str(case.moving))
    assert moving[moving.TransformPhysicalPointToIndex(moving_points[0].tolist())] == MOVING_MARK - 1024
    expected_tre = np.linalg.norm((fixed_index - moving_index) * (0.625, 0.625, 2.5), axis=1).mean()
    assert case.meta["initial_mean_tre_mm_measured"] == pytest.approx(expected_tre, abs=1e-3)
    assert (case.meta["fixed"]["phase"], case.meta["moving"]["phase"]) == ("iBH", "eBH")
    assert case.meta["initial_mean_tre_mm"] == 26.33
    # A copy with a short image is refused, naming it.
    with open(folder / "copd1_eBHCT.img", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(InputError, match=r"^copdgene copd1: copd1/copd1/copd1_eBHCT\.img is 11420 bytes short of 11520 bytes"):
        prepare_dataset("copdgene", root, tmp_path / "cases2", manifest=manifest)


NLST_SIZE = (12, 10, 8)
# A non-trivial header geometry (RAS-stored NIfTI) so voxel -> mm must use it.
NLST_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
NLST_ORIGIN = (100.0, 80.0, -40.0)


def write_nifti(path: Path, array_zyx: np.ndarray, pixel=sitk.sitkFloat32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.Cast(sitk.GetImageFromArray(array_zyx), pixel)
    image.SetSpacing((1.5, 1.5, 1.5))
    image.SetDirection(NLST_DIRECTION)
    image.SetOrigin(NLST_ORIGIN)
    sitk.WriteImage(image, str(path), True)


def make_nlst_pair(folder: Path, case_id: str, rng: np.random.Generator, keypoints: bool = True) -> dict:
    index = {}
    for mod, mark in (("0000", 500.0), ("0001", 700.0)):
        kp = np.stack([rng.uniform(0, s - 1, 40) for s in NLST_SIZE], axis=1)
        kp[0] = np.round(kp[0])  # the first keypoint on a voxel centre, to find the planted value
        index[mod] = kp
        image = np.full(tuple(reversed(NLST_SIZE)), -1000.0, dtype=np.float32)
        x, y, z = (int(v) for v in kp[0])
        image[z, y, x] = mark
        write_nifti(folder / "imagesTr" / f"NLST_{case_id}_{mod}.nii.gz", image)
        mask = np.zeros(tuple(reversed(NLST_SIZE)), dtype=np.uint8)
        mask[2:-2, 2:-2, 2:-2] = 1
        write_nifti(folder / "masksTr" / f"NLST_{case_id}_{mod}.nii.gz", mask, sitk.sitkUInt8)
        if keypoints:
            csv = folder / "keypointsTr" / f"NLST_{case_id}_{mod}.csv"
            csv.parent.mkdir(parents=True, exist_ok=True)
            csv.write_text("".join(f"{a:.5f},{b:.5f},{c:.5f}\n" for a, b, c in kp))
    return index


def test_nlst_small_layout(tmp_path):
    manifest = copy.deepcopy(load_manifest("nlst"))
    manifest["image_format"]["size"] = list(NLST_SIZE)
    rng = np.random.default_rng(3)
    root = tmp_path / "Learn2Reg"
    folder = root / "NLST"
    index = make_nlst_pair(folder, "0001", rng)
    make_nlst_pair(folder, "0101", rng, keypoints=False)  # a held-out validation pair: skipped by default
    cases = prepare_dataset("nlst", root, tmp_path / "cases", manifest=manifest)
    assert [c.path.name for c in cases] == ["nlst_0001"]
    case = cases[0]
    assert case.fixed_mask is not None and case.moving_mask is not None
    fixed_points, moving_points = case.point_sets["points"]
    assert fixed_points.shape == (40, 3)
    for path, points, mod, mark in ((case.fixed, fixed_points, "0000", 500.0), (case.moving, moving_points, "0001", 700.0)):
        image = sitk.ReadImage(str(path))
        assert np.allclose(image.GetDirection(), NLST_DIRECTION) and np.allclose(image.GetOrigin(), NLST_ORIGIN)
        assert image[image.TransformPhysicalPointToIndex(points[0].tolist())] == mark
        # 0-based voxel index -> mm with the header geometry: x and y run towards -x/-y in LPS here.
        expected = np.array(NLST_ORIGIN) + index[mod] * 1.5 * np.array([-1.0, -1.0, 1.0])
        assert np.allclose(points, expected, atol=1e-4)
    assert case.meta["fixed"]["image"] == "NLST/imagesTr/NLST_0001_0000.nii.gz"
    assert case.meta["keypoints"]["index_base"] == 0
    # Naming the held-out pair explicitly demands its keypoints; NLST/ itself works as --root too.
    with pytest.raises(InputError, match=r"^nlst NLST_0101: missing keypoint file NLST_0101_0000\.csv \(expected at keypointsTr/NLST_0101_0000\.csv\)$"):
        prepare_dataset("nlst", folder, tmp_path / "cases2", cases=["101"], manifest=manifest)
    assert not (tmp_path / "cases2").exists()


def test_nlst_wrong_geometry_and_unequal_keypoints_are_rejected(tmp_path):
    manifest = copy.deepcopy(load_manifest("nlst"))
    folder = tmp_path / "NLST"
    make_nlst_pair(folder, "0002", np.random.default_rng(4))
    with pytest.raises(InputError, match=r"NLST/imagesTr/NLST_0002_0000\.nii\.gz is 12x10x8 voxels at 1\.5x1\.5x1\.5 mm, expected 224x192x224 voxels"):
        prepare_dataset("nlst", tmp_path, tmp_path / "cases", manifest=manifest)
    manifest["image_format"]["size"] = list(NLST_SIZE)
    csv = folder / "keypointsTr/NLST_0002_0001.csv"
    csv.write_text("".join(csv.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(InputError, match="has 40 keypoints but .* has 39"):
        prepare_dataset("nlst", tmp_path, tmp_path / "cases", manifest=manifest)
    assert not (tmp_path / "cases").exists()
