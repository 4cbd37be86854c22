"""ACE, Adam and combined objectives: exact grid correspondence, the purposive pruner, falling losses, resume."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from regsam.embed.affines import apply_affine, image_affine, voxel_centres
from regsam.embed.crops import CropConfig, TwoViewSampler, grid_key, load_scan
from regsam.embed.model import load_embedder
from regsam.embed.objectives import ACEObjective, AdamObjective, CombinedObjective, build_objective, objective_config
from regsam.embed.objectives.ace import correspondence
from regsam.embed.objectives.adam import purposive_prune
from regsam.embed.objectives.base import embed_groups
from regsam.embed.train import train_embedder
from regsam.errors import InputError

WINDOW = (-5000.0, 5000.0)


@pytest.fixture(scope="module")
def ramp_scan():
    """An oblique, anisotropic scan whose HU value is a non-symmetric linear function of the world position."""
    image = sitk.Image([60, 56, 40], sitk.sitkFloat32)
    image.SetSpacing((1.3, 1.1, 2.0))
    image.SetOrigin((12.5, -30.25, 101.0))
    angle = np.deg2rad(8.0)
    image.SetDirection((np.cos(angle), -np.sin(angle), 0.0, np.sin(angle), np.cos(angle), 0.0, 0.0, 0.0, 1.0))
    index = voxel_centres(image.GetSize()).numpy()
    world = apply_affine(image_affine(image), index.reshape(-1, 3)).reshape(index.shape)
    filled = sitk.GetImageFromArray((3.0 * world[..., 0] + 2.0 * world[..., 1] - 1.0 * world[..., 2]).astype(np.float32))
    filled.CopyInformation(image)
    return load_scan(filled, spacing_mm=1.0, hu_window=WINDOW, foreground_hu=-1e9)


def _intensity_outputs(batch: dict, keys: list[str]) -> dict:
    """'Embeddings' that are the input intensities at every level voxel (level voxel i = input voxel f * i)."""
    out = {"views": torch.cat([batch["view1"], batch["view2"]])}
    for key in keys:
        out[key] = batch[key].reshape(-1, *batch[key].shape[2:])
    return {k: {"fine": v[:, :, ::2, ::2, ::2], "coarse": v[:, :, ::8, ::8, ::8]} for k, v in out.items()}


def _expected_part(index_xyz: np.ndarray, sub: np.ndarray, grid: tuple) -> np.ndarray:
    """Part number (x fastest, then y, then z) holding view-1 voxel indices (N, 3)."""
    a, b, c = (np.floor(index_xyz / sub + 1e-9).astype(int)).T
    return (c * grid[1] + b) * grid[0] + a


def test_ace_grid_correspondence_is_exact_and_follows_the_geometry(ramp_scan):
    grid = (2, 2, 1)
    config = CropConfig(size=(32, 32, 16), base_spacing_mm=1.5, scan_spacing_mm=1.0, hu_window=WINDOW, rotation_deg=12.0)
    key = grid_key(grid)
    batch = TwoViewSampler([ramp_scan], config, seed=3, augment=False, part_grids=(grid,)).sample(2)
    objective = ACEObjective(grid=grid)
    for level, factor in (("fine", 2), ("coarse", 8)):
        outputs = _intensity_outputs(batch, [key])
        size_c = tuple(outputs["views"][level].shape[2:][::-1])
        size_p = tuple(outputs[key][level].shape[2:][::-1])
        for b in range(2):
            comp, a1, dec, pa = objective._pair_tokens(outputs["views"], outputs[key], batch, b, level, factor)
            down = correspondence(comp.world, pa, size_p, factor)
            assert torch.allclose(down.sum(dim=1), torch.ones(len(down)))  # the grid tiles the composed view
            assert (down.max(dim=1).values > 1 - 1e-5).all()  # aligned grids: one-hot rows
            target = down.argmax(dim=1)
            # the target is the same world point, in the part whose box holds the token, with the same value
            assert (dec.world[target] - comp.world).abs().max() < 1e-6
            view_index = apply_affine(np.linalg.inv(a1), comp.world.numpy())
            n_part = int(np.prod(size_p))
            expected = _expected_part(view_index, np.array(config.size) // np.array(grid), grid)
            assert np.array_equal(target.numpy() // n_part, expected)
            assert set(expected) == set(range(4))
            assert (dec.feats[target] - comp.feats).abs().max() * WINDOW[1] < 0.05
            up = correspondence(dec.world, [a1], size_c, factor)
            assert torch.equal(up.argmax(dim=1)[target], torch.arange(len(comp.world)))

            # permuting the grid (images with their boxes) moves every target to the part's new place
            perm = [3, 2, 1, 0]
            shuffled = dict(batch)
            shuffled[key] = batch[key][:, perm]
            shuffled[key + "_affine"] = batch[key + "_affine"][:, perm]
            out2 = _intensity_outputs(shuffled, [key])
            _, _, dec2, pa2 = objective._pair_tokens(out2["views"], out2[key], shuffled, b, level, factor)
            target2 = correspondence(comp.world, pa2, size_p, factor).argmax(dim=1)
            assert (target2 // n_part != target // n_part).all()
            assert torch.equal(target2 % n_part, target % n_part)
            assert (dec2.feats[target2] - comp.feats).abs().max() * WINDOW[1] < 0.05
            # images permuted but boxes kept (token order taken for geometry): the values no longer match
            wrong = dict(shuffled)
            wrong[key + "_affine"] = batch[key + "_affine"]
            out3 = _intensity_outputs(wrong, [key])
            _, _, dec3, pa3 = objective._pair_tokens(out3["views"], out3[key], wrong, b, level, factor)
            target3 = correspondence(comp.world, pa3, size_p, factor).argmax(dim=1)
            assert (dec3.feats[target3] - comp.feats).abs().max() * WINDOW[1] > 10.0


def test_adam_pruner_removes_a_duplicated_crop(chest_crop_path):
    """The same crop drawn twice (as if a scan were in the data under two names) is pruned from the negatives."""
    if not chest_crop_path.is_file():
        pytest.skip(f"{chest_crop_path} not found")
    model = load_embedder(device="cpu")
    scan = load_scan(chest_crop_path, spacing_mm=2.0)
    config = CropConfig(size=(64, 64, 32), scan_spacing_mm=2.0)
    objective = AdamObjective(levels=2)
    batch = TwoViewSampler([scan, scan], config, seed=1, part_grids=tuple(objective.part_grids(config.size))).sample(3)
    for key, value in batch.items():  # pair 2 := pair 0, under another scan id
        if key != "scan_id":
            value[2] = value[0]
    batch["scan_id"] = torch.tensor([0, 0, 1])
    with torch.no_grad():
        outputs = embed_groups(model, objective.input_groups(batch))
    for level_map, factor in (("coarse", 8), ("fine", 2)):
        nodes = objective.descriptors(outputs, batch, level_map, factor)
        per_pair = 1 + 2 + 4
        assert len(nodes.own) == 3 * per_pair and list(nodes.level[:per_pair]) == [0, 1, 1, 2, 2, 2, 2]
        assert nodes.children[0] == [1, 2] and sorted(nodes.children[1] + nodes.children[2]) == [3, 4, 5, 6]
        distinct, keep = objective.negative_mask(nodes)
        dup = torch.arange(per_pair)
        assert distinct[dup, dup + 2 * per_pair].all()  # another scan id: geometry cannot tell
        assert not keep[dup, dup + 2 * per_pair].any()  # ... the pruner does
        assert not keep[dup + 2 * per_pair, dup].any()
        # distinct anatomy survives: most same-level parts of the first pair are kept for each other
        first = slice(3, per_pair)
        assert keep[first, first].float().sum() >= 0.5 * 4 * 3
        # same scan, nested boxes: a part is never a negative of its whole
        assert not distinct[0, 1:per_pair].any()
    anchors = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    assert torch.equal(purposive_prune(anchors, anchors, 0.99), ~torch.eye(4, dtype=torch.bool))


def _rows(path) -> list[dict]:
    with open(path / "log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _with_objective(config: dict, section: dict) -> dict:
    config["objective"] = section
    return config


ACE = {"name": "ace", "grid": [2, 2, 1], "fine_queries": 128}
ADAM = {"name": "adam", "levels": 2}


@pytest.mark.slow
@pytest.mark.parametrize("section,column,drop", [(ACE, "local", 1.0), (ADAM, "locality", 0.2)], ids=["ace", "adam"])
def test_objective_loss_falls_on_a_real_ct(tiny, tmp_path, section, column, drop):
    train_embedder(_with_objective(tiny(max_steps=30, checkpoint_every=30), dict(section)), tmp_path / "run", progress=False)
    rows = _rows(tmp_path / "run")
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    loss = np.array([float(r["loss"]) for r in rows])
    part = np.array([float(r[column]) for r in rows])
    assert np.isfinite(loss).all()
    assert loss[-10:].mean() < loss[:10].mean() - drop, loss
    assert part[-10:].mean() < part[:10].mean(), part


def test_combined_config_trains_and_resumes_to_the_same_step(tiny, tmp_path):
    sam = {k: v for k, v in tiny()["objective"].items() if k != "name"}
    section = {"name": ["sam", "ace", "adam"], "weights": {"sam": 1.0, "ace": 0.5, "adam": 0.5}, "sam": sam,
               "ace": {"grid": [2, 2, 1], "fine_queries": 64}, "adam": {"levels": 2}}
    config = _with_objective(tiny(max_steps=4, checkpoint_every=2), section)
    full = train_embedder(config, tmp_path / "full", progress=False)
    train_embedder(config, tmp_path / "split", max_steps=2, progress=False)
    resumed = train_embedder(config, tmp_path / "split", resume=True, progress=False)
    assert torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)["step"] == 4
    a = torch.load(full, weights_only=False)["state_dict"]
    b = torch.load(resumed, weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = _rows(tmp_path / "split")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == [r["loss"] for r in _rows(tmp_path / "full")]
    assert {"sam", "ace", "adam", "sam.fine", "ace.local", "adam.pruned"} <= set(rows[0])
    total = sum(w * float(rows[-1][n]) for n, w in section["weights"].items())
    assert float(rows[-1]["loss"]) == pytest.approx(total, rel=1e-4)


def test_objective_config_checks_and_fills_defaults():
    full = objective_config({"name": ["sam", "ace"], "weights": [1.0, 0.25], "ace": {"grid": [2, 1, 1]}})
    assert full["weights"] == {"sam": 1.0, "ace": 0.25} and full["ace"]["grid"] == [2, 1, 1]
    assert full["sam"]["temperature"] == 0.5 and "name" not in full["sam"]
    assert isinstance(build_objective(full, seed=0), CombinedObjective)
    assert objective_config({"name": "adam"})["prune_similarity"] == 0.9
    for bad, match in (({"name": ["sam", "sam"]}, "distinct"), ({"name": ["sam", "ace"], "weights": [1.0]}, "needs 2"),
                       ({"name": ["sam", "nope"]}, "unknown objective"), ({"name": "ace", "grd": 1}, "unknown key"),
                       ({"name": ["sam", "ace"], "adam": {}}, "unknown key"), ({"name": "ace", "grid": [1, 1, 1]}, "at least 2")):
        with pytest.raises(InputError, match=match):
            objective_config(bad)
