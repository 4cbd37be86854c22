"""regsam.register.ants: ANTs SyNRA through regsam's API in regsam's field convention, on a tiny real CT crop."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("ants", reason="antspyx (the peers extra) is not installed")

from regsam.errors import InputError  # noqa: E402
from regsam.io.transforms import folding_share  # noqa: E402
from regsam.register.ants import ANTS_PRESETS, register_ants  # noqa: E402
from regsam.register.api import register  # noqa: E402


@pytest.fixture(scope="module")
def crop(chest_crop_path) -> sitk.Image:
    """The real 1.5 mm chest crop as float32: the preset's own 2 mm working copy keeps ~60 voxels per axis.

    At the 4 mm of ``ct4`` (~45 voxels) SyNRA's 6x-shrunk affine level has ~8 voxels per axis, too few samples
    for Mattes mutual information: the rigid stage then lands far off on some runs (threads, sampling).
    """
    return sitk.Cast(sitk.ReadImage(str(chest_crop_path)), sitk.sitkFloat32)


@pytest.mark.slow
def test_planted_shift_is_recovered_in_the_project_convention(crop):
    """fixed(x) = moving(x + s): the field must be +s (fixed x -> moving x + u), not -s, on every axis."""
    shift = np.array([6.0, -4.0, 8.0])
    fixed = sitk.Resample(crop, crop, sitk.TranslationTransform(3, shift.tolist()), sitk.sitkLinear, -1024.0)
    result = register_ants(fixed, crop)
    inner = sitk.GetArrayFromImage(result.displacement)[12:-12, 12:-12, 12:-12].reshape(-1, 3)
    assert np.abs(np.median(inner, axis=0) - shift).max() < 1.0, np.median(inner, axis=0)
    assert result.displacement.GetSize() == fixed.GetSize()
    assert folding_share(result.displacement) == 0.0
    assert result.method == "ants" and result.preset == "synra"


def test_registry_and_bad_preset(ct4):
    with pytest.raises(InputError, match="unknown ants preset"):
        register(ct4, ct4, method="ants", preset="nope")
    with pytest.raises(InputError, match="does not take"):
        register(ct4, ct4, method="ants", device="cpu")
    assert set(ANTS_PRESETS) == {"synra", "cc"}
