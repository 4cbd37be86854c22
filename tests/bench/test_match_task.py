"""``regsam bench --task match``: SAM matching scored on a tiny real-CT case, rows, files and report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from regsam.bench.match_task import parse_preset
from regsam.bench.runner import parse_methods, run_benchmark
from regsam.data.case import write_case
from regsam.embed.model import DEFAULT_WEIGHTS
from regsam.errors import InputError
from regsam.io.images import read_image

SHIFT_MM = np.array([0.0, 5.0, -7.0])


def _shifted_case(ct_path: Path, out: Path) -> Path:
    """The real CT crop and a copy whose content sits SHIFT_MM away; 16 body points with exact counterparts."""
    fixed = sitk.Cast(read_image(ct_path), sitk.sitkFloat32)
    moving = sitk.Resample(fixed, fixed, sitk.TranslationTransform(3, (-SHIFT_MM).tolist()), sitk.sitkLinear, -1024.0)
    hu = sitk.GetArrayViewFromImage(fixed)
    zyx = np.argwhere(hu[12:-12, 12:-12, 12:-12] > -300) + 12
    pick = zyx[np.random.default_rng(0).choice(len(zyx), 16, replace=False)]
    points = np.array([fixed.TransformIndexToPhysicalPoint([int(i) for i in p[::-1]]) for p in pick])
    return write_case(out, fixed, moving, points, points + SHIFT_MM, extra_point_sets={"few": (points[:4], points[:4] + SHIFT_MM)}).path


def test_presets():
    assert parse_preset(None) == {"mode": "consensus", "cycle_tolerance_mm": None, "adapt_steps": 0}
    assert parse_preset("cycle")["cycle_tolerance_mm"] == 6.0
    assert parse_preset("nearest+cycle+adapt20") == {"mode": "nearest", "cycle_tolerance_mm": 6.0, "adapt_steps": 20}
    with pytest.raises(InputError, match="unknown sam match preset part 'fast'"):
        parse_preset("fast")


@pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="shipped embedder weights absent")
def test_match_bench_scores_and_reports(chest_crop_path, tmp_path):
    if not chest_crop_path.is_file():
        pytest.skip(f"{chest_crop_path} not found")
    case = _shifted_case(chest_crop_path, tmp_path / "cases" / "shifted")
    out = tmp_path / "bench"
    results = run_benchmark([case], parse_methods("sam:cycle,elastix,sam:fast"), out, task="match", progress=lambda _: None)

    rows = {r["method"]: r for r in results["rows"]}
    assert rows["elastix"]["status"] == "failed" and "runs method 'sam' only" in rows["elastix"]["error"]
    assert rows["sam:fast"]["status"] == "failed" and "unknown sam match preset part 'fast'" in rows["sam:fast"]["error"]
    row = rows["sam:cycle"]
    assert row["status"] == "ok", row
    # every fixed point was matched and scored against moving_points; the identity error is |SHIFT_MM| = 8.6 mm
    initial = results["cases"]["shifted"]["initial"]["points"]["tre"]["mean"]
    assert initial == pytest.approx(np.linalg.norm(SHIFT_MM))
    tre = row["point_sets"]["points"]["tre"]
    assert tre["n"] == 16 and tre["median"] < 4.0, tre
    assert row["point_sets"]["few"]["tre"]["n"] == 4
    assert 0.5 <= row["point_sets"]["points"]["kept_share"] <= 1.0
    assert row["point_sets"]["points_kept"]["tre"]["n"] == round(16 * row["point_sets"]["points"]["kept_share"])
    # time per scan and peak memory of the child process
    summary = row["summary"]
    assert summary["embed_s_per_scan"]["fixed"] > 0 and summary["embed_s_per_scan"]["moving"] > 0
    assert 100 < summary["peak_memory_mb"]["max"] < 8000
    assert summary["peak_memory_mb"]["after_embedding"] <= summary["peak_memory_mb"]["max"]
    assert row["wall_s"] > 0 and results["summary"]["sam:cycle"]["peak_memory_mb_max"] == summary["peak_memory_mb"]["max"]
    # matched points are in the run folder
    run_dir = out / "runs" / "shifted" / "sam_cycle"
    lines = (run_dir / "matched_points.csv").read_text().splitlines()
    assert lines[0] == "x,y,z,score,valid" and len(lines) == 17
    assert (run_dir / "matched_few.csv").is_file() and (run_dir / "score.json").is_file()
    assert json.loads((run_dir / "score.json").read_text())["status"] == "ok"

    # the report: tables and the box plot, no slice pictures
    md = (out / "report.md").read_text()
    assert "regsam benchmark (match)" in md
    assert re.search(r"\| shifted \| sam:cycle \| 8\.60 \| \d+\.\d\d \|", md), md
    assert "FAILED: task 'match' runs method 'sam' only" in md
    assert (out / "figures" / "tre_boxplot.png").is_file()
    assert [p.name for p in (out / "figures").iterdir()] == ["tre_boxplot.png"]
    html = (out / "report.html").read_text()
    assert "tre_boxplot.png" in html and "<table>" in html

    # a second run resumes: nothing is recomputed for the finished row
    again = run_benchmark([case], parse_methods("sam:cycle"), out, task="match", progress=lambda _: None)
    assert again["rows"][0]["summary"] == summary


def test_bench_forwards_embedder_weights(chest_crop_path, tmp_path):
    """``--weights`` reaches the match child and the register child of a method that takes weights (a missing file is
    named in the failure)."""
    if not chest_crop_path.is_file():
        pytest.skip(f"{chest_crop_path} not found")
    case = _shifted_case(chest_crop_path, tmp_path / "cases" / "shifted")
    missing = tmp_path / "my_embedder.pt"
    results = run_benchmark([case], parse_methods("sam"), tmp_path / "match", task="match", weights=missing,
                            progress=lambda _: None)
    assert results["embedder_weights"] == str(missing)
    row = results["rows"][0]
    assert row["status"] == "failed" and "embedder weights not found" in row["error"] and "my_embedder.pt" in row["error"]
    results = run_benchmark([case], parse_methods("sam"), tmp_path / "register", weights=missing, progress=lambda _: None)
    row = results["rows"][0]
    assert row["status"] == "failed" and "my_embedder.pt" in row["error"], row


def test_bench_forwards_network_weights(chest_crop_path, tmp_path):
    """``--net-weights`` reaches the register child of sam-net (a missing network file is named in the failure)."""
    if not chest_crop_path.is_file():
        pytest.skip(f"{chest_crop_path} not found")
    case = _shifted_case(chest_crop_path, tmp_path / "cases" / "shifted")
    missing = tmp_path / "my_network.pt"
    results = run_benchmark([case], parse_methods("sam-net"), tmp_path / "register", net_weights=missing,
                            progress=lambda _: None)
    assert results["network_weights"] == str(missing)
    row = results["rows"][0]
    assert row["status"] == "failed" and "network weights not found" in row["error"] and "my_network.pt" in row["error"]
