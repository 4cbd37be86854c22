"""Fixtures shared by the torch-based registration tests."""

from __future__ import annotations

import pytest
import SimpleITK as sitk
import torch

#: working spacing (mm) of the small real-CT test images
SPACING = 4.0


@pytest.fixture(scope="module")
def one_thread():
    """The test machine is shared; one torch thread is several times faster there than two."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def ct4(chest_crop_path) -> sitk.Image:
    """The real chest crop, smoothed and resampled to ``SPACING`` mm (float32 HU)."""
    ct = sitk.Cast(sitk.ReadImage(str(chest_crop_path)), sitk.sitkFloat32)
    size = [int(round(s * sp / SPACING)) for s, sp in zip(ct.GetSize(), ct.GetSpacing())]
    smooth = sitk.SmoothingRecursiveGaussian(ct, 1.5)
    return sitk.Resample(smooth, size, sitk.Transform(), sitk.sitkLinear, ct.GetOrigin(), [SPACING] * 3, ct.GetDirection(), -1024.0, sitk.sitkFloat32)


@pytest.fixture(scope="session")
def thorax4(shared_data) -> sitk.Image:
    """The held-out full chest CT ``lidc_idri_0314_chest``, smoothed and resampled to ``SPACING`` mm (float32 HU)."""
    path = shared_data / "ct_more" / "lidc_idri_0314_chest.nii.gz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    ct = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)
    size = [int(round(s * sp / SPACING)) for s, sp in zip(ct.GetSize(), ct.GetSpacing())]
    return sitk.Resample(sitk.SmoothingRecursiveGaussian(ct, 1.5), size, sitk.Transform(), sitk.sitkLinear,
                         ct.GetOrigin(), [SPACING] * 3, ct.GetDirection(), -1024.0, sitk.sitkFloat32)
