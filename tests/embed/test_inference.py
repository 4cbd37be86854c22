"""Whole-image embedding: geometry of the levels, windows, files, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from regsam.embed.fused import load_fused
from regsam.embed.inference import MAX_WINDOW_VOXELS, choose_windows, embed_image, load_embedding, save_embedding
from regsam.embed.model import SAMEmbedder, save_weights
from regsam.embed.preprocess import preprocess
from regsam.errors import InputError
from regsam.io.images import read_image


@pytest.fixture(scope="module")
def tiny_model() -> SAMEmbedder:
    torch.manual_seed(0)
    model = SAMEmbedder(channels=(8, 16, 16, 16), fine_dim=16, coarse_dim=16, coarse_head_channels=16, fine_head_channels=8)
    with torch.no_grad():
        model(torch.randn(2, 1, 32, 32, 32))
    return model.eval()


@pytest.fixture(scope="module")
def crop(chest_crop_path) -> sitk.Image:
    return read_image(chest_crop_path)


def test_levels_have_the_documented_geometry(tiny_model, crop):
    emb = embed_image(tiny_model, crop, spacing_mm=3.0, device="cpu")
    # 183 x 153 x 168 mm at 3 mm -> 61 x 51 x 56 voxels, padded to 64 x 64 x 64
    assert emb.image_geometry.GetSize() == (61, 51, 56)
    assert emb.fine.shape == (16, 32, 32, 32) and emb.coarse.shape == (16, 8, 8, 8)
    assert emb.fine.dtype == np.float16
    assert emb.fine_geometry.GetSpacing() == (6.0, 6.0, 6.0) and emb.coarse_geometry.GetSpacing() == (24.0, 24.0, 24.0)
    assert emb.fine_geometry.GetOrigin() == emb.image_geometry.GetOrigin() == emb.coarse_geometry.GetOrigin()
    norms = np.linalg.norm(emb.fine.astype(np.float32), axis=0)
    assert np.allclose(norms, 1.0, atol=2e-3)
    # world <-> index round trip, and the image's own corners are inside
    corner = np.array([crop.TransformIndexToPhysicalPoint([0, 0, 0])])
    assert emb.contains(corner).all() and not emb.contains(corner - 50.0).any()
    np.testing.assert_allclose(emb.world_of("fine", emb.index_of("fine", corner)), corner, atol=1e-9)
    valid = emb.level_valid("fine")
    # fine voxel i sits on image voxel 2i: x 0..30 of 61, y 0..25 of 51, z 0..28 of 56 are inside
    assert valid.shape == emb.fine.shape[1:] and valid[:29, :26, :31].all()
    assert not valid[29:].any() and not valid[:, 26:].any() and not valid[:, :, 31:].any()


def test_windows_cover_the_volume(tiny_model, crop):
    whole = embed_image(tiny_model, crop, spacing_mm=3.0, device="cpu", window=64)
    same = embed_image(tiny_model, crop, spacing_mm=3.0, device="cpu", window=128, overlap=32)
    np.testing.assert_array_equal(whole.fine, same.fine)
    tiled = embed_image(tiny_model, crop, spacing_mm=3.0, device="cpu", window=(32, 48, 48), overlap=16)
    assert tiled.fine.shape == whole.fine.shape
    assert np.isfinite(tiled.fine.astype(np.float32)).all()
    assert np.allclose(np.linalg.norm(tiled.coarse, axis=0), 1.0, atol=1e-4)
    # away from window seams the tiles agree closely with the single pass
    agree = (whole.fine.astype(np.float32) * tiled.fine.astype(np.float32)).sum(axis=0)
    assert np.median(agree) > 0.9


def test_fast_path_equals_the_network(tiny_model, crop, tmp_path):
    """What ``regsam embed`` runs (weights read without MONAI, batch norm folded, the scan in one window) gives the
    MONAI network's own forward pass over the whole scan, up to float16 storage."""
    weights = save_weights(tiny_model, tmp_path / "w.pt", {"crops": {"base_spacing_mm": 3.0}})
    fast = embed_image(load_fused(weights, device="cpu"), crop, device="cpu")
    tensor, _ = preprocess(crop, 3.0, stride=tiny_model.stride, min_size=tiny_model.min_input_size)
    with torch.inference_mode():
        reference = tiny_model(tensor)
    assert fast.spacing_mm == 3.0 and fast.fine.shape == tuple(reference["fine"].shape[1:])
    np.testing.assert_allclose(fast.fine.astype(np.float32), reference["fine"][0].numpy(), atol=1e-3)
    np.testing.assert_allclose(fast.coarse, reference["coarse"][0].numpy(), atol=1e-5)
    # the network itself is folded the same way
    np.testing.assert_array_equal(embed_image(tiny_model, crop, spacing_mm=3.0, device="cpu").fine, fast.fine)


def test_default_window_is_the_whole_scan_up_to_a_budget():
    assert choose_windows([144, 208, 208], 16, 64) == [144, 208, 208]  # a whole chest at 2 mm: one pass
    assert choose_windows([448, 256, 256], 16, 64) == [256, 256, 256]  # a long scan is cut along its long axis only
    for dims in ([320, 320, 320], [640, 96, 512], [96, 96, 4000]):
        window = choose_windows(dims, 16, 64)
        assert np.prod(window) <= MAX_WINDOW_VOXELS and all(w % 16 == 0 and 80 <= w <= d for w, d in zip(window, dims))


def test_embedding_file_round_trip(tiny_model, crop, tmp_path):
    emb = embed_image(tiny_model, crop, spacing_mm=4.0, device="cpu")
    path = save_embedding(emb, tmp_path / "e.npz")
    back = load_embedding(path)
    np.testing.assert_array_equal(back.fine, emb.fine)
    np.testing.assert_array_equal(back.coarse, emb.coarse)
    for level in ("fine_geometry", "coarse_geometry", "image_geometry"):
        a, b = getattr(emb, level), getattr(back, level)
        assert a.GetSize() == b.GetSize() and a.GetOrigin() == b.GetOrigin() and a.GetSpacing() == b.GetSpacing()
    assert back.spacing_mm == 4.0
    with pytest.raises(InputError):
        load_embedding(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(InputError, match="not a regsam embedding"):
        load_embedding(tmp_path / "other.npz")


def test_bad_input(tiny_model):
    with pytest.raises(InputError, match="2D"):
        embed_image(tiny_model, sitk.Image([64, 64], sitk.sitkFloat32))
    small = sitk.Image([20, 20, 20], sitk.sitkFloat32)  # 20 mm cube, the model needs 32 voxels = 64 mm
    with pytest.raises(InputError, match="at least"):
        embed_image(tiny_model, small, spacing_mm=2.0)
    with pytest.raises(InputError, match="multiples"):
        embed_image(tiny_model, sitk.Image([80, 80, 80], sitk.sitkFloat32), window=50)
