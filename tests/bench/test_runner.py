"""``regsam bench``: real elastix runs on small real-CT cases, resume, failures, reports."""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from regsam.bench.runner import find_case_folders, parse_methods, run_benchmark
from regsam.data.case import write_case
from regsam.io.images import resample_to_spacing


def _translated_case(ct_path: Path, out: Path, shift_mm=(0.0, 4.0, 6.0)) -> Path:
    """A real CT crop at 3 mm and a copy whose content sits ``shift_mm`` away: exact ground truth."""
    fixed = resample_to_spacing(sitk.Cast(sitk.ReadImage(str(ct_path)), sitk.sitkFloat32), 3.0)
    # moving(y) = fixed(y - s): the fixed point x appears in moving at x + s
    moving = sitk.Resample(fixed, fixed, sitk.TranslationTransform(3, [-v for v in shift_mm]), sitk.sitkLinear, -1024.0)
    rng = np.random.default_rng(0)
    size = np.array(fixed.GetSize())
    idx = rng.uniform(0.3, 0.7, size=(40, 3)) * (size - 1)
    fixed_pts = np.array([fixed.TransformContinuousIndexToPhysicalPoint(i.tolist()) for i in idx])
    return write_case(out, fixed, moving, fixed_pts, fixed_pts + np.array(shift_mm), meta={"shift_mm": shift_mm}).path


class _ImageSources(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


@pytest.mark.slow
def test_bench_scores_resumes_and_reports_failures(chest_crop_path, tmp_path):
    cases = tmp_path / "cases"
    _translated_case(chest_crop_path, cases / "good")
    broken = _translated_case(chest_crop_path, cases / "missing_moving")
    (broken / "moving.nii.gz").unlink()
    uneven = _translated_case(chest_crop_path, cases / "uneven_points")
    lines = (uneven / "moving_points.csv").read_text().splitlines()
    (uneven / "moving_points.csv").write_text("\n".join(lines[:-3]) + "\n")

    out = tmp_path / "report"
    messages: list[str] = []
    results = run_benchmark(find_case_folders(cases), parse_methods("elastix:fast"), out, progress=messages.append)

    rows = {row["case"]: row for row in results["rows"]}
    assert rows["good"]["status"] == "ok"
    initial = results["cases"]["good"]["initial"]["points"]["tre"]["mean"]
    final = rows["good"]["point_sets"]["points"]["tre"]["mean"]
    assert initial == pytest.approx(np.linalg.norm([0, 4, 6]), abs=1e-3)
    assert final < 0.25 * initial
    assert rows["good"]["jacobian_body"]["folding_share"] == 0.0
    assert rows["good"]["summary"]["peak_memory_mb"]["max"] > 0
    assert rows["missing_moving"]["status"] == "failed" and "moving.nii.gz" in rows["missing_moving"]["error"]
    assert rows["uneven_points"]["status"] == "failed" and "points" in rows["uneven_points"]["error"]
    assert any("FAILED" in m for m in messages) and any("TRE" in m for m in messages)

    # The reports reference only files that exist, including one slice picture per successful run.
    md = (out / "report.md").read_text()
    assert "FAILED" in md and "good" in md
    parser = _ImageSources()
    parser.feed((out / "report.html").read_text())
    assert len(parser.sources) >= 2
    for src in parser.sources:
        assert (out / src).is_file(), src
    for src in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (out / src).is_file(), src

    # A second run resumes: the finished pair is not registered again.
    score_file = out / "runs" / "good" / "elastix_fast" / "score.json"
    stamp = score_file.stat().st_mtime_ns
    messages.clear()
    again = run_benchmark(find_case_folders(cases), parse_methods("elastix:fast"), out, progress=messages.append)
    assert score_file.stat().st_mtime_ns == stamp
    assert any("good elastix:fast: already done" in m for m in messages)
    assert json.loads((out / "results.json").read_text())["summary"] == json.loads(json.dumps(again["summary"]))


def test_method_parsing_and_case_discovery(tmp_path):
    specs = parse_methods("elastix:lung, sam")
    assert [s.label for s in specs] == ["elastix:lung", "sam"]
    assert specs[0].preset == "lung" and specs[1].preset is None
    (tmp_path / "b").mkdir()
    (tmp_path / "a").mkdir()
    assert [p.name for p in find_case_folders(tmp_path)] == ["a", "b"]
