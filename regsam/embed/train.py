"""Train an embedder: ``train_embedder(config, out_dir)`` or ``python -m regsam.embed.train``.

The objective is SAM, ACE, Adam or a weighted combination (``objective.name: [sam, ace]``; see
:mod:`regsam.embed.objectives`). ``data`` lists the training scans, ``holdout`` the scans kept for evaluation:
training refuses a held-out scan (same path, file name or content; :func:`check_holdout`).

Single process, or data-parallel under ``torchrun --nproc_per_node=N -m regsam.embed.train ...``
(detected through ``RANK``/``WORLD_SIZE``; gloo on CPU, nccl on CUDA; every rank draws its own views,
only rank 0 writes). Output folder::

    config.yaml      the full configuration (defaults filled in; data entries as written)
    log.csv          step, loss, <2 objective components>, lr, seconds, <other components> (SAM: fine, coarse)
    checkpoint.pt    latest checkpoint (model, optimizer, every rank's random state), written atomically
    weights.pt       final weights (:func:`regsam.embed.model.save_weights`)

``resume=True`` continues from ``checkpoint.pt`` with the same random state, so an interrupted run
ends with the same weights as an uninterrupted one (same world size and thread count).
"""

from __future__ import annotations

import argparse
import copy
import csv
import glob
import hashlib
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from regsam.data.fetch import fetch_sample_ct
from regsam.embed.crops import CropConfig, Scan, TwoViewSampler, load_scan
from regsam.devices import resolve_device
from regsam.distributed import DistInfo, barrier, gather, init_distributed, shutdown
from regsam.embed.model import SAMEmbedder, load_embedder, save_weights
from regsam.embed.objectives import build_objective, objective_config
from regsam.embed.objectives.base import GroupForward
from regsam.embed.objectives.sam import SAMLossConfig
from regsam.errors import InputError
from regsam.io.atomic import atomic_path

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")
SAMPLE_CT = "sample-ct"


@dataclass
class TrainConfig:
    """Optimisation constants (defaults: the public SAM implementation's values)."""

    #: view pairs per process and step (SAM: 3 per GPU)
    batch_size: int = 3
    #: SAM: 20000 iterations
    max_steps: int = 20000
    #: "sgd" (SAM) or "adamw"
    optimizer: str = "sgd"
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    #: linear warm-up from lr * warmup_ratio (SAM: 500 iterations, ratio 0.001)
    warmup_steps: int = 500
    warmup_ratio: float = 0.001
    #: after warm-up: "constant" (SAM) or "cosine" (to 0 at max_steps)
    lr_schedule: str = "constant"
    #: SAM: every 1000 iterations
    checkpoint_every: int = 1000
    #: clip the gradient norm (SAM: none)
    grad_clip: float | None = None
    #: torch intra-op threads per process (None: leave torch's default)
    num_threads: int | None = None
    #: start from these weights (a :func:`regsam.embed.model.save_weights` file, e.g. the shipped ones) with a
    #: fresh optimiser and schedule; relative paths are tried like ``data`` entries. None: random init.
    init_weights: str | None = None


DEFAULT_MODEL = {
    "channels": [16, 32, 64, 128],
    "fine_dim": 128,
    "coarse_dim": 128,
    "coarse_head_channels": 64,
    "fine_head_channels": 32,
    "context_dilation": 2,
    "min_input_size": 32,
}


def default_config() -> dict:
    """The full default configuration (SAM's constants; see ``regsam/configs/embedder/sam_chest.yaml``)."""
    crops = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(CropConfig()).items()}
    objective = {"name": "sam", **{k: v for k, v in asdict(SAMLossConfig()).items() if k != "seed"}}
    return {
        "seed": 0,
        "data": [],
        "holdout": [],
        "model": dict(DEFAULT_MODEL),
        "crops": crops,
        "objective": objective,
        "train": asdict(TrainConfig()),
    }


