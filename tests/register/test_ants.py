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


@pytest.mark.slow
def test_planted_shift_is_recovered_in_the_project_convention(ct4):
    """fixed(x) = moving(x + s): the field must be +s (fixed x -> moving x + u), not -s, on every axis."""
    shift = np.array([6.0, -4.0, 8.0])
    fixed = sitk.Resample(ct4, ct4, sitk.TranslationTransform(3, shift.tolist()), sitk.sitkLinear, -1024.0)
    result = register_ants(fixed, ct4)
    inner = sitk.GetArrayFromImage(result.displacement)[6:-6, 6:-6, 6:-6].reshape(-1, 3)
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
