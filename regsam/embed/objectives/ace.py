"""ACE (Zhou et al., "Learning Anatomically Consistent Embedding with Composition and Decomposition"),
in 3D, on dense embeddings and exact crop geometry.

ACE learns two consistencies; here both act on the embedder's dense maps (no projection heads, so every
gradient lands in the per-voxel features that registration uses):

* **global consistency**: the global feature of a view (its coarse embedding averaged over the voxels
  inside the scan, re-normalised; (C,) unit vector) agrees with that of the other, overlapping view of the
  same scan. Loss per pair and direction: ``(1 - cos) + InfoNCE`` over the other pairs' global features of
  *other* scans (temperature ``global_temperature``; with no such pair only ``1 - cos`` remains).
* **local consistency by grid-wise cropping**: view 1 (the *composed* view) is cut into a ``grid`` of
  sub-crops (the *decomposed* views; :func:`regsam.embed.crops.split_grid`), each resampled from the scan
  and augmented on its own, and embedded as separate inputs (so with less context). Patch (token) features
  are matched in both directions: composed -> decomposed (decomposition) and decomposed -> composed
  (composition). The target of a token is a row of the **correspondence matrix** computed from the crops'
  world geometry (:func:`regsam.embed.objectives.base.interpolation_matrix`: the trilinear weights with which
  the other side's token grid interpolates the token's world point; one-hot when the grids are aligned),
  never from token order. Loss: cross-entropy between that row and the softmax of the token's similarities
  to every token of the other side (temperature ``temperature``), keys closer than ``*_ignore_mm`` to the
  token's point other than the target excluded. On the coarse level (1/8) every token is a query; on the
  fine level (1/2) ``fine_queries`` random tokens per pair and direction.

Adaptations of the 2D original (ViT patch tokens, DINO-style student/teacher, projection heads): tokens are
the voxels of the CNN's fine and coarse maps; the correspondence comes from the views' affines (the 2D code
derives it from token positions in the cropped grid, whose row/column order is easy to get wrong); the
teacher is replaced by InfoNCE against the other tokens (SAM-style), which keeps the embedding from
collapsing without an EMA model.

``loss = global_weight * global + local_weight * local`` (``local`` averaged over levels and directions).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from regsam.embed.affines import apply_affine
from regsam.embed.crops import grid_key
from regsam.embed.objectives.base import (
    VIEWS,
    embed_groups,
    interpolation_matrix,
    level_index,
    level_points,
    parts_group,
    soft_info_nce,
    views_group,
)
from regsam.errors import InputError


@dataclass
class ACELossConfig:
    """Constants of the ACE objective."""

    #: sub-crops of the composed view (x, y, z); must divide the crop size
    grid: tuple[int, int, int] = (2, 2, 1)
    #: local (token) InfoNCE temperature
    temperature: float = 0.1
    #: global InfoNCE temperature
    global_temperature: float = 0.2
    global_weight: float = 1.0
    local_weight: float = 1.0
    #: fine tokens drawn as queries per pair and direction (coarse: all)
    fine_queries: int = 256
    #: keys this close (mm) to a query's point, other than its target, are left out of its softmax
    fine_ignore_mm: float = 8.0
    coarse_ignore_mm: float = 0.0
    fine_factor: int = 2
    coarse_factor: int = 8
    seed: int = 0


@dataclass
class _Tokens:
    """Tokens of one level of one or more crops: features (N, C) with grad, world mm (N, 3), inside the scan (N,)."""

    feats: torch.Tensor
    world: torch.Tensor
    valid: torch.Tensor


def _tokens(feats: torch.Tensor, affine: np.ndarray, factor: int, scan_to_index: np.ndarray, scan_size: np.ndarray) -> _Tokens:
    """Tokens of a (C, z, y, x) level of a crop with index->world ``affine`` (at input resolution)."""
    c, nz, ny, nx = feats.shape
    world = level_points((nx, ny, nz), affine, factor, device=feats.device)
    index = apply_affine(torch.from_numpy(scan_to_index).to(world.device), world)
    size = torch.as_tensor(scan_size, dtype=world.dtype, device=world.device)
    valid = ((index >= -1e-6) & (index <= size - 1 + 1e-6)).all(dim=1)
    return _Tokens(feats.reshape(c, -1).t(), world, valid)


def correspondence(query_world: torch.Tensor, key_affines: list[np.ndarray], key_size_xyz, factor: int) -> torch.Tensor:
    """Correspondence matrix (Q, K * N) from query world points (Q, 3) to the tokens of K crops with the given
    index->world affines, each with an ``key_size_xyz`` token grid at ``factor``: columns are crop-major, each
    crop's tokens in (z, y, x) order. Rows are normalised to sum 1 (zero where no crop holds the point)."""
    blocks = [interpolation_matrix(level_index(query_world, a, factor), key_size_xyz) for a in key_affines]
    target = torch.cat(blocks, dim=1)
    return target / target.sum(dim=1, keepdim=True).clamp_min(1e-12)


