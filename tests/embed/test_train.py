"""Training loop: the loss falls, resume is exact, torchrun/DDP works, bad configs are rejected."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from regsam.embed.train import default_config, learning_rate, load_config, resolve_data, train_embedder, TrainConfig
from regsam.errors import InputError

REPO = Path(__file__).resolve().parents[2]


def _log(path: Path) -> list[dict]:
    with open(path / "log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_loss_falls_on_a_real_ct(tiny, tmp_path):
    weights = train_embedder(tiny(max_steps=30, checkpoint_every=30), tmp_path / "run", progress=False)
    assert weights.is_file()
    rows = _log(tmp_path / "run")
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    assert set(rows[0]) >= {"step", "loss", "fine", "coarse", "lr", "seconds"}
    loss = np.array([float(r["loss"]) for r in rows])
    assert np.isfinite(loss).all()
    assert loss[-10:].mean() < loss[:10].mean() - 0.3, loss


def test_resume_reproduces_an_uninterrupted_run(tiny, tmp_path):
    config = tiny(max_steps=6, checkpoint_every=3)
    full = train_embedder(config, tmp_path / "full", progress=False)
    train_embedder(config, tmp_path / "split", max_steps=3, progress=False)
    with pytest.raises(InputError, match="already holds a checkpoint"):
        train_embedder(config, tmp_path / "split", progress=False)
    resumed = train_embedder(config, tmp_path / "split", resume=True, progress=False)
    a = torch.load(full, weights_only=False)["state_dict"]
    b = torch.load(resumed, weights_only=False)["state_dict"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)["step"] == 6
    assert [r["loss"] for r in _log(tmp_path / "full")] == [r["loss"] for r in _log(tmp_path / "split")]


@pytest.mark.slow
def test_torchrun_with_two_gloo_processes(tiny, tmp_path):
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(tiny(max_steps=2, checkpoint_every=1)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "regsam.embed.train", "--config", str(config_path), "--out", str(tmp_path / "ddp"), "--max-steps", "2", "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=False)
    assert checkpoint["step"] == 2 and len(checkpoint["rng"]) == 2  # both ranks' random state
    assert (tmp_path / "ddp" / "weights.pt").is_file()
    assert [int(r["step"]) for r in _log(tmp_path / "ddp")] == [1, 2]


def test_config_errors(tmp_path, tiny):
    with pytest.raises(InputError, match="unknown key"):
        load_config({"modle": {}})
    with pytest.raises(InputError, match="unknown key"):
        load_config({"train": {"learning_rate": 1}})
    with pytest.raises(InputError, match="unknown objective"):
        load_config({"objective": {"name": "nope"}})
    with pytest.raises(InputError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(InputError, match="matches no image"):
        resolve_data(["no/such/scan.nii.gz"], [tmp_path])
    bad = tiny()
    bad["data"] = []
    with pytest.raises(InputError, match="no training images"):
        train_embedder(bad, tmp_path / "x", progress=False)


def test_data_paths_resolve_against_the_config_folder(tmp_path, chest_crop_path):
    folder = tmp_path / "cfg"
    (folder / "scans").mkdir(parents=True)
    (folder / "scans" / "a.nii.gz").write_bytes(chest_crop_path.read_bytes())
    config = folder / "c.yaml"
    config.write_text(yaml.safe_dump({"data": ["scans", "scans/*.nii.gz", "sample-ct"]}))
    cfg, bases = load_config(config)
    assert bases[0] == folder.resolve()
    paths = resolve_data(cfg["data"], bases)
    assert paths[:2] == [str((folder / "scans" / "a.nii.gz").resolve())] * 2 and paths[2] == "sample-ct"


def test_shipped_config_is_complete_and_relative():
    path = REPO / "regsam" / "configs" / "embedder" / "sam_chest.yaml"
    raw = yaml.safe_load(path.read_text())
    cfg, _ = load_config(path)
    assert set(cfg) == set(default_config())
    assert all(not Path(str(d)).is_absolute() for d in raw["data"])
    # every constant is spelled out in the shipped file
    for section in ("model", "crops", "objective", "train"):
        assert set(raw[section]) >= set(default_config()[section]) - {"seed"}, section


def test_learning_rate_schedule():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, warmup_ratio=0.1, max_steps=110, lr_schedule="cosine")
    assert learning_rate(0, cfg) == pytest.approx(0.1)
    assert learning_rate(10, cfg) == pytest.approx(1.0)
    assert learning_rate(110, cfg) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(50, TrainConfig(lr=0.02)) == pytest.approx(0.02 * (0.001 + 0.999 * 50 / 500))


def test_init_weights_start_training_from_earlier_weights(tiny, tmp_path):
    first = train_embedder(tiny(max_steps=2, checkpoint_every=2), tmp_path / "first", progress=False)
    # lr 0: the optimiser cannot move the weights, so they stay where training started (norm statistics still update)
    frozen = tiny(max_steps=1, checkpoint_every=1, lr=0.0, warmup_steps=0)
    cont = train_embedder(frozen, tmp_path / "cont", init_weights=first, progress=False)
    fresh = train_embedder(frozen, tmp_path / "fresh", progress=False)
    a, b, c = (torch.load(p, weights_only=False)["state_dict"] for p in (first, cont, fresh))
    learned = [k for k in a if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert [k for k in learned if not torch.equal(a[k], b[k])] == []
    assert not all(torch.equal(a[k], c[k]) for k in learned)
    other = tiny(max_steps=1)
    other["model"]["fine_dim"] = 8
    with pytest.raises(InputError, match="does not fit the configured model"):
        train_embedder(other, tmp_path / "bad", init_weights=first, progress=False)
    with pytest.raises(InputError, match="matches no image|not found"):
        train_embedder(frozen, tmp_path / "missing", init_weights=tmp_path / "nope.pt", progress=False)
