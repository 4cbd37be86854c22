"""SAM correspondences: grid points of the fixed body matched into the moving image, and their RANSAC affine.

Used by ``regsam register --method sam`` / ``sam+elastix`` (:mod:`regsam.register.sam`) and by consensus
matching (:mod:`regsam.embed.consensus`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from regsam.data.masks import body_mask
from regsam.embed.matching import match_points
from regsam.errors import InputError
from regsam.fit.affine import AffineFit, fit_affine_ransac
from regsam.fit.correspondences import Correspondences, grid_points_in_mask


@dataclass(frozen=True)
class MatchSettings:
    """How fixed points are placed, matched and fitted (distances in mm); :class:`regsam.register.sam.SamPreset` extends it."""

    point_spacing_mm: float = 20.0  # grid of fixed points matched into the moving image
    cycle_tolerance_mm: float = 8.0  # backward match must return this close
    match_candidates: int = 2  # coarse maxima searched finely per point (the cycle check catches the rest)
    match_radius_mm: float = 12.0  # half-width of the fine search cube
    min_score: float = 0.3  # (fine + coarse cosine) / 2
    ransac_threshold_mm: float = 8.0


def find_correspondences(fixed_emb, moving_emb, fixed_body: sitk.Image, preset: MatchSettings, device=None) -> Correspondences:
    """Match grid points inside the fixed body into the moving image (cycle-checked)."""
    points = grid_points_in_mask(fixed_body, preset.point_spacing_mm)
    points = points[fixed_emb.contains(points)]
    if len(points) < 8:
        raise InputError(f"only {len(points)} fixed body points to match; the fixed image is too small or empty")
    result = match_points(
        fixed_emb, points, moving_emb, cycle_tolerance_mm=preset.cycle_tolerance_mm,
        fine_radius_mm=preset.match_radius_mm, coarse_candidates=preset.match_candidates, device=device,
    )
    keep = result.valid & (result.score >= preset.min_score)
    return Correspondences(points, result.matched, result.score, keep, np.zeros(len(points), bool))


def match_correspondences(
    fixed: sitk.Image, fixed_emb, moving_emb, preset: MatchSettings, device=None, min_kept: int = 8, body: sitk.Image | None = None
) -> Correspondences:
    """:func:`find_correspondences` from the fixed body (``body``, default :func:`body_mask`); InputError if fewer than ``min_kept`` are kept."""
    corr = find_correspondences(fixed_emb, moving_emb, body if body is not None else body_mask(fixed), preset, device=device)
    if corr.valid.sum() < min_kept:
        raise InputError(
            f"only {int(corr.valid.sum())} reliable SAM correspondences (of {len(corr.fixed)}); "
            "the images may not show the same anatomy"
        )
    return corr


def fit_correspondence_affine(corr: Correspondences, preset: MatchSettings, seed: int = 0) -> AffineFit:
    """RANSAC affine (fixed -> moving) of the kept correspondences; marks ``corr.inlier``, returns the ``AffineFit``."""
    keep = np.flatnonzero(corr.valid)
    try:
        fit = fit_affine_ransac(
            corr.fixed[keep], corr.moving[keep], weights=corr.score[keep], threshold_mm=preset.ransac_threshold_mm, seed=seed
        )
    except InputError as exc:
        raise InputError(f"SAM correspondences: {exc}") from None
    corr.inlier[:] = False
    corr.inlier[keep[fit.inliers]] = True
    return fit
