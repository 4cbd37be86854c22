"""Network, preprocessing and weight files."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from regsam.embed.fused import FusedEmbedder, load_fused
from regsam.embed.model import DEFAULT_WEIGHTS, SAMEmbedder, count_parameters, load_embedder, save_weights
from regsam.embed.preprocess import HU_WINDOW, normalize_hu, preprocess, valid_size
from regsam.errors import InputError


def _ct(size=(40, 36, 30), spacing=(1.5, 1.5, 2.5), value=0.0) -> sitk.Image:
    image = sitk.Image(list(size), sitk.sitkFloat32) + value
    image.SetSpacing(spacing)
    image.SetOrigin((-10.0, 20.0, 5.0))
    return image


def test_default_model_size_and_outputs():
    model = SAMEmbedder()
    assert count_parameters(model) <= 5_000_000
    assert model.stride == 16 and model.min_input_size >= model.stride
    out = model(torch.randn(2, 1, 32, 48, 64))
    assert out["fine"].shape == (2, 128, 16, 24, 32)
    assert out["coarse"].shape == (2, 128, 4, 6, 8)
    for level in out.values():
        assert torch.allclose(level.norm(dim=1), torch.ones(1), atol=1e-4)


def test_embed_volume_matches_forward():
    torch.manual_seed(0)
    model = SAMEmbedder(channels=(8, 16, 16, 16), fine_dim=16, coarse_dim=16, coarse_head_channels=16, fine_head_channels=8)
    with torch.no_grad():  # non-trivial batch-norm statistics
        model(torch.randn(2, 1, 32, 32, 32))
    model.eval()
    x = torch.randn(1, 1, 48, 32, 64)
    with torch.inference_mode():
        full = model(x)
        slab = model.embed_volume(x, fine_dtype=torch.float32, rows=1000)
    assert torch.allclose(full["fine"], slab["fine"], atol=1e-5)
    assert torch.allclose(full["coarse"], slab["coarse"], atol=1e-5)


def test_fused_weights_must_fit_the_network(tmp_path):
    model = SAMEmbedder(channels=(8, 16, 16, 16), fine_dim=16, coarse_dim=16, coarse_head_channels=16, fine_head_channels=8)
    state = model.state_dict()
    with pytest.raises(InputError, match="lack the layer lat2.conv.weight"):
        FusedEmbedder({k: v for k, v in state.items() if not k.startswith("lat2.")}, model.config, 2.0, HU_WINDOW)
    with pytest.raises(InputError, match="layers this network does not have"):
        FusedEmbedder({**state, "head.conv.weight": torch.zeros(1)}, model.config, 2.0, HU_WINDOW)
    narrow = {**state, "fine_mix.conv.weight": state["fine_mix.conv.weight"][:, :4]}
    with pytest.raises(InputError, match="fine_mix has 4 channels where 8 arrive"):
        FusedEmbedder(narrow, model.config, 2.0, HU_WINDOW)
    path = tmp_path / "w.pt"
    torch.save({"format": 1, "model_config": model.config, "state_dict": narrow}, path)
    with pytest.raises(InputError, match=f"{path}: embedder weights do not fit"):
        load_fused(path, device="cpu")


def test_forward_rejects_sizes_off_the_stride():
    with pytest.raises(InputError, match="multiple"):
        SAMEmbedder()(torch.zeros(1, 1, 30, 32, 32))


def test_save_and_load_weights(tmp_path):
    model = SAMEmbedder(channels=(8, 16, 16, 16), fine_dim=16, coarse_dim=16)
    path = save_weights(model, tmp_path / "w.pt", {"crops": {"base_spacing_mm": 3.0}})
    loaded = load_embedder(path, device="cpu")
    assert loaded.spacing_mm == 3.0 and not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
    with pytest.raises(InputError, match="not found"):
        load_embedder(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(InputError):
        load_embedder(tmp_path / "junk.pt")


def test_shipped_weights_fit_the_budget():
    if not DEFAULT_WEIGHTS.is_file():
        pytest.skip("no shipped weights yet")
    assert DEFAULT_WEIGHTS.stat().st_size <= 25 * 2**20
    model = load_embedder(None, device="cpu")
    assert count_parameters(model) <= 5_000_000


def test_preprocess_grid_and_intensities():
    image = _ct(value=-2000.0)
    tensor, geometry = preprocess(image, spacing_mm=2.0, stride=16)
    assert tensor.shape[:2] == (1, 1) and all(s % 16 == 0 for s in tensor.shape[2:])
    assert geometry.GetSize() == tuple(reversed(tensor.shape[2:]))
    assert geometry.GetSpacing() == (2.0, 2.0, 2.0)
    assert valid_size(geometry) == (30, 27, 38)  # 60 x 54 x 75 mm at 2 mm
    assert float(tensor.min()) == -1.0 and float(tensor.max()) == -1.0  # clipped air, padding is air too
    np.testing.assert_allclose(normalize_hu(np.array([-1024.0, 0.0, 1024.0, 3000.0])), [-1.0, 0.0, 1.0, 1.0])


def test_preprocess_rejects_2d_and_tiny_images():
    flat = sitk.Image([64, 64], sitk.sitkFloat32)
    with pytest.raises(InputError, match="2D"):
        preprocess(flat)
    with pytest.raises(InputError, match="at least"):
        preprocess(_ct(size=(20, 20, 20), spacing=(1.0, 1.0, 1.0)), spacing_mm=2.0, min_size=32)
