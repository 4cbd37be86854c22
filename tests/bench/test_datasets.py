"""sim4dct and thorax4dct from a user's CT: named, cached per CT content, offset variant, strict on bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

import SimpleITK as sitk

from regsam.bench.datasets import sim4dct_cases, thorax4dct_cases
from regsam.data.case import load_case
from regsam.errors import InputError


@pytest.mark.slow
def test_sim4dct_from_a_named_ct_is_cached_and_offsets_add_misalignment(chest_crop_path, dirlab_landmarks, tmp_path):
    if not chest_crop_path.is_file():
        pytest.skip(f"{chest_crop_path} not found")
    cache = tmp_path / "cache"
    (folder,) = sim4dct_cases(cache, dirlab_landmarks, cases=(4,), source_cts=[chest_crop_path])
    assert folder.name.startswith("pulmonary_ct_cropped_") and folder.name.endswith("_case04")
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["source_ct"] == str(chest_crop_path.resolve())
    stamp = (folder / "fixed.nii.gz").stat().st_mtime_ns
    assert sim4dct_cases(cache, dirlab_landmarks, cases=(4,), source_cts=[chest_crop_path]) == [folder]
    assert (folder / "fixed.nii.gz").stat().st_mtime_ns == stamp  # cached, not rebuilt

    (shifted,) = sim4dct_cases(cache, dirlab_landmarks, cases=(4,), source_cts=[chest_crop_path], rigid_offset=(30.0, 10.0))
    assert shifted != folder and "offset30mm10deg" in str(shifted)
    (f0, m0), (f1, m1) = load_case(folder).point_sets["points"], load_case(shifted).point_sets["points"]
    identity = np.linalg.norm(f0 - m0, axis=1).mean()
    identity_offset = np.linalg.norm(f1 - m1, axis=1).mean()
    assert identity_offset > identity + 15.0, (identity, identity_offset)


def test_sim4dct_bad_input(tmp_path, dirlab_landmarks):
    with pytest.raises(InputError, match="cases must be among"):
        sim4dct_cases(tmp_path, dirlab_landmarks, cases=(7,), source_cts=[tmp_path / "ct.nii.gz"])
    with pytest.raises(InputError, match="CT not found"):
        sim4dct_cases(tmp_path, dirlab_landmarks, cases=(4,), source_cts=[tmp_path / "ct.nii.gz"])
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_thorax4dct_from_a_named_ct_slides_and_keeps_in_plane_spacing(chest_crop_path, dirlab_landmarks, tmp_path):
    """One parametric pair from a small chest crop: native in-plane spacing, 2.5 mm slices, sliding, cached."""
    (folder,) = thorax4dct_cases(tmp_path, dirlab_landmarks, source_cts=[chest_crop_path],
                                 motions=["parametric_28mm"], offsets=False)
    meta = json.loads((folder / "meta.json").read_text())
    own = sitk.ReadImage(str(chest_crop_path)).GetSpacing()
    assert meta["spacing_mm"] == pytest.approx([own[0], own[1], max(own[2], 2.5)])
    assert meta["sliding"] and meta["config"]["sliding"] is True
    assert thorax4dct_cases(tmp_path, dirlab_landmarks, source_cts=[chest_crop_path],
                            motions=["parametric_28mm"], offsets=False) == [folder]
    with pytest.raises(InputError, match="thorax4dct motions"):
        thorax4dct_cases(tmp_path, dirlab_landmarks, source_cts=[chest_crop_path], motions=["nope"])
