"""Embedder objectives compared on one budget: SAM, ACE, Adam and their combination (issue 13).

    python benchmarks/objectives.py train --steps N [--out runs/objectives] [--init shipped|scratch]
    python benchmarks/objectives.py eval  [--out runs/objectives] [--extra NAME=WEIGHTS ...]
    python benchmarks/objectives.py table [--out runs/objectives]      # writes benchmarks/objectives.md

``train`` runs ``regsam train-embedder`` once per objective with ``configs/embedder/chest_all.yaml`` in which only the
``objective`` section differs (``sam``, ``ace``, ``adam``, ``[sam, ace, adam]``): same data, holdout, crops, seed,
optimiser, schedule and number of steps, and the same start (the shipped weights, or random with ``--init scratch``).
Each run resumes (``--resume``) when killed.

``eval`` scores each run's ``weights.pt`` (and the shipped weights, and any ``--extra NAME=WEIGHTS``), all on data no
weights were trained on:

* per-point ``nearest`` matching (SAM's own inference) and the default ``consensus`` matcher of the ~300 lung landmarks
  of held-out breathing pairs: the TotalSegmentator crops moved by DIR-Lab cases 3-5 (``benchmarks/embedder_bench.py
  cases``, in ``runs/match_cases``) and full-thorax pairs of the held-out ``lidc_idri_0314_chest``
  (``regsam bench --dataset thorax4dct``: the 22 mm and 38 mm pairs, sliding lungs);
* the planted-deformation benchmark (``tests/embed/matching_benchmark.py``, held-out aorta crop, seed 0, nearest);
* the registration TRE of the default method (``regsam register``, i.e. ``--method sam``) on the crop pairs.

Everything goes through ``regsam bench --weights W`` (one process per case and method), so the figures are those
a user gets with those weights.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "embedder" / "chest_all.yaml"
SHIPPED = REPO / "regsam" / "weights" / "sam_chest.pt"
OBJECTIVES = {"sam": "sam", "ace": "ace", "adam": "adam", "combined": ["sam", "ace", "adam"]}
THORAX_MATCH = ("dirlab1_22mm", "dirlab4_38mm")
THORAX_REGISTER: tuple[str, ...] = ()  # a full thorax per weights costs minutes on 2 cores


def _config_for(name: str, steps: int, init: str) -> dict:
    config = yaml.safe_load(BASE_CONFIG.read_text())
    objective = copy.deepcopy(config["objective"])
    wanted = OBJECTIVES[name]
    objective["name"] = wanted
    if isinstance(wanted, str):  # a single objective's keys sit directly in the section
        objective = {"name": wanted, **objective[wanted]}
    config["objective"] = objective
    config["train"]["max_steps"] = steps
    config["train"]["init_weights"] = str(SHIPPED) if init == "shipped" else None
    # data entries are relative to the config file's folder or the cwd: make them absolute for a config in runs/
    config["data"] = [d if d == "sample-ct" else str((REPO / d).resolve()) for d in config["data"]]
    config["holdout"] = [str((REPO / d).resolve()) for d in config["holdout"]]
    return config


def cmd_train(args: argparse.Namespace) -> int:
    out = Path(args.out)
    for name in args.objectives:
        run = out / name
        run.mkdir(parents=True, exist_ok=True)
        config_path = out / f"{name}.yaml"
        config_path.write_text(yaml.safe_dump(_config_for(name, args.steps, args.init), sort_keys=False))
        if (run / "weights.pt").is_file():
            print(f"{name}: done", flush=True)
            continue
        cmd = ["regsam", "train-embedder", "--config", str(config_path), "--out", str(run), "--no-progress"]
        if (run / "checkpoint.pt").is_file():
            cmd.append("--resume")
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return 0


def _log_summary(run: Path) -> dict:
    rows = list(csv.DictReader((run / "log.csv").open()))
    last = rows[-1]
    tail = rows[-max(1, len(rows) // 10):]
    return {"steps": int(last["step"]), "train_s": float(last["seconds"]),
            "loss_end": sum(float(r["loss"]) for r in tail) / len(tail)}


def _weights(args: argparse.Namespace) -> dict[str, Path]:
    out = Path(args.out)
    found = {"shipped": SHIPPED}
    for name in OBJECTIVES:
        if (out / name / "weights.pt").is_file():
            found[name] = out / name / "weights.pt"
    for extra in args.extra:
        label, _, path = extra.partition("=")
        found[label] = Path(path)
    return found


def _bench(cases: list[str], methods: str, task: str, weights: Path, out: Path) -> dict:
    """One resumable ``regsam bench`` per case (so a killed eval continues where it stopped); results by case."""
    results = {}
    for case in cases:
        sub = out / Path(case).name
        subprocess.run(["regsam", "bench", "--cases", case, "--methods", methods, "--task", task, "--weights",
                        str(weights), "--no-masks", "--out", str(sub)], check=True)
        results[Path(case).name] = json.loads((sub / "results.json").read_text())
    return results


def _thorax_cases(names: tuple[str, ...]) -> list[str]:
    from regsam.bench.datasets import thorax4dct_cases

    return [str(p) for p in thorax4dct_cases(motions=list(names), offsets=False)]


def cmd_eval(args: argparse.Namespace) -> int:
    out = Path(args.out)
    crops = sorted(str(p) for p in Path(args.match_cases).iterdir() if (p / "meta.json").is_file())
    thorax_match = _thorax_cases(THORAX_MATCH)
    thorax_register = _thorax_cases(THORAX_REGISTER) if THORAX_REGISTER else []
    for label, weights in _weights(args).items():
        done = out / "eval" / label / "eval.json"
        if done.is_file():
            print(f"{label}: evaluated", flush=True)
            continue
        start = time.perf_counter()
        row: dict = {"weights": str(weights)}
        row["match"] = _bench(crops + thorax_match, "sam:nearest,sam", "match", weights, out / "eval" / label / "match")
        planted = subprocess.run([sys.executable, str(REPO / "tests" / "embed" / "matching_benchmark.py"), "--weights",
                                  str(weights), "--seed", "0", "--mode", "nearest"], check=True, capture_output=True,
                                 text=True)
        row["planted"] = json.loads(planted.stdout)
        row["register"] = _bench(crops + thorax_register, "sam", "register", weights, out / "eval" / label / "register")
        row["eval_s"] = time.perf_counter() - start
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(row, indent=1))
        print(f"{label}: evaluated in {row['eval_s']:.0f} s", flush=True)
    return 0


def _pooled(results: dict, method: str, names) -> dict:
    """Mean / p95 / mean by group over all landmarks of the named cases (errors pooled, not averaged per case)."""
    import numpy as np

    errors = []
    for name in names:
        for r in results[name]["rows"]:
            if r["method"] == method and r.get("status") == "ok":
                errors += r["point_sets"]["points"]["errors"]
    if not errors:
        return {"mean": float("nan"), "p95": float("nan"), "n": 0}
    e = np.asarray(errors)
    return {"mean": float(e.mean()), "p95": float(np.percentile(e, 95)), "n": int(e.size)}


def _register_tre(results: dict, names) -> dict:
    import numpy as np

    means, p95s = [], []
    for name in names:
        for r in results[name]["rows"]:
            if r.get("status") == "ok":
                means.append(r["point_sets"]["points"]["tre"]["mean"])
                p95s.append(r["point_sets"]["points"]["tre"]["p95"])
    return {"mean": float(np.mean(means)) if means else float("nan"), "p95_max": float(max(p95s)) if p95s else float("nan")}


def cmd_table(args: argparse.Namespace) -> int:
    out = Path(args.out)
    lines = ["| weights | objective | steps | train s | nearest crops mean / p95 | nearest thorax mean / p95 | "
             "consensus crops mean / p95 | consensus thorax mean / p95 | planted nearest median / mean / p90 | "
             "register crops mean (p95 max) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for folder in sorted((out / "eval").iterdir()):
        path = folder / "eval.json"
        if not path.is_file():
            continue
        row = json.loads(path.read_text())
        label = folder.name
        log = _log_summary(out / label) if (out / label / "log.csv").is_file() else None
        match = row["match"]
        crops = [k for k in match if not k.startswith("lidc")]
        thorax = [k for k in match if k.startswith("lidc")]
        cells = []
        for method in ("sam:nearest", "sam"):
            for group in (crops, thorax):
                p = _pooled(match, method, group)
                cells.append(f"{p['mean']:.2f} / {p['p95']:.2f}")
        planted = row["planted"]
        reg = row["register"]
        rc = _register_tre(reg, [k for k in reg if not k.startswith("lidc")])
        objective = OBJECTIVES.get(label, "sam (shipped)" if label == "shipped" else "?")
        lines.append(
            f"| {label} | {objective} | {log['steps'] if log else '-'} | {log['train_s']:.0f} |" if log else
            f"| {label} | {objective} | - | - |")
        lines[-1] += (" " + " | ".join(cells) + f" | {planted['median_mm']:.2f} / {planted['mean_mm']:.2f} / "
                      f"{planted['p90_mm']:.2f} | {rc['mean']:.3f} ({rc['p95_max']:.2f}) |")
    table = "\n".join(lines)
    print(table)
    (out / "table.md").write_text(table + "\n")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("train")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--init", choices=["shipped", "scratch"], default="shipped")
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("eval")
    p.add_argument("--match-cases", default="runs/match_cases")
    p.add_argument("--extra", nargs="*", default=[], metavar="NAME=WEIGHTS")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("table")
    p.set_defaults(func=cmd_table)
    for p in sub.choices.values():
        p.add_argument("--out", default="runs/objectives")
    args = parser.parse_args(argv)
    os.chdir(REPO)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
