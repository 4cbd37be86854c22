"""sam-net (issue 12): the embedding ablation and the comparison with the per-pair SAM method, on held-out pairs.

    python benchmarks/deformable_net.py ablation --weights embed=W1 noembed=W2 [--out runs/deformable_net]
    python benchmarks/deformable_net.py compare [--out runs/deformable_net]          # the shipped network
    python benchmarks/deformable_net.py table [--out runs/deformable_net]   # prints the markdown tables

``ablation``: on every held-out pair, one process embeds both images and fits the SAM affine once (the ``affine``
stage), then runs the ``network`` stage of each network on that same start and scores the network-only field
(TRE mean, p95, by true motion magnitude). Pairs: the four plain full-thorax pairs of ``regsam bench --dataset
thorax4dct`` (held-out ``lidc_idri_0314_chest``, 22-38 mm, sliding lungs) and the held-out TotalSegmentator crops
moved by DIR-Lab cases 3-5 (``python benchmarks/embedder_bench.py cases runs/match_cases``). No network was trained
on any of these scans.

``compare``: whole ``regsam register`` processes through ``regsam bench`` on the plain full-thorax pairs:
``sam`` (the per-pair default), ``sam-net:instant``, ``sam-net:fast`` and Elastix ``fast``, in one run (wall times
comparable within it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
THORAX = ("dirlab1_22mm", "dirlab3_30mm", "dirlab4_38mm", "parametric_28mm")


def _cases(match_cases: str) -> list[Path]:
    from regsam.bench.datasets import thorax4dct_cases

    crops = sorted(p for p in Path(match_cases).iterdir() if (p / "meta.json").is_file())
    return list(thorax4dct_cases(motions=list(THORAX), offsets=False)) + crops


def _score(fixed_pts: np.ndarray, moving_pts: np.ndarray, predicted: np.ndarray) -> dict:
    from regsam.bench.motion import motion_bins
    from regsam.bench.tre import summarize_errors

    errors = np.linalg.norm(predicted - moving_pts, axis=1)
    return {"tre": summarize_errors(errors), "bins": motion_bins(fixed_pts, moving_pts, predicted),
            "errors": errors.tolist()}


def _ablate_case(case_dir: Path, weights: dict[str, str]) -> dict:
    """Embed + affine once, then each network's pass from that start; scores per network."""
    import SimpleITK as sitk

    from regsam.data.case import load_case
    from regsam.io.transforms import transform_to_field
    from regsam.register.net.model import network_embedder
    from regsam.register.result import RegistrationResult
    from regsam.register.sam import NET_PRESETS, STAGE_OBJECTS, SamState, embed_pair

    case = load_case(case_dir)
    fixed, moving = sitk.ReadImage(str(case.fixed), sitk.sitkFloat32), sitk.ReadImage(str(case.moving), sitk.sitkFloat32)
    fixed_pts, moving_pts = case.point_sets["points"]
    embedders = {network_embedder(path, None) for path in weights.values()}
    if len(embedders) > 1:
        raise SystemExit(f"the networks were trained on different embedders ({sorted(map(str, embedders))})")
    embedder = embedders.pop()
    fixed_emb, moving_emb, dev = embed_pair(fixed, moving, None if embedder is None else str(embedder))
    state = SamState(fixed, moving, NET_PRESETS["instant"], 0, dev, fixed_emb, moving_emb)
    STAGE_OBJECTS["affine"].run(state)
    row: dict = {"affine": _score(fixed_pts, moving_pts, np.array([state.affine.TransformPoint(p.tolist())
                                                                   for p in fixed_pts]))}
    for label, path in weights.items():
        state.net_weights, state.residual = path, None
        start = time.perf_counter()
        STAGE_OBJECTS["network"].run(state)
        seconds = time.perf_counter() - start
        field = transform_to_field(sitk.CompositeTransform([state.affine, sitk.DisplacementFieldTransform(
            sitk.Cast(state.residual, sitk.sitkVectorFloat64))]), fixed)
        result = RegistrationResult(displacement=field, warped=fixed, method="sam-net", preset="instant", timings={})
        row[label] = _score(fixed_pts, moving_pts, result.map_points(fixed_pts)) | {
            "network_s": seconds, **result.jacobian_stats()["grid"]}
    return row


