"""Embedder benchmarks behind ``benchmarks/embedder.md``. Run from the repository root (``../shared`` beside it).

    python benchmarks/embedder_bench.py cases runs/match_cases      # 4 held-out breathing pairs (case folders)
    regsam bench --task match --cases runs/match_cases --methods sam,sam:cycle,sam:nearest,sam:nearest+cycle --out runs/bench_match
    python benchmarks/embedder_bench.py table runs/bench_match      # cycle-kept share / TRE, embed time per scan
    python benchmarks/embedder_bench.py speed                       # embedding time / memory vs peers, sample CT
    python benchmarks/embedder_bench.py adapt                       # test-time adaptation: 0 vs 20 vs 50 steps

``cases``: TotalSegmentator ``aorta_ct_cropped`` (3 pairs, motion of DIR-Lab cases 3, 4, 5) and
``pulmonary_ct_cropped`` (1 pair, DIR-Lab case 4), resampled to 2 mm: CT the shipped weights never saw.

``speed``: every measurement in a fresh process (so peak RSS is its own): ``embed`` (read the sample CT, embed
it with the shipped weights), and two peers on the same scan in the same run, ``gauss`` (SimpleITK recursive
Gaussian smoothing, sigma 2 mm, of the full-resolution scan) and ``resample`` (regsam's 2 mm network-input
resampling, :func:`regsam.embed.preprocess.resample_standard`). Rounds alternate, so load from other jobs hits
all three alike; the ratios to the peers show how much of a time is the machine.

``adapt``: simulated breathing pairs (parametric motion, 15 mm, 2 mm grid) of the held-out aorta crop; the fixed
image's 300 lung landmarks are matched into the moving image after 0 / 20 / 50 adaptation steps on the pair.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("REGSAM_SHARED_DATA", REPO.parent / "shared" / "data"))
AORTA = SHARED / "totalseg" / "aorta_ct_cropped.nii.gz"
PULMONARY = SHARED / "totalseg" / "pulmonary_ct_cropped.nii.gz"
LANDMARKS = SHARED / "dirlab4dct_landmarks"
#: (case name, source CT, DIR-Lab case driving the motion)
CASES = (("aorta_dirlab3", AORTA, 3), ("aorta_dirlab4", AORTA, 4), ("aorta_dirlab5", AORTA, 5), ("pulmonary_dirlab4", PULMONARY, 4))


def _machine() -> str:
    load = os.getloadavg()
    return f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), load average {load[0]:.1f} at start"


# ---------------------------------------------------------------- cases
def cmd_cases(args: argparse.Namespace) -> int:
    from regsam.bench.datasets import DIRLAB_MOTIONS

    out = Path(args.out)
    for name, ct, k in CASES:
        if (out / name / "meta.json").is_file():
            print(f"{name}: exists")
            continue
        spacing = ",".join(str(v) for v in DIRLAB_MOTIONS[k][0])
        cmd = [sys.executable, "-m", "regsam.cli", "data", "simulate", str(ct), "--out", str(out / name), "--seed", str(k),
               "--motion-landmarks", str(LANDMARKS / f"Case{k}_300_T00_xyz.txt"), str(LANDMARKS / f"Case{k}_300_T50_xyz.txt"),
               "--motion-spacing", spacing, "--spacing", "2"]
        print(" ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True)
    for name, _, _ in CASES:
        meta = json.loads((out / name / "meta.json").read_text())
        print(f"{name}: {meta['size']} voxels at 2 mm, {meta['n_points']} lung points, identity TRE mean {meta['mean_identity_tre_mm']:.2f} mm")
    return 0


# ---------------------------------------------------------------- speed
def _one(kind: str, threads: int) -> dict:
    """One measurement in this (fresh) process."""
    import SimpleITK as sitk
    import torch

    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    from regsam.data.fetch import fetch_sample_ct
    from regsam.io.images import read_image

    ct = read_image(fetch_sample_ct()["ct"])
    base_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out: dict = {"kind": kind, "threads": threads, "size": list(ct.GetSize()), "spacing": [round(s, 3) for s in ct.GetSpacing()]}
    if kind == "embed":
        from regsam.embed.inference import embed_image
        from regsam.embed.model import load_embedder

        model = load_embedder(device="cpu")
        t = time.perf_counter()
        emb = embed_image(model, ct)
        out["seconds"] = time.perf_counter() - t
        out["voxels_2mm"] = int(np.prod(emb.image_geometry.GetSize()))
        out["grid_2mm"] = list(emb.image_geometry.GetSize())
    elif kind == "gauss":
        t = time.perf_counter()
        smooth = sitk.SmoothingRecursiveGaussian(sitk.Cast(ct, sitk.sitkFloat32), 2.0)
        sitk.GetArrayViewFromImage(smooth).sum()
        out["seconds"] = time.perf_counter() - t
    elif kind == "resample":
        from regsam.embed.preprocess import resample_standard

        t = time.perf_counter()
        resample_standard(ct, 2.0)
        out["seconds"] = time.perf_counter() - t
    else:
        raise SystemExit(f"unknown kind {kind}")
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["rss_before_mb"] = base_mb
    return out


def cmd_speed(args: argparse.Namespace) -> int:
    if args.one:
        print(json.dumps(_one(args.one, args.threads)))
        return 0
    print(f"# {_machine()}; torch/SimpleITK threads {args.threads}", flush=True)
    rows: dict[str, list[dict]] = {"embed": [], "gauss": [], "resample": []}
    for r in range(args.rounds):
        for kind in rows:
            proc = subprocess.run([sys.executable, __file__, "speed", "--one", kind, "--threads", str(args.threads)],
                                  capture_output=True, text=True, check=True, cwd=REPO)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows[kind].append(row)
            print(f"round {r + 1} {kind}: {row['seconds']:.2f} s, peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
    med = {k: float(np.median([r["seconds"] for r in v])) for k, v in rows.items()}
    embed = rows["embed"][0]
    summary = {
        "scan": f"sample CT {embed['size']} at {embed['spacing']} mm -> {embed['grid_2mm']} = {embed['voxels_2mm'] / 1e6:.2f} M voxels at 2 mm",
        "median_s": {k: round(v, 2) for k, v in med.items()},
        "all_s": {k: [round(r["seconds"], 2) for r in v] for k, v in rows.items()},
        "embed_over_gauss": round(med["embed"] / med["gauss"], 2),
        "embed_over_resample": round(med["embed"] / med["resample"], 2),
        "peak_rss_mb": {k: round(max(r["peak_rss_mb"] for r in v)) for k, v in rows.items()},
        "rss_after_reading_mb": round(embed["rss_before_mb"]),
        "load_average_end": round(os.getloadavg()[0], 1),
    }
    print(json.dumps(summary, indent=2))
    return 0


# ---------------------------------------------------------------- adapt
def cmd_adapt(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    from regsam.bench.tre import summarize_errors
    from regsam.data.simulate import SimulationConfig, simulate_case
    from regsam.embed.commands import match_images
    from regsam.embed.model import load_embedder
    from regsam.io.images import read_image

    print(f"# {_machine()}; torch threads {args.threads}", flush=True)
    model = load_embedder(args.weights, device="cpu")
    ct = read_image(args.ct)
    results = []
    for sim_seed in args.sim_seeds:
        pair = simulate_case(ct, SimulationConfig(seed=sim_seed, motion="parametric", amplitude_mm=15.0, spacing_mm=2.0))
        identity = np.linalg.norm(pair.moving_points - pair.fixed_points, axis=1)
        print(f"sim seed {sim_seed}: {len(identity)} lung points, identity mean {identity.mean():.2f} mm, "
              f"median {np.median(identity):.2f}, p95 {np.percentile(identity, 95):.2f}", flush=True)
        for steps in args.steps:
            timings: dict = {}
            t = time.perf_counter()
            res = match_images(pair.fixed, pair.fixed_points, pair.moving, model=model, cycle_tolerance_mm=args.cycle,
                               adapt_steps=steps, adapt_seed=args.adapt_seed, device="cpu", timings=timings)
            wall = time.perf_counter() - t
            err = np.linalg.norm(res.matched - pair.moving_points, axis=1)
            s = summarize_errors(err)
            kept = res.valid
            row = {
                "sim_seed": sim_seed, "steps": steps, "mean": s["mean"], "median": s["median"], "p95": s["p95"],
                "kept": float(kept.mean()), "kept_mean": float(err[kept].mean()) if kept.any() else None,
                "kept_p95": float(np.percentile(err[kept], 95)) if kept.any() else None,
                "identity_mean": float(identity.mean()), "wall_s": wall, **{k: round(v, 2) for k, v in timings.items()},
            }
            results.append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    print("| sim seed | steps | identity mean | mean | median | p95 | cycle-kept % | kept mean / p95 | adapt s | embed s (2 scans) | match s | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['sim_seed']} | {r['steps']} | {r['identity_mean']:.2f} | {r['mean']:.2f} | {r['median']:.2f} | {r['p95']:.2f} | "
              f"{100 * r['kept']:.0f} | {r['kept_mean']:.2f} / {r['kept_p95']:.2f} | {r['adapt_s']:.0f} | "
              f"{r['embed_template_s'] + r['embed_target_s']:.1f} | {r['match_s']:.1f} | {r['wall_s']:.0f} |")
    return 0


# ---------------------------------------------------------------- table
def cmd_table(args: argparse.Namespace) -> int:
    """What the bench report leaves out: cycle-kept share and TRE of kept points, embedding time per scan."""
    results = json.loads((Path(args.results) / "results.json").read_text())
    print("| case | method | mean (all) | p95 (all) | cycle-kept % | kept mean | kept median | kept p95 | embed s / scan | adapt s | peak MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    pooled: dict[str, dict[str, list]] = {}
    for row in results["rows"]:
        if row.get("status") != "ok":
            continue
        sets, summary, timings = row["point_sets"], row.get("summary", {}), row.get("timings", {})
        tre, kept = sets["points"]["tre"], sets.get("points_kept", {}).get("tre")
        share = sets["points"].get("kept_share")
        embed = summary.get("embed_s_per_scan", {})
        pool = pooled.setdefault(row["method"], {"all": [], "kept": []})
        pool["all"] += sets["points"]["errors"]
        if share is not None:
            pool["kept"] += sets.get("points_kept", {}).get("errors", [])

        def f(v, d=2):
            return "-" if v is None else f"{v:.{d}f}"

        print(f"| {row['case']} | {row['method']} | {tre['mean']:.2f} | {tre['p95']:.2f} | {f(None if share is None else 100 * share, 0)} | "
              f"{f(kept and kept['mean'])} | {f(kept and kept['median'])} | {f(kept and kept['p95'])} | "
              f"{f(np.mean(list(embed.values())) if embed else None, 1)} | {f(timings.get('adapt_s'), 0)} | "
              f"{f(summary.get('peak_memory_mb', {}).get('max'), 0)} |")
    for method, pool in pooled.items():
        e, k = np.array(pool["all"]), np.array(pool["kept"])
        line = f"| ALL points | {method} | {e.mean():.2f} | {np.percentile(e, 95):.2f} | "
        if len(k):
            line += f"{100 * len(k) / len(e):.0f} | {k.mean():.2f} | {np.median(k):.2f} | {np.percentile(k, 95):.2f} | | | |"
        else:
            line += "- | - | - | - | | | |"
        print(line)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("cases", help="build the held-out breathing-pair case folders")
    p.add_argument("out", nargs="?", default="runs/match_cases")
    p.set_defaults(func=cmd_cases)
    p = sub.add_parser("speed", help="embedding time and peak memory on the sample CT, next to peers")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_speed)
    p = sub.add_parser("adapt", help="test-time adaptation: matching error and time vs steps")
    p.add_argument("--ct", default=str(AORTA))
    p.add_argument("--weights", default=None)
    p.add_argument("--sim-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, nargs="+", default=[0, 20, 50])
    p.add_argument("--adapt-seed", type=int, default=0)
    p.add_argument("--cycle", type=float, default=6.0, help="cycle tolerance (mm) for the kept share")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the shared 2-core machine is faster so)")
    p.set_defaults(func=cmd_adapt)
    p = sub.add_parser("table", help="cycle-kept share, kept-point TRE and timings from a 'regsam bench --task match' folder")
    p.add_argument("results", nargs="?", default="runs/bench_match")
    p.set_defaults(func=cmd_table)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
