"""TRE by true motion magnitude, and the undershoot along the motion: is large motion captured?

A mean TRE hides large-motion failures: on breathing pairs most landmarks move little. The
landmarks are binned by their true motion ``|moving - fixed|`` (mm) and, per bin, the report shows
the mean TRE and the mean *signed* residual along the true motion direction::

    along = (predicted - moving) . (moving - fixed) / |moving - fixed|

which is negative when the method stops short of the true motion (undershoot) and positive when it
overshoots. Summaries are plain Python numbers (JSON-ready).
"""

from __future__ import annotations

import numpy as np

#: Motion bins (mm): [low, high).
MOTION_BINS: tuple[tuple[float, float], ...] = ((0.0, 10.0), (10.0, 20.0), (20.0, float("inf")))


def bin_label(low: float, high: float) -> str:
    return f"> {low:g} mm" if not np.isfinite(high) else f"{low:g}-{high:g} mm"


def motion_bins(fixed: np.ndarray, moving: np.ndarray, predicted: np.ndarray) -> dict[str, dict]:
    """Per motion bin: ``n``, ``tre_mean`` (mm) and ``along_mean`` (mm, < 0 = undershoot); points (N, 3) mm."""
    fixed, moving, predicted = (np.asarray(a, dtype=np.float64).reshape(-1, 3) for a in (fixed, moving, predicted))
    motion = moving - fixed
    length = np.linalg.norm(motion, axis=1)
    direction = motion / np.maximum(length, 1e-9)[:, None]
    residual = predicted - moving
    tre = np.linalg.norm(residual, axis=1)
    along = np.sum(residual * direction, axis=1)
    out = {}
    for low, high in MOTION_BINS:
        inside = (length >= low) & (length < high)
        n = int(inside.sum())
        out[bin_label(low, high)] = {
            "n": n,
            "tre_mean": float(tre[inside].mean()) if n else None,
            "along_mean": float(along[inside].mean()) if n else None,
        }
    return out


def pooled_bins(entries: list[dict[str, dict]]) -> dict[str, dict]:
    """Pool per-case :func:`motion_bins` results (point-weighted means)."""
    out = {}
    for low, high in MOTION_BINS:
        label = bin_label(low, high)
        parts = [e[label] for e in entries if label in e and e[label]["n"]]
        n = sum(p["n"] for p in parts)
        out[label] = {
            "n": n,
            "tre_mean": sum(p["n"] * p["tre_mean"] for p in parts) / n if n else None,
            "along_mean": sum(p["n"] * p["along_mean"] for p in parts) / n if n else None,
        }
    return out


def motion_table_markdown(results: dict, point_set: str = "points") -> str:
    """Markdown table: one row per method (all cases pooled), TRE and along-motion residual per motion bin."""
    labels = [bin_label(lo, hi) for lo, hi in MOTION_BINS]
    header = "| method | TRE mean | p95 | " + " | ".join(f"TRE {lab} (n)" for lab in labels) + " | " + " | ".join(
        f"along {lab}" for lab in labels) + " |"
    rule = "|" + "---|" * (3 + 2 * len(labels))
    lines = [header, rule]
    for method, pooled in motion_summary(results, point_set).items():
        entry = results.get("summary", {}).get(method, {})
        mean, p95 = entry.get("tre_mean_of_cases"), entry.get("tre_all_points", {}).get("p95")
        head = [f"{v:.2f}" if v is not None else "-" for v in (mean, p95)]
        tre = [f"{b['tre_mean']:.2f} ({b['n']})" if b["n"] else "-" for b in pooled.values()]
        along = [f"{b['along_mean']:+.2f}" if b["n"] else "-" for b in pooled.values()]
        lines.append(f"| {method} | " + " | ".join(head + tre + along) + " |")
    return "\n".join(lines)


def motion_summary(results: dict, point_set: str = "points") -> dict[str, dict[str, dict]]:
    """Per method: :func:`pooled_bins` over its successful cases that carry motion bins."""
    methods = dict.fromkeys(row["method"] for row in results.get("rows", []))
    out = {}
    for method in methods:
        entries = [row["point_sets"][point_set]["motion_bins"] for row in results["rows"]
                   if row["method"] == method and row.get("status") == "ok"
                   and "motion_bins" in row.get("point_sets", {}).get(point_set, {})]
        if entries:
            out[method] = pooled_bins(entries)
    return out
