"""Benchmark reports: ``report.md`` and ``report.html`` with a TRE box plot and slice pictures.

Pictures are PNGs under ``figures/``; both reports reference them by relative
path, so the report folder can be moved or published as a whole.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import numpy as np

from regsam.bench.motion import motion_summary, motion_table_markdown
from regsam.bench.rows import peak_memory_mb
from regsam.io.atomic import atomic_path
from regsam.io.images import to_lps

POINT_SET = "points"

_COLUMNS = (
    ("case", "case"),
    ("method", "method"),
    ("initial TRE", "initial"),
    ("TRE mean", "mean"),
    ("median", "median"),
    ("p95", "p95"),
    ("max", "max"),
    ("% < 2 mm", "pct_under_2mm"),
    ("folding %", "folding"),
    ("wall s", "wall_s"),
    ("peak MB", "peak_mb"),
)


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}f}"


def table_rows(results: dict, point_set: str = POINT_SET) -> list[dict[str, str]]:
    """One display row per (case, method): strings ready for Markdown or HTML."""
    rows = []
    for row in results["rows"]:
        case_info = results["cases"].get(row["case"], {})
        initial = case_info.get("initial", {}).get(point_set, {}).get("tre", {}).get("mean")
        cells = {"case": row["case"], "method": row["method"], "initial": _fmt(initial)}
        if row.get("status") != "ok":
            cells.update({key: "-" for _, key in _COLUMNS[3:]})
            cells["mean"] = f"FAILED: {row.get('error', 'unknown error')}"
            rows.append(cells)
            continue
        tre = row["point_sets"].get(point_set, {}).get("tre", {})
        fold = row.get("jacobian_body", {}).get("folding_share")
        cells.update(
            mean=_fmt(tre.get("mean")),
            median=_fmt(tre.get("median")),
            p95=_fmt(tre.get("p95")),
            max=_fmt(tre.get("max")),
            pct_under_2mm=_fmt(tre.get("pct_under_2mm"), 1),
            folding=_fmt(None if fold is None else 100.0 * fold, 3),
            wall_s=_fmt(row.get("wall_s"), 1),
            peak_mb=_fmt(peak_memory_mb(row), 0),
        )
        rows.append(cells)
    return rows


def summary_rows(results: dict) -> list[dict[str, str]]:
    """One display row per method, over all cases (mean of case means; p95/max over all points)."""
    rows = []
    initial = [
        info["initial"][POINT_SET]["tre"]["mean"]
        for info in results["cases"].values()
        if POINT_SET in info.get("initial", {})
    ]
    for method, entry in results["summary"].items():
        tre = entry.get("tre_all_points", {})
        fold = entry.get("folding_share_max")
        rows.append(
            {
                "case": f"ALL ({entry['cases_ok']} ok, {entry['cases_failed']} failed)",
                "method": method,
                "initial": _fmt(float(np.mean(initial)) if initial else None),
                "mean": _fmt(entry.get("tre_mean_of_cases")),
                "median": _fmt(tre.get("median")),
                "p95": _fmt(tre.get("p95")),
                "max": _fmt(tre.get("max")),
                "pct_under_2mm": _fmt(tre.get("pct_under_2mm"), 1),
                "folding": _fmt(None if fold is None else 100.0 * fold, 3),
                "wall_s": _fmt(entry.get("wall_s_mean"), 1),
                "peak_mb": _fmt(entry.get("peak_memory_mb_max"), 0),
            }
        )
    return rows


def markdown_table(rows: list[dict[str, str]]) -> str:
    header = "| " + " | ".join(title for title, _ in _COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in _COLUMNS) + "|"
    body = ["| " + " | ".join(row[key].replace("|", "/") for _, key in _COLUMNS) + " |" for row in rows]
    return "\n".join([header, rule, *body])


def _html_table(rows: list[dict[str, str]]) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for title, _ in _COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(row[key])}</td>" for _, key in _COLUMNS) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


MOTION_NOTE = ("Landmarks binned by their true motion |moving - fixed|; 'along' is the mean residual along the true "
               "motion direction (mm): negative = the method stops short of the motion (undershoot).")


def _markdown_to_html_table(table: str) -> str:
    lines = [line.strip().strip("|").split("|") for line in table.splitlines() if line.strip()]
    head = "".join(f"<th>{html.escape(c.strip())}</th>" for c in lines[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in row) + "</tr>" for row in lines[2:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _save_figure(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, bbox_inches="tight", format="png")


def tre_boxplot(results: dict, path: Path, point_set: str = POINT_SET) -> Path | None:
    """Box plot of per-point TRE, grouped by case, one box per method (identity first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [name for name, info in results["cases"].items() if "initial" in info and point_set in info["initial"]]
    if not cases:
        return None
    methods = ["identity", *results["methods"]]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cases) * len(methods) * 0.5 + 2), 4))
    width = 0.8 / len(methods)
    colors = plt.cm.tab10(np.arange(len(methods)) % 10)
    for m_index, method in enumerate(methods):
        data, positions = [], []
        for c_index, case in enumerate(cases):
            if method == "identity":
                errors = results["cases"][case]["initial"][point_set]["errors"]
            else:
                match = [r for r in results["rows"] if r["case"] == case and r["method"] == method and r.get("status") == "ok"]
                if not match or point_set not in match[0]["point_sets"]:
                    continue
                errors = match[0]["point_sets"][point_set]["errors"]
            data.append(errors)
            positions.append(c_index + (m_index - (len(methods) - 1) / 2) * width)
        if data:
            parts = ax.boxplot(data, positions=positions, widths=width * 0.9, patch_artist=True, showfliers=False)
            for patch in parts["boxes"]:
                patch.set_facecolor(colors[m_index])
            ax.plot([], [], color=colors[m_index], linewidth=6, label=method)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, rotation=30, ha="right")
    ax.set_ylabel("TRE (mm)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _save_figure(fig, path)
    plt.close(fig)
    return path


def _slices(volume: np.ndarray, centre: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Coronal (z, x) and axial (y, x) slices of a (z, y, x) array through ``centre``."""
    z, y, _ = centre
    return volume[:, y, :], volume[z, :, :]


def slice_figure(case_info: dict, row: dict, run_dir: Path, path: Path) -> Path | None:
    """Fixed, moving, warped and warped-minus-fixed on one coronal and one axial slice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import SimpleITK as sitk

    case_path = Path(case_info["path"])
    warped_path = run_dir / "warped.nii.gz"
    if not warped_path.exists():
        return None
    fixed = to_lps(sitk.ReadImage(str(case_path / "fixed.nii.gz"), sitk.sitkFloat32))
    moving = sitk.Resample(to_lps(sitk.ReadImage(str(case_path / "moving.nii.gz"), sitk.sitkFloat32)), fixed, sitk.Transform(), sitk.sitkLinear, -1024.0)
    warped = sitk.Resample(to_lps(sitk.ReadImage(str(warped_path), sitk.sitkFloat32)), fixed, sitk.Transform(), sitk.sitkLinear, -1024.0)
    arrays = [sitk.GetArrayFromImage(im) for im in (fixed, moving, warped)]
    arrays.append(arrays[2] - arrays[0])
    mask_path = case_path / "fixed_mask.nii.gz"
    if mask_path.exists():
        mask = sitk.GetArrayFromImage(sitk.Resample(to_lps(sitk.ReadImage(str(mask_path))), fixed, sitk.Transform(), sitk.sitkNearestNeighbor))
        idx = np.argwhere(mask > 0)
        centre = tuple(int(v) for v in (idx.mean(0) if len(idx) else np.array(mask.shape) // 2))
    else:
        centre = tuple(int(s) // 2 for s in arrays[0].shape)
    sx, sy, sz = fixed.GetSpacing()
    titles = ("fixed", "moving", f"warped ({row['method']})", "warped - fixed")
    fig, axes = plt.subplots(2, 4, figsize=(13, 6.5))
    for col, (title, volume) in enumerate(zip(titles, arrays)):
        coronal, axial = _slices(volume, centre)
        is_diff = col == 3
        kwargs = dict(cmap="RdBu_r", vmin=-500, vmax=500) if is_diff else dict(cmap="gray", vmin=-1000, vmax=400)
        axes[0, col].imshow(coronal, origin="lower", aspect=sz / sx, **kwargs)
        axes[1, col].imshow(axial, origin="upper", aspect=sy / sx, **kwargs)
        axes[0, col].set_title(title, fontsize=9)
        for ax in axes[:, col]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("coronal")
    axes[1, 0].set_ylabel("axial")
    _save_figure(fig, path)
    plt.close(fig)
    return path


def write_reports(results: dict, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` (and their figures) into ``out``."""
    out = Path(out)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    boxplot = tre_boxplot(results, figures / "tre_boxplot.png")
    pictures: list[tuple[str, str, Path]] = []
    for row in results["rows"]:
        if row.get("status") != "ok" or results.get("task", "register") != "register":
            continue
        run_dir = out / "runs" / row["case"] / row["method"].replace(":", "_")
        name = f"{row['case']}_{row['method'].replace(':', '_')}.png"
        picture = slice_figure(results["cases"][row["case"]], row, run_dir, figures / name)
        if picture is not None:
            pictures.append((row["case"], row["method"], picture))
    per_case, summary = table_rows(results), summary_rows(results)
    title = f"regsam benchmark ({results.get('task', 'register')})"
    md = [f"# {title}", "", "TRE in mm on the `points` set; folding = % of body voxels with det J <= 0.", ""]
    md += ["## Summary", "", markdown_table(summary), ""]
    motion_md = motion_table_markdown(results) if motion_summary(results) else ""
    if motion_md:
        md += ["## TRE by true motion", "", MOTION_NOTE, "", motion_md, ""]
    md += ["## Per case", "", markdown_table(per_case), ""]
    if boxplot:
        md += ["## TRE per case", "", f"![TRE box plot]({boxplot.relative_to(out)})", ""]
    for case, method, picture in pictures:
        md += [f"### {case} - {method}", "", f"![{case} {method}]({picture.relative_to(out)})", ""]
    html_parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}img{max-width:100%}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<p>TRE in mm on the <code>points</code> set; folding = % of body voxels with det J &lt;= 0.</p>",
        "<h2>Summary</h2>",
        _html_table(summary),
        *(["<h2>TRE by true motion</h2>", f"<p>{html.escape(MOTION_NOTE)}</p>", _markdown_to_html_table(motion_md)] if motion_md else []),
        "<h2>Per case</h2>",
        _html_table(per_case),
    ]
    if boxplot:
        html_parts += ["<h2>TRE per case</h2>", f"<img src='{boxplot.relative_to(out)}' alt='TRE box plot'>"]
    for case, method, picture in pictures:
        html_parts += [f"<h3>{html.escape(case)} - {html.escape(method)}</h3>", f"<img src='{picture.relative_to(out)}' alt='{html.escape(case)}'>"]
    html_parts.append("</body></html>")
    md_path, html_path = out / "report.md", out / "report.html"
    with atomic_path(md_path) as tmp:
        tmp.write_text("\n".join(md) + "\n")
    with atomic_path(html_path) as tmp:
        tmp.write_text("\n".join(html_parts) + "\n")
    return md_path, html_path
