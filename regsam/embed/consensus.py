"""Consensus matching: read template points off a smooth map fitted to dense embedding matches.

Per-point nearest-neighbour search (:func:`regsam.embed.matching.match_points`) answers each point
from its own embedding alone; in homogeneous tissue (lung parenchyma, liver) that embedding is
ambiguous, and a few percent of points land tens of mm away. Their neighbours, however, are
mostly matched right. Consensus matching uses that:

1. grid points inside the template's body (every ``anchor_spacing_mm``, at most ``max_anchors``) are
   matched into the target by nearest-neighbour search; matches whose backward match does not return
   within ``anchor_cycle_mm`` are dropped;
2. a robust affine map (RANSAC, :mod:`regsam.fit.affine`) and a smooth B-spline residual
   (penalised, iteratively reweighted, :mod:`regsam.fit.smooth`) are fitted to the kept matches;
3. each query point is mapped through affine + residual. Its ``score`` is the embedding similarity of
   the point and its match; with a cycle tolerance, the same map is fitted from the target back to the
   template and a point is ``valid`` when its round trip returns within the tolerance.

These are the affine and coarse stages of ``regsam register --method sam``, used as a point matcher.
It assumes the anatomy moves smoothly between the two scans (breathing, positioning, follow-up of the
same patient); for a few isolated structures that move on their own, per-point search is the better tool.
Measured on held-out breathing pairs in ``benchmarks/embedder.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from regsam.data.masks import body_mask
from regsam.embed.correspondences import MatchSettings, fit_correspondence_affine, match_correspondences
from regsam.embed.inference import Embedding
from regsam.embed.matching import MatchResult, similarity_at
from regsam.errors import InputError
from regsam.fit.smooth import SmoothFit, fit_smooth_residual
from regsam.io.landmarks import as_points

#: grid spacing (mm) of the template points whose matches build the consensus map
DEFAULT_ANCHOR_SPACING_MM = 16.0
#: cap on the number of anchor points (the spacing grows on large bodies)
DEFAULT_MAX_ANCHORS = 4000
#: backward-match tolerance (mm) for an anchor match to be used
DEFAULT_ANCHOR_CYCLE_MM = 6.0


@dataclass
class ConsensusMap:
    """A smooth template -> target map fitted to embedding matches of anchor points.

    Attributes:
        affine: ``sitk.AffineTransform`` template mm -> target mm (RANSAC on the kept anchor matches).
        residual: :class:`regsam.fit.smooth.SmoothFit`, the smooth correction after the affine (mm).
        anchors: (M, 3) template anchor points (mm); ``anchor_matches`` (M, 3) their matches in the target;
            ``anchor_kept`` (M,) bool, passed the cycle check (and took part in the fits).
    """

    affine: sitk.Transform
    residual: SmoothFit
    anchors: np.ndarray
    anchor_matches: np.ndarray
    anchor_kept: np.ndarray

    def map_points(self, points_mm: np.ndarray) -> np.ndarray:
        """Template world points (N, 3) mm -> their positions in the target (N, 3) mm."""
        points = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
        moved = np.array([self.affine.TransformPoint(p) for p in points.tolist()]).reshape(-1, 3)
        return moved + self.residual.evaluate(points)


#: smoothing and control spacing (mm) of the residual B-spline after the affine
_RESIDUAL_SMOOTHING_MM = 12.0
_RESIDUAL_GRID_MM = 20.0


def _anchor_preset(body: sitk.Image, spacing_mm: float, max_anchors: int, cycle_mm: float) -> MatchSettings:
    voxel_mm3 = float(np.prod(body.GetSpacing()))
    body_mm3 = float(np.count_nonzero(sitk.GetArrayViewFromImage(body))) * voxel_mm3
    spacing = max(float(spacing_mm), (body_mm3 / max(int(max_anchors), 1)) ** (1.0 / 3.0))
    return dataclasses.replace(
        MatchSettings(), point_spacing_mm=spacing, cycle_tolerance_mm=float(cycle_mm), min_score=-1.0,
    )


def fit_consensus_map(
    template: sitk.Image,
    template_emb: Embedding,
    target_emb: Embedding,
    anchor_spacing_mm: float = DEFAULT_ANCHOR_SPACING_MM,
    max_anchors: int = DEFAULT_MAX_ANCHORS,
    anchor_cycle_mm: float = DEFAULT_ANCHOR_CYCLE_MM,
    device=None,
    seed: int = 0,
) -> ConsensusMap:
    """Fit the template -> target :class:`ConsensusMap` (steps 1-2 of the module docstring).

    Args:
        template: the template CT (HU); its automatic body mask says where anchors are placed.
        template_emb, target_emb: embeddings of the template and the target.

    Raises:
        InputError: no body in the template, or too few anchor matches survive the cycle check for a fit.
    """
    if anchor_spacing_mm <= 0 or max_anchors < 8 or anchor_cycle_mm <= 0:
        raise InputError("anchor spacing and cycle tolerance must be positive and max_anchors at least 8")
    body = body_mask(template)
    preset = _anchor_preset(body, anchor_spacing_mm, max_anchors, anchor_cycle_mm)
    try:
        corr = match_correspondences(template, template_emb, target_emb, preset, device=device, body=body)
        affine = fit_correspondence_affine(corr, preset, seed).transform
        kept = corr.valid
        residual = fit_smooth_residual(
            corr.fixed[kept], corr.moving[kept], template, affine, weights=np.clip(corr.score[kept], 0.01, None),
            smoothing_mm=_RESIDUAL_SMOOTHING_MM, grid_spacing_mm=_RESIDUAL_GRID_MM,
        )
    except InputError as exc:
        raise InputError(f"consensus matching found no consistent map ({exc}); try --mode nearest") from None
    return ConsensusMap(affine, residual, corr.fixed, corr.moving, kept)


class ConsensusMatcher:
    """Match template points into the target through consensus maps (see the module docstring).

    The forward map (and, with ``cycle_tolerance_mm``, the backward map target -> template) is fitted on the
    first call and reused for further point sets. ``options`` go to :func:`fit_consensus_map`
    (``anchor_spacing_mm``, ``max_anchors``, ``anchor_cycle_mm``).
    """

    def __init__(
        self,
        template: sitk.Image,
        template_emb: Embedding,
        target: sitk.Image,
        target_emb: Embedding,
        cycle_tolerance_mm: float | None = None,
        device=None,
        **options,
    ) -> None:
        self.template, self.template_emb, self.target, self.target_emb = template, template_emb, target, target_emb
        self.cycle_tolerance_mm, self.device, self.options = cycle_tolerance_mm, device, options
        self.forward: ConsensusMap | None = None
        self.backward: ConsensusMap | None = None

    def __call__(self, points_mm: np.ndarray) -> MatchResult:
        """(N, 3) template points (mm) -> :class:`MatchResult`; ``valid`` is False for matches outside the target
        and, with a cycle tolerance, for round trips that do not return within it."""
        points = as_points(points_mm, "points_mm")
        if self.forward is None:
            self.forward = fit_consensus_map(self.template, self.template_emb, self.target_emb, device=self.device, **self.options)
        matched = self.forward.map_points(points)
        inside = self.target_emb.contains(matched)
        score = np.full(len(points), -1.0, dtype=np.float32)
        if inside.any():
            score[inside] = similarity_at(self.template_emb, points[inside], self.target_emb, matched[inside], device=self.device)
        valid, cycle = inside.copy(), None
        if self.cycle_tolerance_mm is not None:
            if self.backward is None:
                self.backward = fit_consensus_map(self.target, self.target_emb, self.template_emb, device=self.device, **self.options)
            cycle = np.linalg.norm(self.backward.map_points(matched) - points, axis=1)
            valid &= cycle <= float(self.cycle_tolerance_mm)
        return MatchResult(matched=matched, score=score, valid=valid, cycle_error_mm=cycle)
