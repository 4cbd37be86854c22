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

from regsam.embed.train import IMAGE_SUFFIXES, default_config, learning_rate, load_config, resolve_data, train_embedder, TrainConfig
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
@pytest.mark.parametrize("combined", [False, True], ids=["sam", "sam+ace+adam"])
def test_torchrun_with_two_gloo_processes(tiny, tmp_path, combined):
    config = tiny(max_steps=2, checkpoint_every=1)
    if combined:  # several input groups per step, still one DDP forward (GroupForward)
        sam = {k: v for k, v in config["objective"].items() if k != "name"}
        config["objective"] = {"name": ["sam", "ace", "adam"], "sam": sam, "ace": {"fine_queries": 64}}
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config))
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


def test_kill_9_mid_run_then_resume_continues_from_the_last_checkpoint(tiny, tmp_path):
    """A real ``regsam train-embedder`` process killed with SIGKILL resumes (``--resume``) from its last checkpoint
    and ends with the weights and log of an uninterrupted run."""
    import signal
    import time

    config = tiny(max_steps=400, checkpoint_every=2)
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "regsam.cli", "train-embedder", "--config", str(config_path), "--out", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "log.csv").is_file() and len(_log(out)) >= 5:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    step = torch.load(out / "checkpoint.pt", weights_only=False)["step"]
    assert 4 <= step < 400 and step % 2 == 0
    assert not (out / "weights.pt").exists()
    resume = cmd + ["--resume", "--max-steps", str(step + 3)]
    done = subprocess.run(resume, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == step + 3
    rows = _log(out)
    assert [int(r["step"]) for r in rows] == list(range(1, step + 4))
    straight = train_embedder(config, tmp_path / "straight", max_steps=step + 3, progress=False)
    a = torch.load(straight, weights_only=False)["state_dict"]
    b = torch.load(out / "weights.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in rows] == [r["loss"] for r in _log(tmp_path / "straight")]


def test_held_out_scans_are_refused(tiny, tmp_path, chest_crop_path):
    config = tiny(max_steps=1)
    config["holdout"] = [str(chest_crop_path)]
    with pytest.raises(InputError, match="held-out scan .*pulmonary_ct_cropped"):
        train_embedder(config, tmp_path / "a", progress=False)
    copy = tmp_path / "renamed.nii.gz"  # a renamed copy is refused by content
    copy.write_bytes(chest_crop_path.read_bytes())
    config["data"] = [str(copy)]
    with pytest.raises(InputError, match="held-out scan .*renamed"):
        train_embedder(config, tmp_path / "b", progress=False)
    config["holdout"] = ["elsewhere/renamed.nii.gz"]  # absent here: compared by file name
    with pytest.raises(InputError, match="holdout entry 'elsewhere/renamed.nii.gz'"):
        train_embedder(config, tmp_path / "c", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_all_data_config_covers_every_ct_but_the_held_out_ones(shared_data):
    path = REPO / "regsam" / "configs" / "embedder" / "chest_all.yaml"
    raw = yaml.safe_load(path.read_text())
    cfg, bases = load_config(path)
    assert set(cfg) == set(default_config())
    for section in ("model", "crops", "train"):  # every constant spelled out, the model not grown
        assert set(raw[section]) >= set(default_config()[section]), section
    assert raw["model"] == yaml.safe_load((REPO / "regsam" / "configs" / "embedder" / "sam_chest.yaml").read_text())["model"]
    assert cfg["crops"]["rotation_deg"] == 15.0 and cfg["crops"]["thick_slice_mm"][1] >= 8.0
    files = resolve_data(cfg["data"], bases)
    held = {Path(p).name for p in resolve_data(cfg["holdout"], bases)}
    assert held == {"lidc_idri_0314_chest.nii.gz", "aorta_ct_cropped.nii.gz", "pulmonary_ct_cropped.nii.gz"}
    every_ct = {p.name for p in shared_data.rglob("*") if p.name.endswith(IMAGE_SUFFIXES) and "mask" not in p.name}
    assert {Path(p).name for p in files if p != "sample-ct"} | held == every_ct
    assert "sample-ct" in files
    from regsam.embed.train import check_holdout

    check_holdout(files, cfg["holdout"], bases)  # no error
    with pytest.raises(InputError, match="lidc_idri_0314"):
        check_holdout(files + resolve_data(["../shared/data/ct_more/lidc_idri_0314_chest.nii.gz"], bases), cfg["holdout"], bases)
