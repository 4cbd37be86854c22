"""``regsam train-embedder``, ``regsam embed`` and ``regsam match`` as a user runs them (subprocesses).

Bad input (2D image, image below the network's minimum size, points outside the template, ...) must give one
line on stderr, exit code 2 and no output file.
"""

from __future__ import annotations

import importlib.util

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml

from regsam.embed.inference import load_embedding
from regsam.embed.model import DEFAULT_WEIGHTS
from regsam.io.images import read_image
from regsam.io.landmarks import write_fcsv, write_points_csv

REPO = Path(__file__).resolve().parents[2]
SHIFT_MM = np.array([4.0, -6.0, 8.0])


def regsam(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "regsam.cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def assert_input_error(proc: subprocess.CompletedProcess, pattern: str, absent: Path) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("regsam: error: "), proc.stderr
    assert pattern in lines[0], lines[0]
    assert not absent.exists()
    assert not [p for p in absent.parent.iterdir() if p.name.startswith(f".{absent.name}.")], "temporary file left behind"


@pytest.fixture(scope="module")
def files(chest_crop_path, tmp_path_factory) -> dict[str, Path]:
    """The real chest CT crop, a copy whose content sits SHIFT_MM away, a 2D image and a too-small volume."""
    if not chest_crop_path.is_file():
        pytest.skip(f"{chest_crop_path} not found")
    root = tmp_path_factory.mktemp("cli")
    ct = read_image(chest_crop_path)
    ct = sitk.Cast(ct, sitk.sitkFloat32)
    # target(y) = ct(y - s): the template point x appears in the target at x + s
    target = sitk.Resample(ct, ct, sitk.TranslationTransform(3, (-SHIFT_MM).tolist()), sitk.sitkLinear, -1024.0)
    paths = {"template": chest_crop_path, "target": root / "target.nii.gz", "flat": root / "flat.nii.gz", "small": root / "small.nii.gz"}
    sitk.WriteImage(target, str(paths["target"]))
    flat = sitk.Image([64, 64], sitk.sitkInt16)
    sitk.WriteImage(flat, str(paths["flat"]))
    small = sitk.Image([20, 20, 20], sitk.sitkInt16)
    small.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(small, str(paths["small"]))
    # 12 points in the body (> -300 HU) of the template, away from the edges
    hu = sitk.GetArrayViewFromImage(ct)
    rng = np.random.default_rng(0)
    zyx = np.argwhere(hu[12:-12, 12:-12, 12:-12] > -300) + 12
    pick = zyx[rng.choice(len(zyx), 12, replace=False)]
    points = np.array([ct.TransformIndexToPhysicalPoint([int(i) for i in p[::-1]]) for p in pick])
    np.save(root / "points.npy", points)
    write_points_csv(points, root / "points.csv")
    write_fcsv(points, root / "points.fcsv")
    write_points_csv(np.vstack([points[:3], points[:1] + 500.0]), root / "outside.csv")
    paths.update(points=root / "points.csv", fcsv=root / "points.fcsv", outside=root / "outside.csv", npy=root / "points.npy", root=root)
    return paths


def run_inline(capsys, *args: str) -> tuple[int, str, str]:
    """``regsam ARGS`` in this process (no interpreter start-up): exit code, stdout, stderr."""
    from regsam.cli import main

    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_embedder_then_embed(files, tmp_path, capsys):
    """One training step with a tiny config, then ``regsam embed`` with the weights it wrote (both in-process: the
    subprocess tests below cover the command as a user runs it)."""
    # by path: another folder's conftest.py may be the module named "conftest" in this session
    spec = importlib.util.spec_from_file_location("embed_test_conftest", Path(__file__).with_name("conftest.py"))
    embed_conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(embed_conftest)
    tiny_config = embed_conftest.tiny_config

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config([str(files["template"])], max_steps=1, checkpoint_every=1)))
    threads = torch.get_num_threads()
    try:
        code, stdout, stderr = run_inline(capsys, "train-embedder", "--config", str(config), "--out", str(tmp_path / "run"),
                                          "--device", "cpu", "--no-progress")
    finally:
        torch.set_num_threads(threads)  # the tiny config asks for 1 thread
    assert code == 0, stderr
    weights = tmp_path / "run" / "weights.pt"
    assert f"weights: {weights}" in stdout and weights.is_file()
    code, _, stderr = run_inline(capsys, "train-embedder", "--config", str(config), "--out", str(tmp_path / "run"), "--max-steps", "0")
    assert code == 2 and stderr.startswith("regsam: error: --max-steps must be at least 1")

    out = tmp_path / "emb" / "ct.npz"
    code, stdout, stderr = run_inline(capsys, "embed", str(files["template"]), "--out", str(out), "--weights", str(weights),
                                      "--device", "cpu", "--spacing", "4")
    assert code == 0 and stdout.strip() == f"wrote {out}", stderr
    emb = load_embedding(out)
    # 183 x 153 x 168 mm at 4 mm: 46 x 38 x 42 voxels; fine level at 8 mm, 16-d (tiny model)
    assert emb.image_geometry.GetSize() == (46, 38, 42) and emb.spacing_mm == 4.0
    assert emb.fine.shape[0] == 16 and emb.fine_geometry.GetSpacing() == (8.0, 8.0, 8.0)
    assert np.allclose(np.linalg.norm(emb.fine.astype(np.float32), axis=0), 1.0, atol=2e-3)
    assert emb.contains(np.load(files["npy"])).all()


