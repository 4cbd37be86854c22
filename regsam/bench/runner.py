"""``regsam bench``: run registration methods on case folders and score them.

Each (case, method) pair runs ``regsam register`` in its own process, so its
wall time and peak memory are its own and a crash cannot stop the others. A
pair whose ``score.json`` exists is not run again: a killed benchmark resumes.

Layout of the output folder::

    runs/<case>/<method>/     disp.nii.gz, warped.nii.gz, summary.json, score.json (or error.json)
    results.json              every row, machine-readable
    report.md, report.html    tables, box plot, slice pictures (figures/)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from regsam.bench.motion import motion_bins
from regsam.bench.report import write_reports
from regsam.bench.rows import summarize_rows
from regsam.bench.tre import summarize_errors, target_registration_error
from regsam.data.case import Case, load_case
from regsam.data.masks import threshold_masks
from regsam.errors import InputError
from regsam.io.atomic import atomic_path
from regsam.io.images import read_image
from regsam.io.transforms import jacobian_summary, map_points, read_displacement_field
from regsam.register.methods import DEFAULT_BENCH_METHODS, METHODS, get_method
from regsam.util import json_default, last_line

DEFAULT_METHODS = DEFAULT_BENCH_METHODS


@dataclass(frozen=True)
class MethodChoice:
    """A method and its preset as written on the command line: ``elastix:fast``, ``sam`` or ``sam+elastix:fast``.

    The method is a key of the registry :data:`regsam.register.methods.METHODS`; the preset is
    checked against it only for ``--task register`` (``--task match`` has its own presets, e.g. ``sam:cycle``).
    """

    method: str
    preset: str | None = None

    @property
    def label(self) -> str:
        return f"{self.method}:{self.preset}" if self.preset else self.method

    @classmethod
    def parse(cls, text: str, task: str | None = None) -> MethodChoice:
        """``METHOD[:PRESET]``; with ``task="register"`` the preset must be one of the method's."""
        method, _, preset = text.strip().partition(":")
        if not method:
            raise InputError(f"empty method name in '{text}'")
        if method not in METHODS:
            raise InputError(f"unknown method '{method}' in '{text.strip()}' (known: {', '.join(METHODS)})")
        if task == "register" and preset:
            METHODS[method].check_call(preset, {}, {})
        return cls(method, preset or None)


def parse_methods(text: str | Sequence[str], task: str | None = None) -> list[MethodChoice]:
    """Comma-separated ``METHOD[:PRESET]`` (see :meth:`MethodChoice.parse`); at least one."""
    items = text.split(",") if isinstance(text, str) else list(text)
    choices = [MethodChoice.parse(item, task) for item in items if item.strip()]
    if not choices:
        raise InputError("no method given")
    return choices


