"""``regsam bench --task match``: score SAM point matching on case folders.

Methods: ``sam`` (the default matcher, consensus matching, :mod:`regsam.embed.consensus`), with an optional
preset of ``+``-joined parts:

* ``nearest``: per-point coarse-to-fine nearest-neighbour search instead (SAM's own inference);
* ``cycle``: cycle check (match back into the fixed image, keep if within :data:`CYCLE_TOLERANCE_MM`); the TRE
  stays over *all* points (comparable with ``sam``), and the kept share and the TRE of the kept points are added
  (point set ``<name>_kept`` in ``results.json``);
* ``adaptN``: N test-time adaptation steps on the pair before embedding (:mod:`regsam.embed.adapt`).

e.g. ``--methods sam,sam:nearest,sam:nearest+cycle,sam:nearest+cycle+adapt20``.

Each (case, method) runs in its own process (``python -m regsam.bench.match_task CASE RUN_DIR``) so its peak
memory (``ru_maxrss``) is its own, as for the register task. For every point set of the case, each fixed point is
matched into the moving image and compared with ``moving_points``; the run folder gets ``matched_<set>.csv``
(``x,y,z,score,valid``) and ``match.json``. Timings: model load, adaptation, embedding of each scan, matching;
memory: peak RSS after embedding both scans and at the end of the run (MB).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from regsam.bench.tre import summarize_errors
from regsam.data.case import load_case
from regsam.embed.commands import check_embeddable, make_matcher, write_matches_csv
from regsam.errors import InputError
from regsam.io.atomic import atomic_path
from regsam.io.images import read_image
from regsam.util import last_line

#: tolerance (mm) of the ``cycle`` preset
CYCLE_TOLERANCE_MM = 6.0
#: environment variable naming the torch device of the child (default: CUDA if available)
DEVICE_ENV = "REGSAM_MATCH_DEVICE"


def parse_preset(preset: str | None) -> dict:
    """``None`` / ``nearest`` / ``cycle`` / ``adapt20`` / ``nearest+cycle+adapt20`` ->
    ``{"mode": "consensus" | "nearest", "cycle_tolerance_mm": float | None, "adapt_steps": int}``."""
    options = {"mode": "consensus", "cycle_tolerance_mm": None, "adapt_steps": 0}
    for part in (preset or "").split("+"):
        part = part.strip()
        if not part:
            continue
        if part == "cycle":
            options["cycle_tolerance_mm"] = CYCLE_TOLERANCE_MM
        elif part == "nearest":
            options["mode"] = "nearest"
        elif re.fullmatch(r"adapt\d+", part):
            options["adapt_steps"] = int(part[5:])
        else:
            raise InputError(f"unknown sam match preset part '{part}' (use nearest, cycle, adaptN, joined by '+')")
    return options


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def match_case(
    case, preset: str | None, run_dir: str | os.PathLike, device: str | None = None, weights: str | None = None
) -> dict:
    """Do the work of one (case, ``sam[:preset]``) in this process; return the row fields and write ``run_dir``.

    ``weights``: embedder weights file (default: the shipped ones).

    Peak memory is this process's ``ru_maxrss`` (a max over its whole life): use :func:`run_match_task`,
    which runs this in a fresh process, to get a per-case figure.
    """
    # torch and MONAI (~5 s) load here, in the child process, not in the runner that imports run_match_task
    import torch

    from regsam.devices import resolve_device
    from regsam.embed.inference import embed_image
    from regsam.embed.model import load_embedder

    options = parse_preset(preset)
    if not case.point_sets:
        raise InputError(f"case {case.name}: no point sets to match")
    run_dir = Path(run_dir)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    dev = resolve_device(device)
    model = load_embedder(weights, device=dev)
    fixed, moving = read_image(case.fixed, "fixed"), read_image(case.moving, "moving")
    check_embeddable(fixed, model, name=f"case {case.name} fixed")
    check_embeddable(moving, model, name=f"case {case.name} moving")
    timings["load_s"] = time.perf_counter() - t
    if options["adapt_steps"]:
        from regsam.embed.adapt import adapt_embedder

        t = time.perf_counter()
        model = adapt_embedder(model, [fixed, moving], options["adapt_steps"], device=dev)
        timings["adapt_s"] = time.perf_counter() - t
    t = time.perf_counter()
    fixed_emb = embed_image(model, fixed, device=dev)
    timings["embed_fixed_s"] = time.perf_counter() - t
    t = time.perf_counter()
    moving_emb = embed_image(model, moving, device=dev)
    timings["embed_moving_s"] = time.perf_counter() - t
    peak_after_embed = _peak_mb()
    t = time.perf_counter()
    point_sets: dict[str, dict] = {}
    kept_share: dict[str, float] = {}
    matcher = make_matcher(options["mode"], fixed, fixed_emb, moving, moving_emb, options["cycle_tolerance_mm"], dev)
    for name, (fixed_pts, moving_pts) in case.point_sets.items():
        result = matcher(fixed_pts)
        errors = np.linalg.norm(result.matched - np.asarray(moving_pts), axis=1)
        point_sets[name] = {"tre": summarize_errors(errors), "errors": errors.tolist()}
        if options["cycle_tolerance_mm"] is not None:
            kept_share[name] = float(result.valid.mean())
            point_sets[name]["kept_share"] = kept_share[name]
            if result.valid.any():
                kept = errors[result.valid]
                point_sets[f"{name}_kept"] = {"tre": summarize_errors(kept), "errors": kept.tolist()}
        write_matches_csv(result, run_dir / f"matched_{name}.csv")
    timings["match_s"] = time.perf_counter() - t
    voxels = {k: int(np.prod(e.image_geometry.GetSize())) for k, e in (("fixed", fixed_emb), ("moving", moving_emb))}
    summary = {
        "peak_memory_mb": {"max": _peak_mb(), "after_embedding": peak_after_embed},
        "memory_note": "ru_maxrss of the process that ran this (case, method)",
        "embed_s_per_scan": {"fixed": timings["embed_fixed_s"], "moving": timings["embed_moving_s"]},
        "voxels_at_network_spacing": voxels,
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
        "options": options,
        "embedder_weights": "shipped" if weights is None else str(weights),
    }
    if kept_share:
        summary["cycle_kept_share"] = kept_share
    return {"point_sets": point_sets, "summary": summary, "timings": timings}


def run_match_task(case, spec, run_dir: str | os.PathLike, weights: str | None = None) -> dict:
    """Run ``sam[:preset]`` on one case in a child process; return ``point_sets``, ``summary`` and ``timings``.

    ``weights``: embedder weights file (default: the shipped ones).

    Raises:
        InputError: another method than ``sam``, a bad preset, or the child failed (its last error line).
    """
    if spec.method != "sam":
        raise InputError(f"task 'match' runs method 'sam' only, got '{spec.method}'")
    parse_preset(spec.preset)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out_json = run_dir / "match.json"
    out_json.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "regsam.bench.match_task", str(case.path), str(run_dir)]
    if spec.preset:
        cmd += ["--preset", spec.preset]
    if weights is not None:
        cmd += ["--weights", str(weights)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not out_json.is_file():
        reason = last_line(proc.stderr) or f"exit code {proc.returncode}"
        raise InputError(reason.removeprefix("regsam: error: "))
    return json.loads(out_json.read_text())


def main(argv=None) -> int:
    """``python -m regsam.bench.match_task CASE_DIR RUN_DIR [--preset P]``: writes RUN_DIR/match.json."""
    parser = argparse.ArgumentParser(
        prog="python -m regsam.bench.match_task", description="score SAM matching on one case"
    )
    parser.add_argument("case")
    parser.add_argument("run_dir")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--weights", default=None, help="embedder weights (default: the shipped ones)")
    args = parser.parse_args(argv)
    try:
        case = load_case(args.case)
        row = match_case(case, args.preset, args.run_dir, device=os.environ.get(DEVICE_ENV) or None,
                         weights=args.weights)
    except InputError as exc:
        print(f"regsam: error: {exc}", file=sys.stderr)
        return 2
    with atomic_path(Path(args.run_dir) / "match.json") as tmp:
        tmp.write_text(json.dumps(row, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
