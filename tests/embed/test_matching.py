"""Point matching: exact on planted embeddings, accurate on a deformed real CT, strict on bad input."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.ndimage import gaussian_filter

from regsam.embed.inference import Embedding, embed_image
from regsam.embed.matching import (
    _interpolated_norm_sampled,
    _interpolated_norm_separable,
    _Level,
    _near,
    match_points,
    similarity_at,
)
from regsam.embed.model import DEFAULT_WEIGHTS, load_embedder
from regsam.errors import InputError
from regsam.io.geometry import empty_like_grid
from regsam.io.images import read_image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import matching_benchmark  # noqa: E402

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _field(rng, channels, shape, sigma):
    a = rng.standard_normal((channels, *shape)).astype(np.float32)
    a = np.stack([gaussian_filter(c, sigma) for c in a])
    return a / np.linalg.norm(a, axis=0, keepdims=True)


@pytest.fixture(scope="module")
def planted():
    """The same smooth random embedding placed on two grids 7.3, -5.1, 3.7 mm apart (image grid 2 mm)."""
    rng = np.random.default_rng(0)
    d, h, w = 40, 48, 56
    fine = _field(rng, 32, (d // 2, h // 2, w // 2), 1.5).astype(np.float16)
    coarse = _field(rng, 32, (d // 8, h // 8, w // 8), 1.0)

    def embedding(origin):
        return Embedding(
            np.ascontiguousarray(fine.transpose(1, 2, 3, 0)).transpose(3, 0, 1, 2),
            np.ascontiguousarray(coarse.transpose(1, 2, 3, 0)).transpose(3, 0, 1, 2),
            empty_like_grid((w // 2, h // 2, d // 2), origin, (4.0,) * 3, IDENTITY),
            empty_like_grid((w // 8, h // 8, d // 8), origin, (16.0,) * 3, IDENTITY),
            empty_like_grid((w, h, d), origin, (2.0,) * 3, IDENTITY),
            2.0,
        )

    shift = np.array([7.3, -5.1, 3.7])
    return embedding((0.0, 0.0, 0.0)), embedding(tuple(shift)), shift


def test_planted_embedding_is_found(planted):
    template, target, shift = planted
    rng = np.random.default_rng(1)
    on_grid = np.array([[4.0 * i, 4.0 * j, 4.0 * k] for i in range(4, 10) for j in range(4, 8) for k in range(3, 6)])
    result = match_points(template, on_grid, target, cycle_tolerance_mm=3.0, device="cpu")
    error = np.linalg.norm(result.matched - (on_grid + shift), axis=1)
    assert error.max() < 1.0  # exact voxel, sub-voxel parabola stays within a quarter voxel
    assert result.valid.all() and result.cycle_error_mm.max() < 3.0
    assert result.score.min() > 0.99
    off_grid = rng.uniform([12, 12, 12], [100, 84, 64], size=(2000, 3))
    result = match_points(template, off_grid, target, device="cpu", chunk_size=300)
    error = np.linalg.norm(result.matched - (off_grid + shift), axis=1)
    assert np.median(error) < 1.0 and np.percentile(error, 95) < 2.5  # fine voxels are 4 mm


def test_separable_coarse_norm_equals_grid_sample():
    """The matrix-product interpolation of the coarse level's length equals grid_sample's, clamping at the border
    included (the coarse grid is offset and shorter than the fine one along z)."""
    rng = np.random.default_rng(3)
    fine_grid = empty_like_grid((10, 12, 9), (1.0, -2.0, 0.5), (2.0, 2.0, 3.0), IDENTITY)
    fine = _Level(_field(rng, 16, (9, 12, 10), 1.0), fine_grid, np.ones((9, 12, 10), bool), torch.device("cpu"))
    coarse_grid = empty_like_grid((4, 5, 3), (2.5, -1.0, 3.0), (6.0, 5.0, 7.5), IDENTITY)
    coarse = _Level(_field(rng, 16, (3, 5, 4), 0.7), coarse_grid, np.ones((3, 5, 4), bool), torch.device("cpu"))
    to_coarse = torch.as_tensor(coarse.inverse @ fine.affine, dtype=torch.float64)
    separable = _interpolated_norm_separable(coarse, fine, to_coarse)
    sampled = _interpolated_norm_sampled(coarse, fine, to_coarse, slab=4)
    assert separable.shape == sampled.shape == (9 * 12 * 10,)
    np.testing.assert_allclose(separable.numpy(), sampled.numpy(), atol=2e-6)
    assert sampled.min() < 0.95  # the interpolation shortens the unit vectors: the test is not trivial


def test_non_maximum_suppression_mask_is_the_ball():
    size = (7, 5, 6)  # x, y, z
    centres = torch.tensor([[0, 0, 0], [3, 2, 4], [6, 4, 5]])
    zz, yy, xx = np.meshgrid(np.arange(6), np.arange(5), np.arange(7), indexing="ij")
    grid = np.stack((xx, yy, zz), axis=-1).reshape(-1, 3)
    expected = ((grid[None] - centres.numpy()[:, None]) ** 2).sum(axis=2) <= 2.5**2
    np.testing.assert_array_equal(_near(centres, size, 2.5).numpy(), expected)


def test_match_point_validation(planted):
    template, target, _ = planted
    with pytest.raises(InputError, match="outside the template"):
        match_points(template, np.array([[20.0, 20.0, 20.0], [500.0, 0.0, 0.0]]), target)
    with pytest.raises(InputError, match=r"\(N, 3\)"):
        match_points(template, np.zeros((4, 2)), target)
    with pytest.raises(InputError, match="NaN"):
        match_points(template, np.array([[np.nan, 1.0, 1.0]]), target)
    empty = match_points(template, np.zeros((0, 3)), target)
    assert empty.matched.shape == (0, 3)


@pytest.fixture(scope="module")
def shipped_model():
    if not DEFAULT_WEIGHTS.is_file():
        pytest.skip("no shipped weights (regsam/weights/sam_chest.pt)")
    return load_embedder(None, device="cpu")


@pytest.fixture(scope="module")
def held_out_ct(shared_data):
    path = shared_data / "totalseg" / "aorta_ct_cropped.nii.gz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return read_image(path)


@pytest.mark.slow
def test_shipped_weights_match_a_deformed_held_out_ct(shipped_model, held_out_ct):
    summary, _ = matching_benchmark.run(shipped_model, held_out_ct, n_points=120)
    assert summary.identity_median_mm > 8.0  # the deformation is large enough to matter
    assert summary.median_mm < 5.0, summary
    assert summary.within_8mm > 0.65, summary
    assert summary.cycle_median_mm <= summary.median_mm + 0.5, summary


@pytest.mark.slow
def test_planted_landmark_in_a_shifted_real_ct(shipped_model, held_out_ct):
    """A 4 mm calcification-like bead planted in the CT is found in a copy shifted by (9.4, -6.2, 12.9) mm."""
    array = sitk.GetArrayFromImage(held_out_ct).astype(np.float32)
    centre_index = (60, 70, 90)  # x, y, z voxel in the mediastinum
    zz, yy, xx = np.ogrid[: array.shape[0], : array.shape[1], : array.shape[2]]
    spacing = held_out_ct.GetSpacing()
    r2 = ((xx - centre_index[0]) * spacing[0]) ** 2 + ((yy - centre_index[1]) * spacing[1]) ** 2 + ((zz - centre_index[2]) * spacing[2]) ** 2
    array[r2 <= 2.0**2] = 1200.0
    ct = sitk.GetImageFromArray(array)
    ct.CopyInformation(held_out_ct)
    shift = np.array([9.4, -6.2, 12.9])
    # target(x) = ct(x + shift): the bead at p in ct is at p - shift in the target
    target = sitk.Resample(ct, ct, sitk.TranslationTransform(3, shift.tolist()), sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    bead = np.array([ct.TransformContinuousIndexToPhysicalPoint(centre_index)])
    result = match_points(embed_image(shipped_model, ct), bead, embed_image(shipped_model, target), cycle_tolerance_mm=4.0)
    error = np.linalg.norm(result.matched - (bead - shift), axis=1)
    assert error[0] < 3.0, (result.matched, bead - shift)
    assert result.valid[0]


@pytest.mark.slow
def test_consensus_matching_beats_per_point_search_on_a_deformed_held_out_ct(shipped_model, held_out_ct):
    """Consensus matching (smooth map fitted to dense matches) removes the gross errors of per-point search."""
    from regsam.embed.consensus import ConsensusMatcher

    transform = matching_benchmark.deformation(held_out_ct, seed=0)
    target = matching_benchmark.deformed_copy(held_out_ct, transform)
    points = matching_benchmark.body_points(target, 200, seed=1)
    truth = np.array([transform.TransformPoint(p.tolist()) for p in points])
    emb_target, emb_ct = embed_image(shipped_model, target), embed_image(shipped_model, held_out_ct)
    nearest = match_points(emb_target, points, emb_ct)
    matcher = ConsensusMatcher(target, emb_target, held_out_ct, emb_ct, cycle_tolerance_mm=3.0)
    consensus = matcher(points)
    err_nearest = np.linalg.norm(nearest.matched - truth, axis=1)
    err = np.linalg.norm(consensus.matched - truth, axis=1)
    identity = np.linalg.norm(points - truth, axis=1)
    assert np.median(identity) > 8.0
    assert err.mean() < 0.5 * err_nearest.mean(), (err.mean(), err_nearest.mean())
    assert err.mean() < 3.0 and np.percentile(err, 95) < 6.0, (err.mean(), np.percentile(err, 95))
    # the anchors are mostly kept, the fit is reused for a second point set, and round trips close
    assert matcher.forward.anchor_kept.mean() > 0.5
    forward = matcher.forward
    again = matcher(points[:10])
    assert matcher.forward is forward and np.allclose(again.matched, consensus.matched[:10])
    assert consensus.valid.mean() > 0.75 and np.median(consensus.cycle_error_mm) < 1.5
    assert err[consensus.valid].mean() < err.mean()  # the cycle check flags the worse answers
    # scores are the embedding similarity at the answer: higher there than at the identity position
    assert np.median(consensus.score) > np.median(similarity_at(emb_target, points, emb_ct, points))
