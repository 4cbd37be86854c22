"""Two-view crop geometry: positives are exactly the same physical point in both views."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from regsam.embed.affines import apply_affine, image_affine, voxel_centres
from regsam.embed.crops import (
    CropConfig,
    TwoViewSampler,
    ViewGeometry,
    grid_key,
    hierarchy_grids,
    load_scan,
    sample_view,
    sample_view_pair,
    split_grid,
)
from regsam.embed.objectives.sam import SAMObjective
from regsam.errors import InputError

WINDOW = (-5000.0, 5000.0)


def _ramp(world: np.ndarray) -> np.ndarray:
    """A linear function of world mm (trilinear interpolation reproduces it exactly)."""
    return 3.0 * world[..., 0] + 2.0 * world[..., 1] - 1.0 * world[..., 2]


@pytest.fixture(scope="module")
def ramp_scan():
    """An oblique, anisotropic scan whose HU value is a linear function of the world position."""
    image = sitk.Image([50, 44, 30], sitk.sitkFloat32)
    image.SetSpacing((1.3, 1.1, 2.0))
    image.SetOrigin((12.5, -30.25, 101.0))
    angle = np.deg2rad(8.0)
    image.SetDirection((np.cos(angle), -np.sin(angle), 0.0, np.sin(angle), np.cos(angle), 0.0, 0.0, 0.0, 1.0))
    index = voxel_centres(image.GetSize()).numpy()
    world = apply_affine(image_affine(image), index.reshape(-1, 3)).reshape(index.shape)
    filled = sitk.GetImageFromArray(_ramp(world).astype(np.float32))
    filled.CopyInformation(image)
    return load_scan(filled, spacing_mm=1.0, hu_window=WINDOW, foreground_hu=-1e9)


def _interior(scan, world: np.ndarray, margin: float = 3.0) -> np.ndarray:
    """(N,) bool: world points at least ``margin`` voxels inside the (resampled) scan grid."""
    index = apply_affine(scan.world_to_index, world)
    return ((index >= margin) & (index <= np.array(scan.size_xyz) - 1 - margin)).all(axis=1)


def test_positive_pairs_map_to_the_same_world_point(ramp_scan):
    config = CropConfig(size=(24, 20, 16), scan_spacing_mm=1.0, hu_window=WINDOW)
    rng = np.random.default_rng(1)
    scales = []
    for _ in range(20):
        view1, view2 = sample_view_pair(ramp_scan, config, rng)
        scales += [view1.scale, view2.scale]
        index1 = rng.uniform(0, np.array(view1.size) - 1, size=(500, 3))
        world = view1.to_world(index1)
        index2 = view2.to_index(world)
        # view 1 -> world -> view 2 -> world is the identity (rescale included)
        assert np.abs(view2.to_world(index2) - world).max() < 1e-4
        # spacing of each view = base * its own scale
        for view in (view1, view2):
            step = view.to_world(np.array([[1.0, 0, 0]])) - view.to_world(np.zeros((1, 3)))
            assert np.linalg.norm(step) == pytest.approx(config.base_spacing_mm * view.scale, rel=1e-9)
    assert min(scales) >= 0.8 and max(scales) <= 1.2 and max(scales) - min(scales) > 0.2


def test_views_sample_the_scan_at_their_world_points(ramp_scan):
    """The grid_sample views hold the scan's value at A_view @ index, for both views (float32 precision)."""
    config = CropConfig(size=(24, 20, 16), scan_spacing_mm=1.0, hu_window=WINDOW)
    rng = np.random.default_rng(2)
    for _ in range(5):
        for view in sample_view_pair(ramp_scan, config, rng):
            values, valid = sample_view(ramp_scan, view)
            world = view.to_world(voxel_centres(view.size).numpy().reshape(-1, 3))
            expected = _ramp(world) / WINDOW[1]
            got = values.reshape(-1).numpy()
            inside = valid.reshape(-1).numpy()
            assert inside.any()
            # voxels away from the resampled scan's border (which holds air where it leaves the oblique
            # original) match to < 0.05 HU
            interior = inside & _interior(ramp_scan, world)
            assert np.abs(got - expected)[interior].max() * WINDOW[1] < 0.05