def merge_config(base: dict, override: dict, where: str = "") -> dict:
    """``override`` merged into a copy of ``base``, mapping by mapping; InputError on a key ``base`` lacks.

    ``where`` prefixes key names in the messages (``"train."``); an ``objective`` mapping is taken whole.
    """
    out = copy.deepcopy(base)
    for key, value in override.items():
        if key not in base:
            known = ", ".join(sorted(base))
            raise InputError(f"config: unknown key '{where}{key}' (known: {known})")
        if isinstance(base[key], dict) and key != "objective":
            if not isinstance(value, dict):
                raise InputError(f"config: '{where}{key}' must be a mapping")
            out[key] = merge_config(base[key], value, f"{where}{key}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(config: str | os.PathLike | dict) -> tuple[dict, list[Path]]:
    """Read a YAML file (or take a dict) and merge it over :func:`default_config`.

    Returns:
        ``(config, base_dirs)``: relative data paths are looked up in ``base_dirs`` in order (the config
        file's folder, then the current directory).

    Raises:
        InputError: missing/invalid YAML or unknown keys.
    """
    if isinstance(config, dict):
        raw, bases = config, [Path.cwd()]
    else:
        path = Path(config)
        if not path.is_file():
            raise InputError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise InputError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise InputError(f"{path}: the top level must be a mapping")
        bases = [path.resolve().parent, Path.cwd()]
    raw = dict(raw)
    objective = raw.get("objective", {}) or {}
    if not isinstance(objective, dict):
        raise InputError("config: 'objective' must be a mapping")
    merged = merge_config(default_config(), {k: v for k, v in raw.items() if k != "objective"})
    merged["objective"] = objective_config(objective)
    return merged, bases


def _load_init_weights(model: torch.nn.Module, path: str) -> None:
    """Copy the weights of ``path`` into ``model`` (same architecture), or raise InputError."""
    source = load_embedder(path, device="cpu")
    try:
        model.load_state_dict(source.state_dict())
    except RuntimeError as exc:
        raise InputError(f"train.init_weights {path}: does not fit the configured model ({str(exc).splitlines()[0][:160]})") from None


def resolve_data(entries: Sequence[str], bases: Sequence[Path], suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[str]:
    """Expand ``data`` entries (files, folders, globs, or ``sample-ct``) into image paths (or ``sample-ct``).

    Relative entries are tried against each of ``bases`` in order; the first that matches wins.

    Raises:
        InputError: an entry matches nothing, or the list is empty.
    """
    if isinstance(entries, (str, os.PathLike)):
        entries = [str(entries)]
    out: list[str] = []
    for entry in entries:
        entry = str(entry)
        if entry == SAMPLE_CT:
            out.append(SAMPLE_CT)
            continue
        candidates = [Path(entry).expanduser()] if Path(entry).expanduser().is_absolute() else [b / entry for b in bases]
        found: list[str] = []
        for cand in candidates:
            if any(ch in entry for ch in "*?["):
                found = sorted(p for p in glob.glob(str(cand), recursive=True) if str(p).endswith(suffixes))
            elif cand.is_dir():
                found = sorted(str(p) for p in cand.iterdir() if p.name.endswith(suffixes))
            elif cand.is_file():
                found = [str(cand)]
            if found:
                break
        if not found:
            tried = ", ".join(str(c) for c in candidates)
            raise InputError(f"data entry '{entry}' matches no image (tried {tried})")
        out.extend(str(Path(f).resolve()) for f in found)
    if not out:
        raise InputError("config: 'data' lists no training images")
    return out


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_holdout(data_files: Sequence[str], holdout: Sequence[str], bases: Sequence[Path]) -> None:
    """Refuse training on held-out scans.

    A training file is refused when it is a ``holdout`` entry (same path, relative entries tried against
    ``bases`` like ``data`` entries; globs allowed), has the same file name as one, or the same content as an
    existing held-out file (a renamed copy). Held-out entries that exist nowhere are compared by name only.

    Raises:
        InputError: naming the training file, the holdout entry and what to do.
    """
    held: dict[str, str] = {}  # resolved path or file name -> entry
    for entry in holdout or []:
        entry = str(entry)
        held[Path(entry).name] = entry
        try:
            for path in resolve_data([entry], bases):
                held[path] = held[Path(path).name] = entry
        except InputError:
            continue
    sizes = {os.path.getsize(p): p for p in held if os.path.isabs(p) and os.path.isfile(p)}
    digests: dict[str, str] = {}
    for path in data_files:
        entry = held.get(path) or held.get(Path(path).name)
        if entry is None and path != SAMPLE_CT and os.path.getsize(path) in sizes:
            twin = sizes[os.path.getsize(path)]
            digests.setdefault(twin, _sha256(twin))
            entry = held[twin] if _sha256(path) == digests[twin] else None
        if entry is not None:
            raise InputError(f"training data includes the held-out scan {path} (holdout entry '{entry}'); "
                             "remove it from 'data' (held-out scans are for evaluation only)")


def load_scans(paths: Sequence[str], crops: CropConfig) -> list[Scan]:
    """Load every training image once (see :func:`regsam.embed.crops.load_scan`)."""
    scans = []
    for path in paths:
        if path == SAMPLE_CT:
            path = str(fetch_sample_ct()["ct"])
        scans.append(
            load_scan(path, spacing_mm=crops.scan_spacing_mm, hu_window=crops.hu_window, foreground_hu=crops.foreground_hu)
        )
    return scans


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Learning rate for (0-based) ``step``: linear warm-up, then constant or cosine."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        frac = step / cfg.warmup_steps
        return cfg.lr * (cfg.warmup_ratio + (1.0 - cfg.warmup_ratio) * frac)
    if cfg.lr_schedule == "cosine":
        span = max(cfg.max_steps - cfg.warmup_steps, 1)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(step - cfg.warmup_steps, span) / span))
    return cfg.lr


