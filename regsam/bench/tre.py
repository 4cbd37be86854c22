"""Target registration error (TRE); Jacobian statistics are in :func:`regsam.io.transforms.jacobian_summary`.

A registration maps a fixed point ``x`` to ``x + u(x)`` in the moving image; its
TRE at a landmark pair is the distance (mm) between the mapped fixed landmark and
the corresponding moving landmark. Summaries hold plain Python numbers so they go
straight into JSON.
"""

from __future__ import annotations

import numpy as np

from regsam.errors import InputError
from regsam.io.landmarks import as_points
from regsam.io.transforms import TransformLike, map_points

#: The usual "registration succeeded at this landmark" threshold (mm).
SUCCESS_MM = 2.0


def target_registration_error(predicted_moving: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """Euclidean distance (mm) per row between predicted and true moving points, both (N, 3) mm.

    Returns:
        (N,) float64 array.
    """
    predicted = as_points(predicted_moving, "predicted moving points")
    truth = as_points(moving, "moving points")
    if predicted.shape != truth.shape:
        raise InputError(f"{len(predicted)} predicted points but {len(truth)} moving points; rows must correspond")
    return np.linalg.norm(predicted - truth, axis=1)


def map_and_score(transform_or_field: TransformLike, fixed_points: np.ndarray, moving_points: np.ndarray) -> np.ndarray:
    """Map fixed points (N, 3) mm through a fixed -> moving transform or field and return the (N,) TRE in mm."""
    fixed = as_points(fixed_points, "fixed points")
    moving = as_points(moving_points, "moving points")
    if fixed.shape != moving.shape:
        raise InputError(f"{len(fixed)} fixed points but {len(moving)} moving points; rows must correspond")
    return target_registration_error(map_points(transform_or_field, fixed), moving)


def summarize_errors(errors: np.ndarray) -> dict:
    """Statistics of per-landmark errors (mm).

    Returns:
        ``n`` (int) and floats ``mean``, ``median``, ``std`` (sample SD, ddof=1, as DIR-Lab
        reports; 0 for one value), ``p95`` (linear interpolation), ``max`` (all mm) and
        ``pct_under_2mm`` (percent 0-100 of errors strictly below 2 mm).
    """
    e = np.asarray(errors, dtype=np.float64).ravel()
    if e.size == 0:
        raise InputError("no errors to summarise (empty point set)")
    if not np.isfinite(e).all():
        raise InputError("errors contain NaN or infinite values")
    return {
        "n": int(e.size),
        "mean": float(e.mean()),
        "median": float(np.median(e)),
        "std": float(e.std(ddof=1)) if e.size > 1 else 0.0,
        "p95": float(np.percentile(e, 95)),
        "max": float(e.max()),
        "pct_under_2mm": float(100.0 * np.mean(e < SUCCESS_MM)),
    }