def test_views_overlap_and_share_the_seed(ramp_scan):
    config = CropConfig(size=(16, 16, 8), scan_spacing_mm=1.0, hu_window=WINDOW)
    rng = np.random.default_rng(3)
    for _ in range(20):
        view1, view2 = sample_view_pair(ramp_scan, config, rng)
        corners = view1.to_world(np.array([[0, 0, 0], np.array(view1.size) - 1], dtype=float))
        points = rng.uniform(corners.min(axis=0), corners.max(axis=0), size=(4000, 3))
        assert view2.contains(points).any()


def test_objective_keys_are_interpolated_at_the_query_world_point(ramp_scan):
    """Inside the SAM objective, a query voxel of view 1 and its key in view 2 are the same world point."""
    config = CropConfig(size=(32, 32, 16), scan_spacing_mm=1.0, hu_window=WINDOW)
    batch = TwoViewSampler([ramp_scan], config, seed=4, augment=False).sample(1)
    objective = SAMObjective()
    levels = {}
    for v in (1, 2):
        feats = batch[f"view{v}"][0][:, ::2, ::2, ::2]  # "features" = the intensity at every fine voxel
        levels[v] = objective._level(feats, batch[f"affine{v}"][0].numpy(), 2, batch["scan_to_index"][0].numpy(), batch["scan_size"][0].numpy())
        level = levels[v]
        interior = level.valid & torch.from_numpy(_interior(ramp_scan, level.world.numpy()))
        assert (level.feats[0] - _ramp(level.world) / WINDOW[1])[interior].abs().max() * WINDOW[1] < 0.05
    index2, inside = objective._inside(levels[2], levels[1].world)
    keep = inside & levels[1].valid & torch.from_numpy(_interior(ramp_scan, levels[1].world.numpy()))
    assert keep.sum() > 100
    grid = torch.nn.functional.grid_sample(
        levels[2].grid,
        (2 * index2[keep] / (torch.tensor(levels[2].size, dtype=torch.float64) - 1) - 1).float().reshape(1, 1, 1, -1, 3),
        align_corners=True,
    )
    assert (grid.reshape(-1) - levels[1].feats[0][keep]).abs().max() * WINDOW[1] < 0.05


def test_sampler_state_replays_the_same_batch(ramp_scan):
    config = CropConfig(size=(16, 16, 8), scan_spacing_mm=1.0, hu_window=WINDOW)
    sampler = TwoViewSampler([ramp_scan], config, seed=5)
    sampler.sample(2)
    state = sampler.state_dict()
    first = sampler.sample(2)
    sampler.load_state_dict(state)
    again = sampler.sample(2)
    for key in first:
        assert torch.equal(first[key], again[key]), key


def test_crop_config_rejects_unknown_keys():
    with pytest.raises(InputError, match="unknown"):
        CropConfig.from_dict({"sizes": [1, 2, 3]})


def test_rotated_views_keep_positives_exact(ramp_scan):
    """Up to 15 deg per axis: a world point read in both views is the same point, and views hold its value."""
    config = CropConfig(size=(24, 20, 16), scan_spacing_mm=1.0, hu_window=WINDOW, rotation_deg=15.0)
    rng = np.random.default_rng(6)
    angles = []
    for _ in range(10):
        view1, view2 = sample_view_pair(ramp_scan, config, rng)
        for view in (view1, view2):
            axes = view.index_to_world[:3, :3] / np.linalg.norm(view.index_to_world[:3, :3], axis=0)
            scan_axes = ramp_scan.index_to_world[:3, :3] / np.linalg.norm(ramp_scan.index_to_world[:3, :3], axis=0)
            relative = scan_axes.T @ axes  # the view's rotation relative to the scan grid
            angles.append(np.degrees(np.arccos(np.clip((np.trace(relative) - 1) / 2, -1, 1))))
            values, valid = sample_view(ramp_scan, view)
            world = view.to_world(voxel_centres(view.size).numpy().reshape(-1, 3))
            interior = valid.reshape(-1).numpy() & _interior(ramp_scan, world)
            assert np.abs(values.reshape(-1).numpy() - _ramp(world) / WINDOW[1])[interior].max() * WINDOW[1] < 0.05
        world = view1.to_world(rng.uniform(0, np.array(view1.size) - 1, size=(200, 3)))
        assert np.abs(view2.to_world(view2.to_index(world)) - world).max() < 1e-4
    assert 5.0 < max(angles) <= 15.0 + 1e-6