class ACEObjective:
    """ACE's global + local consistency. ``objective(model, batch) -> {"loss", "global", "local", "global_acc",
    "local_acc"}``; ``local_acc``: share of token queries whose best key is their geometric target, ``global_acc``:
    share of views whose positive beats every negative (nan without negatives)."""

    components: tuple[str, ...] = ("global", "local", "global_acc", "local_acc")

    def __init__(self, **kwargs) -> None:
        kwargs = {k: v for k, v in kwargs.items() if k != "name"}
        unknown = set(kwargs) - set(ACELossConfig.__dataclass_fields__)
        if unknown:
            raise InputError(f"objective 'ace': unknown key(s) {sorted(unknown)}; known: {sorted(ACELossConfig.__dataclass_fields__)}")
        if "grid" in kwargs:
            kwargs["grid"] = tuple(int(g) for g in kwargs["grid"])
        self.config = ACELossConfig(**kwargs)
        cfg = self.config
        if len(cfg.grid) != 3 or min(cfg.grid) < 1 or np.prod(cfg.grid) < 2:
            raise InputError(f"objective 'ace': grid must be 3 positive counts with at least 2 parts, got {cfg.grid}")
        if cfg.temperature <= 0 or cfg.global_temperature <= 0:
            raise InputError("objective 'ace': temperatures must be positive")
        self.generator = torch.Generator().manual_seed(int(cfg.seed))

    # ------------------------------------------------------------ state (for exact resume)
    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(int(seed))

    def as_dict(self) -> dict:
        return asdict(self.config)

    # ------------------------------------------------------------ inputs
    def part_grids(self, view_size) -> list[tuple[int, int, int]]:
        return [self.config.grid]

    def input_groups(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        key = grid_key(self.config.grid)
        return {VIEWS: views_group(batch), key: parts_group(batch, key)}

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict:
        return self.compute(embed_groups(model, self.input_groups(batch)), batch)

    # ------------------------------------------------------------ global consistency
    def global_loss(self, coarse: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
        """Global consistency from the views' coarse maps (2B, C, z, y, x); returns (loss, positive-wins share)."""
        n = coarse.shape[0] // 2
        to_index, sizes = batch["scan_to_index"].cpu().numpy(), batch["scan_size"].cpu().numpy()
        globals_ = []
        for v, key in ((0, "affine1"), (1, "affine2")):
            for b in range(n):
                tok = _tokens(coarse[v * n + b], batch[key][b].cpu().numpy(), self.config.coarse_factor, to_index[b], sizes[b])
                feats = tok.feats[tok.valid] if tok.valid.any() else tok.feats
                globals_.append(F.normalize(feats.mean(dim=0), dim=0))
        g = torch.stack(globals_)  # (2B, C)
        g1, g2 = g[:n], g[n:]
        ids = batch["scan_id"].to(g.device)
        negative = ids[:, None] != ids[None, :]
        losses, wins = [], []
        for q, k in ((g1, g2), (g2, g1)):
            sim = q @ k.t() / self.config.global_temperature
            pos = sim.diagonal()[:, None]
            logits = torch.cat([pos, sim.masked_fill(~negative, float("-inf"))], dim=1)
            ce = F.cross_entropy(logits, torch.zeros(n, dtype=torch.long, device=g.device), reduction="none")
            losses.append(ce + 1.0 - (q * k).sum(dim=1))
            has_neg = negative.any(dim=1)
            wins += [bool((logits[i, 1:] < logits[i, 0]).all()) for i in range(n) if has_neg[i]]
        return torch.cat(losses).mean(), (float(np.mean(wins)) if wins else float("nan"))

    # ------------------------------------------------------------ local consistency
    def _direction(self, query: _Tokens, keys: _Tokens, key_affines: list[np.ndarray], key_size, factor: int,
                   ignore_mm: float, n_queries: int):
        """Soft InfoNCE of ``query`` tokens (all, or ``n_queries`` drawn at random among those with a counterpart)
        against every token of ``keys`` (crops with ``key_affines``), targets from :func:`correspondence`."""
        hi = torch.as_tensor(key_size, dtype=query.world.dtype, device=query.world.device) - 1
        covered = torch.zeros_like(query.valid)
        for affine in key_affines:
            index = level_index(query.world, affine, factor)
            covered |= ((index >= -1e-6) & (index <= hi + 1e-6)).all(dim=1)
        rows = torch.nonzero(query.valid & covered).flatten()
        if n_queries > 0 and len(rows) > n_queries:
            rows = rows[torch.randperm(len(rows), generator=self.generator)[:n_queries].to(rows.device)]
        if len(rows) == 0:
            return None
        target = correspondence(query.world[rows], key_affines, key_size, factor)
        ignore = ~keys.valid[None, :].expand(len(rows), -1)
        if ignore_mm > 0:
            ignore = ignore | (torch.cdist(query.world[rows].float(), keys.world.float()) < ignore_mm)
        return soft_info_nce(query.feats[rows], keys.feats, target, self.config.temperature, ignore)

    def _pair_tokens(self, views: dict, parts: dict, batch: dict, b: int, level: str, factor: int):
        """(composed tokens, its affine, decomposed tokens, their affines) of pair ``b`` at ``level``."""
        g = int(np.prod(self.config.grid))
        to_index, size = batch["scan_to_index"][b].cpu().numpy(), batch["scan_size"][b].cpu().numpy()
        a1 = batch["affine1"][b].cpu().numpy()
        pa = [a.numpy() for a in batch[grid_key(self.config.grid) + "_affine"][b].cpu()]
        comp = _tokens(views[level][b], a1, factor, to_index, size)
        toks = [_tokens(parts[level][b * g + p], pa[p], factor, to_index, size) for p in range(g)]
        dec = _Tokens(*(torch.cat([getattr(t, f) for t in toks]) for f in ("feats", "world", "valid")))
        return comp, a1, dec, pa

    def local_loss(self, views: dict, parts: dict, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, float]:
        """Local consistency over every pair, both levels and both directions; returns (loss, hit share)."""
        cfg = self.config
        losses, hits = [], []
        for level, factor, ignore_mm, n_q in (("coarse", cfg.coarse_factor, cfg.coarse_ignore_mm, 0),
                                               ("fine", cfg.fine_factor, cfg.fine_ignore_mm, cfg.fine_queries)):
            size_c, size_p = tuple(views[level].shape[2:][::-1]), tuple(parts[level].shape[2:][::-1])
            for b in range(batch["view1"].shape[0]):
                comp, a1, dec, pa = self._pair_tokens(views, parts, batch, b, level, factor)
                for result in (self._direction(comp, dec, pa, size_p, factor, ignore_mm, n_q),
                               self._direction(dec, comp, [a1], size_c, factor, ignore_mm, n_q)):
                    if result is not None:
                        losses.append(result[0].mean())
                        hits.append(result[1].float().mean())
        if not losses:
            return None, float("nan")
        return torch.stack(losses).mean(), float(torch.stack(hits).mean())

    # ------------------------------------------------------------ entry point
    def compute(self, outputs: dict[str, dict[str, torch.Tensor]], batch: dict[str, torch.Tensor]) -> dict:
        """The loss from the embedded ``views`` and parts groups (see the module docstring)."""
        cfg = self.config
        views, parts = outputs[VIEWS], outputs[grid_key(cfg.grid)]
        zero = 0.0 * sum(t.sum() for group in (views, parts) for t in group.values())
        glob, glob_acc = self.global_loss(views["coarse"], batch)
        local, local_acc = self.local_loss(views, parts, batch)
        local = zero if local is None else local
        loss = cfg.global_weight * glob + cfg.local_weight * local + zero
        return {"loss": loss, "global": float(glob.detach()), "local": float(local.detach()),
                "global_acc": glob_acc, "local_acc": local_acc}
