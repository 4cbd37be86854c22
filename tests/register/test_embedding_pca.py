"""PCA of fine embeddings: the channels-last projection and the projection of only the part a grid reads."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from regsam.io.geometry import empty_like_grid
from regsam.register import torch_fields as tf
from regsam.register.embedding_pca import pca_basis, project_features, project_seen


def _embedding(seed: int) -> np.ndarray:
    """(C, D, H, W) float16 unit vectors, channels-last in memory like regsam.embed.inference's fine output."""
    rows = np.random.default_rng(seed).normal(size=(9, 10, 11, 24)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=-1, keepdims=True)
    return rows.astype(np.float16).transpose(3, 0, 1, 2)


def test_project_features_matches_the_channels_first_formula() -> None:
    fine = _embedding(0)
    basis, mean = pca_basis(fine, _embedding(1), 5)
    flat = torch.from_numpy(np.ascontiguousarray(fine)).reshape(24, -1).float()
    expected = basis @ (flat - mean)
    expected /= expected.norm(dim=0, keepdim=True) + 1e-6
    out = project_features(fine, basis, mean)
    assert out.shape == (5, 9, 10, 11) and out.dtype == np.float32 and out.flags.c_contiguous
    assert np.allclose(out, expected.reshape(5, 9, 10, 11).numpy(), atol=1e-5)


def test_project_seen_samples_like_the_whole_projection() -> None:
    fine = _embedding(2)
    geometry = empty_like_grid((11, 10, 9), (-10.0, 5.0, 2.0), (2.0, 2.0, 3.0), np.eye(3))
    basis, mean = pca_basis(fine, fine, 4)
    whole = torch.from_numpy(project_features(fine, basis, mean))
    target = empty_like_grid((5, 4, 6), (-4.0, 9.0, 6.0), (1.5, 1.7, 1.9), np.eye(3))
    for transform in (None, sitk.TranslationTransform(3, (3.0, -2.0, 40.0))):  # the second leaves the top in z
        part, part_geometry = project_seen(fine, geometry, basis, mean, target, transform)
        assert np.prod(part.shape) < np.prod(whole.shape)
        got = tf.sample_world(torch.from_numpy(part), part_geometry, target, transform=transform)
        want = tf.sample_world(whole, geometry, target, transform=transform)
        assert torch.allclose(got, want, atol=1e-5)