def find_case_folders(root: str | os.PathLike) -> list[Path]:
    """``root`` itself if it is a case folder, else its sub-folders that look like cases (sorted)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"cases folder not found: {root}")
    if (root / "fixed.nii.gz").exists() or (root / "moving.nii.gz").exists():
        return [root]
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise InputError(f"no case folders in {root}")
    return folders


def _write_json(data: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=json_default) + "\n")


def run_registration_process(
    case: Case, spec: MethodChoice, out_dir: Path, extra_args: Sequence[str] = (), timeout_s: float | None = None,
    use_masks: bool = True, weights: str | None = None, net_weights: str | None = None,
) -> tuple[float, str | None]:
    """Run ``regsam register`` for one case in a child process; return (wall seconds, error or None).

    With ``use_masks`` the case's masks go to the methods that use them (a method refuses a mask it does not use);
    without, every method runs as a user without masks would. ``weights`` (embedder weights) and ``net_weights``
    (registration network weights) go to the methods that take them; the others run as they are.
    """
    cmd = [sys.executable, "-m", "regsam.cli", "register", str(case.fixed), str(case.moving), "--out", str(out_dir)]
    cmd += ["--method", spec.method]
    if spec.preset:
        cmd += ["--preset", spec.preset]
    uses = get_method(spec.method).uses_masks if use_masks else frozenset()
    if case.fixed_mask is not None and "fixed" in uses:
        cmd += ["--fixed-mask", str(case.fixed_mask)]
    if case.moving_mask is not None and "moving" in uses:
        cmd += ["--moving-mask", str(case.moving_mask)]
    if weights is not None and "weights" in get_method(spec.method).options:
        cmd += ["--weights", str(weights)]
    if net_weights is not None and "net_weights" in get_method(spec.method).options:
        cmd += ["--net-weights", str(net_weights)]
    cmd += list(extra_args)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - start, f"timed out after {timeout_s:.0f} s"
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        reason = last_line(proc.stderr) or f"exit code {proc.returncode}"
        return wall, reason.removeprefix("regsam: error: ")
    return wall, None


def score_registration(case: Case, run_dir: Path) -> dict:
    """TRE per point set and Jacobian statistics of a finished registration folder."""
    field = read_displacement_field(run_dir / "disp.nii.gz")
    sets = {}
    for name, (fixed_pts, moving_pts) in case.point_sets.items():
        predicted = map_points(field, fixed_pts)
        errors = target_registration_error(predicted, moving_pts)
        sets[name] = {"tre": summarize_errors(errors), "errors": errors.tolist(),
                      "motion_bins": motion_bins(fixed_pts, moving_pts, predicted)}
    try:
        body, _ = threshold_masks(read_image(case.fixed))
    except InputError:
        body = None  # no lungs found by thresholds: count folding over the whole fixed grid
    jac = jacobian_summary(field, mask=body)
    jac["over"] = "body" if body is not None else "grid"
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    return {"point_sets": sets, "jacobian_body": jac, "summary": summary}


def initial_errors(case: Case) -> dict:
    """Identity (no registration) TRE per point set."""
    out = {}
    for name, (fixed_pts, moving_pts) in case.point_sets.items():
        errors = np.linalg.norm(np.asarray(moving_pts) - np.asarray(fixed_pts), axis=1)
        out[name] = {"tre": summarize_errors(errors), "errors": errors.tolist()}
    return out


def _row_done(run_dir: Path) -> dict | None:
    for file_name in ("score.json", "error.json"):
        path = run_dir / file_name
        if path.exists():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError:
                return None
    return None


def run_benchmark(
    case_dirs: Iterable[Path],
    methods: Sequence[MethodChoice],
    out: str | os.PathLike,
    task: str = "register",
    timeout_s: float | None = None,
    progress: Callable[[str], None] | None = None,
    rerun_failed: bool = True,
    use_masks: bool = True,
    weights: str | os.PathLike | None = None,
    net_weights: str | os.PathLike | None = None,
) -> dict:
    """Run every method on every case, score it, and write results.json and the reports.

    ``use_masks=False`` runs every method without the cases' masks (as a user without masks would).
    ``weights``: embedder weights for the methods (and the match task) that take them (default: the shipped ones).
    ``net_weights``: registration network weights for the methods that take them (default: the shipped ones).
    Returns the results dictionary (also in ``out/results.json``).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda text: print(text, file=sys.stderr, flush=True))
    case_dirs = list(case_dirs)
    rows: list[dict] = []
    cases_info: dict[str, dict] = {}
    total = len(case_dirs) * len(methods)
    step = 0
    for case_dir in case_dirs:
        case_name = Path(case_dir).name
        try:
            case = load_case(case_dir)
            if not case.point_sets:
                raise InputError(f"case {case_name}: no point files (fixed_points.csv / moving_points.csv)")
            cases_info[case_name] = {"path": str(case.path), "initial": initial_errors(case), "meta": case.meta}
        except InputError as exc:
            for spec in methods:
                step += 1
                say(f"[{step}/{total}] {case_name} {spec.label}: FAILED ({exc})")
                rows.append({"case": case_name, "method": spec.label, "status": "failed", "error": str(exc)})
            cases_info[case_name] = {"path": str(case_dir), "error": str(exc)}
            continue
        for spec in methods:
            step += 1
            rows.append(_run_one(case, spec, out, task, timeout_s, rerun_failed, say, f"[{step}/{total}]", use_masks,
                                 None if weights is None else str(weights),
                                 None if net_weights is None else str(net_weights)))
    results = {
        "task": task,
        "methods": [spec.label for spec in methods],
        "masks": "case masks given to the methods that use them" if use_masks else "none (every method without masks)",
        "embedder_weights": "shipped" if weights is None else str(weights),
        "network_weights": "shipped" if net_weights is None else str(net_weights),
        "cases": cases_info,
        "rows": rows,
        "summary": summarize_rows(rows),
    }
    _write_json(results, out / "results.json")
    write_reports(results, out)
    return results


def _run_one(
    case: Case, spec: MethodChoice, out: Path, task: str, timeout_s, rerun_failed: bool, say, prefix: str,
    use_masks: bool = True, weights: str | None = None, net_weights: str | None = None,
) -> dict:
    run_dir = out / "runs" / case.name / spec.label.replace(":", "_")
    done = _row_done(run_dir)
    if done is not None and (done.get("status") == "ok" or not rerun_failed):
        say(f"{prefix} {case.name} {spec.label}: already done")
        return done
    say(f"{prefix} {case.name} {spec.label}: running ...")
    if task == "register":
        wall, error = run_registration_process(case, spec, run_dir, timeout_s=timeout_s, use_masks=use_masks,
                                               weights=weights, net_weights=net_weights)
        row: dict = {"case": case.name, "method": spec.label, "wall_s": wall}
        if error is None:
            try:
                row.update(status="ok", **score_registration(case, run_dir))
            except (InputError, RuntimeError, OSError) as exc:
                error = f"scoring failed: {exc}"
    elif task == "match":
        from regsam.bench.match_task import run_match_task

        row = {"case": case.name, "method": spec.label}
        start = time.perf_counter()
        try:
            row.update(status="ok", **run_match_task(case, spec, run_dir, weights=weights))
            error = None
        except InputError as exc:
            error = str(exc)
        row["wall_s"] = time.perf_counter() - start
    else:
        raise InputError(f"unknown task '{task}' (register or match)")
    if error is not None:
        row.update(status="failed", error=error)
        _write_json(row, run_dir / "error.json")
        say(f"{prefix} {case.name} {spec.label}: FAILED ({error})")
        return row
    (run_dir / "error.json").unlink(missing_ok=True)
    _write_json(row, run_dir / "score.json")
    main = row["point_sets"].get("points") or next(iter(row["point_sets"].values()))
    say(f"{prefix} {case.name} {spec.label}: TRE {main['tre']['mean']:.2f} mm, {row['wall_s']:.1f} s")
    return row
