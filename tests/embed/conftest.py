"""Fixtures for the embedder tests: a tiny configuration (4 mm, 32-voxel views, a ~50 k-parameter model)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest


def tiny_config(data: list[str], **train) -> dict:
    """A configuration that trains in ~0.1-0.3 s per step on one CPU core."""
    config = {
        "seed": 0,
        "data": list(data),
        "model": {"channels": [8, 16, 16, 16], "fine_dim": 16, "coarse_dim": 16, "coarse_head_channels": 16, "fine_head_channels": 8},
        "crops": {"size": [32, 32, 32], "base_spacing_mm": 4.0, "scan_spacing_mm": 4.0},
        "objective": {
            "name": "sam",
            "fine_positives": 64,
            "fine_candidates": 400,
            "fine_negatives": 100,
            "coarse_candidates": 20,
            "coarse_negatives": 10,
            "coarse_global_negatives": 50,
        },
        "train": {"batch_size": 2, "max_steps": 30, "optimizer": "adamw", "lr": 0.002, "warmup_steps": 3, "checkpoint_every": 10, "num_threads": 1},
    }
    config["train"].update(train)
    return copy.deepcopy(config)


@pytest.fixture()
def tiny(chest_crop_path: Path):
    """Factory: ``tiny(**train_overrides) -> config dict`` training on the real chest CT crop."""
    if not chest_crop_path.is_file():
        pytest.skip(f"{chest_crop_path} not found")
    return lambda **train: tiny_config([str(chest_crop_path)], **train)
