"""Benchmark result rows (one per case and method) and their per-method summary.

Shared by :mod:`regsam.bench.runner`, which writes the rows, and :mod:`regsam.bench.report`, which shows them.
"""

from __future__ import annotations

import numpy as np


def peak_memory_mb(row: dict) -> float | None:
    """Peak resident memory (MB) of a run, as recorded in its summary.json."""
    value = row.get("summary", {}).get("peak_memory_mb")
    return value.get("max") if isinstance(value, dict) else value


def summarize_rows(rows: list[dict], point_set: str = "points") -> dict[str, dict]:
    """Per method: mean over cases of each case's TRE statistics, wall time and memory (successful rows only)."""
    summary: dict[str, dict] = {}
    for method in dict.fromkeys(row["method"] for row in rows):
        mine = [r for r in rows if r["method"] == method]
        ok = [r for r in mine if r.get("status") == "ok" and point_set in r.get("point_sets", {})]
        entry: dict = {"cases_ok": len(ok), "cases_failed": sum(1 for r in mine if r.get("status") != "ok")}
        if ok:
            all_errors = np.concatenate([r["point_sets"][point_set]["errors"] for r in ok])
            entry["tre_mean_of_cases"] = float(np.mean([r["point_sets"][point_set]["tre"]["mean"] for r in ok]))
            entry["tre_all_points"] = {
                "mean": float(all_errors.mean()),
                "median": float(np.median(all_errors)),
                "p95": float(np.percentile(all_errors, 95)),
                "max": float(all_errors.max()),
                "pct_under_2mm": float(100.0 * np.mean(all_errors < 2.0)),
            }
            entry["wall_s_mean"] = float(np.mean([r["wall_s"] for r in ok]))
            mems = [m for m in (peak_memory_mb(r) for r in ok) if m is not None]
            entry["peak_memory_mb_max"] = float(max(mems)) if mems else None
            folds = [r.get("jacobian_body", {}).get("folding_share") for r in ok]
            folds = [f for f in folds if f is not None]
            entry["folding_share_max"] = float(max(folds)) if folds else None
        summary[method] = entry
    return summary
