"""Crash safety with real processes: ``kill -9`` during ``regsam register`` and ``regsam bench``, and determinism.

The pair is a real CT crop at 3 mm and a copy shifted by (0, 4, 6) mm; every run is a real ``regsam`` child process
(SAM method, CPU).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from regsam.data.case import write_case
from regsam.io.atomic import atomic_dir, remove_stale_temporaries
from regsam.io.images import resample_to_spacing

SHIFT_MM = (0.0, 4.0, 6.0)


def _case(ct_path: Path, out: Path) -> Path:
    fixed = resample_to_spacing(sitk.Cast(sitk.ReadImage(str(ct_path)), sitk.sitkFloat32), 3.0)
    # moving(y) = fixed(y - s): the fixed point x appears in moving at x + s
    moving = sitk.Resample(fixed, fixed, sitk.TranslationTransform(3, [-v for v in SHIFT_MM]), sitk.sitkLinear, -1024.0)
    size = np.array(fixed.GetSize())
    idx = np.random.default_rng(0).uniform(0.3, 0.7, size=(30, 3)) * (size - 1)
    fixed_pts = np.array([fixed.TransformContinuousIndexToPhysicalPoint(i.tolist()) for i in idx])
    return write_case(out, fixed, moving, fixed_pts, fixed_pts + np.array(SHIFT_MM)).path


@pytest.fixture(scope="module")
def case_dir(chest_crop_path, tmp_path_factory) -> Path:
    return _case(chest_crop_path, tmp_path_factory.mktemp("crash") / "case")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "ITK_GLOBAL_DEFAULT_THREADER": "Pool"}


def _regsam(*args: str, **kwargs) -> subprocess.Popen:
    # a session of its own, so that kill -9 reaches the whole run (bench's registration children included)
    return subprocess.Popen([sys.executable, "-m", "regsam.cli", *args], env=_env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _kill_when(proc: subprocess.Popen, condition, timeout_s: float = 110.0, poll_s: float = 0.005) -> bool:
    """``kill -9`` the process group of ``proc`` as soon as ``condition()`` holds; False if it exited first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll_s)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    raise AssertionError(f"condition not met within {timeout_s} s")


def _register_args(case: Path, out: Path) -> list[str]:
    return ["register", str(case / "fixed.nii.gz"), str(case / "moving.nii.gz"), "--out", str(out),
            "--method", "sam", "--device", "cpu"]


def test_stale_temporaries_of_a_dead_writer_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    left = tmp_path / f".out.pid{pid}.abc123.tmp"
    (left / "sub").mkdir(parents=True)
    mine = tmp_path / f".out.pid{os.getpid()}.def456.tmp"
    mine.mkdir()
    other = tmp_path / f".out2.pid{pid}.abc123.tmp"
    other.mkdir()
    assert remove_stale_temporaries(tmp_path / "out") == [left]
    assert not left.exists() and mine.exists() and other.exists()
    with atomic_dir(tmp_path / "out2") as tmp:
        (tmp / "a.txt").write_text("a")
    assert not other.exists() and (tmp_path / "out2" / "a.txt").is_file()


@pytest.mark.slow
def test_kill_9_during_register_leaves_no_partial_out(case_dir, tmp_path):
    out = tmp_path / "out"

    def saving() -> bool:  # the result folder is being written next to --out
        return any(p.name.startswith(".out.") for p in tmp_path.iterdir())

    proc = _regsam(*_register_args(case_dir, out))
    assert _kill_when(proc, saving), "regsam register finished before it could be killed while saving"
    assert not out.exists(), "a partial --out folder was left"
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".")]

    # the next run completes, and takes away what the killed one left
    proc = _regsam(*_register_args(case_dir, out))
    _, err = proc.communicate(timeout=110)
    assert proc.returncode == 0, err
    assert {"disp.nii.gz", "warped.nii.gz", "summary.json"} <= {p.name for p in out.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "temporaries left behind"


@pytest.mark.slow
def test_kill_9_during_bench_then_rerun_resumes(case_dir, tmp_path):
    cases = tmp_path / "cases"
    for name in ("a", "b"):
        (cases / name).mkdir(parents=True)
        for f in case_dir.iterdir():
            (cases / name / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "bench"
    args = ["bench", "--cases", str(cases), "--methods", "sam", "--out", str(out)]
    score_a = out / "runs" / "a" / "sam" / "score.json"
    score_b = out / "runs" / "b" / "sam" / "score.json"

    proc = _regsam(*args)
    assert _kill_when(proc, score_a.is_file), "regsam bench finished before it could be killed"
    assert not score_b.exists() and not (out / "results.json").exists()
    first = score_a.read_text()
    done_at = score_a.stat().st_mtime_ns

    proc = _regsam(*args)
    _, err = proc.communicate(timeout=110)
    assert proc.returncode == 0, err
    assert "a sam: already done" in err, err
    assert score_a.read_text() == first and score_a.stat().st_mtime_ns == done_at  # not re-run
    results = json.loads((out / "results.json").read_text())
    rows = {row["case"]: row for row in results["rows"]}
    assert set(rows) == {"a", "b"} and all(row["status"] == "ok" for row in rows.values())
    for row in rows.values():
        assert row["point_sets"]["points"]["tre"]["mean"] < 0.25 * float(np.linalg.norm(SHIFT_MM))
    assert (out / "report.html").is_file() and (out / "report.md").is_file()


@pytest.mark.slow
def test_same_inputs_and_seed_give_bit_identical_fields_on_cpu(case_dir, tmp_path):
    fields = []
    for name in ("one", "two"):  # two processes, the default seed (0)
        proc = _regsam(*_register_args(case_dir, tmp_path / name))
        _, err = proc.communicate(timeout=110)
        assert proc.returncode == 0, err
        fields.append(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name / "disp.nii.gz"))))
    assert fields[0].shape == fields[1].shape and np.abs(fields[0]).max() > 1.0
    assert np.array_equal(fields[0], fields[1]), f"max difference {np.abs(fields[0] - fields[1]).max()} mm"
