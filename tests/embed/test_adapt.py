"""Test-time adaptation: a few real SAM steps change a copy, never the original, and are reproducible by seed."""

from __future__ import annotations

import pytest
import SimpleITK as sitk
import torch

from regsam.embed.adapt import adapt_config, adapt_embedder
from regsam.embed.model import SAMEmbedder
from regsam.errors import InputError
from regsam.io.images import read_image, resample_to_spacing

#: small views and loss sizes so a step takes ~0.1-0.3 s on one core
SMALL = {
    "crops": {"size": [32, 32, 32], "scan_spacing_mm": 4.0},
    "objective": {"fine_positives": 32, "fine_candidates": 200, "fine_negatives": 50, "coarse_candidates": 20, "coarse_negatives": 10},
    "train": {"lr": 1e-3},
}


@pytest.fixture(scope="module")
def model() -> SAMEmbedder:
    torch.manual_seed(0)
    net = SAMEmbedder(channels=(8, 16, 16, 16), fine_dim=16, coarse_dim=16, coarse_head_channels=16, fine_head_channels=8)
    net.spacing_mm = 4.0
    return net.eval()


@pytest.fixture(scope="module")
def images(chest_crop_path) -> list[sitk.Image]:
    ct = resample_to_spacing(sitk.Cast(read_image(chest_crop_path), sitk.sitkFloat32), 4.0)
    shifted = sitk.Resample(ct, ct, sitk.TranslationTransform(3, [4.0, -6.0, 8.0]), sitk.sitkLinear, -1024.0)
    return [ct, shifted]


def _state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_steps_change_a_copy_reproducibly(model, images):
    before = _state(model)
    history: list[dict] = []
    a = adapt_embedder(model, images, 3, config=SMALL, seed=0, device="cpu", history=history)
    b = adapt_embedder(model, images, 3, config=SMALL, seed=0, device="cpu")
    c = adapt_embedder(model, images, 3, config=SMALL, seed=1, device="cpu")
    # the original is untouched (weights and batch-norm statistics) and still in eval mode
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not model.training
    # the copy moved, is in eval mode, keeps the model's input spacing
    assert a is not model and not a.training and a.spacing_mm == model.spacing_mm
    changed = [k for k, v in a.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any("conv.weight" in k for k in changed) and any("running_mean" in k for k in changed)
    # same seed -> identical weights; another seed -> different ones
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items() if v.is_floating_point())
    # the training step ran the SAM objective: one logged row per step
    assert [r["step"] for r in history] == [1, 2, 3]
    assert {"loss", "fine", "coarse", "lr"} <= set(history[0]) and all(r["loss"] > 0 for r in history)
    # the adapted copy embeds like any model
    with torch.no_grad():
        out = a(torch.zeros(1, 1, 32, 32, 32))
    assert out["fine"].shape == (1, 16, 16, 16, 16)


def test_zero_steps_is_an_equal_copy(model, images):
    same = adapt_embedder(model, images, 0, config=SMALL)
    assert same is not model
    for key, value in model.state_dict().items():
        assert torch.equal(value, same.state_dict()[key]), key


def test_config_defaults_and_bad_input(model, images):
    cfg = adapt_config(model)
    assert cfg["crops"]["base_spacing_mm"] == 4.0  # the model's spacing
    assert cfg["objective"]["coarse_global_negatives"] == 0  # same patient: no cross-scan negatives
    assert cfg["train"]["optimizer"] == "adamw" and cfg["train"]["warmup_steps"] == 0
    with pytest.raises(InputError, match="steps must be >= 0"):
        adapt_embedder(model, images, -1)
    with pytest.raises(InputError, match="at least one image"):
        adapt_embedder(model, [], 2)
    with pytest.raises(InputError, match="unknown key"):
        adapt_embedder(model, images, 1, config={"train": {"learning_rate": 1.0}})
    with pytest.raises(InputError, match="unknown section"):
        adapt_embedder(model, images, 1, config={"model": {}})
    flat = sitk.Image([40, 40, 1], sitk.sitkInt16)
    with pytest.raises(InputError):
        adapt_embedder(model, [flat], 1, config=SMALL)
