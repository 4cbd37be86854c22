"""The ``regsam`` command. Each subcommand is a thin wrapper over one module.

Bad input anywhere surfaces as :class:`regsam.errors.InputError`; it is printed
as one line on stderr and the command exits with code 2. A registration method that
fails inside (:class:`regsam.register.methods.MethodFailure`) is one line too, exit code 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from regsam.errors import InputError
from regsam.register.methods import DEFAULT_BENCH_METHODS, DEFAULT_METHOD, METHODS, MethodFailure, get_method


def _floats(text: str, count: int | None, what: str) -> tuple[float, ...]:
    """Comma-separated numbers; ``count`` of them (None: any number, at least one)."""
    expected = f"{count}" if count is not None else "one or more"
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"{what}: expected {expected} comma-separated numbers, got '{text}'") from None
    if len(values) != count and count is not None:
        raise InputError(f"{what}: expected {expected} comma-separated numbers, got '{text}'")
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

    if args.motion_landmarks and args.motion == "parametric":
        raise InputError("--motion-landmarks is only used with --motion landmarks (the default when given)")
    if args.motion_spacing and not args.motion_landmarks:
        raise InputError("--motion-spacing is only used with --motion-landmarks")
    config = SimulationConfig(
        seed=args.seed,
        motion="landmarks" if args.motion_landmarks else (args.motion or "parametric"),
        motion_landmarks=tuple(Path(p) for p in args.motion_landmarks) if args.motion_landmarks else None,
        motion_spacing=_floats(args.motion_spacing, 3, "--motion-spacing") if args.motion_spacing else None,
        rigid_offset=_floats(args.rigid_offset, 2, "--rigid-offset") if args.rigid_offset else None,
        amplitude_mm=args.amplitude,
        noise_hu=args.noise_hu,
        spacing_mm=args.spacing,
        sliding=args.sliding,
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
    p.add_argument("--motion", choices=["landmarks", "parametric"], default=None,
                   help="lung motion model (default: landmarks when --motion-landmarks is given, else parametric)")
    p.add_argument("--motion-landmarks", nargs=2, metavar=("T00", "T50"),
                   help="DIR-Lab _xyz.txt pair driving the lung motion")
    p.add_argument("--motion-spacing", help="SX,SY,SZ voxel spacing (mm) of the landmark files' scan")
    p.add_argument("--rigid-offset", help="MM,DEGREES: extra rigid misalignment (translation length, rotation angle)")
    p.add_argument("--amplitude", type=float, default=None,
                   help="peak diaphragm motion in mm (default: from landmarks, or 15 mm)")
    p.add_argument("--noise-hu", type=float, default=20.0, help="std of added scanner noise (HU)")
    p.add_argument("--spacing", type=float, default=None, help="resample the CT to this isotropic spacing (mm) first")
    p.add_argument("--labels", default=None, help="optional organ label image of the CT (used for the body/lung masks)")
    p.add_argument("--sliding", action="store_true",
                   help="the lungs slide along the chest wall (the tangential motion jumps at the lung surface)")
    p.set_defaults(func=_cmd_data_simulate)


# ---------------------------------------------------------------- register
#: ``regsam register`` flags that are method options (MethodSpec.options), flag name -> option name
_REGISTER_OPTION_FLAGS = {"--stages": "stages", "--device": "device", "--weights": "weights",
                          "--net-weights": "net_weights"}


def _methods_taking(option: str) -> str:
    return ", ".join(name for name, spec in METHODS.items() if option in spec.options)


def _cmd_register(args: argparse.Namespace) -> int:
    from regsam.register.api import run_register_command

    spec = get_method(args.method)
    given = {flag: option for flag, option in _REGISTER_OPTION_FLAGS.items() if getattr(args, option)}
    refused = [flag for flag, option in given.items() if option not in spec.options]
    if refused:
        takes = [flag for flag, option in _REGISTER_OPTION_FLAGS.items() if option in spec.options]
        raise InputError(
            f"--method {spec.name} does not take {', '.join(refused)} "
            f"(of {', '.join(_REGISTER_OPTION_FLAGS)} it takes {', '.join(takes) or 'none'})"
        )
    out = run_register_command(
        Path(args.fixed),
        Path(args.moving),
        Path(args.out),
        method=args.method,
        preset=args.preset,
        fixed_mask_path=Path(args.fixed_mask) if args.fixed_mask else None,
        moving_mask_path=Path(args.moving_mask) if args.moving_mask else None,
        options={option: getattr(args, option) for option in given.values()},
        nan_value=args.nan_value,
    )
    print(f"wrote {out}")
    return 0


def _add_register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("register", help="register MOVING onto FIXED; writes disp.nii.gz, warped.nii.gz, summary.json")
    p.add_argument("fixed", help="fixed image (the grid of the result)")
    p.add_argument("moving", help="moving image")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--method", default=DEFAULT_METHOD, metavar="{" + ",".join(METHODS) + "}",
                   help=f"registration method (default: {DEFAULT_METHOD}): {', '.join(METHODS)}")
    presets = "; ".join(
        f"{spec.name}: {', '.join(spec.presets)} (default {spec.default_preset})" for spec in METHODS.values()
    )
    p.add_argument("--preset", default=None, help=f"method preset: {presets}")
    p.add_argument("--fixed-mask", default=None,
                   help=f"mask of the fixed image (non-zero inside); used by {_masks_users('fixed')}")
    p.add_argument("--moving-mask", default=None,
                   help=f"mask of the moving image (non-zero inside); used by {_masks_users('moving')}")
    p.add_argument("--stages", default=None,
                   help=f"comma-separated stages to run, e.g. affine,bspline ({_methods_taking('stages')})")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help=f"torch device ({_methods_taking('device')})")
    p.add_argument("--weights", default=None,
                   help=f"embedder weights file, default the shipped weights ({_methods_taking('weights')})")
    p.add_argument("--net-weights", default=None,
                   help=f"registration network weights, default the shipped weights ({_methods_taking('net_weights')})")
    p.add_argument("--nan-value", type=float, default=None, metavar="HU",
                   help="replace NaN/inf voxels of the images by HU (e.g. -1024) instead of refusing them")
    p.set_defaults(func=_cmd_register)


def _masks_users(mask: str) -> str:
    return ", ".join(name for name, spec in METHODS.items() if mask in spec.uses_masks)


# ---------------------------------------------------------------- apply a result
def _cmd_warp(args: argparse.Namespace) -> int:
    from regsam.register.apply import warp_file

    print(f"wrote {warp_file(args.image, args.transform, args.out, args.interpolator, args.reference)}")
    return 0


def _cmd_transform_points(args: argparse.Namespace) -> int:
    from regsam.register.apply import transform_points_file

    print(f"wrote {transform_points_file(args.points, args.transform, args.out, args.reference)}")
    return 0


def _add_apply(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("warp", help="warp a moving-space image onto the fixed grid with a registration result")
    p.add_argument("image", help="image in moving space (CT, labels, mask)")
    p.add_argument("--transform", required=True, help="result folder of 'regsam register', a field file, or a .tfm")
    p.add_argument("--out", required=True, help="output image")
    p.add_argument("--interpolator", choices=["linear", "nearest", "bspline"], default="linear",
                   help="nearest for labels")
    p.add_argument("--reference", default=None, help="fixed image giving the output grid (default: the field's grid)")
    p.set_defaults(func=_cmd_warp)

    p = sub.add_parser("transform-points", help="map fixed-space points into moving space (x + u(x))")
    p.add_argument("points", help="points file: .csv (x,y,z mm), _xyz.txt, elastix .txt/.pts, .mrk.json, .fcsv")
    p.add_argument("--transform", required=True, help="result folder of 'regsam register', a field file, or a .tfm")
    p.add_argument("--out", required=True, help="output points file; format from its extension")
    p.add_argument("--reference", default=None, help="image that voxel-index point files refer to")
    p.set_defaults(func=_cmd_transform_points)


# ---------------------------------------------------------------- bench
def _bench_case_dirs(args: argparse.Namespace) -> list[Path]:
    from regsam.bench.datasets import prepared_cases, sim4dct_cases, thorax4dct_cases
    from regsam.bench.runner import find_case_folders

    if args.cases and args.dataset:
        raise InputError("give either --cases or --dataset, not both")
    if args.cases:
        return find_case_folders(args.cases)
    if args.dataset == "sim4dct":
        return sim4dct_cases(
            landmarks_dir=args.landmarks,
            cases=tuple(int(v) for v in _floats(args.sim_cases, None, "--sim-cases")),
            rigid_offset=_floats(args.rigid_offset, 2, "--rigid-offset") if args.rigid_offset else None,
            source_cts=args.ct,
            progress=lambda t: print(t, file=sys.stderr, flush=True),
        )
    if args.dataset == "thorax4dct":
        return thorax4dct_cases(
            landmarks_dir=args.landmarks, source_cts=args.ct, offsets=True,
            progress=lambda t: print(t, file=sys.stderr, flush=True),
        )
    if args.dataset in ("dirlab4dct", "copdgene"):
        if not args.root:
            raise InputError(f"--dataset {args.dataset} needs --root (the folder of your download)")
        return prepared_cases(args.dataset, args.root, args.out)
    raise InputError("give --cases DIR or --dataset sim4dct|thorax4dct|dirlab4dct|copdgene")


def _cmd_bench(args: argparse.Namespace) -> int:
    from regsam.bench.runner import parse_methods, run_benchmark

    methods = parse_methods(args.methods, task=args.task)
    case_dirs = _bench_case_dirs(args)
    run_benchmark(case_dirs, methods, args.out, task=args.task, timeout_s=args.timeout, use_masks=not args.no_masks,
                  weights=args.weights, net_weights=args.net_weights)
    print(f"report: {Path(args.out) / 'report.html'}")
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run methods on case folders and write TRE reports")
    p.add_argument("--cases", default=None, help="a case folder or a folder of case folders")
    p.add_argument("--dataset", choices=["sim4dct", "thorax4dct", "dirlab4dct", "copdgene"], default=None,
                   help="thorax4dct: full-chest breathing pairs with 15-40 mm motion and sliding lungs "
                        "(held-out LIDC CT)")
    p.add_argument("--root", default=None, help="download folder for --dataset dirlab4dct/copdgene")
    p.add_argument("--landmarks", default=None, help="DIR-Lab landmark folder driving sim4dct motion")
    p.add_argument("--ct", action="append", default=None, metavar="CT",
                   help="build sim4dct/thorax4dct from this CT instead of the default "
                        "(repeatable; e.g. scans the embedder never saw)")
    p.add_argument("--sim-cases", default="1,2,3,4,5", metavar="K,K",
                   help="DIR-Lab cases whose motion drives the sim4dct pairs (default 1,2,3,4,5)")
    p.add_argument("--rigid-offset", default=None, metavar="MM,DEG",
                   help="sim4dct with an extra rigid misalignment (translation length, rotation angle)")
    p.add_argument("--methods", default=",".join(DEFAULT_BENCH_METHODS),
                   help=f"comma-separated METHOD[:PRESET] (default {','.join(DEFAULT_BENCH_METHODS)})")
    p.add_argument("--task", choices=["register", "match"], default="register")
    p.add_argument("--no-masks", action="store_true",
                   help="run every method without the cases' lung masks, as a user without masks would")
    p.add_argument("--weights", default=None,
                   help="embedder weights for the methods that take them and for --task match "
                        "(default: the shipped ones); e.g. to compare your own trained embedder")
    p.add_argument("--net-weights", default=None,
                   help="registration network weights for the methods that take them (sam-net; default: the "
                        "shipped ones); e.g. to compare your own trained network")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per (case, method)")
    p.add_argument("--out", required=True, help="report folder")
    p.set_defaults(func=_cmd_bench)


# ---------------------------------------------------------------- demo
def _cmd_demo(args: argparse.Namespace) -> int:
    from regsam.bench.demo import run_demo

    report = run_demo(Path(args.out), methods=args.methods, seed=args.seed)
    print(f"report: {report}")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="fetch the sample CT, simulate a breathing pair, register it, write a report")
    p.add_argument("--out", default="regsam_demo", help="output folder (default ./regsam_demo)")
    p.add_argument("--methods", default="elastix:lung,sam", help="methods to run (default elastix:lung,sam)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)


# ---------------------------------------------------------------- embedder: train, embed, match
def _cmd_train_embedder(args: argparse.Namespace) -> int:
    import os

    from regsam.embed.commands import train_embedder_command

    path = train_embedder_command(args.config, args.out, resume=args.resume, max_steps=args.max_steps,
                                  device=args.device,
                                  progress=not args.no_progress, init_weights=args.init_weights)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"weights: {path}")
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from regsam.embed.commands import embed_command

    out = embed_command(args.image, args.out, weights=args.weights, device=args.device, spacing_mm=args.spacing)
    print(f"wrote {out}")
    return 0


def _cmd_match(args: argparse.Namespace) -> int:
    from regsam.embed.commands import match_command

    out = match_command(args.template, args.points, args.target, args.out, weights=args.weights,
                        cycle_tolerance_mm=args.cycle_tolerance, adapt_steps=args.adapt_steps, device=args.device,
                        mode=args.mode)
    print(f"wrote {out}")
    return 0


def _add_embed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-embedder", help="train a SAM embedder (also runs under torchrun -m regsam.cli)")
    p.add_argument("--config", required=True, help="YAML config (e.g. regsam/configs/embedder/sam_chest.yaml)")
    p.add_argument("--out", required=True, help="output folder (checkpoints, log.csv, weights.pt)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--max-steps", type=int, default=None, help="override train.max_steps")
    p.add_argument("--init-weights", default=None, metavar="PT",
                   help="start from these weights with a fresh optimiser (e.g. regsam/weights/sam_chest.pt)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train_embedder)

    p = sub.add_parser("embed", help="embed a CT: fine and coarse SAM embeddings with their geometry (.npz)")
    p.add_argument("image", help="3D CT in HU")
    p.add_argument("--out", required=True, help="output .npz file")
    p.add_argument("--weights", default=None, help="embedder weights (default: shipped regsam/weights/sam_chest.pt)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--spacing", type=float, default=None,
                   help="network input spacing in mm (default: the model's, 2 mm)")
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser("match",
                       help="find template points in a target image by embedding similarity; writes x,y,z,score,valid")
    p.add_argument("--template", required=True, help="image the points are given in")
    p.add_argument("--points", required=True,
                   help="points file: .csv (x,y,z mm), _xyz.txt, elastix .txt/.pts, .mrk.json, .fcsv")
    p.add_argument("--target", required=True, help="image to find the points in")
    p.add_argument("--out", required=True, help="output CSV: x,y,z (mm, in the target),score,valid")
    p.add_argument("--weights", default=None, help="embedder weights (default: shipped regsam/weights/sam_chest.pt)")
    p.add_argument("--mode", choices=["consensus", "nearest"], default="consensus",
                   help="consensus (default): read each point off a smooth map fitted to dense embedding matches; "
                        "nearest: per-point coarse-to-fine nearest-neighbour search (SAM's own)")
    p.add_argument("--cycle-tolerance", type=float, default=None, metavar="MM",
                   help="match back into the template; valid=1 only if it returns within MM")
    p.add_argument("--adapt-steps", type=int, default=0, metavar="N",
                   help="test-time adaptation: fine-tune the embedder on the two images for N steps first (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.set_defaults(func=_cmd_match)


# ---------------------------------------------------------------- registration network: train
def _cmd_train_deformable(args: argparse.Namespace) -> int:
    from regsam.register.net.train import run_command, run_rank

    path = run_command(args)
    if run_rank() == 0:
        print(f"weights: {path}")
    return 0


def _add_train_deformable(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-deformable",
                       help="train the embedding-guided registration network of --method sam-net (torchrun-aware)")
    p.add_argument("--config", required=True, help="YAML config (e.g. configs/deformable/sam_net_chest.yaml)")
    p.add_argument("--out", required=True, help="output folder (checkpoint.pt, log.csv, weights.pt)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--init-weights", default=None, metavar="PT",
                   help="start from these network weights with a fresh optimiser (override train.init_weights)")
    p.add_argument("--max-steps", type=int, default=None, help="override train.max_steps")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train_deformable)


# ---------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regsam", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"regsam {__import__('regsam').__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data(sub)
    _add_register(sub)
    _add_apply(sub)
    _add_bench(sub)
    _add_embed(sub)
    _add_train_deformable(sub)
    _add_demo(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"regsam: error: {exc}", file=sys.stderr)
        return 2
    except MethodFailure as exc:
        print(f"regsam: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
