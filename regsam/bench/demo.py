"""``regsam demo``: the whole pipeline on the embedded default data, end to end.

Fetches the sample chest CT (cached after the first run), simulates one
breathing pair with parametric motion, registers it with the chosen methods (default:
Elastix's lung preset and SAM, side by side) and
writes a benchmark report. Opens nothing; returns the report path.
"""

from __future__ import annotations

import sys
from pathlib import Path

from regsam.bench.runner import parse_methods, run_benchmark
from regsam.data.fetch import fetch_sample_ct
from regsam.data.simulate import SimulationConfig, simulate_case_from_file

DEMO_SPACING_MM = 2.5
DEMO_AMPLITUDE_MM = 15.0


DEMO_METHODS = "elastix:lung,sam"


def run_demo(out: Path, methods: str = DEMO_METHODS, seed: int = 0) -> Path:
    """Run the demo into ``out``; returns ``out/report.html``."""
    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    sample = fetch_sample_ct()
    case_dir = out / "cases" / "demo_case"
    if not (case_dir / "meta.json").is_file():
        say(f"simulating a breathing pair from {sample['ct']} ...")
        config = SimulationConfig(
            seed=seed, motion="parametric", amplitude_mm=DEMO_AMPLITUDE_MM, spacing_mm=DEMO_SPACING_MM
        )
        simulate_case_from_file(sample["ct"], case_dir, config, body_label_image=sample["labels"])
    run_benchmark([case_dir], parse_methods(methods), out, progress=say)
    return out / "report.html"
