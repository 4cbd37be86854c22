"""Data-parallel training under ``torchrun``: one place that starts the process group and gathers objects.

Both trainers (:mod:`regsam.embed.train`, :mod:`regsam.register.net.train`) detect ``torchrun`` through
``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; a single process (``WORLD_SIZE`` unset or 1) needs no process group.
The backend is gloo on CPU and nccl on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """This process's place in the run: ``rank`` of ``world`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        """True under torchrun with more than one process."""
        return self.world > 1


def launched_world_size() -> int:
    """``WORLD_SIZE`` set by torchrun (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); a plain DistInfo when alone."""
    if launched_world_size() <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def gather(obj: Any, info: DistInfo) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` when alone. All ranks must call it."""
    if not info.active:
        return [obj]
    out: list = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op when alone)."""
    if info.active:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group if this process joined one (end of a torchrun entry point)."""
    if launched_world_size() > 1 and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["DistInfo", "barrier", "gather", "init_distributed", "launched_world_size", "shutdown"]
