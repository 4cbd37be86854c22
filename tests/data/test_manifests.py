"""The shipped dataset manifests: loadable from the package, complete, and consistent with the published facts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from regsam.data.fetch import describe_known_data
from regsam.data.manifests import find_case, list_manifests, load_manifest, manifest_folder, manifest_names
from regsam.errors import InputError

REPO = Path(__file__).resolve().parents[2]


def test_list_manifests_has_the_three_datasets():
    manifests = list_manifests()
    assert [m["name"] for m in manifests] == ["copdgene", "dirlab4dct", "nlst"]
    for m in manifests:
        assert m["description"] and "\n" not in m["description"]
        assert m["citation"] and m["url"].startswith("https://")
        assert m["cases"]


def test_manifests_live_in_the_package_and_data_manifests_points_there():
    folder = Path(str(manifest_folder()))
    assert folder.parts[-3:] == ("regsam", "data", "manifests")
    link = REPO / "data_manifests"
    if not link.exists():
        pytest.skip("not a source checkout")
    assert link.is_symlink() and link.resolve() == folder.resolve()
    assert sorted(p.stem for p in link.glob("*.json")) == manifest_names()


def test_dirlab4dct_cases_match_the_published_geometry():
    m = load_manifest("dirlab4dct")
    fmt = m["image_format"]
    assert (fmt["dtype"], fmt["header_bytes"], fmt["hu_offset"]) == ("<i2", 0, -1024)
    assert fmt["direction"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    assert m["landmark_format"]["count"] == 300 and m["landmark_format"]["index_base"] == 1
    cases = m["cases"]
    assert [c["id"] for c in cases] == [f"case{n:02d}" for n in range(1, 11)]
    assert [c["size"][2] for c in cases] == [94, 112, 104, 99, 106, 128, 136, 128, 128, 120]
    assert all(c["size"][:2] == ([256, 256] if c["number"] <= 5 else [512, 512]) for c in cases)
    assert [c["spacing"][0] for c in cases] == [0.97, 1.16, 1.15, 1.13, 1.10, 0.97, 0.97, 0.97, 0.97, 0.97]
    assert all(c["spacing"][1] == c["spacing"][0] and c["spacing"][2] == 2.5 for c in cases)
    assert [c["initial_mean_tre_mm"] for c in cases] == [3.89, 4.34, 6.94, 9.83, 7.48, 10.89, 11.03, 14.99, 7.92, 7.30]
    for c in cases:
        assert c["image_bytes"] == int(np.prod(c["size"])) * 2
        assert (c["fixed"]["phase"], c["moving"]["phase"]) == ("T00", "T50")
        for side in (c["fixed"], c["moving"]):
            assert side["image_sha256"] is None and side["landmarks_sha256"] is None
    # Sizes of the distributed case-1 and case-3 phase images.
    assert cases[0]["image_bytes"] == 12_320_768 and cases[2]["image_bytes"] == 13_631_488
    assert cases[0]["fixed"]["image"] == "Case1Pack/Images/case1_T00_s.img"
    assert cases[0]["moving"]["landmarks"] == "Case1Pack/ExtremePhases/Case1_300_T50_xyz.txt"
    assert cases[7]["fixed"]["image"].startswith("Case8Deploy/")
    assert cases[5]["fixed"]["landmarks"].endswith("case6_dirLab300_T00_xyz.txt")
    assert "case2_T00_s.img" in cases[1]["fixed"]["image_alternatives"]


def test_copdgene_cases_match_the_published_geometry():
    m = load_manifest("copdgene")
    cases = m["cases"]
    assert [c["id"] for c in cases] == [f"copd{n:02d}" for n in range(1, 11)]
    assert [c["spacing"][0] for c in cases] == [0.625, 0.645, 0.652, 0.590, 0.647, 0.633, 0.625, 0.586, 0.664, 0.742]
    assert [c["size"][2] for c in cases] == [121, 102, 126, 126, 131, 119, 112, 115, 116, 135]
    assert [c["initial_mean_tre_mm"] for c in cases] == [26.33, 21.79, 12.64, 29.58, 30.08, 28.46, 21.60, 26.46, 14.86, 21.81]
    for c in cases:
        n = c["number"]
        assert c["size"][:2] == [512, 512] and c["spacing"][2] == 2.5
        assert c["image_bytes"] == 512 * 512 * c["size"][2] * 2
        assert c["fixed"]["image"].endswith(f"copd{n}_iBHCT.img") and c["moving"]["image"].endswith(f"copd{n}_eBHCT.img")
        assert c["fixed"]["landmarks"].endswith(f"copd{n}_300_iBH_xyz_r1.txt")
        assert c["moving"]["landmarks"].endswith(f"copd{n}_300_eBH_xyz_r1.txt")


def test_nlst_layout():
    m = load_manifest("nlst")
    assert m["kind"] == "learn2reg"
    assert m["image_format"]["size"] == [224, 192, 224] and m["image_format"]["spacing"] == [1.5, 1.5, 1.5]
    layout = m["layout"]
    assert layout["image"].format(id="0001", modality="0000") == "imagesTr/NLST_0001_0000.nii.gz"
    assert layout["keypoints"].format(id="0001", modality="0001") == "keypointsTr/NLST_0001_0001.csv"
    assert (layout["fixed_modality"], layout["moving_modality"]) == ("0000", "0001")
    kp = m["keypoint_format"]
    assert (kp["delimiter"], kp["header"], kp["index_base"]) == (",", False, 0)


def test_manifest_files_are_plain_json_with_matching_names():
    for name in manifest_names():
        data = json.loads((manifest_folder() / f"{name}.json").read_text())
        assert data["name"] == name


def test_unknown_dataset_and_case_are_input_errors():
    with pytest.raises(InputError, match="unknown dataset 'popi'"):
        load_manifest("popi")
    m = load_manifest("dirlab4dct")
    with pytest.raises(InputError, match="unknown case '11'"):
        find_case(m, "11")


@pytest.mark.parametrize("text", ["3", "case3", "Case3Pack", "case03", "03"])
def test_find_case_accepts_common_spellings(text):
    assert find_case(load_manifest("dirlab4dct"), text)["id"] == "case03"


def test_find_case_copd_and_nlst():
    assert find_case(load_manifest("copdgene"), "copd10")["id"] == "copd10"
    assert find_case(load_manifest("nlst"), "NLST_0007")["id"] == "0007"


def test_describe_known_data_lists_the_manifests(tmp_path):
    text = describe_known_data(cache_dir=tmp_path)
    for name in ("dirlab4dct", "copdgene", "nlst"):
        assert name in text
    assert "[10 cases]" in text
