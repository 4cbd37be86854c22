"""Training the registration network: the loss falls, resume is exact, torchrun/DDP runs, bad input is one line
with exit code 2 (``regsam train-deformable`` and ``regsam register --method sam-net``)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml

from regsam.cli import main as cli_main
from regsam.errors import InputError
from regsam.register.net.loss import LossConfig
from regsam.embed.weights import embedder_fingerprint, read_weights
from regsam.register.net.model import load_network
from regsam.register.net.train import load_config, train_deformable

REPO = Path(__file__).resolve().parents[3]
CONFIGS = REPO / "regsam" / "configs" / "deformable"


def tiny(data: Path, landmarks: Path, **train) -> dict:
    """One small real lung CT, one pool pair, 32-voxel crops, a ~10 k-weight network: ~0.3 s per step."""
    config = {
        "seed": 0,
        "data": [str(data)],
        "model": {"nb_features": [8, 16, 16]},
        "pairs": {"pool_size": 1, "refresh_every": 1000, "crop_size": [32, 32, 32], "embed_components": 4,
                  "landmarks": str(landmarks)},
        "train": {"max_steps": 30, "lr": 1e-3, "warmup_steps": 0, "checkpoint_every": 10, "num_threads": 1},
    }
    config["train"].update(train)
    return config


@pytest.fixture()
def lung_ct(shared_data) -> Path:
    return shared_data / "elastix_3dct_lung" / "3DCT_lung_baseline_small.mha"


def _log(folder: Path) -> list[dict]:
    with open(folder / "log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_loss_falls_on_a_tiny_run_with_the_embedding_term(lung_ct, dirlab_landmarks, tmp_path):
    weights = train_deformable(tiny(lung_ct, dirlab_landmarks), tmp_path / "run", progress=False)
    rows = _log(tmp_path / "run")
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    loss = np.array([float(r["loss"]) for r in rows])
    embed = np.array([float(r["embed"]) for r in rows])
    assert np.isfinite(loss).all() and embed[0] > 0  # the embedding term is computed and counted
    assert loss[-10:].mean() < loss[:10].mean() - 0.05, loss
    loaded = load_network(weights)
    assert loaded.config.nb_features == (8, 16, 16) and loaded.training["steps"] == 30
    assert weights.stat().st_size < 25e6


@pytest.mark.slow
def test_resume_reaches_the_same_step_and_weights_as_an_uninterrupted_run(lung_ct, dirlab_landmarks, tmp_path):
    config = tiny(lung_ct, dirlab_landmarks, max_steps=6, checkpoint_every=3, lr_schedule="constant")
    config["loss"] = {"weight_embed": 0.0}  # no embeddings: the pair costs a few seconds
    full = train_deformable(config, tmp_path / "full", progress=False)
    train_deformable(config, tmp_path / "split", max_steps=3, progress=False)
    with pytest.raises(InputError, match="already holds a checkpoint"):
        train_deformable(config, tmp_path / "split", progress=False)
    resumed = train_deformable(config, tmp_path / "split", resume=True, progress=False)
    a = torch.load(full, weights_only=False)["state_dict"]
    b = torch.load(resumed, weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)["step"] == 6
    assert [r["loss"] for r in _log(tmp_path / "full")] == [r["loss"] for r in _log(tmp_path / "split")]
    changed = {**config, "loss": {"weight_embed": 0.0, "weight_reg": 2.0}}  # another recipe: refused, not mixed in
    with pytest.raises(InputError, match=r"differs .*loss\.weight_reg: 1\.0 -> 2\.0"):
        train_deformable(changed, tmp_path / "split", resume=True, max_steps=8, progress=False)


@pytest.mark.slow
def test_torchrun_with_two_gloo_processes(lung_ct, dirlab_landmarks, tmp_path):
    config = tiny(lung_ct, dirlab_landmarks, max_steps=2, checkpoint_every=1)
    config["loss"] = {"weight_embed": 0.0}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "regsam.register.net.train", "--config", str(path), "--out", str(tmp_path / "ddp"), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=False)
    assert checkpoint["step"] == 2 and len(checkpoint["rng"]) == 2  # both ranks' random state
    assert checkpoint["rng"][0]["pool"] != checkpoint["rng"][1]["pool"]  # each rank draws its own crops
    assert [int(r["step"]) for r in _log(tmp_path / "ddp")] == [1, 2]
    assert load_network(tmp_path / "ddp" / "weights.pt").training["world_size"] == 2


def _one_line_exit_2(capsys, argv: list[str], message: str) -> None:
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and message in err, err


def test_cosine_embedding_schedule_lowers_the_weight_to_zero():
    steps = 11
    weights = [LossConfig(weight_embed=0.8, embed_schedule="cosine").embed_weight(s, steps) for s in range(steps)]
    assert weights[0] == pytest.approx(0.8) and weights[5] == pytest.approx(0.4) and weights[-1] == pytest.approx(0.0)
    assert all(a > b for a, b in zip(weights, weights[1:]))
    assert LossConfig(weight_embed=0.8).embed_weight(7, steps) == 0.8


def test_bad_training_input_is_one_line_and_exit_2(lung_ct, dirlab_landmarks, tmp_path, capsys):
    good = tiny(lung_ct, dirlab_landmarks)
    cases = {
        "unknown key": ({**good, "model": {"nb_featurez": [8]}}, "unknown key 'model.nb_featurez'"),
        "top-level key": ({**good, "epochs": 3}, "unknown key 'epochs'"),
        "missing data": ({**good, "data": [str(tmp_path / "nothing.nii.gz")]}, "matches no image"),
        "held out": ({**good, "holdout": [str(lung_ct)]}, "held-out scan"),
        "bad value": ({**good, "loss": {"similarity": "ssd"}}, "loss.similarity"),
        "bad schedule": ({**good, "loss": {"embed_schedule": "linear"}}, "loss.embed_schedule"),
        "landmarks": ({**good, "pairs": {**good["pairs"], "landmarks": str(tmp_path)}}, "landmark file not found"),
    }
    for name, (config, message) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.yaml"
        path.write_text(yaml.safe_dump(config))
        _one_line_exit_2(capsys, ["train-deformable", "--config", str(path), "--out", str(tmp_path / name)], message)
        assert not (tmp_path / name).exists(), name
    flat = sitk.Image([40, 40], sitk.sitkInt16)
    sitk.WriteImage(flat, str(tmp_path / "slice.nii.gz"))
    path = tmp_path / "2d.yaml"
    path.write_text(yaml.safe_dump({**good, "data": [str(tmp_path / "slice.nii.gz")]}))
    _one_line_exit_2(capsys, ["train-deformable", "--config", str(path), "--out", str(tmp_path / "2d")], "3D volume")
    _one_line_exit_2(capsys, ["train-deformable", "--config", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "x")],
                     "config file not found")


def test_bad_registration_input_is_one_line_and_exit_2(lung_ct, tmp_path, capsys):
    flat = sitk.Image([40, 40], sitk.sitkInt16)
    sitk.WriteImage(flat, str(tmp_path / "slice.nii.gz"))
    out = tmp_path / "out"
    _one_line_exit_2(capsys, ["register", str(tmp_path / "slice.nii.gz"), str(lung_ct), "--out", str(out),
                              "--method", "sam-net"], "2D")
    _one_line_exit_2(capsys, ["register", str(lung_ct), str(lung_ct), "--out", str(out), "--method", "sam-net",
                              "--net-weights", str(tmp_path / "missing.pt")], "network weights not found")
    _one_line_exit_2(capsys, ["register", str(lung_ct), str(lung_ct), "--out", str(out), "--method", "sam-net",
                              "--preset", "accurate"], "preset")
    _one_line_exit_2(capsys, ["register", str(lung_ct), str(lung_ct), "--out", str(out), "--method", "sam",
                              "--net-weights", str(tmp_path / "w.pt")], "does not take --net-weights")
    assert not out.exists()


def test_shipped_configs_load_and_differ_only_in_the_embedding_weight(shared_data, monkeypatch):
    monkeypatch.chdir(REPO)
    main, _ = load_config(CONFIGS / "sam_net_chest.yaml")
    ablation, _ = load_config(CONFIGS / "sam_net_chest_noembed.yaml")
    assert main["loss"]["weight_embed"] > 0 and ablation["loss"]["weight_embed"] == 0
    ablation["loss"]["weight_embed"] = main["loss"]["weight_embed"]
    assert ablation == main
    shipped, _ = load_config(CONFIGS / "sam_net_chest_corr.yaml")  # the shipped network's config and its twin
    twin, _ = load_config(CONFIGS / "sam_net_chest_corr_noembed.yaml")
    assert shipped["model"]["correlation_radius"] > 0 and twin["loss"]["weight_embed"] == 0
    twin["loss"]["weight_embed"] = shipped["loss"]["weight_embed"]
    assert twin == shipped
    assert load_network().config.to_dict() == {**shipped["model"], "hu_window": list(shipped["model"]["hu_window"])}
    assert "sample-ct" in main["data"] and not any("lidc_idri_0314" in d for d in main["data"])
    embedder = yaml.safe_load((REPO / "regsam" / "configs" / "embedder" / "chest_all.yaml").read_text())
    assert main["data"] == embedder["data"] and main["holdout"] == embedder["holdout"]
    raw = (CONFIGS / "sam_net_chest.yaml").read_text().splitlines()
    keyed = [line for line in raw if line.startswith("  ") and ":" in line and not line.strip().startswith("-")]
    assert all("#" in line for line in keyed if not line.strip().startswith("warmup_ratio")), "every key is commented"


@pytest.mark.slow
def test_sam_feature_inputs_use_one_basis_from_training_to_inference(lung_ct, dirlab_landmarks, tmp_path):
    """The feature-input variant: the network takes image + k SAM channels on a fixed basis stored with the
    weights, and sam-net projects the inference embeddings on that same basis."""
    from regsam.register.api import register

    config = tiny(lung_ct, dirlab_landmarks, max_steps=2, checkpoint_every=2)
    config["model"]["feature_channels"] = 3
    weights = train_deformable(config, tmp_path / "feat", progress=False)
    loaded = load_network(weights)
    basis, mean = loaded.feature_basis
    assert basis.shape == (3, mean.shape[0]) and torch.allclose(basis @ basis.T, torch.eye(3), atol=1e-4)
    trained_on = embedder_fingerprint(read_weights(config.get("embedder")).state_dict)
    assert loaded.training["embedder_fingerprint"] == trained_on  # inference pins this embedder
    again = train_deformable(config, tmp_path / "again", progress=False)
    assert torch.equal(load_network(again).feature_basis[0], basis)  # deterministic: same on every run and rank
    other = {**config, "seed": 1}
    fresh = train_deformable(other, tmp_path / "seed1", progress=False)
    assert not torch.equal(load_network(fresh).feature_basis[0], basis)  # another seed draws another basis
    continued = train_deformable(other, tmp_path / "continued", init_weights=weights, progress=False)
    assert torch.equal(load_network(continued).feature_basis[0], basis)  # continued weights keep their basis
    ct = sitk.ReadImage(str(lung_ct))
    result = register(ct, ct, method="sam-net", stages="network", net_weights=str(weights), device="cpu")
    assert result.extras["network"]["feature_channels"] == 3
    assert np.isfinite(sitk.GetArrayViewFromImage(result.displacement)).all()


def test_correlation_volume_peaks_at_the_planted_offset():
    """SAME++-style input: channel o is the cosine of fixed(i) and moving(i + o); a moving copy shifted by
    +2 voxels along x (dilation 2) correlates fully in the (0, 0, +1) channel, and nowhere else."""
    from regsam.register.net.model import correlation_volume

    fixed = torch.randn(1, 8, 12, 12, 12, generator=torch.Generator().manual_seed(0))
    moving = torch.roll(fixed, shifts=2, dims=4)  # moving(i + 2 x) = fixed(i)
    corr = correlation_volume(fixed, moving, radius=1, dilation=2)
    assert corr.shape == (1, 27, 12, 12, 12)
    inner = corr[0, :, 2:-2, 2:-2, 2:-2]
    assert torch.allclose(inner[1 * 9 + 1 * 3 + 2], torch.ones(()), atol=1e-5)
    assert (inner.mean(dim=(1, 2, 3)).argmax() == 14) and inner[13].mean() < 0.5


@pytest.mark.slow
def test_correlation_input_trains_and_registers(lung_ct, dirlab_landmarks, tmp_path):
    from regsam.register.api import register

    config = tiny(lung_ct, dirlab_landmarks, max_steps=2, checkpoint_every=2)
    config["model"].update(feature_channels=3, correlation_radius=1)
    weights = train_deformable(config, tmp_path / "corr", progress=False)
    loaded = load_network(weights)
    assert loaded.config.input_channels == (1, 28)
    ct = sitk.ReadImage(str(lung_ct))
    result = register(ct, ct, method="sam-net", stages="network", net_weights=str(weights), device="cpu")
    assert np.isfinite(sitk.GetArrayViewFromImage(result.displacement)).all()
    bad = {**config, "model": {**config["model"], "feature_channels": 0}}
    with pytest.raises(InputError, match="correlation_radius needs"):
        train_deformable(bad, tmp_path / "bad", progress=False)
