"""Robust affine transform from point correspondences (RANSAC + least squares).

The fitted transform maps FIXED points to MOVING points (mm, world LPS), the ITK/regsam
convention, so ``sitk.Resample(moving, fixed, fit.transform)`` warps the moving image onto the
fixed grid and ``fit.transform.TransformPoint(fixed_point)`` predicts the moving point.

Algorithm:
    1. RANSAC over minimal samples of 4 correspondences (drawn with probability proportional
       to ``weights``). A sample is rejected when its fixed or moving tetrahedron is nearly flat
       (coplanar points determine no affine) or when its affine is a reflection (det <= 0).
       Hypotheses are scored with the MSAC cost ``sum_i w_i * min(r_i^2, t^2)``.
    2. Weighted least squares on the inliers of the best hypothesis, then re-selecting inliers
       and refitting until the inlier set is stable (at most ``refinements`` rounds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from regsam.errors import InputError

#: tetrahedron "flatness" below which a 4-point sample is degenerate: 6 * volume / (longest edge)^3
_MIN_TETRA_SHAPE = 0.02


@dataclass
class AffineFit:
    """Result of :func:`fit_affine_ransac`.

    Attributes:
        transform: ``sitk.AffineTransform`` fixed (mm) -> moving (mm); its centre is the inliers' fixed centroid.
        inliers: (N,) bool, residual <= threshold under the final transform.
        residuals_mm: (N,) float64, ``|transform(fixed_i) - moving_i|`` in mm, for every correspondence.
        n_inliers: number of inliers.
        matrix: (4, 4) homogeneous matrix of ``transform`` (fixed mm -> moving mm).
        rms_inlier_mm: root mean square residual over the inliers (mm).
        hypotheses: number of non-degenerate RANSAC hypotheses scored.
    """

    transform: sitk.AffineTransform
    inliers: np.ndarray
    residuals_mm: np.ndarray
    n_inliers: int
    matrix: np.ndarray
    rms_inlier_mm: float
    hypotheses: int


def check_correspondences(fixed_pts, moving_pts, weights=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate point correspondences: (N, 3) fixed and moving mm arrays, (N,) weights >= 0 (default 1).

    Raises:
        InputError: wrong shapes, unequal lengths, NaNs, or bad weights.
    """
    try:
        f = np.asarray(fixed_pts, dtype=np.float64)
        m = np.asarray(moving_pts, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError("fixed and moving points must be numeric (N, 3) arrays") from None
    if f.ndim != 2 or f.shape[1] != 3 or m.ndim != 2 or m.shape[1] != 3:
        raise InputError(f"points must be (N, 3) arrays, got fixed {f.shape} and moving {m.shape}")
    if len(f) != len(m):
        raise InputError(f"{len(f)} fixed points but {len(m)} moving points; rows must correspond")
    if not (np.isfinite(f).all() and np.isfinite(m).all()):
        raise InputError("points contain NaN or infinite coordinates")
    if weights is None:
        w = np.ones(len(f))
    else:
        w = np.asarray(weights, dtype=np.float64).ravel()
        if w.shape != (len(f),):
            raise InputError(f"weights must have one value per correspondence ({len(f)}), got {w.shape}")
        if not np.isfinite(w).all() or np.any(w < 0):
            raise InputError("weights must be finite and >= 0")
    return f, m, w


def _tetra_shape(p: np.ndarray) -> np.ndarray:
    """(S, 4, 3) point quadruples -> (S,) 6 * |volume| / longest_edge^3 (0 for coplanar, ~0.5-1 for well spread)."""
    e = p[:, 1:] - p[:, :1]
    vol6 = np.abs(np.linalg.det(e))
    edges = [p[:, i] - p[:, j] for i in range(4) for j in range(i + 1, 4)]
    longest = np.max(np.stack([np.linalg.norm(x, axis=1) for x in edges], axis=1), axis=1)
    return vol6 / np.maximum(longest, 1e-12) ** 3


def _solve_minimal(f4: np.ndarray, m4: np.ndarray) -> np.ndarray:
    """(S, 4, 3) fixed and moving quadruples -> (S, 4, 3) parameters P with [x, 1] @ P = y."""
    xh = np.concatenate([f4, np.ones(f4.shape[:2] + (1,))], axis=2)
    return np.linalg.solve(xh, m4)


def _weighted_lstsq(f: np.ndarray, m: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least-squares affine, returns P (4, 3) with [x, 1] @ P = y; InputError when degenerate."""
    centre = np.average(f, axis=0, weights=w)
    xh = np.concatenate([f - centre, np.ones((len(f), 1))], axis=1)
    sw = np.sqrt(w)[:, None]
    a = xh * sw
    if np.linalg.matrix_rank(a, tol=1e-6 * max(1.0, np.abs(a).max())) < 4:
        raise InputError("the inlier fixed points are coplanar or collinear; they determine no 3D affine transform")
    p, *_ = np.linalg.lstsq(a, m * sw, rcond=None)
    # undo the centring: [x - c, 1] @ p = [x, 1] @ P with P[:3] = p[:3], P[3] = p[3] - c @ p[:3]
    out = p.copy()
    out[3] = p[3] - centre @ p[:3]
    return out


def _apply(p: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ p[:3] + p[3]


def _to_sitk(p: np.ndarray, centre: np.ndarray) -> sitk.AffineTransform:
    """P (4, 3) ([x, 1] @ P = y) -> sitk.AffineTransform with the given centre (same mapping)."""
    matrix = p[:3].T  # y = M x + t
    t = p[3]
    out = sitk.AffineTransform(3)
    out.SetMatrix(matrix.ravel().tolist())
    out.SetCenter(centre.tolist())
    # sitk: y = M (x - c) + t' + c  ==  M x + t   ->   t' = t + M c - c
    out.SetTranslation((t + matrix @ centre - centre).tolist())
    return out


def fit_affine_ransac(
    fixed_pts: np.ndarray,
    moving_pts: np.ndarray,
    weights: np.ndarray | None = None,
    threshold_mm: float = 5.0,
    iterations: int = 2000,
    seed: int = 0,
    min_inliers: int = 8,
    refinements: int = 3,
    confidence: float = 0.9999,
) -> AffineFit:
    """Fit an affine transform fixed -> moving to correspondences with outliers.

    Args:
        fixed_pts, moving_pts: (N, 3) corresponding points, mm, world LPS (row i matches row i).
        weights: (N,) non-negative confidences (e.g. match scores); they set the sampling
            probability, the MSAC score and the least-squares weights. ``None`` = all 1.
        threshold_mm: a correspondence is an inlier when its residual is at most this (mm).
        iterations: maximum number of RANSAC samples (fewer when ``confidence`` is reached earlier).
        seed: random seed (the result is deterministic for a given seed).
        min_inliers: fewest inliers accepted as a consensus (at least 4).
        refinements: rounds of (least squares on inliers -> re-select inliers).
        confidence: stop sampling once an all-inlier sample has been drawn with this probability.

    Returns:
        :class:`AffineFit`.

    Raises:
        InputError: malformed points or weights, fewer than ``min_inliers`` correspondences with
            positive weight, every sample degenerate (coplanar points), or no consensus of at least
            ``min_inliers`` inliers.
    """
    f, m, w = check_correspondences(fixed_pts, moving_pts, weights)
    min_inliers = max(4, int(min_inliers))
    if threshold_mm <= 0:
        raise InputError(f"threshold_mm must be positive, got {threshold_mm}")
    usable = np.flatnonzero(w > 0)
    if len(usable) < min_inliers:
        raise InputError(
            f"{len(usable)} correspondences with positive weight; an affine fit needs at least {min_inliers}"
        )
    rng = np.random.default_rng(seed)
    prob = w[usable] / w[usable].sum()
    t2 = float(threshold_mm) ** 2
    best_cost, best_p, hypotheses = np.inf, None, 0
    needed = int(iterations)
    drawn, batch = 0, 256
    while drawn < min(needed, int(iterations)):
        s = min(batch, int(iterations) - drawn)
        drawn += s
        # 4 distinct indices per sample (weighted, without replacement via Gumbel top-k)
        keys = np.log(prob)[None, :] - np.log(-np.log(rng.random((s, len(usable)))))
        if len(usable) > 4:
            pick = np.argpartition(-keys, 4, axis=1)[:, :4]
        else:
            pick = np.tile(np.arange(4), (s, 1))
        idx = usable[pick]
        f4, m4 = f[idx], m[idx]
        ok = (_tetra_shape(f4) > _MIN_TETRA_SHAPE) & (_tetra_shape(m4) > _MIN_TETRA_SHAPE)
        if not ok.any():
            continue
        p = _solve_minimal(f4[ok], m4[ok])  # (S', 4, 3)
        ok2 = np.linalg.det(p[:, :3, :]) > 0  # orientation preserving
        p = p[ok2]
        if len(p) == 0:
            continue
        hypotheses += len(p)
        pred = np.einsum("nj,sjk->snk", f, p[:, :3, :]) + p[:, None, 3, :]
        r2 = np.sum((pred - m[None]) ** 2, axis=2)
        cost = np.sum(w[None, :] * np.minimum(r2, t2), axis=1)
        k = int(np.argmin(cost))
        if cost[k] < best_cost:
            best_cost, best_p = float(cost[k]), p[k]
            inlier_share = float(np.sum(w[r2[k] <= t2]) / w.sum())
            if 0.0 < inlier_share < 1.0:
                needed = math.ceil(math.log(1.0 - confidence) / math.log(1.0 - inlier_share**4))
            elif inlier_share >= 1.0:
                needed = 0
    if best_p is None:
        raise InputError("all RANSAC samples were degenerate (the points are coplanar or collinear)")

    p = best_p
    inliers = (np.sum((_apply(p, f) - m) ** 2, axis=1) <= t2) & (w > 0)
    for _ in range(max(1, int(refinements))):
        if inliers.sum() < min_inliers:
            break
        p = _weighted_lstsq(f[inliers], m[inliers], w[inliers])
        new = (np.sum((_apply(p, f) - m) ** 2, axis=1) <= t2) & (w > 0)
        if np.array_equal(new, inliers):
            break
        inliers = new
    n_in = int(inliers.sum())
    if n_in < min_inliers:
        raise InputError(
            f"no affine consensus: best hypothesis has {n_in} inliers within {threshold_mm} mm, "
            f"fewer than min_inliers={min_inliers} (of {len(f)} correspondences)"
        )
    residuals = np.linalg.norm(_apply(p, f) - m, axis=1)
    centre = np.average(f[inliers], axis=0, weights=w[inliers])
    transform = _to_sitk(p, centre)
    matrix = np.eye(4)
    matrix[:3, :3] = p[:3].T
    matrix[:3, 3] = p[3]
    return AffineFit(
        transform=transform,
        inliers=inliers,
        residuals_mm=residuals,
        n_inliers=n_in,
        matrix=matrix,
        rms_inlier_mm=float(np.sqrt(np.mean(residuals[inliers] ** 2))),
        hypotheses=hypotheses,
    )
