"""Train the registration network: ``train_deformable(config, out_dir)``, ``python -m regsam.register.net.train``
or ``regsam train-deformable``.

Configuration (``regsam/configs/deformable/sam_net_chest.yaml``): ``seed``, ``data`` and ``holdout`` (as the
embedder's: files, folders, globs or ``sample-ct``; held-out scans are refused, see
:func:`regsam.embed.train.check_holdout`), ``model`` (:class:`~regsam.register.net.model.NetConfig`),
``pairs`` (:class:`~regsam.register.net.pairs.PairSettings`), ``loss``
(:class:`~regsam.register.net.loss.LossConfig`), ``embedder`` (frozen SAM weights for the pairs' embeddings;
null = the shipped ones) and ``train`` (:class:`NetTrainConfig`). Unknown keys are refused (one line).

Single process, or data-parallel under ``torchrun --nproc_per_node=N -m regsam.register.net.train ...``
(:mod:`regsam.distributed`: gloo on CPU, nccl on CUDA; every rank simulates its own pairs, rank 0 writes).
Output folder::

    config.yaml      the full configuration (defaults filled in)
    log.csv          step, loss, image, embed, reg, lr, seconds
    checkpoint.pt    latest checkpoint (network, optimizer, every rank's random state), written atomically
    weights.pt       final weights (:func:`regsam.register.net.model.save_network`; network + training config)

``resume=True`` continues from ``checkpoint.pt``: same step, same weights and log as an uninterrupted run
(same world size and thread count).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

from regsam.devices import resolve_device
from regsam.distributed import DistInfo, barrier, gather, init_distributed, shutdown
from regsam.embed.model import load_embedder
from regsam.embed.train import (
    build_optimizer,
    check_holdout,
    check_resumed_config,
    learning_rate,
    merge_config,
    resolve_data,
    write_log_header,
)
from regsam.errors import InputError
from regsam.io.atomic import atomic_path
from regsam.register.net.loss import COMPONENTS, LossConfig, RegistrationLoss
from regsam.register.net.model import (
    NetConfig,
    build_network,
    load_network,
    network_inputs,
    predict_residual,
    save_network,
)
from regsam.register.net.pairs import PairPool, PairSettings, input_feature_basis, landmark_files, load_scans


@dataclass
class NetTrainConfig:
    """Optimisation constants (the ``train`` section)."""

    #: crops per process and step
    batch_size: int = 1
    max_steps: int = 3000
    #: "adamw" or "sgd"
    optimizer: str = "adamw"
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 0.0
    #: linear warm-up from lr * warmup_ratio, then constant or cosine
    warmup_steps: int = 50
    warmup_ratio: float = 0.01
    lr_schedule: str = "cosine"
    checkpoint_every: int = 25
    grad_clip: float | None = 10.0
    #: torch intra-op threads per process (None: torch's default)
    num_threads: int | None = None
    #: start from these network weights (a weights.pt) with a fresh optimiser; ignored on resume
    init_weights: str | None = None


def default_config() -> dict:
    """The full default configuration (see ``regsam/configs/deformable/sam_net_chest.yaml``)."""
    return {
        "seed": 0,
        "data": [],
        "holdout": [],
        "embedder": None,
        "model": NetConfig().to_dict(),
        "pairs": PairSettings().to_dict(),
        "loss": LossConfig().to_dict(),
        "train": asdict(NetTrainConfig()),
    }


def load_config(config: str | os.PathLike | dict) -> tuple[dict, list[Path]]:
    """Read a YAML file (or take a dict) and merge it over :func:`default_config`.

    Returns ``(config, base_dirs)`` (relative paths are tried against the config's folder, then the cwd).

    Raises:
        InputError: missing/invalid YAML, unknown keys or bad values.
    """
    if isinstance(config, dict):
        raw, bases = dict(config), [Path.cwd()]
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
    merged = merge_config(default_config(), raw)
    try:  # construct every section once so bad values fail here, before any work
        net = NetConfig.from_dict(merged["model"])
        pairs = PairSettings.from_dict(merged["pairs"])
        LossConfig(**merged["loss"])
        NetTrainConfig(**merged["train"])
    except TypeError as exc:
        raise InputError(f"config: {exc}") from None
    if net.feature_channels > pairs.embed_components:
        raise InputError("model.feature_channels must be <= pairs.embed_components")
    return merged, bases


@dataclass
class _Run:
    cfg: dict
    bases: list[Path]
    net_cfg: NetConfig
    pairs: PairSettings
    loss: LossConfig
    train: NetTrainConfig
    data_files: list[str]
    device: torch.device
    dist: DistInfo
    out: Path
    progress: bool
    checkpoint: dict | None = None

    @property
    def ckpt_path(self) -> Path:
        return self.out / "checkpoint.pt"

    @property
    def log_path(self) -> Path:
        return self.out / "log.csv"

    @property
    def needs_embeddings(self) -> bool:
        return self.loss.weight_embed > 0 or self.net_cfg.feature_channels > 0


def _resolve_one(entry: str, bases: list[Path], what: str, suffixes: tuple[str, ...] = (".pt",)) -> str:
    try:
        return resolve_data([entry], bases, suffixes=suffixes)[0]
    except InputError:
        raise InputError(f"{what}: file not found: {entry}") from None


def _prepare(config, out_dir, resume: bool, device, max_steps, init_weights, progress: bool) -> _Run:
    """Read and check the configuration, the data, the device / process group and any checkpoint."""
    cfg, bases = load_config(config)
    if max_steps is not None:
        cfg["train"]["max_steps"] = int(max_steps)
    if init_weights is not None:
        cfg["train"]["init_weights"] = str(init_weights)
    train_cfg = NetTrainConfig(**cfg["train"])
    if train_cfg.lr_schedule not in ("constant", "cosine"):
        raise InputError(f"train.lr_schedule must be 'constant' or 'cosine', got '{train_cfg.lr_schedule}'")
    data_files = resolve_data(cfg["data"], bases)
    check_holdout(data_files, cfg["holdout"], bases)
    dev = resolve_device(device)
    info = init_distributed(dev)
    if info.active and dev.type == "cuda":
        dev = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(dev)
    if train_cfg.num_threads:
        torch.set_num_threads(int(train_cfg.num_threads))
    run = _Run(cfg, bases, NetConfig.from_dict(cfg["model"]), PairSettings.from_dict(cfg["pairs"]),
               LossConfig(**cfg["loss"]), train_cfg, data_files, dev, info, Path(out_dir), progress)
    if run.ckpt_path.is_file():
        if not resume:
            raise InputError(f"{run.out} already holds a checkpoint; pass resume=True (--resume) or choose another "
                             "folder")
        run.checkpoint = torch.load(run.ckpt_path, map_location="cpu", weights_only=False)
        check_resumed_config(run.checkpoint.get("config"), cfg, run.out)
    return run


def _landmark_folder(run: _Run) -> Path:
    for base in ([Path()] if Path(run.pairs.landmarks).is_absolute() else run.bases):
        candidate = base / run.pairs.landmarks
        if candidate.is_dir():
            return candidate
    raise InputError(f"pairs.landmarks: DIR-Lab landmark folder not found: {run.pairs.landmarks}")


def _build(run: _Run):
    """Network, loss, pair pool and optimizer, restored from the checkpoint when there is one.

    Returns ``(net, loss, pool, optimizer, start_step, seconds)``; ``pool.input_basis`` is the network's fixed
    SAM input basis (``feature_channels > 0``), derived from the first training scan.
    """
    seed, rank = int(run.cfg["seed"]), run.dist.rank
    torch.manual_seed(seed + 1000 * rank)
    net = build_network(run.net_cfg).to(run.device)
    loss = RegistrationLoss(run.loss).to(run.device)
    needs_landmarks = run.pairs.parametric_share < 1.0 and run.pairs.dirlab_cases
    landmarks = landmark_files(_landmark_folder(run), run.pairs.dirlab_cases) if needs_landmarks else {}
    embedder = None
    if run.needs_embeddings:
        weights = _resolve_one(run.cfg["embedder"], run.bases, "embedder") if run.cfg["embedder"] else None
        embedder = load_embedder(weights, device=run.device)
    scans, skipped = load_scans(run.data_files, run.pairs.scan_spacing_mm)
    if skipped and rank == 0:
        print(f"regsam: no lungs to simulate breathing in, left out: {', '.join(skipped)}", file=sys.stderr)
    source = None
    if run.train.init_weights:  # also on --resume: its feature basis stays the run's
        source = load_network(_resolve_one(run.train.init_weights, run.bases, "train.init_weights"))
        if source.config != run.net_cfg:
            raise InputError(f"train.init_weights {run.train.init_weights}: its network differs from the model section")
        if run.checkpoint is None:
            net.load_state_dict(source.net.state_dict())
    basis = None
    if source is not None and source.feature_basis is not None:
        basis = source.feature_basis  # the weights were trained on this basis: keep it, whatever this run's seed
    elif run.net_cfg.feature_channels and embedder is not None:
        basis = input_feature_basis(scans[0], embedder, run.net_cfg.feature_channels, seed, run.device)
    pool = PairPool(scans, run.pairs, run.net_cfg, landmarks, seed + 1000 * rank, embedder, run.device, basis)
    source_embedder = None if source is None else source.training.get("embedder_fingerprint")
    if source_embedder and pool.embedder_fingerprint and source_embedder != pool.embedder_fingerprint:
        raise InputError(f"train.init_weights {run.train.init_weights} was trained on embedder {source_embedder}, "
                         f"the config's embedder is {pool.embedder_fingerprint}: its input basis would not fit")
    optimizer = build_optimizer(list(net.parameters()), run.train)  # type: ignore[arg-type]
    start, seconds = 0, 0.0
    if run.checkpoint is not None:
        net.load_state_dict(run.checkpoint["state_dict"])
        optimizer.load_state_dict(run.checkpoint["optimizer"])
        start, seconds = int(run.checkpoint["step"]), float(run.checkpoint["seconds"])
        states = run.checkpoint["rng"]
        if len(states) == run.dist.world:
            pool.load_state_dict(states[rank]["pool"])
            torch.set_rng_state(states[rank]["torch"])
        else:  # another world size cannot replay the same streams: fresh, step-dependent seeds
            pool = PairPool(scans, run.pairs, run.net_cfg, landmarks, seed + 1000 * rank + start, embedder,
                            run.device, basis)
            torch.manual_seed(seed + 1000 * rank + start)
    return net, loss, pool, optimizer, start, seconds


def _inputs(batch: dict[str, torch.Tensor], net_cfg: NetConfig, device: torch.device):
    """The batch on ``device`` and its (fixed, moving) network inputs (:func:`network_inputs`)."""
    batch = {k: v.to(device) for k, v in batch.items()}
    fixed, moving = network_inputs(batch["fixed"], batch["moving"], batch.get("fixed_inputs"),
                                   batch.get("moving_inputs"), net_cfg)
    return batch, fixed, moving


def train_step(run: _Run, model, loss_fn, pool: PairPool, optimizer, step: int) -> tuple[dict, float]:
    """One optimisation step (0-based ``step``): learning rate, a batch of crops, forward, backward, clip, step."""
    lr = learning_rate(step, run.train)  # type: ignore[arg-type]
    for group in optimizer.param_groups:
        group["lr"] = lr
    batch, fixed, moving = _inputs(pool.batch(step, run.train.batch_size), run.net_cfg, run.device)
    displacement = predict_residual(model, fixed, moving)
    result = loss_fn(batch, displacement, run.loss.embed_weight(step, run.train.max_steps))
    optimizer.zero_grad(set_to_none=True)
    result["loss"].backward()
    if run.train.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), run.train.grad_clip)
    optimizer.step()
    return result, lr


def _save_checkpoint(run: _Run, step: int, net, optimizer, rng_states: list, seconds: float) -> None:
    payload = {"step": step, "net_config": run.net_cfg.to_dict(), "state_dict": net.state_dict(),
               "optimizer": optimizer.state_dict(), "rng": rng_states, "seconds": seconds, "config": run.cfg}
    with atomic_path(run.ckpt_path) as tmp:
        torch.save(payload, tmp)


def _loop(run: _Run, net, model, loss_fn, pool: PairPool, optimizer, start: int, seconds: float) -> float:
    """Steps ``start`` .. ``max_steps``: log every step (rank 0), checkpoint every ``checkpoint_every``."""
    bar = None
    if run.progress and run.dist.rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=run.train.max_steps, initial=start, desc="sam-net", unit="step", mininterval=5.0,
                   dynamic_ncols=True)
    model.train()
    log_fh = open(run.log_path, "a", newline="") if run.dist.rank == 0 else None
    try:
        writer = csv.writer(log_fh) if log_fh else None
        for step in range(start, run.train.max_steps):
            t0 = time.perf_counter()
            result, lr = train_step(run, model, loss_fn, pool, optimizer, step)
            seconds += time.perf_counter() - t0
            done = step + 1
            if writer is not None and log_fh is not None:
                writer.writerow([done, f"{float(result['loss'].detach()):.6f}",
                                 *(f"{float(result[c]):.6f}" for c in COMPONENTS), f"{lr:.6g}", f"{seconds:.2f}"])
                log_fh.flush()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(result['loss'].detach()):.3f}", refresh=False)
            if done % run.train.checkpoint_every == 0 or done == run.train.max_steps:
                states = gather({"pool": pool.state_dict(), "torch": torch.get_rng_state()}, run.dist)
                if run.dist.rank == 0:
                    _save_checkpoint(run, done, net, optimizer, states, seconds)
    finally:
        if log_fh:
            log_fh.close()
        if bar is not None:
            bar.close()
    return seconds


def train_deformable(
    config: str | os.PathLike | dict,
    out_dir: str | os.PathLike,
    resume: bool = False,
    device: str | torch.device | None = None,
    max_steps: int | None = None,
    progress: bool = True,
    init_weights: str | os.PathLike | None = None,
) -> Path:
    """Train the registration network and return the path of the final weights (``out_dir/weights.pt``).

    Args:
        config: YAML path or dict (see the module docstring); unspecified keys take :func:`default_config`.
        out_dir: output folder (created).
        resume: continue from ``out_dir/checkpoint.pt``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA when available (``cuda:LOCAL_RANK`` under
            torchrun).
        max_steps: override ``train.max_steps``.
        progress: tqdm progress bar (rank 0).
        init_weights: override ``train.init_weights`` (on resume only its feature basis is used, as at the start).

    Raises:
        InputError: bad config or data (held-out scans included), or ``out_dir`` holds a checkpoint and not
            ``resume``.
    """
    run = _prepare(config, out_dir, resume, device, max_steps, init_weights, progress)
    net, loss_fn, pool, optimizer, start, seconds = _build(run)
    model = net
    if run.dist.active:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    if run.dist.rank == 0:
        run.out.mkdir(parents=True, exist_ok=True)
        with atomic_path(run.out / "config.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(run.cfg, sort_keys=False))
        write_log_header(run.log_path, ["step", "loss", *COMPONENTS, "lr", "seconds"],
                         keep_until=start if run.checkpoint is not None else None)
    seconds = _loop(run, net, model, loss_fn, pool, optimizer, start, seconds)
    weights = run.out / "weights.pt"
    if run.dist.rank == 0:
        net.eval()
        training = {"config": run.cfg, "steps": run.train.max_steps, "train_seconds": seconds,
                    "world_size": run.dist.world, "data_files": [Path(f).name for f in run.data_files]}
        if pool.embedder_fingerprint:
            training["embedder_fingerprint"] = pool.embedder_fingerprint
        save_network(net, run.net_cfg, weights, training, feature_basis=pool.input_basis)
    barrier(run.dist)
    return weights


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m regsam.register.net.train --config C --out DIR [--resume] [--init-weights W] [--max-steps N]``."""
    parser = argparse.ArgumentParser(prog="python -m regsam.register.net.train",
                                     description="Train the embedding-guided registration network (sam-net).")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        path = run_command(args)
    except InputError as exc:
        print(f"regsam: error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    if run_rank() == 0:
        print(f"weights: {path}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The training options (shared by ``regsam train-deformable`` and ``python -m regsam.register.net.train``)."""
    parser.add_argument("--config", required=True, help="YAML config (e.g. configs/deformable/sam_net_chest.yaml)")
    parser.add_argument("--out", required=True, help="output folder (checkpoint.pt, log.csv, weights.pt)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--init-weights", default=None, metavar="PT",
                        help="start from these network weights with a fresh optimiser (override train.init_weights)")
    parser.add_argument("--max-steps", type=int, default=None, help="override train.max_steps")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_command(args: argparse.Namespace) -> Path:
    """Run :func:`train_deformable` from parsed :func:`add_arguments` options."""
    return train_deformable(args.config, args.out, resume=args.resume, device=args.device, max_steps=args.max_steps,
                            progress=not args.no_progress, init_weights=args.init_weights)


def run_rank() -> int:
    """This process's torchrun rank (0 when alone)."""
    return int(os.environ.get("RANK", "0"))


if __name__ == "__main__":
    sys.exit(main())