def test_embed_rejects_bad_input(files, tmp_path):
    out = tmp_path / "e.npz"
    assert_input_error(regsam("embed", str(files["flat"]), "--out", str(out)), "is 2D; a 3D volume is required", out)
    assert_input_error(regsam("embed", str(files["template"]), "--out", str(tmp_path / "e.txt")), "must name an .npz file", tmp_path / "e.txt")
    assert_input_error(regsam("embed", str(tmp_path / "missing.nii.gz"), "--out", str(out)), "file not found", out)


def test_inline_bad_options(files, tmp_path, capsys):
    """Further bad input, run in-process (the subprocess tests above cover the exit path itself)."""
    out = tmp_path / "m.csv"
    match = ["match", "--template", str(files["template"]), "--points", str(files["points"]), "--target", str(files["target"]), "--out", str(out)]
    code, _, err = run_inline(capsys, *match, "--adapt-steps", "-1")
    assert code == 2 and err.strip() == "regsam: error: --adapt-steps must be >= 0, got -1"
    code, _, err = run_inline(capsys, *match, "--cycle-tolerance", "0")
    assert code == 2 and "--cycle-tolerance must be a positive number" in err
    if not torch.cuda.is_available():
        code, _, err = run_inline(capsys, "embed", str(files["template"]), "--out", str(tmp_path / "e.npz"), "--device", "cuda")
        assert code == 2 and "CUDA is not available" in err
    if DEFAULT_WEIGHTS.is_file():
        small = ["match", "--template", str(files["template"]), "--points", str(files["points"]), "--target", str(files["small"]),
                 "--out", str(out), "--device", "cpu"]
        code, _, err = run_inline(capsys, *small)
        assert code == 2 and "target is 40 x 40 x 40 mm; the embedder needs at least 64 mm" in err
    assert not out.exists()


@pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="shipped embedder weights absent")
def test_embed_needs_no_monai_and_gives_the_networks_embedding(files, tmp_path):
    """``regsam embed`` as a user runs it imports neither MONAI (2-4 s) nor itk-elastix or matplotlib, and writes
    what the MONAI network computes over the whole scan."""
    out = tmp_path / "e.npz"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "regsam.cli", "embed", str(files["template"]), "--out", str(out),
                           "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported and not imported & {"monai", "itk", "matplotlib"}, sorted(imported)
    from regsam.embed.model import load_embedder
    from regsam.embed.preprocess import preprocess

    model = load_embedder(device="cpu")
    tensor, _ = preprocess(read_image(files["template"]), model.spacing_mm, stride=model.stride, min_size=model.min_input_size)
    with torch.inference_mode():
        reference = model(tensor)
    emb = load_embedding(out)
    np.testing.assert_allclose(emb.fine.astype(np.float32), reference["fine"][0].numpy(), atol=2e-3)
    np.testing.assert_allclose(emb.coarse, reference["coarse"][0].numpy(), atol=1e-4)


@pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="shipped embedder weights absent")
def test_embed_rejects_an_image_below_the_minimum_size(files, tmp_path):
    out = tmp_path / "e.npz"
    assert_input_error(regsam("embed", str(files["small"]), "--out", str(out), "--device", "cpu"), "the embedder needs at least 64 mm", out)


@pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="shipped embedder weights absent")
def test_match_finds_shifted_points(files, tmp_path):
    """Shipped weights on a real CT and a shifted copy; points given as a Slicer .fcsv file."""
    out = tmp_path / "matched.csv"
    proc = regsam("match", "--template", str(files["template"]), "--points", str(files["fcsv"]), "--target", str(files["target"]),
                  "--out", str(out), "--cycle-tolerance", "8", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote {out}"
    lines = out.read_text().splitlines()
    assert lines[0] == "x,y,z,score,valid" and len(lines) == 13
    table = np.array([[float(v) for v in line.split(",")] for line in lines[1:]])
    points = np.load(files["npy"])
    error = np.linalg.norm(table[:, :3] - (points + SHIFT_MM), axis=1)
    assert np.median(error) < 4.0, error  # identity error is |SHIFT_MM| = 10.8 mm
    assert set(np.unique(table[:, 4])) <= {0.0, 1.0} and table[:, 4].mean() >= 0.5
    assert (np.abs(table[:, 3]) <= 1.0).all()
    from regsam.embed.commands import read_matches_csv

    back = read_matches_csv(out)
    np.testing.assert_allclose(back.matched, table[:, :3])
    assert back.valid.tolist() == (table[:, 4] == 1).tolist()


def test_match_rejects_bad_input(files, tmp_path):
    out = tmp_path / "m.csv"
    common = ["--target", str(files["target"]), "--out", str(out)]
    assert_input_error(regsam("match", "--template", str(files["template"]), "--points", str(files["outside"]), *common),
                       "1 of 4 point(s) lie outside the template image (first: row 3", out)
    assert_input_error(regsam("match", "--template", str(files["flat"]), "--points", str(files["points"]), *common), "is 2D", out)
    assert_input_error(regsam("match", "--template", str(files["template"]), "--points", str(files["points"]),
                              "--target", str(files["flat"]), "--out", str(out)), "is 2D", out)


def test_match_images_with_adaptation_from_python(files):
    """``adapt_steps`` of the Python API runs adaptation on the two images before embedding (tiny model, 1 step)."""
    from regsam.embed.commands import match_images
    from regsam.embed.model import SAMEmbedder

    torch.manual_seed(0)
    model = SAMEmbedder(channels=(8, 16, 16, 16), fine_dim=16, coarse_dim=16, coarse_head_channels=16, fine_head_channels=8).eval()
    model.spacing_mm = 4.0
    small = {"crops": {"size": [32, 32, 32], "scan_spacing_mm": 4.0},
             "objective": {"fine_positives": 16, "fine_candidates": 100, "fine_negatives": 20, "coarse_candidates": 10, "coarse_negatives": 5}}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    timings: dict = {}
    points = np.load(files["npy"])
    result = match_images(read_image(files["template"]), points, read_image(files["target"]), model=model, adapt_steps=1,
                          adapt_config=small, device="cpu", timings=timings, mode="nearest")
    assert result.matched.shape == (12, 3) and result.valid.all()
    assert timings["adapt_s"] > 0 and timings["embed_template_s"] > 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
