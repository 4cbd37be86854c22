"""A network with SAM inputs is pinned to the embedder it was trained on (its fingerprint travels with it)."""

from __future__ import annotations

import pytest
import torch

from regsam.embed.model import SAMEmbedder, load_embedder, save_weights
from regsam.embed.weights import embedder_fingerprint, read_weights
from regsam.errors import InputError
from regsam.register.net.model import (
    DEFAULT_NET_WEIGHTS,
    SHIPPED_EMBEDDERS,
    NetConfig,
    build_network,
    load_network,
    network_embedder,
    save_network,
)


def _embedder(path, seed: int):
    torch.manual_seed(seed)
    net = SAMEmbedder(channels=(8, 16, 16, 16), fine_dim=16, coarse_dim=16, coarse_head_channels=16,
                      fine_head_channels=8)
    return save_weights(net.eval(), path)


def _network(path, fingerprint: str | None):
    cfg = NetConfig(nb_features=(4, 8), feature_channels=2)
    basis = (torch.eye(2, 16), torch.zeros(16, 1))
    training = {} if fingerprint is None else {"embedder_fingerprint": fingerprint}
    return save_network(build_network(cfg), cfg, path, training, feature_basis=basis)


def test_fingerprint_is_the_same_for_the_file_and_the_loaded_model_and_changes_with_one_weight(tmp_path):
    path = _embedder(tmp_path / "a.pt", 0)
    weights = read_weights(path)
    model = load_embedder(path, device="cpu")
    assert embedder_fingerprint(weights.state_dict) == embedder_fingerprint(model.state_dict())
    changed = dict(weights.state_dict)
    name = next(k for k, v in changed.items() if v.is_floating_point() and v.numel() > 1)
    changed[name] = changed[name].clone()
    changed[name].view(-1)[0] += 1e-6
    assert embedder_fingerprint(changed) != embedder_fingerprint(weights.state_dict)


def test_network_embedder_accepts_its_own_embedder_and_refuses_another(tmp_path):
    mine, other = _embedder(tmp_path / "mine.pt", 0), _embedder(tmp_path / "other.pt", 1)
    net = _network(tmp_path / "net.pt", embedder_fingerprint(read_weights(mine).state_dict))
    assert network_embedder(net, mine) == mine
    with pytest.raises(InputError, match="trained on embedder") as err:
        network_embedder(net, other)
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="not shipped"):  # no shipped embedder is this tiny one
        network_embedder(net, None)


def test_network_without_a_record_keeps_the_given_or_default_embedder(tmp_path):
    net = _network(tmp_path / "net.pt", None)
    other = _embedder(tmp_path / "other.pt", 1)
    assert network_embedder(net, None) is None
    assert network_embedder(net, other) == other


def test_the_shipped_network_finds_the_shipped_embedder_it_was_trained_on():
    wanted = load_network(DEFAULT_NET_WEIGHTS).training["embedder_fingerprint"]
    path = network_embedder(None, None)
    assert path is not None and path in SHIPPED_EMBEDDERS
    assert embedder_fingerprint(read_weights(path).state_dict) == wanted
