"""The ``regsam`` command. Each subcommand is a thin wrapper over one module.

Bad input anywhere surfaces as :class:`regsam.errors.InputError`; it is printed
as one line on stderr and the command exits with code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from regsam.errors import InputError


def _floats(text: str, count: int, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"{what}: expected {count} comma-separated numbers, got '{text}'") from None
    if len(values) != count:
        raise InputError(f"{what}: expected {count} comma-separated numbers, got '{text}'")
    return values


# ---------------------------------------------------------------- data
def _cmd_data_fetch(args: argparse.Namespace) -> int:
    from regsam.data.fetch import fetch

    paths = fetch(args.name, cache_dir=args.cache_dir)
    for key, path in paths.items():
        print(f"{key}: {path}")
    return 0


def _cmd_data_list(args: argparse.Namespace) -> int:
    from regsam.data.fetch import describe_known_data

    print(describe_known_data(cache_dir=args.cache_dir))
    return 0


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from regsam.data.prepare import prepare_dataset

    cases = prepare_dataset(args.dataset, Path(args.root), Path(args.out), cases=args.cases)
    print(f"wrote {len(cases)} case(s) under {args.out}")
    return 0


def _cmd_data_simulate(args: argparse.Namespace) -> int:
    from regsam.data.simulate import SimulationConfig, simulate_case_from_file

    if args.motion_landmarks and args.motion != "landmarks":
        raise InputError("--motion-landmarks is only used with --motion landmarks (the default when given)")
    config = SimulationConfig(
        seed=args.seed,
        motion="landmarks" if args.motion_landmarks else args.motion,
        motion_landmarks=tuple(Path(p) for p in args.motion_landmarks) if args.motion_landmarks else None,
        motion_spacing=_floats(args.motion_spacing, 3, "--motion-spacing") if args.motion_spacing else None,
        rigid_offset=_floats(args.rigid_offset, 2, "--rigid-offset") if args.rigid_offset else None,
        amplitude_mm=args.amplitude,
        noise_hu=args.noise_hu,
        spacing_mm=args.spacing,
    )
    case = simulate_case_from_file(Path(args.ct), Path(args.out), config, body_label_image=args.labels)
    print(f"wrote case {case.path}")
    return 0


def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="datasets: fetch, list, prepare, simulate")
    data_sub = data.add_subparsers(dest="data_command", required=True)

    p = data_sub.add_parser("fetch", help="download and cache a known dataset (sample-ct)")
    p.add_argument("name", choices=["sample-ct"])
    p.add_argument("--cache-dir", default=None, help="cache folder (default: $REGSAM_CACHE or ~/.cache/regsam)")
    p.set_defaults(func=_cmd_data_fetch)

    p = data_sub.add_parser("list", help="show known datasets and what is cached")
    p.add_argument("--cache-dir", default=None)
    p.set_defaults(func=_cmd_data_list)

    p = data_sub.add_parser("prepare", help="validate a public dataset download and write regsam case folders")
    p.add_argument("dataset", choices=["dirlab4dct", "copdgene", "nlst"])
    p.add_argument("--root", required=True, help="folder of the user's download")
    p.add_argument("--out", required=True, help="folder to write case folders into")
    p.add_argument("--cases", nargs="*", default=None, help="only these case ids (default: all found)")
    p.set_defaults(func=_cmd_data_prepare)

    p = data_sub.add_parser("simulate", help="simulate a breathing pair with exact ground truth from a real CT")
    p.add_argument("ct", help="3D CT image (HU)")
    p.add_argument("--out", required=True, help="case folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--motion", choices=["landmarks", "parametric"], default="parametric")
    p.add_argument("--motion-landmarks", nargs=2, metavar=("T00", "T50"), help="DIR-Lab _xyz.txt pair driving the lung motion")
    p.add_argument("--motion-spacing", help="SX,SY,SZ voxel spacing (mm) of the landmark files' scan")
    p.add_argument("--rigid-offset", help="MM,DEGREES: extra rigid misalignment (translation length, rotation angle)")
    p.add_argument("--amplitude", type=float, default=None, help="peak diaphragm motion in mm (default: from landmarks, or 15 mm)")
    p.add_argument("--noise-hu", type=float, default=20.0, help="std of added scanner noise (HU)")
    p.add_argument("--spacing", type=float, default=None, help="resample the CT to this isotropic spacing (mm) first")
    p.add_argument("--labels", default=None, help="optional organ label image of the CT (used for the body/lung masks)")
    p.set_defaults(func=_cmd_data_simulate)


# ---------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regsam", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"regsam {__import__('regsam').__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"regsam: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
