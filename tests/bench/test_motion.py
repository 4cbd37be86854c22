"""TRE by true motion magnitude: bins, the along-motion residual (undershoot < 0) and pooling over cases."""

from __future__ import annotations

import numpy as np
import pytest

from regsam.bench.motion import motion_bins, motion_table_markdown, pooled_bins


def test_bins_and_undershoot_along_the_motion():
    fixed = np.zeros((4, 3))
    moving = np.array([[0.0, 0, 5], [0, 0, 15], [0, 0, -25], [30, 0, 0]])
    predicted = moving * 0.5  # every method that recovers half of the motion
    bins = motion_bins(fixed, moving, predicted)
    assert [b["n"] for b in bins.values()] == [1, 1, 2]
    assert bins["0-10 mm"]["tre_mean"] == pytest.approx(2.5)
    assert bins["10-20 mm"]["along_mean"] == pytest.approx(-7.5)  # stops 7.5 mm short
    assert bins["> 20 mm"]["along_mean"] == pytest.approx(-13.75)
    over = motion_bins(fixed, moving, moving * 1.2)
    assert over["> 20 mm"]["along_mean"] > 0


def test_pooling_weights_by_points_and_the_table():
    a = motion_bins(np.zeros((2, 3)), [[0, 0, 12], [0, 0, 14]], [[0, 0, 10], [0, 0, 14]])
    b = motion_bins(np.zeros((1, 3)), [[0, 0, 16]], [[0, 0, 12]])
    pooled = pooled_bins([a, b])
    assert pooled["10-20 mm"]["n"] == 3
    assert pooled["10-20 mm"]["tre_mean"] == pytest.approx((2 + 0 + 4) / 3)
    assert pooled["0-10 mm"]["n"] == 0 and pooled["0-10 mm"]["tre_mean"] is None
    rows = [{"method": "m", "status": "ok", "point_sets": {"points": {"motion_bins": a}}},
            {"method": "m", "status": "ok", "point_sets": {"points": {"motion_bins": b}}}]
    table = motion_table_markdown({"rows": rows, "summary": {"m": {"tre_mean_of_cases": 1.5}}})
    assert "| m | 1.50 | - | - | 2.00 (3) | - |" in table
