"""Shared fixtures: paths to the real data in ../shared and small real CT crops."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("ITK_GLOBAL_DEFAULT_THREADER", "Pool")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("REGSAM_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; tests that need it skip with a reason when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (expected ../shared/data beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def dirlab_landmarks(shared_data: Path) -> Path:
    return shared_data / "dirlab4dct_landmarks"


@pytest.fixture(scope="session")
def chest_crop_path(shared_data: Path) -> Path:
    """A real contrast chest CT crop, 122x102x112 at 1.5 mm, int16 HU."""
    return shared_data / "totalseg" / "pulmonary_ct_cropped.nii.gz"