def build_optimizer(params: Sequence[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` names (``sgd`` with momentum, or ``adamw``) over ``params``."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise InputError(f"train.optimizer must be 'sgd' or 'adamw', got '{cfg.optimizer}'")


def train_step(
    net: torch.nn.Module,
    objective,
    sampler: TwoViewSampler,
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.nn.Parameter],
    step: int,
    cfg: TrainConfig,
) -> tuple[dict, float]:
    """One optimisation step (0-based ``step``): set the learning rate, draw a batch of view pairs, back-propagate
    the objective, clip (``cfg.grad_clip``) and step. Used by :func:`train_embedder` and by test-time adaptation
    (:func:`regsam.embed.adapt.adapt_embedder`). Returns ``(objective result, learning rate)``."""
    lr = learning_rate(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    batch = sampler.sample(cfg.batch_size)
    result = objective(net, batch)
    optimizer.zero_grad(set_to_none=True)
    result["loss"].backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()
    return result, lr


# ---------------------------------------------------------------- main loop
def _rng_state(sampler: TwoViewSampler, objective) -> dict:
    return {"sampler": sampler.state_dict(), "objective": objective.state_dict(), "torch": torch.get_rng_state()}


def _save_checkpoint(path: Path, step: int, model, optimizer, rng_states: list, seconds: float, config: dict) -> None:
    net = model.module if hasattr(model, "module") else model
    net = net.model if isinstance(net, GroupForward) else net
    payload = {
        "step": step,
        "model_config": dict(net.config),
        "state_dict": net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng_states,
        "seconds": seconds,
        "config": config,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def write_log_header(path: Path, columns: list[str], keep_until: int | None) -> None:
    """Start log.csv, or (on resume) keep only rows up to step ``keep_until``."""
    rows: list[list[str]] = []
    if keep_until is not None and path.is_file():
        with open(path, newline="") as fh:
            reader = csv.reader(fh)
            next(reader, None)
            rows = [r for r in reader if r and int(r[0]) <= keep_until]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(columns)
            writer.writerows(rows)


@dataclass
class _Run:
    """Everything a training run is set up from (see :func:`_prepare`)."""

    cfg: dict
    bases: list[Path]
    train: TrainConfig
    crops: CropConfig
    data_files: list[str]
    device: torch.device
    dist: DistInfo
    out: Path
    checkpoint: dict | None = None
    extra: dict = field(default_factory=dict)

    @property
    def ckpt_path(self) -> Path:
        return self.out / "checkpoint.pt"

    @property
    def log_path(self) -> Path:
        return self.out / "log.csv"


#: keys a resumed run may change: a longer (or shorter) run of the same recipe
RESUMABLE_CHANGES = ("train.max_steps",)


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out |= _flat(value, name + ".") if isinstance(value, dict) else {name: value}
    return out


def check_resumed_config(saved: dict | None, cfg: dict, out: Path) -> None:
    """Refuse a resume whose configuration differs from the checkpoint's ``saved`` one (mixing two recipes in one
    run; for the registration network a new ``init_weights`` would also change its SAM input basis); only
    :data:`RESUMABLE_CHANGES` may differ, and a longer cosine schedule is announced on stderr."""
    if saved is None:  # checkpoints written before the configuration was stored in them
        return
    old, new = _flat(saved), _flat(cfg)
    changed = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES]
    if changed:
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:3])
        raise InputError(f"--resume: the configuration differs from {out / 'checkpoint.pt'}'s in {len(changed)} key(s) "
                         f"({shown}); resume with the run's own config and overrides ({out / 'config.yaml'})")
    if old.get("train.max_steps") != new.get("train.max_steps") and new.get("train.lr_schedule") == "cosine":
        print(f"regsam: resuming with train.max_steps {old.get('train.max_steps')} -> {new.get('train.max_steps')}: "
              "the cosine learning-rate schedule is stretched from here on", file=sys.stderr)


def _prepare(config, out_dir, resume: bool, device, max_steps, init_weights) -> _Run:
    """Read and check the configuration, the data, the device / process group and any checkpoint."""
    cfg, bases = load_config(config)
    if max_steps is not None:
        cfg["train"]["max_steps"] = int(max_steps)
    if init_weights is not None:
        cfg["train"]["init_weights"] = str(init_weights)
    train_cfg = TrainConfig(**cfg["train"])
    if train_cfg.optimizer not in ("sgd", "adamw"):
        raise InputError(f"train.optimizer must be 'sgd' or 'adamw', got '{train_cfg.optimizer}'")
    if train_cfg.lr_schedule not in ("constant", "cosine"):
        raise InputError(f"train.lr_schedule must be 'constant' or 'cosine', got '{train_cfg.lr_schedule}'")
    crops = CropConfig.from_dict(cfg["crops"])
    # cfg keeps the entries as written (no machine-specific paths end up in the outputs)
    data_files = resolve_data(cfg["data"], bases)
    check_holdout(data_files, cfg["holdout"], bases)

    dev = resolve_device(device)
    info = init_distributed(dev)
    if info.active and dev.type == "cuda":
        dev = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(dev)
    if train_cfg.num_threads:
        torch.set_num_threads(int(train_cfg.num_threads))

    run = _Run(cfg, bases, train_cfg, crops, data_files, dev, info, Path(out_dir))
    if run.ckpt_path.is_file():
        if not resume:
            raise InputError(f"{run.out} already holds a checkpoint; pass resume=True (--resume) or choose another folder")
        run.checkpoint = torch.load(run.ckpt_path, map_location="cpu", weights_only=False)
        check_resumed_config(run.checkpoint.get("config"), cfg, run.out)
    return run


def _build(run: _Run):
    """Model, objective, sampler and optimizer, restored from the checkpoint when there is one.

    Returns ``(model, objective, sampler, optimizer, params, start_step, seconds)``.
    """
    seed, rank, info = int(run.cfg["seed"]), run.dist.rank, run.dist
    torch.manual_seed(seed + 1000 * rank)
    model = SAMEmbedder(**run.cfg["model"]).to(run.device)
    objective = build_objective(run.cfg["objective"], seed + 7919 + 1000 * rank)
    grids = objective.part_grids(tuple(run.crops.size)) if hasattr(objective, "part_grids") else []
    scans = load_scans(run.data_files, run.crops)
    sampler = TwoViewSampler(scans, run.crops, seed=seed + 104729 + 1000 * rank, part_grids=tuple(grids))

    if run.train.init_weights and run.checkpoint is None:
        _load_init_weights(model, resolve_data([run.train.init_weights], run.bases, suffixes=(".pt",))[0])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, run.train)

    start, seconds = 0, 0.0
    checkpoint = run.checkpoint
    if checkpoint is not None:
        model.load_state_dict(checkpoint["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start, seconds = int(checkpoint["step"]), float(checkpoint["seconds"])
        states = checkpoint["rng"]
        if len(states) == info.world:
            mine = states[rank]
            sampler.load_state_dict(mine["sampler"])
            objective.load_state_dict(mine["objective"])
            torch.set_rng_state(mine["torch"])
        else:  # a different world size cannot replay the same streams; continue with fresh, step-dependent seeds
            sampler = TwoViewSampler(scans, run.crops, seed=seed + 104729 + 1000 * rank + start, part_grids=tuple(grids))
            objective.reseed(seed + 7919 + 1000 * rank + start)
            torch.manual_seed(seed + 1000 * rank + start)
    return model, objective, sampler, optimizer, params, start, seconds


def _wrap(model: torch.nn.Module, run: _Run) -> torch.nn.Module:
    """The module the objective calls: the model, or DDP around a :class:`GroupForward` of it (one DDP forward
    per step however many input groups the objective embeds)."""
    if not run.dist.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(GroupForward(model), device_ids=[run.device.index] if run.device.type == "cuda" else None)


def _objective_label(run: _Run) -> str:
    name = run.cfg["objective"]["name"]
    return "+".join(name) if isinstance(name, list) else str(name)


def _log_row(done: int, result: dict, lr: float, seconds: float, components: Sequence[str]) -> list[str]:
    row = [str(done), f"{float(result['loss'].detach()):.6f}"]
    row += [f"{float(result[c]):.6f}" for c in components[:2]]
    row += [f"{lr:.6g}", f"{seconds:.2f}"]
    row += [f"{float(result[c]):.6f}" for c in components[2:]]
    return row


def _loop(run: _Run, model, net, objective, sampler, optimizer, params, start: int, seconds: float) -> float:
    """Steps ``start`` .. ``max_steps``: log every step (rank 0), checkpoint every ``checkpoint_every``.
    Returns the seconds spent in training steps (over all sessions)."""
    info, train_cfg = run.dist, run.train
    bar = None
    if run.extra.get("progress") and info.rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=train_cfg.max_steps, initial=start, desc=_objective_label(run), unit="step", mininterval=5.0, dynamic_ncols=True)
    model.train()
    log_fh = open(run.log_path, "a", newline="") if info.rank == 0 else None
    try:
        writer = csv.writer(log_fh) if log_fh else None
        for step in range(start, train_cfg.max_steps):
            t0 = time.perf_counter()
            result, lr = train_step(net, objective, sampler, optimizer, params, step, train_cfg)
            seconds += time.perf_counter() - t0
            done = step + 1
            if writer is not None:
                writer.writerow(_log_row(done, result, lr, seconds, objective.components))
                log_fh.flush()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(result['loss'].detach()):.3f}", refresh=False)
            if done % train_cfg.checkpoint_every == 0 or done == train_cfg.max_steps:
                states = gather(_rng_state(sampler, objective), info)
                if info.rank == 0:
                    _save_checkpoint(run.ckpt_path, done, net, optimizer, states, seconds, run.cfg)
    finally:
        if log_fh:
            log_fh.close()
        if bar is not None:
            bar.close()
    return seconds


def train_embedder(
    config: str | os.PathLike | dict,
    out_dir: str | os.PathLike,
    resume: bool = False,
    device: str | torch.device | None = None,
    max_steps: int | None = None,
    progress: bool = True,
    init_weights: str | os.PathLike | None = None,
) -> Path:
    """Train a :class:`SAMEmbedder` and return the path of the final weights (``out_dir/weights.pt``).

    Args:
        config: YAML path or dict (see ``regsam/configs/embedder/sam_chest.yaml``); unspecified keys take
            SAM's values (:func:`default_config`).
        out_dir: output folder (created); see the module docstring for its content.
        resume: continue from ``out_dir/checkpoint.pt`` (starts fresh when there is none).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA when available. Under torchrun on CUDA
            each rank uses ``cuda:LOCAL_RANK``.
        max_steps: override ``train.max_steps``.
        progress: show a tqdm progress bar (rank 0).
        init_weights: override ``train.init_weights`` (continue training earlier weights with a new schedule;
            ignored on ``resume`` from a checkpoint, which holds its own state).

    Raises:
        InputError: bad config or data (held-out scans included), or ``out_dir`` already holds a checkpoint and
            ``resume`` is False.
    """
    run = _prepare(config, out_dir, resume, device, max_steps, init_weights)
    run.extra["progress"] = progress
    model, objective, sampler, optimizer, params, start, seconds = _build(run)
    net = _wrap(model, run)

    columns = ["step", "loss", *objective.components[:2], "lr", "seconds", *objective.components[2:]]
    if run.dist.rank == 0:
        run.out.mkdir(parents=True, exist_ok=True)
        with atomic_path(run.out / "config.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(run.cfg, sort_keys=False))
        write_log_header(run.log_path, columns, keep_until=start if run.checkpoint is not None else None)

    seconds = _loop(run, model, net, objective, sampler, optimizer, params, start, seconds)
    weights = run.out / "weights.pt"
    if run.dist.rank == 0:
        model.eval()
        extra = {"steps": run.train.max_steps, "train_seconds": seconds, "data_files": [Path(f).name for f in run.data_files]}
        save_weights(model, weights, run.cfg, extra=extra)
    barrier(run.dist)
    return weights


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m regsam.embed.train --config C --out DIR [--resume] [--max-steps N] [--device D]``."""
    parser = argparse.ArgumentParser(prog="python -m regsam.embed.train", description="Train an embedder (SAM, ACE, Adam or a weighted combination).")
    parser.add_argument("--config", required=True, help="YAML config (e.g. regsam/configs/embedder/sam_chest.yaml)")
    parser.add_argument("--out", required=True, help="output folder (checkpoints, log.csv, weights.pt)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--max-steps", type=int, default=None, help="override train.max_steps")
    parser.add_argument("--init-weights", default=None, help="start from these weights (override train.init_weights)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        path = train_embedder(
            args.config, args.out, resume=args.resume, device=args.device, max_steps=args.max_steps, progress=not args.no_progress, init_weights=args.init_weights
        )
    except InputError as exc:
        print(f"regsam: error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"weights: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
