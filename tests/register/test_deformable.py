"""regsam.register.deformable and regsam.register.torch_fields on a real CT crop with planted motion.

Planting: ``moving`` is the CT (4 mm) and ``fixed(x) = moving(x + u(x))`` (``sitk.Resample`` through the
planted field ``u``), so the true fixed -> moving mapping is exactly ``x -> x + u(x)`` and the true
moving landmark of a fixed point ``p`` is ``p + u(p)`` (``u`` is analytic, no inversion needed).
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from regsam.errors import InputError
from regsam.io.transforms import folding_share, map_points, transform_to_field
from regsam.register import torch_fields as tf
from regsam.register.deformable import PRESETS, local_contrast, mind_ssc, refine_deformable

SPACING = 4.0
SHIFT = np.array([3.0, -4.0, 5.0])


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs with one torch thread (fixture in conftest.py)."""


def breathing(points: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Smooth breathing-like motion (mm): up to ~8 mm cranio-caudal (z) near the base, some AP (y), a little x."""
    q = points - centre
    g1 = np.exp(-np.sum((q - [20, 10, -40]) ** 2, axis=1) / (2 * 35.0**2))
    g2 = np.exp(-np.sum((q - [-30, -20, -20]) ** 2, axis=1) / (2 * 30.0**2))
    u = np.zeros_like(q)
    u[:, 2] = 8.0 * g1 + 6.0 * g2
    u[:, 1] = -3.0 * g1 + 3.0 * g2
    u[:, 0] = 2.0 * np.sin(q[:, 2] / 30.0)
    return u


@pytest.fixture(scope="module")
def planted(ct4):
    """(fixed, moving, fixed landmarks, true moving landmarks, planted u as a function)."""
    moving = ct4
    centre = np.array(moving.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in moving.GetSize()]))

    def u(points):
        return breathing(points, centre) + SHIFT

    grid_pts = tf.world_points(moving).reshape(-1, 3)
    arr = u(grid_pts).reshape(tuple(moving.GetSize()[::-1]) + (3,))
    field = sitk.GetImageFromArray(arr, isVector=True)
    field.CopyInformation(moving)
    fixed = sitk.Resample(moving, moving, sitk.DisplacementFieldTransform(field), sitk.sitkLinear, -1024.0)
    rng = np.random.default_rng(0)
    body = np.argwhere(sitk.GetArrayFromImage(fixed)[3:-3, 3:-3, 3:-3] > -500) + 3
    pick = body[rng.choice(len(body), 300, replace=False)]
    points = np.array([fixed.TransformIndexToPhysicalPoint([int(i) for i in p[::-1]]) for p in pick])
    return fixed, moving, points, points + u(points), u


def tre(field, points, truth) -> float:
    return float(np.linalg.norm(map_points(field, points) - truth, axis=1).mean())


# ------------------------------------------------------------------ torch_fields conventions
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_warp_ddf_axis_convention_on_a_rotated_anisotropic_grid(axis):
    """A world shift along x, y or z, converted with field_to_ddf, makes MONAI Warp reproduce sitk.Resample."""
    rng = np.random.default_rng(axis)
    image = sitk.GetImageFromArray(rng.normal(size=(14, 16, 18)).astype(np.float32))
    image.SetSpacing((1.5, 2.0, 3.0))
    image.SetOrigin((5.0, -3.0, 2.0))
    image.SetDirection(sitk.VersorTransform((0.3, 0.5, 0.2), 0.4).GetMatrix())
    image = sitk.SmoothingRecursiveGaussian(image, 3.0)
    shift = np.zeros(3)
    shift[axis] = 4.0
    field = sitk.GetImageFromArray(np.broadcast_to(shift, (14, 16, 18, 3)).copy(), isVector=True)
    field.CopyInformation(image)
    expected = sitk.GetArrayFromImage(sitk.Resample(image, image, sitk.TranslationTransform(3, shift.tolist()), sitk.sitkLinear, 0.0))
    ddf = tf.field_to_ddf(field)
    got = tf.make_warp()(tf.image_to_tensor(image), ddf)[0, 0].numpy()
    inner = (slice(4, -4),) * 3
    assert np.abs(got[inner] - expected[inner]).max() < 1e-4
    # and a wrong channel order would not: the shift is really seen along one axis only
    wrong = tf.make_warp()(tf.image_to_tensor(image), ddf.flip(1))[0, 0].numpy()
    assert np.abs(wrong[inner] - expected[inner]).max() > 0.05
    back = sitk.GetArrayFromImage(tf.ddf_to_field(ddf, image))
    assert np.allclose(back, shift, atol=1e-5)


def test_sample_world_matches_sitk_resample_and_grids_are_corner_aligned(ct4):
    coarse = tf.corner_aligned_grid(ct4, 9.0)
    assert np.allclose(coarse.GetOrigin(), ct4.GetOrigin())
    last = [s - 1 for s in ct4.GetSize()]
    assert np.allclose(
        coarse.TransformIndexToPhysicalPoint([s - 1 for s in coarse.GetSize()]), ct4.TransformIndexToPhysicalPoint(last)
    )
    shift = sitk.TranslationTransform(3, (2.5, -3.0, 1.0))
    got = tf.sample_world(tf.image_to_tensor(ct4)[0], ct4, coarse, transform=shift)[0].numpy()
    expected = sitk.GetArrayFromImage(sitk.Resample(ct4, coarse, shift, sitk.sitkLinear, -1024.0))
    inner = (slice(1, -1),) * 3
    assert np.abs(got[inner] - expected[inner]).max() < 0.05
    pooled = tf.pooled_geometry(ct4, (5, 4, 6))
    assert np.allclose(np.array(pooled.GetSpacing()) * np.array(pooled.GetSize()), np.array(ct4.GetSpacing()) * np.array(ct4.GetSize()))


def test_mind_ssc_shape_and_invariance():
    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.normal(size=(1, 1, 12, 13, 14)).astype(np.float32))
    d = mind_ssc(img)
    assert d.shape == (1, 12, 12, 13, 14) and torch.isfinite(d).all()
    assert float(d.max()) <= 1.0 + 1e-6 and float(d.min()) >= 0.0
    assert torch.allclose(mind_ssc(3.0 * img + 7.0), d, atol=1e-4)  # contrast invariant


def test_local_contrast_ignores_gain_and_offset_but_keeps_position():
    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.normal(size=(1, 1, 12, 13, 14)).astype(np.float32))
    c = local_contrast(img, window=3)
    assert c.shape == img.shape and float(c.abs().max()) <= 1.0
    assert torch.allclose(local_contrast(2.5 * img - 4.0, window=3), c, atol=1e-3)  # density change between phases
    assert not torch.allclose(local_contrast(-img, window=3), c, atol=0.1)  # a sign MIND-SSC's distances lose
    shifted = local_contrast(torch.roll(img, 1, dims=2), window=3)
    assert torch.allclose(shifted[:, :, 3:-3], torch.roll(c, 1, dims=2)[:, :, 3:-3], atol=1e-5)  # moves with the image


# ------------------------------------------------------------------ refinement
def test_refinement_lowers_tre_without_folding(planted):
    fixed, moving, points, truth, _ = planted
    initial = sitk.TranslationTransform(3, SHIFT.tolist())  # right shift, breathing unknown
    before = tre(initial, points, truth)

    result = refine_deformable(fixed, moving, initial, preset="fast", iterations=(60, 30))

    after = tre(result.field, points, truth)
    assert before > 2.5
    assert after < 0.4 * before and after < 1.2, (before, after)
    assert result.field.GetSize() == fixed.GetSize() and result.field.GetPixelID() == sitk.sitkVectorFloat64
    assert result.folding_share == 0.0 and folding_share(result.field) == 0.0
    assert result.info["levels"][-1]["loss_last"] < result.info["levels"][0]["loss_first"]


def test_initial_field_is_accepted_and_mask_weights(planted):
    """Start from a dense field (half the true motion) and weight the similarity by a body mask."""
    fixed, moving, points, truth, u = planted
    half = sitk.GetImageFromArray(0.5 * u(tf.world_points(fixed).reshape(-1, 3)).reshape(tuple(fixed.GetSize()[::-1]) + (3,)), isVector=True)
    half.CopyInformation(fixed)
    mask = sitk.Cast(fixed > -500, sitk.sitkUInt8)
    before = tre(half, points, truth)
    result = refine_deformable(fixed, moving, half, fixed_mask=mask, iterations=(40, 20), diffeomorphic=True)
    after = tre(result.field, points, truth)
    assert after < 0.5 * before, (before, after)
    assert result.folding_share == 0.0


def test_embedding_term_alone_drives_alignment(planted):
    """weight_image=0: only synthetic 'embeddings' (smooth coordinate-like channels, 8 mm grids) guide the fit."""
    fixed, moving, points, truth, u = planted
    rng = np.random.default_rng(4)
    directions = rng.normal(size=(8, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    phases = rng.uniform(0, 2 * np.pi, size=8)

    def g(points_mm):  # features of an anatomical (moving-space) position: (N, 8)
        return np.sin(points_mm @ directions.T / 25.0 + phases)

    moving_geo = tf.pooled_geometry(moving, tuple(s // 2 for s in moving.GetSize()[::-1]))
    fixed_geo = tf.pooled_geometry(fixed, tuple(s // 2 for s in fixed.GetSize()[::-1]))
    mpts = tf.world_points(moving_geo)
    fpts = tf.world_points(fixed_geo)
    moving_feat = torch.from_numpy(g(mpts.reshape(-1, 3)).T.reshape((8,) + mpts.shape[:3]).astype(np.float32))
    fixed_at = fpts.reshape(-1, 3)
    fixed_feat = g(fixed_at + u(fixed_at)).T.reshape((8,) + fpts.shape[:3]).astype(np.float32)  # numpy also accepted

    initial = sitk.TranslationTransform(3, SHIFT.tolist())
    before = tre(initial, points, truth)
    result = refine_deformable(
        fixed, moving, initial, weight_image=0.0, weight_embed=1.0, iterations=(60, 30),
        fixed_features=fixed_feat, moving_features=moving_feat, moving_feature_geometry=moving_geo,
    )
    after = tre(result.field, points, truth)
    assert result.info["embedding_term"] is True
    assert after < 0.4 * before, (before, after)
    assert result.folding_share == 0.0


def test_initial_transform_is_composed_and_upsampled_exactly(ct4):
    """No iterations: the result is the initial affine itself, after a detour through a coarser working grid."""
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((1.04, 0.03, 0.0, -0.02, 0.97, 0.05, 0.01, 0.0, 1.02))
    affine.SetCenter(ct4.TransformContinuousIndexToPhysicalPoint([20, 18, 20]))
    affine.SetTranslation((4.0, -6.0, 9.0))
    result = refine_deformable(ct4, ct4, affine, spacing_mm=7.0, iterations=(0, 0))
    assert result.info["working_grid"]["size"] != list(ct4.GetSize())
    expected = sitk.GetArrayFromImage(transform_to_field(affine, ct4))
    assert np.abs(sitk.GetArrayFromImage(result.field) - expected).max() < 1e-3


def test_folds_are_repaired(planted):
    """No regulariser, a huge step size: the raw optimum folds; the returned field must not."""
    fixed, moving, *_ = planted
    result = refine_deformable(
        fixed, moving, None, levels=1, iterations=(25,), lr=3.0, weight_smooth=0.0, param_smoothing=0
    )
    fix = result.info["folding_fix"]
    assert fix["folded_before"] > 0.0 and fix["repairs"] >= 1
    assert result.folding_share == 0.0 and folding_share(result.field) == 0.0


def test_a_folding_initial_field_is_repaired_too(ct4):
    """An initial field that folds (a sharp 12 mm bump, sigma 5 mm) is smoothed until it does not."""
    pts = tf.world_points(ct4).reshape(-1, 3)
    centre = np.array(ct4.TransformContinuousIndexToPhysicalPoint([20, 18, 20]))
    bump = np.exp(-np.sum((pts - centre) ** 2, axis=1) / (2 * 5.0**2))
    arr = np.zeros_like(pts)
    arr[:, 0] = 12.0 * np.sign(pts[:, 0] - centre[0]) * -bump
    initial = sitk.GetImageFromArray(arr.reshape(tuple(ct4.GetSize()[::-1]) + (3,)), isVector=True)
    initial.CopyInformation(ct4)
    assert folding_share(initial) > 0
    result = refine_deformable(ct4, ct4, initial, iterations=(0, 0))
    fix = result.info["folding_fix"]
    assert fix["folded_before"] > 0 and (fix["field_sigma_voxels"] > 0 or fix["local_unfold_rounds"][0] > 0), fix
    assert result.folding_share == 0.0 and folding_share(result.field) == 0.0


def test_bad_options(planted):
    fixed, moving, *_ = planted
    with pytest.raises(InputError, match="unknown deformable preset"):
        refine_deformable(fixed, moving, preset="nope")
    with pytest.raises(InputError, match="unknown deformable option"):
        refine_deformable(fixed, moving, bogus=1)
    with pytest.raises(InputError, match="both fixed_features and moving_features"):
        refine_deformable(fixed, moving, fixed_features=torch.zeros(2, 4, 4, 4))
    with pytest.raises(InputError, match="one count per level"):
        refine_deformable(fixed, moving, iterations=(1, 2, 3))
    with pytest.raises(InputError, match="does not match the feature shape"):
        refine_deformable(
            fixed, moving, fixed_features=torch.zeros(2, 4, 4, 4), moving_features=torch.zeros(2, 4, 4, 4),
            fixed_feature_geometry=fixed, iterations=(1, 1),
        )
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA"):
            refine_deformable(fixed, moving, device="cuda")
    assert set(PRESETS) == {"fast", "accurate"}


def test_no_level_is_finer_than_the_fixed_image(planted):
    """Asked for 1 mm on a 4 mm image, the finest level works at 4 mm (the coarser ones scale with it)."""
    fixed, moving, _, _, _ = planted
    assert min(fixed.GetSpacing()) == pytest.approx(4.0)
    result = refine_deformable(fixed, moving, None, spacing_mm=1.0, levels=2, iterations=(2, 2))
    assert result.info["working_grid"]["spacing_mm"] == pytest.approx([4.0, 4.0, 4.0])
    # corner-aligned grids stretch a level's spacing slightly so that it spans the image exactly
    assert [lvl["spacing_mm"] for lvl in result.info["levels"]] == [pytest.approx([8.0] * 3, rel=0.05), pytest.approx([4.0] * 3, rel=0.05)]


def test_box_smoothing_equals_average_pooling():
    from regsam.register.deformable import _smooth_param

    theta = torch.randn(1, 3, 9, 7, 8, generator=torch.Generator().manual_seed(1))
    expected = theta
    for _ in range(2):
        expected = torch.nn.functional.avg_pool3d(torch.nn.functional.pad(expected, [1] * 6, mode="replicate"), 3, stride=1)
    assert torch.allclose(_smooth_param(theta, 2), expected, atol=1e-6)


def test_functional_adam_takes_the_same_steps_as_torch_adam():
    from regsam.register.deformable import _Adam

    start = torch.randn(40, generator=torch.Generator().manual_seed(2))
    a, b = start.clone().requires_grad_(True), start.clone().requires_grad_(True)
    reference, ours = torch.optim.Adam([a], lr=0.05), _Adam(b, lr=0.05)
    for _ in range(15):
        for param, opt in ((a, reference), (b, ours)):
            opt.zero_grad()
            ((param - 1.5) ** 4).sum().backward()
            opt.step()
    assert not torch.allclose(b, start)
    assert torch.allclose(a, b, atol=1e-6)


def test_coarse_control_grid_on_the_finest_level_still_refines(planted):
    """finest_control_ratio=2: the finest level's unknowns live on a 2x coarser grid, its loss on the full one."""
    fixed, moving, points, truth, _ = planted
    initial = sitk.TranslationTransform(3, SHIFT.tolist())
    before = tre(initial, points, truth)
    result = refine_deformable(fixed, moving, initial, iterations=(60, 30), finest_control_ratio=2)
    finest = result.info["levels"][-1]
    assert finest["size"] == result.info["working_grid"]["size"]
    assert all(2 * c <= s + 1 for c, s in zip(finest["control_size"], finest["size"]))
    assert tre(result.field, points, truth) < 0.4 * before
    assert result.folding_share == 0.0


def test_embedding_term_only_on_the_coarsest_levels(planted):
    """embed_levels=0 with weight_image=0 leaves nothing to optimise: the initial mapping comes back unchanged."""
    fixed, moving, points, truth, _ = planted
    feat = torch.randn(4, 6, 6, 6, generator=torch.Generator().manual_seed(3))
    initial = sitk.TranslationTransform(3, SHIFT.tolist())
    common = dict(weight_image=0.0, iterations=(10, 10), fixed_features=feat, moving_features=feat.flip(1))
    unchanged = refine_deformable(fixed, moving, initial, embed_levels=0, **common)
    assert [lvl["embedding_term"] for lvl in unchanged.info["levels"]] == [False, False]
    assert tre(unchanged.field, points, truth) == pytest.approx(tre(initial, points, truth), abs=1e-3)
    moved = refine_deformable(fixed, moving, initial, embed_levels=1, **common)
    assert [lvl["embedding_term"] for lvl in moved.info["levels"]] == [True, False]
    assert abs(tre(moved.field, points, truth) - tre(initial, points, truth)) > 1e-2
    with pytest.raises(InputError, match="embed_levels"):
        refine_deformable(fixed, moving, initial, embed_levels=-1, **common)
    with pytest.raises(InputError, match="finest_control_ratio"):
        refine_deformable(fixed, moving, initial, finest_control_ratio=0, iterations=(1, 1))


def test_similarity_is_computed_on_the_mask_box_plus_margin(planted):
    from regsam.register.deformable import MASK_MARGIN_MM, _mask_box

    mask = torch.zeros(1, 1, 20, 30, 40)
    mask[0, 0, 5:8, 10:12, 30:33] = 1
    assert _mask_box(mask, [2, 3, 4]) == (slice(3, 10), slice(7, 15), slice(26, 37))
    assert _mask_box(None, [2, 3, 4]) == (slice(None),) * 3

    fixed, moving, points, truth, _ = planted
    corner = sitk.Image(fixed.GetSize(), sitk.sitkUInt8)
    corner.CopyInformation(fixed)
    corner[2:6, 2:6, 2:6] = 1  # a 16 mm cube at the image's corner: the box is that cube plus the margin
    result = refine_deformable(fixed, moving, None, fixed_mask=corner, iterations=(2, 2))
    finest = result.info["levels"][-1]
    expected = [min(s, 6 + int(np.ceil(MASK_MARGIN_MM / sp))) for s, sp in zip(finest["size"], finest["spacing_mm"])]
    assert finest["similarity_size"] == expected and expected != finest["size"]
