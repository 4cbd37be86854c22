"""Adam (Hosseinzadeh Taher et al., MICCAI 2023 DART, "Towards Foundation Models Learned from Anatomy in
Medical Imaging via Self-Supervision"; code JLiangLab/Eden), in 3D and on dense embeddings.

Adam learns anatomy by **hierarchical decomposition**: an image is split coarse-to-fine into parts, every
level's parts are embedded, **locality** makes the embedding of a part match its own augmented views and
differ from *distinct* parts, **compositionality** (Adam-v2) makes a whole consistent with the aggregate of its
parts, and a **purposive pruner** removes near-duplicate anatomy (parts that the current embedding already
finds near-identical to the anchor, e.g. the same anatomy of another scan) from the negatives.

How it is made dense (registration needs per-voxel features, Adam gives one vector per image part):

* The hierarchy is a binary one over view 1 (the *whole*, level 0): level ``l`` halves every level ``l-1``
  part along its longest side (:func:`regsam.embed.crops.hierarchy_grids`; 64 x 64 x 32 -> 2 x 1 x 1, 2 x 2 x 1
  for ``levels: 2``). Each part is resampled from the scan at the view's spacing (no zoom, the network always
  sees 2 mm voxels), augmented on its own and embedded as a separate input, with less context than the whole.
* A part's embedding is not a pooled network head but the **mean of its dense map** (coarse and fine map
  separately, re-normalised): the descriptor of a region. Every loss term is a function of the per-voxel
  features, so the gradient shapes the dense maps, and does so on each map level.
* The positives of a part are the same world box read off the other inputs' dense maps: view 1's map
  averaged over the part's box (the whole, decomposed) and view 2's map averaged over its voxels inside the
  box (another scale, rotation and augmentation; used when it covers at least ``min_cover`` of the box).
  Boxes come from the views' affines, never from input order.
* Negatives: the own descriptors of every other part in the batch that is *distinct* (another scan, or a
  world-box overlap of at most ``distinct_overlap`` of the smaller box: ancestors and descendants are not
  negatives) and not pruned: the pruner drops those whose (gradient-free) cosine to the anchor is at least
  ``prune_similarity``. Loss: InfoNCE, temperature ``temperature``.
* Compositionality: ``1 - cos(whole, aggregate of its children)``, the aggregate being the token-count
  weighted mean of the children's (own-input) mean features; children are found by box containment.
* Coarse-to-fine learning: with ``level_steps > 0`` level ``l`` joins after ``l * level_steps`` steps (Adam
  trains granularity levels one after the other); ``0``: all levels from the start.

``loss = locality_weight * locality + composition_weight * composition`` (each averaged over both maps).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from regsam.embed.affines import apply_affine, scale_affine, voxel_centres
from regsam.embed.crops import grid_key, hierarchy_grids
from regsam.embed.objectives.base import VIEWS, embed_groups, parts_group, views_group
from regsam.errors import InputError

MAPS = (("coarse", "coarse_factor"), ("fine", "fine_factor"))


@dataclass
class AdamLossConfig:
    """Constants of the (dense) Adam objective."""

    #: hierarchy levels below the whole view (level l has 2**l parts)
    levels: int = 2
    temperature: float = 0.2
    locality_weight: float = 1.0
    composition_weight: float = 1.0
    #: purposive pruner: negatives at least this similar to the anchor are dropped (Adam: a threshold on cosine)
    prune_similarity: float = 0.9
    #: a same-scan part is a distinct negative if its world box overlaps the anchor's by at most this share
    distinct_overlap: float = 0.25
    #: view 2 is a positive of a part when its voxels cover at least this share of the part's box
    min_cover: float = 0.5
    #: coarse-to-fine schedule: level l used from step l * level_steps on (0: all levels at once)
    level_steps: int = 0
    fine_factor: int = 2
    coarse_factor: int = 8
    seed: int = 0


@dataclass
class _Nodes:
    """All parts of a batch at one map level (K nodes): descriptors and bookkeeping.

    own: (K, C) unit descriptors from each part's own input; whole: (K, C) view 1 pooled over the box;
    other: (K, C) view 2 pooled over the box, ``other_ok`` (K,) where it covers enough; ``sums`` (K, C) and
    ``counts`` (K,) the unnormalised token sums behind ``own``; ``pair``, ``level``, ``scan`` (K,) ints;
    ``lo``/``hi`` (K, 3) world-mm axis-aligned bounding box of the part; ``children``: node -> its child nodes.
    """

    own: torch.Tensor
    whole: torch.Tensor
    other: torch.Tensor
    other_ok: torch.Tensor
    sums: torch.Tensor
    counts: torch.Tensor
    pair: np.ndarray
    level: np.ndarray
    scan: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    children: dict[int, list[int]]


def purposive_prune(anchors: torch.Tensor, negatives: torch.Tensor, threshold: float) -> torch.Tensor:
    """Adam's purposive pruner: keep (A, N) bool, False where negative n is at least ``threshold`` cosine-similar
    to anchor a (near-duplicate anatomy). Inputs (A, C), (N, C) unit vectors; no gradient."""
    with torch.no_grad():
        return (anchors.detach() @ negatives.detach().t()) < float(threshold)


def box_overlap(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(K, K) shared volume of axis-aligned world boxes (K, 3) over the smaller box's volume, in [0, 1]."""
    inter = np.clip(np.minimum(hi[:, None], hi[None]) - np.maximum(lo[:, None], lo[None]), 0.0, None).prod(axis=2)
    vol = np.clip(hi - lo, 1e-9, None).prod(axis=1)
    return inter / np.minimum(vol[:, None], vol[None])