def cmd_ablation(args: argparse.Namespace) -> int:
    weights = dict(w.split("=", 1) for w in args.weights)
    out = Path(args.out) / "ablation"
    out.mkdir(parents=True, exist_ok=True)
    for case_dir in _cases(args.match_cases):
        path = out / f"{case_dir.name}.json"
        if path.is_file() and set(weights) <= set(json.loads(path.read_text())):
            continue
        print(f"{case_dir.name} ...", flush=True)
        path.write_text(json.dumps(_ablate_case(case_dir, weights)))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from regsam.bench.datasets import thorax4dct_cases

    cases = thorax4dct_cases(motions=list(THORAX), offsets=False)
    root = Path(args.out) / "compare_cases"
    root.mkdir(parents=True, exist_ok=True)
    for case in cases:  # one folder of links, so that a single bench run covers the plain pairs only
        link = root / case.name
        if not link.exists():
            link.symlink_to(case, target_is_directory=True)
    cmd = ["regsam", "bench", "--cases", str(root), "--no-masks", "--methods", args.methods,
           "--out", str(Path(args.out) / "compare")]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd).returncode


def _pool(rows: list[dict], label: str) -> dict:
    from regsam.bench.motion import pooled_bins

    errors = np.concatenate([np.asarray(r[label]["errors"]) for r in rows])
    return {"mean": float(errors.mean()), "p95": float(np.percentile(errors, 95)),
            "case_means": [r[label]["tre"]["mean"] for r in rows], "bins": pooled_bins([r[label]["bins"] for r in rows])}


def cmd_table(args: argparse.Namespace) -> int:
    out = Path(args.out) / "ablation"
    rows = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}
    groups = {"full thorax (4 pairs)": [r for k, r in rows.items() if k.startswith("lidc")],
              "held-out crops (4 pairs)": [r for k, r in rows.items() if not k.startswith("lidc")]}
    labels = [k for k in next(iter(rows.values())) if k != "affine"]
    print("| pairs | network | mean TRE of the pair means | pooled mean | pooled p95 | 0-10 mm | 10-20 mm | > 20 mm "
          "(along) | min det J | network pass s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for group, members in groups.items():
        if not members:
            continue
        for label in ["affine", *labels]:
            p = _pool(members, label)
            bins = p["bins"]

            def cell(key: str) -> str:
                b = bins.get(key)
                return "-" if not b or not b.get("n") else f"{b['tre_mean']:.2f}"

            gt20 = bins.get("> 20 mm") or {}
            along = f" ({gt20['along_mean']:+.2f})" if gt20.get("n") else ""
            jac = min(r[label].get("jac_min", np.nan) for r in members) if label != "affine" else float("nan")
            secs = np.mean([r[label].get("network_s", np.nan) for r in members]) if label != "affine" else float("nan")
            print(f"| {group} | {label} | {np.mean(p['case_means']):.2f} | {p['mean']:.2f} | {p['p95']:.2f} | "
                  f"{cell('0-10 mm')} | {cell('10-20 mm')} | {cell('> 20 mm')}{along} | {jac:.3f} | {secs:.1f} |")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ablation")
    p.add_argument("--weights", nargs="+", required=True, metavar="LABEL=WEIGHTS")
    p.add_argument("--match-cases", default="runs/match_cases")
    p.set_defaults(func=cmd_ablation)
    p = sub.add_parser("compare")
    p.add_argument("--methods", default="sam,sam-net:instant,sam-net:fast,elastix:fast")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("table")
    p.set_defaults(func=cmd_table)
    for p in sub.choices.values():
        p.add_argument("--out", default="runs/deformable_net")
    args = parser.parse_args(argv)
    os.chdir(REPO)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
