"""Pieces shared by the objectives: one embedding pass over named input groups, level geometry, exact
geometric correspondence matrices and InfoNCE with soft (geometric) targets.

Input groups: an objective says which tensors it needs embedded (``input_groups(batch) -> {name: (N, 1, z,
y, x)}``, e.g. ``views`` = view 1 and view 2 of every pair, ``parts_2x2x1`` = the grid parts of view 1) and
gets back ``{name: {"fine": (N, Cf, z/2, y/2, x/2), "coarse": (N, Cc, z/8, y/8, x/8)}}``. A combined objective
embeds the union of its members' groups once. Under DDP the model is wrapped in :class:`GroupForward`, so
that a step makes exactly one DDP forward call however many groups there are.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from regsam.embed.affines import apply_affine, scale_affine, voxel_centres

#: the views group: view 1 of every pair, then view 2 of every pair, (2B, 1, z, y, x)
VIEWS = "views"


class GroupForward(nn.Module):
    """Wraps an embedder so that one call embeds a dict of input groups (one forward per group)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, groups: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        return {name: self.model(x) for name, x in groups.items()}


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def embed_groups(model: nn.Module, groups: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Embed every group with ``model`` (a plain embedder, a :class:`GroupForward`, or DDP around one)."""
    device = model_device(model)
    groups = {k: v.to(device) for k, v in groups.items()}
    inner = model.module if hasattr(model, "module") else model
    if isinstance(inner, GroupForward):
        return model(groups)
    return {name: model(x) for name, x in groups.items()}


def views_group(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(2B, 1, z, y, x): view 1 of every pair, then view 2 (the order SAM has always used)."""
    return torch.cat([batch["view1"], batch["view2"]], dim=0)


def parts_group(batch: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """(B * G, 1, z, y, x) parts of ``key`` (pair-major), see :class:`regsam.embed.crops.TwoViewSampler`."""
    if key not in batch:
        from regsam.errors import InputError

        raise InputError(f"the batch has no '{key}' parts; the sampler must be built with the objective's part_grids")
    x = batch[key]
    return x.reshape(-1, *x.shape[2:])


def level_points(size_xyz, view_affine: np.ndarray, factor: int, device=None) -> torch.Tensor:
    """World mm (N, 3) of the voxels of a level ``factor`` times coarser than a view (torch (z, y, x) order)."""
    index = voxel_centres(size_xyz, device=device).reshape(-1, 3)
    return apply_affine(torch.from_numpy(scale_affine(view_affine, factor)).to(index.device), index)


def level_index(world: torch.Tensor, view_affine: np.ndarray, factor: int) -> torch.Tensor:
    """Continuous level indices (x, y, z) of world points (N, 3) in a level ``factor`` times coarser."""
    to_index = np.linalg.inv(scale_affine(view_affine, factor))
    return apply_affine(torch.from_numpy(to_index).to(world.device), world)


def interpolation_matrix(index: torch.Tensor, size_xyz, tol: float = 1e-6) -> torch.Tensor:
    """Trilinear weights (Q, N) of continuous indices (Q, 3) (x, y, z) over a (z, y, x)-flattened grid of
    ``size_xyz``: row q holds the weights with which the grid's voxels interpolate point q (they sum to 1),
    or zeros where q lies outside the voxel-centre box. This is the exact correspondence matrix between a
    set of points and a grid of tokens; an aligned point has a one-hot row."""
    nx, ny, nz = (int(s) for s in size_xyz)
    size = torch.tensor([nx, ny, nz], dtype=index.dtype, device=index.device)
    inside = ((index >= -tol) & (index <= size - 1 + tol)).all(dim=1)
    clamped = index.clamp(min=torch.zeros_like(size), max=size - 1)
    lo = torch.floor(clamped).clamp(max=size - 1)
    frac = clamped - lo
    out = torch.zeros(len(index), nx * ny * nz, dtype=torch.float32, device=index.device)
    rows = torch.arange(len(index), device=index.device)
    for corner in range(8):
        bits = torch.tensor([(corner >> a) & 1 for a in range(3)], dtype=index.dtype, device=index.device)
        weight = torch.where(bits.bool(), frac, 1.0 - frac).prod(dim=1) * inside
        pos = torch.minimum(lo + bits, size - 1).long()
        flat = (pos[:, 2] * ny + pos[:, 1]) * nx + pos[:, 0]
        out.index_put_((rows, flat), weight.float(), accumulate=True)
    return out


def soft_info_nce(query: torch.Tensor, keys: torch.Tensor, target: torch.Tensor, temperature: float,
                  ignore: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE with a soft target: cross-entropy between ``target`` rows (Q, N) (sum 1) and
    ``softmax(query @ keys.T / temperature)`` over the keys not in ``ignore`` (Q, N bool).

    Args:
        query: (Q, C) unit vectors (with gradient); keys: (N, C) unit vectors.
    Returns:
        per-query loss (Q,) and per-query hit (Q,) bool: the best-scoring key is one with target weight
        >= 0.5 (one-hot targets: the right key wins).
    """
    logits = query @ keys.t() / float(temperature)
    if ignore is not None:
        logits = logits.masked_fill(ignore & (target <= 0), float("-inf"))
    loss = -(target * F.log_softmax(logits, dim=1).masked_fill(target <= 0, 0.0)).sum(dim=1)
    hit = target.gather(1, logits.argmax(dim=1, keepdim=True))[:, 0] >= 0.5
    return loss, hit


def pooled(feats: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of features (C, N) with weights (K, N) -> (K, C) unit vectors (zero rows stay ~0)."""
    total = weights.sum(dim=1, keepdim=True).clamp_min(1e-6)
    return F.normalize((weights @ feats.t()) / total, dim=1)
