"""The ``network`` stage of ``--method sam-net``: one pass of the trained network after the SAM affine.

It reads a SAM state (:class:`regsam.register.sam.SamState`: ``fixed``, ``moving``, ``start`` = the affine
``T0``, ``device``, ``net_weights``) and sets ``state.residual``: the ``r`` of the SAM contract
``x -> T0(x + r(x))``, a world displacement image (mm) on the network grid (a fixed-grid copy at the network's
spacing, padded). The deformable stage that may follow starts from it (``initial_residual``).
"""

from __future__ import annotations

from typing import Any

import torch

from regsam.register.embedding_pca import project_features
from regsam.register.net.model import (
    LoadedNetwork,
    image_on_grid,
    load_network,
    network_field_to_world,
    network_grid,
    network_inputs,
    predict_residual,
)
from regsam.register.torch_fields import sample_world


def _feature_inputs(state: Any, loaded: LoadedNetwork, grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Both images' SAM fine embeddings on the network's fixed input basis, on ``grid`` (moving through T0):
    (1, feature_channels, D, H, W) each."""
    assert loaded.feature_basis is not None
    f = project_features(state.fixed_emb.fine, *loaded.feature_basis)
    m = project_features(state.moving_emb.fine, *loaded.feature_basis)
    f_on = sample_world(torch.from_numpy(f), state.fixed_emb.fine_geometry, grid)
    m_on = sample_world(torch.from_numpy(m), state.moving_emb.fine_geometry, grid, state.start)
    return f_on[None], m_on[None]


class NetworkStage:
    name = "network"

    def run(self, state: Any) -> None:
        loaded = load_network(state.net_weights, device=state.device)
        cfg = loaded.config
        grid = network_grid(state.fixed, cfg.spacing_mm, cfg.stride)
        fixed_t = image_on_grid(state.fixed, grid, None, cfg.hu_window)
        moving_t = image_on_grid(state.moving, grid, state.start, cfg.hu_window)
        f, m = _feature_inputs(state, loaded, grid) if cfg.feature_channels else (None, None)
        fixed_t, moving_t = network_inputs(fixed_t, moving_t, f, m, cfg)
        with torch.no_grad():
            displacement = predict_residual(loaded.net, fixed_t.to(state.device), moving_t.to(state.device))
        state.residual = network_field_to_world(displacement, grid)
        state.extras["network"] = {"spacing_mm": cfg.spacing_mm, "grid_size": list(grid.GetSize()),
                                   "feature_channels": cfg.feature_channels,
                                   "weights": str(state.net_weights) if state.net_weights else "shipped"}


__all__ = ["NetworkStage"]
