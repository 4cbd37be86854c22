"""SAM registration vs Elastix, SAM+Elastix and ConvexAdam on breathing pairs from CT the embedder never saw.

    python benchmarks/register_heldout.py [--out runs/bench_heldout] [--methods ...] [--cases 4,5]

Runs, from the repository root with ``../shared`` beside it, two ``regsam bench`` commands (all methods of one
command in the same run, one process per (case, method)):

    regsam bench --dataset sim4dct --ct ../shared/data/totalseg/aorta_ct_cropped.nii.gz \\
        --ct ../shared/data/totalseg/pulmonary_ct_cropped.nii.gz --sim-cases 4,5 --methods M --out OUT/plain
    ... the same with --rigid-offset 30,10 --out OUT/offset

(the TotalSegmentator crops are held out of the shipped embedder's training, see regsam/weights/MODEL_CARD.md),
then writes ``benchmarks/register_heldout.md``: both reports' summaries and the ratios the SAM registration issue
asks for (SAM / Elastix lung mean TRE and wall time, offset / plain TRE per method, SAM / ConvexAdam TRE).
Both bench runs resume, so a killed run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("REGSAM_SHARED_DATA", REPO.parent / "shared" / "data"))
CTS = (SHARED / "totalseg" / "aorta_ct_cropped.nii.gz", SHARED / "totalseg" / "pulmonary_ct_cropped.nii.gz")
METHODS = "elastix:lung,sam,sam+elastix,convexadam"


def _bench(out: Path, methods: str, cases: str, offset: str | None) -> dict:
    cmd = ["regsam", "bench", "--dataset", "sim4dct", "--sim-cases", cases, "--methods", methods, "--out", str(out)]
    for ct in CTS:
        cmd += ["--ct", str(ct)]
    if offset:
        cmd += ["--rigid-offset", offset]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads((out / "results.json").read_text())


def _by_case(results: dict) -> dict[tuple[str, str], dict]:
    return {(r["case"], r["method"]): r for r in results["rows"] if r["status"] == "ok"}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _ratios(plain: dict, offset: dict, reference: str = "elastix:lung") -> list[str]:
    p, o = _by_case(plain), _by_case(offset)
    methods = plain["methods"]
    lines = ["| method | mean TRE plain | / Elastix lung | wall s plain | / Elastix lung | mean TRE offset | offset / plain (mean of per-pair ratios) | peak MB max | folding % max |",
             "|---|---|---|---|---|---|---|---|---|"]
    ref_cases = [c for (c, m) in p if m == reference]
    for method in methods:
        cases = [c for (c, m) in p if m == method and c in ref_cases]
        tre = _mean(p[(c, method)]["point_sets"]["points"]["tre"]["mean"] for c in cases)
        ref_tre = _mean(p[(c, reference)]["point_sets"]["points"]["tre"]["mean"] for c in cases)
        wall = _mean(p[(c, method)]["wall_s"] for c in cases)
        ref_wall = _mean(p[(c, reference)]["wall_s"] for c in cases)
        pairs = [(c, c) for c in cases if (c, method) in o]
        tre_off = _mean(o[(c, method)]["point_sets"]["points"]["tre"]["mean"] for c, _ in pairs)
        off_ratio = _mean(o[(c, method)]["point_sets"]["points"]["tre"]["mean"] / p[(c, method)]["point_sets"]["points"]["tre"]["mean"] for c, _ in pairs)
        rows = [p[(c, method)] for c in cases] + [o[(c, method)] for c, _ in pairs]
        peak = max((r["summary"].get("peak_memory_mb", {}).get("max") or 0) for r in rows) if rows else float("nan")
        fold = max((r["summary"].get("folding_share") or 0.0) for r in rows) * 100 if rows else float("nan")
        lines.append(f"| {method} | {tre:.3f} | {tre / ref_tre:.2f} | {wall:.1f} | {wall / ref_wall:.2f} | {tre_off:.3f} | {off_ratio:.2f} | {peak:.0f} | {fold:.3f} |")
    return lines


def _summary(report: Path) -> str:
    text = report.read_text()
    start, end = text.find("## Summary"), text.find("## TRE per case")
    section = text[start:end].strip() if start >= 0 else text
    return section.replace("\n## ", "\n### ").replace("## Summary", "### Summary", 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench_heldout")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--cases", default="4,5", help="DIR-Lab cases driving the motion (default 4,5: the largest)")
    parser.add_argument("--offset", default="30,10", help="rigid offset MM,DEG of the offset pairs")
    parser.add_argument("--md", default=str(REPO / "benchmarks" / "register_heldout.md"))
    args = parser.parse_args(argv)
    missing = [str(ct) for ct in CTS if not ct.is_file()]
    if missing:
        print(f"missing held-out CT(s): {', '.join(missing)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = os.getloadavg()[0]
    plain = _bench(out / "plain", args.methods, args.cases, None)
    offset = _bench(out / "offset", args.methods, args.cases, args.offset)
    lines = [
        "# SAM registration vs Elastix, SAM+Elastix and ConvexAdam on held-out breathing pairs",
        "",
        f"Command (repository root, ../shared beside it): `python benchmarks/register_heldout.py --out {args.out} "
        f"--methods {args.methods} --cases {args.cases} --offset {args.offset}`",
        "",
        f"Machine: {os.cpu_count()} CPU cores, no GPU; started {start}, load average {load:.1f} at start "
        "(a resumed run reuses earlier rows: their times are from the run that computed them). "
        "Pairs: `regsam bench --dataset sim4dct --ct CT` from the TotalSegmentator aorta and pulmonary crops (CT the "
        f"shipped embedder never saw), motion of DIR-Lab cases {args.cases}, 2 mm; offset pairs add a "
        f"{args.offset.split(',')[0]} mm / {args.offset.split(',')[1]} deg rigid misalignment. TRE over the ~300 lung points "
        "of each pair; wall s is the whole process of one (pair, method), imports included.",
        "",
        "## Ratios",
        "",
        *_ratios(plain, offset),
        "",
        "## Plain pairs",
        "",
        _summary(out / "plain" / "report.md"),
        "",
        "## Offset pairs",
        "",
        _summary(out / "offset" / "report.md"),
        "",
    ]
    Path(args.md).write_text("\n".join(lines))
    print(f"wrote {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
