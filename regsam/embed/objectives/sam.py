"""SAM's pixel-wise contrastive objective (Yan et al., IEEE TMI 2022), on exact two-view geometry.

For a pair of views of one scan (see :mod:`regsam.embed.crops`):

* **fine (local) level**, 1/2 resolution: queries are ``fine_positives`` random fine voxels of one view
  that also lie in the other view; the key is the other view's fine embedding trilinearly interpolated
  at *exactly* the same world point. Negatives are fine voxels of both views more than ``fine_ignore_mm``
  from the query's point: the ``fine_candidates`` most similar by *combined* fine + coarse similarity
  (hard negatives), of which ``fine_negatives`` are drawn at random (diverse hard negatives).
* **coarse (global) level**, 1/8 resolution: every coarse voxel of one view inside the other view is a
  query, its key interpolated in the other view; negatives are the ``coarse_candidates`` most similar
  coarse voxels of both views beyond ``coarse_ignore_mm`` (``coarse_negatives`` drawn at random) plus
  ``coarse_global_negatives`` random coarse voxels of *other scans* in the batch.
* each level: InfoNCE (cross-entropy with the positive at index 0) with temperature ``temperature``;
  both directions (view 1 -> 2 and 2 -> 1); averaged over pairs; ``loss = fine + coarse``.

Default constants are the public SAM implementation's chest-CT configuration
(alibaba-damo-academy/self-supervised-anatomical-embedding-v2, ``configs/sam/sam_NIHLN.py`` over
``sam_deeplesion.py``): temperature 0.5, 100 positives, 500 of 2000 hard fine negatives, 20 mm fine
ignore radius (3 mm in the DeepLesion configuration), 200 of 250 coarse negatives, 5 mm coarse ignore
radius, 1000 cross-scan coarse negatives (300 for DeepLesion).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from regsam.embed.affines import apply_affine, normalized_grid, scale_affine, voxel_centres
from regsam.embed.objectives.base import VIEWS, embed_groups, views_group
from regsam.errors import InputError


@dataclass
class SAMLossConfig:
    """Constants of the SAM objective (defaults: the public SAM implementation's chest-CT values)."""

    temperature: float = 0.5
    fine_positives: int = 100
    fine_candidates: int = 2000
    fine_negatives: int = 500
    fine_ignore_mm: float = 20.0
    coarse_positives: int = 0  # 0 = all overlapping coarse voxels (SAM)
    coarse_candidates: int = 250
    coarse_negatives: int = 200
    coarse_ignore_mm: float = 5.0
    coarse_global_negatives: int = 1000
    fine_factor: int = 2
    coarse_factor: int = 8
    seed: int = 0


@dataclass
class _Level:
    """One level of one view: features (C, N) with grad, world points (N, 3), validity (N,), grid info."""

    feats: torch.Tensor
    grid: torch.Tensor  # (1, C, z, y, x) for interpolation
    world: torch.Tensor
    valid: torch.Tensor
    world_to_index: np.ndarray
    size: tuple[int, int, int]


class SAMObjective:
    """SAM's fine + coarse InfoNCE. ``objective(model, batch) -> {"loss", "fine", "coarse", "fine_acc", "coarse_acc"}``.

    ``fine_acc`` / ``coarse_acc``: fraction of queries whose positive beats all their sampled negatives.
    """

    components: tuple[str, ...] = ("fine", "coarse", "fine_acc", "coarse_acc")

    def __init__(self, **kwargs) -> None:
        kwargs = {k: v for k, v in kwargs.items() if k != "name"}
        unknown = set(kwargs) - set(SAMLossConfig.__dataclass_fields__)
        if unknown:
            raise InputError(f"objective 'sam': unknown key(s) {sorted(unknown)}; known: {sorted(SAMLossConfig.__dataclass_fields__)}")
        self.config = SAMLossConfig(**kwargs)
        if self.config.temperature <= 0:
            raise InputError(f"objective 'sam': temperature must be positive, got {self.config.temperature}")
        self.generator = torch.Generator().manual_seed(int(self.config.seed))

    # ------------------------------------------------------------ state (for exact resume)
    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(int(seed))

    def as_dict(self) -> dict:
        return asdict(self.config)

    # ------------------------------------------------------------ helpers
    def _rand(self, *shape: int, device: torch.device) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator).to(device)

    def _randperm(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.randperm(n, generator=self.generator).to(device)

    @staticmethod
    def _level(feats: torch.Tensor, view_affine: np.ndarray, factor: int, scan_to_index: np.ndarray, scan_size: np.ndarray) -> _Level:
        """Describe one level of one view: (C, z, y, x) features, their world points and validity."""
        c, nz, ny, nx = feats.shape
        affine = scale_affine(view_affine, factor)
        index = voxel_centres((nx, ny, nz), device=feats.device).reshape(-1, 3)
        world = apply_affine(torch.from_numpy(affine).to(feats.device), index)
        scan_index = apply_affine(torch.from_numpy(scan_to_index).to(feats.device), world)
        size = torch.as_tensor(scan_size, dtype=world.dtype, device=feats.device)
        valid = ((scan_index >= -1e-6) & (scan_index <= size - 1 + 1e-6)).all(dim=1)
        return _Level(feats.reshape(c, -1), feats[None], world, valid, np.linalg.inv(affine), (nx, ny, nz))

    @staticmethod
    def _inside(level: _Level, world: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Continuous indices of ``world`` points in ``level`` and whether they fall inside its voxel-centre box."""
        index = apply_affine(torch.from_numpy(level.world_to_index).to(world.device), world)
        hi = torch.as_tensor(level.size, dtype=index.dtype, device=index.device) - 1
        return index, ((index >= -1e-6) & (index <= hi + 1e-6)).all(dim=1)

    @staticmethod
    def _interpolate(level: _Level, index: torch.Tensor) -> torch.Tensor:
        """Trilinear features of ``level`` at continuous indices (P, 3) -> (P, C), re-normalised to unit length."""
        grid = normalized_grid(index, level.size).to(level.grid.dtype).reshape(1, 1, 1, -1, 3)
        out = F.grid_sample(level.grid, grid, mode="bilinear", padding_mode="border", align_corners=True)
        return F.normalize(out.reshape(level.grid.shape[1], -1).t(), dim=1)

    def _sample_negatives(self, scores: torch.Tensor, n_candidates: int, n_negatives: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: take the ``n_candidates`` highest ``scores`` and draw ``n_negatives`` of them at random.

        Returns (indices (P, n), usable (P, n) bool); entries of -inf score (ignored) are not usable.
        """
        k = min(int(n_candidates), scores.shape[1])
        top_scores, top = scores.topk(k, dim=1)
        n = min(int(n_negatives), k)
        pick = self._rand(scores.shape[0], k, device=scores.device).argsort(dim=1)[:, :n]
        return top.gather(1, pick), torch.isfinite(top_scores.gather(1, pick))

    @staticmethod
    def _info_nce(q: torch.Tensor, k: torch.Tensor, neg: torch.Tensor, neg_ok: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [q.k, q.neg_1..n] / T with unusable negatives masked; returns (per-query loss, positive-wins)."""
        pos = (q * k).sum(dim=1, keepdim=True)
        logits = torch.cat([pos, neg.masked_fill(~neg_ok, float("-inf"))], dim=1) / temperature
        loss = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device), reduction="none")
        wins = (logits[:, 1:] < logits[:, :1]).all(dim=1)
        return loss, wins

    # ------------------------------------------------------------ the two levels
    def _fine_direction(self, qa: _Level, kb: _Level, qa_coarse: torch.Tensor, cand_feats, cand_coarse, cand_world, cand_valid):
        cfg = self.config
        device = qa.feats.device
        index_b, inside = self._inside(kb, qa.world)
        pool = torch.nonzero(qa.valid & inside).flatten()
        if len(pool) == 0:
            return None
        sel = pool[self._randperm(len(pool), device)[: cfg.fine_positives]]
        q = qa.feats[:, sel].t()  # (P, C)
        k = self._interpolate(kb, index_b[sel])
        with torch.no_grad():
            scores = q.detach() @ cand_feats.t() + qa_coarse[:, sel].t() @ cand_coarse
            far = torch.cdist(qa.world[sel].float(), cand_world.float()) >= cfg.fine_ignore_mm
            scores = scores.masked_fill(~(far & cand_valid[None]), float("-inf"))
            neg_idx, neg_ok = self._sample_negatives(scores, cfg.fine_candidates, cfg.fine_negatives)
        neg = torch.einsum("pc,pnc->pn", q, cand_feats[neg_idx])
        return self._info_nce(q, k, neg, neg_ok, cfg.temperature)

    def _coarse_direction(self, qa: _Level, kb: _Level, cand_feats, cand_world, cand_valid, global_feats):
        cfg = self.config
        device = qa.feats.device
        index_b, inside = self._inside(kb, qa.world)
        sel = torch.nonzero(qa.valid & inside).flatten()
        if len(sel) == 0:
            return None
        if cfg.coarse_positives > 0:
            sel = sel[self._randperm(len(sel), device)[: cfg.coarse_positives]]
        q = qa.feats[:, sel].t()
        k = self._interpolate(kb, index_b[sel])
        with torch.no_grad():
            scores = q.detach() @ cand_feats.t()
            far = torch.cdist(qa.world[sel].float(), cand_world.float()) >= cfg.coarse_ignore_mm
            scores = scores.masked_fill(~(far & cand_valid[None]), float("-inf"))
            neg_idx, neg_ok = self._sample_negatives(scores, cfg.coarse_candidates, cfg.coarse_negatives)
        neg = torch.einsum("pc,pnc->pn", q, cand_feats[neg_idx])
        if global_feats is not None and len(global_feats) > 0:
            g = global_feats[self._randperm(len(global_feats), device)[: cfg.coarse_global_negatives]]
            neg = torch.cat([neg, q @ g.t()], dim=1)
            neg_ok = torch.cat([neg_ok, torch.ones(len(q), len(g), dtype=torch.bool, device=device)], dim=1)
        return self._info_nce(q, k, neg, neg_ok, cfg.temperature)

    # ------------------------------------------------------------ entry point
    def part_grids(self, view_size) -> list[tuple[int, int, int]]:
        """SAM needs no parts (see :class:`~regsam.embed.crops.TwoViewSampler`)."""
        return []

    def input_groups(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``views``: (2B, 1, z, y, x), view 1 of every pair then view 2."""
        return {VIEWS: views_group(batch)}

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict:
        """Compute the loss for a batch of view pairs (see :class:`~regsam.embed.crops.TwoViewSampler`).

        Returns:
            ``loss`` (scalar tensor with gradient), and floats ``fine``, ``coarse``, ``fine_acc``, ``coarse_acc``.
        """
        return self.compute(embed_groups(model, self.input_groups(batch)), batch)

    def _pair_levels(self, fine: torch.Tensor, coarse: torch.Tensor, batch: dict[str, torch.Tensor]) -> list[dict]:
        """Per pair ``{1: (fine level, coarse level), 2: (...)}`` from the (2B, C, ...) view embeddings."""
        cfg = self.config
        n_pairs = fine.shape[0] // 2
        aff = {1: batch["affine1"].cpu().numpy(), 2: batch["affine2"].cpu().numpy()}
        to_index = batch["scan_to_index"].cpu().numpy()
        sizes = batch["scan_size"].cpu().numpy()
        levels = []
        for b in range(n_pairs):
            per = {}
            for v, offset in ((1, 0), (2, n_pairs)):
                per[v] = (
                    self._level(fine[offset + b], aff[v][b], cfg.fine_factor, to_index[b], sizes[b]),
                    self._level(coarse[offset + b], aff[v][b], cfg.coarse_factor, to_index[b], sizes[b]),
                )
            levels.append(per)
        return levels

    def _pair_fine(self, f1: _Level, c1: _Level, f2: _Level, c2: _Level) -> list:
        """Both fine directions of one pair (results of :meth:`_fine_direction`, ``None`` dropped)."""
        cfg = self.config
        with torch.no_grad():
            # coarse embedding at every fine voxel (for the combined hard-negative score); level j -> j * f/c
            ratio = cfg.fine_factor / cfg.coarse_factor
            coarse_at_fine = []
            for fl, cl in ((f1, c1), (f2, c2)):
                idx = voxel_centres(fl.size, device=fl.feats.device).reshape(-1, 3) * ratio
                coarse_at_fine.append(self._interpolate(cl, idx).t())  # (C, N)
        cand_feats = torch.cat([f1.feats, f2.feats], dim=1).t()  # (N1 + N2, C)
        cand_coarse = torch.cat(coarse_at_fine, dim=1)
        cand_world = torch.cat([f1.world, f2.world])
        cand_valid = torch.cat([f1.valid, f2.valid])
        out = [
            self._fine_direction(f1, f2, coarse_at_fine[0], cand_feats, cand_coarse, cand_world, cand_valid),
            self._fine_direction(f2, f1, coarse_at_fine[1], cand_feats, cand_coarse, cand_world, cand_valid),
        ]
        return [r for r in out if r is not None]

    def _pair_coarse(self, levels: list[dict], b: int, scan_ids: torch.Tensor) -> list:
        """Both coarse directions of pair ``b``, with cross-scan negatives from the other pairs."""
        c1, c2 = levels[b][1][1], levels[b][2][1]
        ccand = torch.cat([c1.feats, c2.feats], dim=1).t()
        cworld = torch.cat([c1.world, c2.world])
        cvalid = torch.cat([c1.valid, c2.valid])
        others = [
            torch.cat([levels[o][v][1].feats[:, levels[o][v][1].valid] for v in (1, 2)], dim=1).t()
            for o in range(len(levels))
            if o != b and int(scan_ids[o]) != int(scan_ids[b])
        ]
        global_feats = torch.cat(others) if others else None
        out = [
            self._coarse_direction(c1, c2, ccand, cworld, cvalid, global_feats),
            self._coarse_direction(c2, c1, ccand, cworld, cvalid, global_feats),
        ]
        return [r for r in out if r is not None]

    def compute(self, outputs: dict[str, dict[str, torch.Tensor]], batch: dict[str, torch.Tensor]) -> dict:
        """The loss from the embedded ``views`` group (see :meth:`__call__`)."""
        fine, coarse = outputs[VIEWS]["fine"], outputs[VIEWS]["coarse"]
        levels = self._pair_levels(fine, coarse, batch)
        scan_ids = batch["scan_id"].cpu()
        fine_losses, coarse_losses, fine_wins, coarse_wins = [], [], [], []
        for b in range(len(levels)):
            pair_fine = self._pair_fine(*levels[b][1], *levels[b][2])
            if pair_fine:
                fine_losses.append(torch.cat([r[0] for r in pair_fine]).mean())
                fine_wins.append(torch.cat([r[1] for r in pair_fine]).float().mean())
            pair_coarse = self._pair_coarse(levels, b, scan_ids)
            if pair_coarse:
                coarse_losses.append(torch.cat([r[0] for r in pair_coarse]).mean())
                coarse_wins.append(torch.cat([r[1] for r in pair_coarse]).float().mean())

        # keep every parameter in the graph (DDP) even when a level had no overlap
        zero = 0.0 * (fine.sum() + coarse.sum())
        fine_loss = torch.stack(fine_losses).mean() if fine_losses else zero
        coarse_loss = torch.stack(coarse_losses).mean() if coarse_losses else zero
        loss = fine_loss + coarse_loss + zero
        return {
            "loss": loss,
            "fine": float(fine_loss.detach()),
            "coarse": float(coarse_loss.detach()),
            "fine_acc": float(torch.stack(fine_wins).mean()) if fine_wins else float("nan"),
            "coarse_acc": float(torch.stack(coarse_wins).mean()) if coarse_wins else float("nan"),
        }