def test_thick_slice_views_blur_along_z_only():
    """A 4 mm-period z pattern vanishes in an 8 mm thick-slice reading; a linear ramp is reproduced exactly;
    x/y detail is untouched."""
    z = (np.arange(200) * 0.5)[:, None, None]  # 100 mm along z
    x = np.arange(30)[None, None, :]
    affine = np.eye(4) * 0.5
    affine[3, 3] = 1.0
    affine[:3, 3] = (2.0, 2.0, 42.0)  # 16 x 16 x 32 voxels of 0.5 mm well inside the scan
    view = ViewGeometry((16, 16, 32), affine)
    for pattern, thickness, phase, expect_thin, expect_thick in (
        (100.0 * np.sin(2 * np.pi * z / 4.0), 8.0, 0.3, "pattern", "flat"),
        (10.0 * z + 0.0 * x, 6.0, 0.7, "pattern", "same"),
        (100.0 * np.sin(2 * np.pi * x / 4.0) + 0.0 * z, 8.0, 0.1, "pattern", "same"),
    ):
        image = sitk.GetImageFromArray(np.broadcast_to(pattern, (200, 30, 30)).astype(np.float32))
        image.SetSpacing((1.0, 1.0, 0.5))
        scan = load_scan(image, spacing_mm=0.5, hu_window=WINDOW, foreground_hu=-1e9)
        thin, valid = sample_view(scan, view)
        thick, _ = sample_view(scan, view, thickness_mm=thickness, phase=phase)
        assert valid.all()
        assert np.ptp(thin.numpy()) * WINDOW[1] > 50
        if expect_thick == "flat":  # slab average (3-point rule at 0, +-t/3) of a 4 mm sine over 8 mm is ~0
            assert np.abs(thick.numpy()).max() * WINDOW[1] < 1.0
        else:
            assert np.abs((thick - thin).numpy()).max() * WINDOW[1] < 0.05
    config = CropConfig(size=(16, 16, 16), base_spacing_mm=0.5, hu_window=WINDOW, thick_slice_prob=1.0)
    batch = TwoViewSampler([scan], config, seed=0, augment=True).sample(1)
    assert batch["view1"].shape == (1, 1, 16, 16, 16)
    with pytest.raises(InputError, match="thick_slice_prob"):
        CropConfig.from_dict({"thick_slice_prob": 2.0})


def test_part_grids_tile_view_one_exactly(ramp_scan):
    assert hierarchy_grids((64, 64, 32), 3) == [(2, 1, 1), (2, 2, 1), (4, 2, 1)]
    assert hierarchy_grids((32, 64, 32), 1) == [(1, 2, 1)]
    with pytest.raises(InputError, match="cannot split"):
        hierarchy_grids((32, 32, 32), 4, min_part=16)
    config = CropConfig(size=(32, 32, 16), scan_spacing_mm=1.0, hu_window=WINDOW, rotation_deg=10.0)
    batch = TwoViewSampler([ramp_scan], config, seed=7, augment=False, part_grids=((2, 2, 1),)).sample(2)
    key = grid_key((2, 2, 1))
    assert batch[key].shape == (2, 4, 1, 16, 16, 16) and batch[key + "_affine"].shape == (2, 4, 4, 4)
    for b in range(2):
        view = batch["view1"][b, 0]
        for p, (a, y, c) in enumerate([(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)]):
            # part p = (c * gy + y) * gx + a holds view voxels [a*16, a*16+16) x [y*16, ...) x [c*16, ...)
            block = view[c * 16:(c + 1) * 16, y * 16:(y + 1) * 16, a * 16:(a + 1) * 16]
            assert (batch[key][b, p, 0] - block).abs().max() * WINDOW[1] < 0.05
    with pytest.raises(InputError, match="must be 3 positive counts dividing"):
        split_grid(sample_view_pair(ramp_scan, config, np.random.default_rng(0))[0], (3, 1, 1))