def _box_tokens(index: torch.Tensor, box: np.ndarray) -> torch.Tensor:
    """(N,) bool: view-1 voxel indices (N, 3) inside the inclusive voxel box (2, 3)."""
    b = torch.as_tensor(box, dtype=index.dtype, device=index.device)
    return ((index >= b[0] - 1e-6) & (index <= b[1] + 1e-6)).all(dim=1)


class AdamObjective:
    """Dense Adam: ``objective(model, batch) -> {"loss", "locality", "composition", "locality_acc", "pruned"}``.

    ``locality_acc``: share of (anchor, positive) rows where the positive beats every kept negative;
    ``pruned``: share of distinct negatives removed by the purposive pruner.
    """

    components: tuple[str, ...] = ("locality", "composition", "locality_acc", "pruned")

    def __init__(self, **kwargs) -> None:
        kwargs = {k: v for k, v in kwargs.items() if k != "name"}
        unknown = set(kwargs) - set(AdamLossConfig.__dataclass_fields__)
        if unknown:
            raise InputError(f"objective 'adam': unknown key(s) {sorted(unknown)}; known: {sorted(AdamLossConfig.__dataclass_fields__)}")
        self.config = AdamLossConfig(**kwargs)
        if self.config.levels < 1:
            raise InputError(f"objective 'adam': levels must be >= 1, got {self.config.levels}")
        if self.config.temperature <= 0:
            raise InputError(f"objective 'adam': temperature must be positive, got {self.config.temperature}")
        self.calls = 0

    # ------------------------------------------------------------ state (for exact resume)
    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])

    def reseed(self, seed: int) -> None:
        """Adam draws nothing at random; kept for the training loop's interface."""

    def as_dict(self) -> dict:
        return asdict(self.config)

    # ------------------------------------------------------------ inputs
    def part_grids(self, view_size) -> list[tuple[int, int, int]]:
        return hierarchy_grids(view_size, self.config.levels)

    def input_groups(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        groups = {VIEWS: views_group(batch)}
        for grid in self.part_grids(tuple(batch["view1"].shape[2:][::-1])):
            groups[grid_key(grid)] = parts_group(batch, grid_key(grid))
        return groups

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict:
        return self.compute(embed_groups(model, self.input_groups(batch)), batch)

    def active_levels(self) -> int:
        """Hierarchy levels in use at the current step (coarse-to-fine schedule)."""
        if self.config.level_steps <= 0:
            return self.config.levels
        return min(self.config.levels, self.calls // int(self.config.level_steps))

    # ------------------------------------------------------------ descriptors
    def _pair_nodes(self, outputs: dict, batch: dict, b: int, level_map: str, factor: int) -> list[dict]:
        """Nodes of pair ``b`` (whole view 1, then every active level's parts) at one map level."""
        n = batch["view1"].shape[0]
        a1, a2 = batch["affine1"][b].cpu().numpy(), batch["affine2"][b].cpu().numpy()
        view1, view2 = outputs[VIEWS][level_map][b], outputs[VIEWS][level_map][n + b]
        size1 = tuple(batch["view1"].shape[2:][::-1])
        to_scan, scan_size = batch["scan_to_index"][b].cpu().numpy(), batch["scan_size"][b].cpu().numpy()

        def tokens(feats: torch.Tensor, affine: np.ndarray):
            """(N, C) features, (N, 3) view-1 voxel indices, (N,) inside the scan."""
            world = apply_affine(scale_affine(affine, factor), voxel_centres(feats.shape[1:][::-1]).reshape(-1, 3).numpy())
            scan_idx = apply_affine(to_scan, world)
            valid = ((scan_idx >= -1e-6) & (scan_idx <= scan_size - 1 + 1e-6)).all(axis=1)
            index = apply_affine(np.linalg.inv(a1), world)
            dev = feats.device
            return feats.reshape(feats.shape[0], -1).t(), torch.from_numpy(index).to(dev), torch.from_numpy(valid).to(dev)

        t1, t2 = tokens(view1, a1), tokens(view2, a2)
        nodes = [{"level": 0, "box": np.array([[0.0] * 3, np.array(size1, float) - 1]), "own": t1}]
        for level, grid in enumerate(self.part_grids(size1)[: self.active_levels()], start=1):
            sub = np.array(size1) // np.array(grid)
            affines = batch[grid_key(grid) + "_affine"][b].cpu().numpy()
            for p, affine in enumerate(affines):
                lo = np.rint(apply_affine(np.linalg.inv(a1), affine[:3, 3][None])[0])
                feats = outputs[grid_key(grid)][level_map][b * len(affines) + p]
                nodes.append({"level": level, "box": np.array([lo, lo + sub - 1]), "own": tokens(feats, affine)})
        for node in nodes:
            node["in1"] = _box_tokens(t1[1], node["box"]) & t1[2]
            node["in2"] = _box_tokens(t2[1], node["box"]) & t2[2]
            node["corners"] = apply_affine(a1, np.array([[node["box"][i // 4][0], node["box"][i // 2 % 2][1], node["box"][i % 2][2]] for i in range(8)]))
            node["t1"], node["t2"] = t1, t2
        return nodes

    def descriptors(self, outputs: dict, batch: dict, level_map: str, factor: int) -> _Nodes:
        """Every node of the batch at one map level (see :class:`_Nodes`)."""
        rows: dict[str, list] = {k: [] for k in ("own", "whole", "other", "other_ok", "sums", "counts", "pair", "level", "scan", "lo", "hi")}
        children: dict[int, list[int]] = {}
        for b in range(batch["view1"].shape[0]):
            nodes = self._pair_nodes(outputs, batch, b, level_map, factor)
            base = len(rows["own"])
            for k, node in enumerate(nodes):
                feats, _, valid = node["own"]
                use = valid if valid.any() else torch.ones_like(valid)
                total = feats[use].sum(dim=0)
                rows["sums"].append(total)
                rows["counts"].append(float(use.sum()))
                rows["own"].append(F.normalize(total, dim=0))
                whole_feats, other_feats = node["t1"][0], node["t2"][0]
                rows["whole"].append(F.normalize(whole_feats[node["in1"]].sum(dim=0), dim=0))
                rows["other"].append(F.normalize(other_feats[node["in2"]].sum(dim=0), dim=0))
                rows["other_ok"].append(float(node["in2"].sum()) >= self.config.min_cover * max(float(node["in1"].sum()), 1.0))
                rows["pair"].append(b)
                rows["level"].append(node["level"])
                rows["scan"].append(int(batch["scan_id"][b]))
                rows["lo"].append(node["corners"].min(axis=0))
                rows["hi"].append(node["corners"].max(axis=0))
                inside = [j for j, o in enumerate(nodes) if o["level"] == node["level"] + 1
                          and (o["box"][0] >= node["box"][0]).all() and (o["box"][1] <= node["box"][1]).all()]
                if inside:
                    children[base + k] = [base + j for j in inside]
        t = {k: torch.stack(rows[k]) for k in ("own", "whole", "other", "sums")}
        return _Nodes(t["own"], t["whole"], t["other"], torch.tensor(rows["other_ok"]), t["sums"],
                      torch.tensor(rows["counts"]), *(np.array(rows[k]) for k in ("pair", "level", "scan", "lo", "hi")), children)

    # ------------------------------------------------------------ losses
    def negative_mask(self, nodes: _Nodes) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, K) bool masks: ``distinct`` (another scan, or same scan with little box overlap; never itself)
        and ``keep`` = distinct and not pruned by :func:`purposive_prune`."""
        same_scan = nodes.scan[:, None] == nodes.scan[None]
        distinct = ~same_scan | (box_overlap(nodes.lo, nodes.hi) <= self.config.distinct_overlap)
        np.fill_diagonal(distinct, False)
        distinct_t = torch.from_numpy(distinct).to(nodes.own.device)
        return distinct_t, distinct_t & purposive_prune(nodes.own, nodes.own, self.config.prune_similarity)

    def locality(self, nodes: _Nodes) -> tuple[torch.Tensor, float, float]:
        """InfoNCE of each part's own descriptor against its positives (whole-pooled for parts, view-2-pooled where
        covered) and its kept negatives; returns (loss, positive-wins share, pruned share)."""
        distinct, keep = self.negative_mask(nodes)
        anchors, positives, rows = [], [], []
        for k in range(len(nodes.own)):
            for pos, ok in ((nodes.whole[k], nodes.level[k] > 0), (nodes.other[k], bool(nodes.other_ok[k]))):
                if ok:
                    anchors.append(k)
                    positives.append(pos)
        if not anchors:
            return nodes.own.sum() * 0.0, float("nan"), float("nan")
        idx = torch.tensor(anchors, device=nodes.own.device)
        q = nodes.own[idx]
        pos = (q * torch.stack(positives)).sum(dim=1, keepdim=True)
        neg = (q @ nodes.own.t()).masked_fill(~keep[idx], float("-inf"))
        logits = torch.cat([pos, neg], dim=1) / self.config.temperature
        loss = F.cross_entropy(logits, torch.zeros(len(idx), dtype=torch.long, device=q.device))
        wins = float((logits[:, 1:] < logits[:, :1]).all(dim=1).float().mean())
        n_distinct = int(distinct.sum())
        pruned = float((distinct & ~keep).sum()) / n_distinct if n_distinct else float("nan")
        return loss, wins, pruned

    @staticmethod
    def composition(nodes: _Nodes) -> torch.Tensor:
        """Mean over wholes of ``1 - cos(whole, token-weighted mean of its children)`` (0 without children)."""
        terms = []
        for parent, kids in nodes.children.items():
            agg = nodes.sums[kids].sum(dim=0) / nodes.counts[kids].sum().clamp_min(1.0)
            terms.append(1.0 - (nodes.own[parent] * F.normalize(agg, dim=0)).sum())
        return torch.stack(terms).mean() if terms else nodes.own.sum() * 0.0

    # ------------------------------------------------------------ entry point
    def compute(self, outputs: dict[str, dict[str, torch.Tensor]], batch: dict[str, torch.Tensor]) -> dict:
        """The loss from the embedded views and hierarchy parts (see the module docstring)."""
        cfg = self.config
        zero = 0.0 * sum(t.sum() for group in outputs.values() for t in group.values())
        loc, comp, wins, pruned = [], [], [], []
        for level_map, factor_key in MAPS:
            nodes = self.descriptors(outputs, batch, level_map, int(getattr(cfg, factor_key)))
            l_loss, l_wins, l_pruned = self.locality(nodes)
            loc.append(l_loss)
            comp.append(self.composition(nodes))
            wins.append(l_wins)
            pruned.append(l_pruned)
        self.calls += 1
        locality, composition = torch.stack(loc).mean(), torch.stack(comp).mean()
        loss = cfg.locality_weight * locality + cfg.composition_weight * composition + zero
        return {"loss": loss, "locality": float(locality.detach()), "composition": float(composition.detach()),
                "locality_acc": float(np.nanmean(wins)) if not np.isnan(wins).all() else float("nan"),
                "pruned": float(np.nanmean(pruned)) if not np.isnan(pruned).all() else float("nan")}
