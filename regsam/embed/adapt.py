"""Test-time adaptation: fine-tune a copy of a trained embedder on the scans at hand.

``adapt_embedder(model, [template, target], steps)`` runs ``steps`` more SAM training steps on view
pairs drawn from the given images only, with the very same pieces as training: the crop sampler
(:class:`regsam.embed.crops.TwoViewSampler`), the objective (:mod:`regsam.embed.objectives`) and the
optimisation step (:func:`regsam.embed.train.train_step`). The model passed in is never modified.

Defaults (:func:`adapt_config`): crops and loss constants of the shipped training configuration
(``regsam/configs/embedder/sam_chest.yaml``), with the model's own input spacing and HU window, and

* AdamW, learning rate 2e-4 (1/5 of training's peak), no warm-up, cosine decay to 0 over ``steps``;
* **no cross-scan coarse negatives** (``coarse_global_negatives: 0``): training takes negatives from the
  *other* scan of a batch, which is right for different patients but wrong here, where the scans are
  usually the same patient (two breathing phases): their corresponding anatomy must not be pushed apart.

Batch norm runs in training mode during adaptation (as in training), so its running statistics move
towards the scans at hand; the returned copy is in eval mode.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from pathlib import Path

import SimpleITK as sitk
import torch

from regsam.embed.crops import CropConfig, TwoViewSampler, load_scan
from regsam.devices import resolve_device
from regsam.embed.model import SAMEmbedder
from regsam.embed.objectives import OBJECTIVES
from regsam.embed.train import TrainConfig, build_optimizer, load_config, train_step
from regsam.errors import InputError

#: the training configuration whose crop and loss constants adaptation reuses
TRAINING_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "embedder" / "sam_chest.yaml"

#: what adaptation changes relative to the training configuration
ADAPT_OVERRIDES: dict = {
    "objective": {"coarse_global_negatives": 0},
    "train": {
        "batch_size": 2,
        "optimizer": "adamw",
        "lr": 2e-4,
        "weight_decay": 1e-4,
        "warmup_steps": 0,
        "lr_schedule": "cosine",
        "grad_clip": None,
        "num_threads": None,
    },
}


def _merge_section(base: dict, override: dict, section: str) -> dict:
    unknown = set(override) - set(base)
    if unknown:
        raise InputError(f"adapt config: unknown key(s) {sorted(unknown)} in '{section}'; known: {sorted(base)}")
    out = dict(base)
    out.update(copy.deepcopy(override))
    return out


def adapt_config(model: SAMEmbedder, config: dict | None = None) -> dict:
    """The full adaptation configuration: ``crops``, ``objective`` and ``train`` sections.

    The training configuration (:data:`TRAINING_CONFIG`) with :data:`ADAPT_OVERRIDES`, the model's input
    spacing / HU window, then ``config`` (same sections and keys as a training config; ``train.max_steps``
    is ignored: ``steps`` of :func:`adapt_embedder` rules).

    Raises:
        InputError: unknown sections or keys.
    """
    cfg, _ = load_config(TRAINING_CONFIG)
    cfg = {k: copy.deepcopy(cfg[k]) for k in ("crops", "objective", "train")}
    for section, values in ADAPT_OVERRIDES.items():
        cfg[section] = _merge_section(cfg[section], values, section)
    cfg["crops"]["base_spacing_mm"] = float(getattr(model, "spacing_mm", cfg["crops"]["base_spacing_mm"]))
    cfg["crops"]["hu_window"] = [float(v) for v in getattr(model, "hu_window", cfg["crops"]["hu_window"])]
    for section, values in (config or {}).items():
        if section not in cfg:
            raise InputError(f"adapt config: unknown section '{section}' (known: crops, objective, train)")
        if not isinstance(values, dict):
            raise InputError(f"adapt config: '{section}' must be a mapping")
        cfg[section] = _merge_section(cfg[section], values, section)
    return cfg


def adapt_embedder(
    model: SAMEmbedder,
    images: Sequence[sitk.Image],
    steps: int,
    config: dict | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    history: list | None = None,
) -> SAMEmbedder:
    """Fine-tune a copy of ``model`` on ``images`` for ``steps`` SAM steps; return the copy in eval mode.

    Args:
        model: a trained embedder (left unchanged).
        images: the CTs the embeddings are needed for (e.g. template and target), HU, any grid.
        steps: optimisation steps (0 returns an unchanged copy).
        config: overrides of :func:`adapt_config` (``crops``, ``objective``, ``train`` sections).
        seed: seeds the view sampler and the objective; equal seeds give equal weights (same device
            and thread count).
        device: where to adapt (default: the model's device); the copy stays there.
        history: if given, one dict per step is appended (``step``, ``loss``, objective components, ``lr``,
            ``seconds``).

    Raises:
        InputError: negative ``steps``, no images, a bad image (2D, not a CT) or a bad config.
    """
    steps = int(steps)
    if steps < 0:
        raise InputError(f"adaptation steps must be >= 0, got {steps}")
    if not images:
        raise InputError("adapt_embedder needs at least one image")
    cfg = adapt_config(model, config)
    train_cfg = TrainConfig(**{**cfg["train"], "max_steps": max(steps, 1)})
    crops = CropConfig.from_dict(cfg["crops"])
    objective_name = cfg["objective"].get("name", "sam")
    if objective_name not in OBJECTIVES:
        raise InputError(f"adapt config: unknown objective '{objective_name}' (known: {', '.join(OBJECTIVES)})")
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    net = copy.deepcopy(model).to(dev)
    if steps == 0:
        return net.eval()
    scans = [
        load_scan(image, spacing_mm=crops.scan_spacing_mm, hu_window=crops.hu_window, foreground_hu=crops.foreground_hu, name=f"image {i}")
        for i, image in enumerate(images)
    ]
    objective = OBJECTIVES[objective_name](**{**cfg["objective"], "seed": int(seed) + 7919})
    sampler = TwoViewSampler(scans, crops, seed=int(seed) + 104729)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, train_cfg)
    threads = torch.get_num_threads()
    if train_cfg.num_threads:
        torch.set_num_threads(int(train_cfg.num_threads))
    net.train()
    start = time.perf_counter()
    try:
        for step in range(steps):
            result, lr = train_step(net, objective, sampler, optimizer, params, step, train_cfg)
            if history is not None:
                row = {"step": step + 1, "loss": float(result["loss"].detach())}
                row.update({c: float(result[c]) for c in objective.components})
                row.update(lr=lr, seconds=time.perf_counter() - start)
                history.append(row)
    finally:
        torch.set_num_threads(threads)
        net.eval()
        optimizer.zero_grad(set_to_none=True)
    return net
