"""Training pairs: the start transform is the simulator's exact rigid part (plus the bounded residual), and the
pool refreshes one pair every ``refresh_every`` steps, oldest first."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from regsam.data.simulate import SimulationConfig, simulate_case
from regsam.io.images import standardize
from regsam.register.net.model import NetConfig
from regsam.register.net.pairs import PairPool, PairSettings, load_scans, start_transform


@pytest.fixture(scope="module")
def lung_ct(shared_data) -> sitk.Image:
    return standardize(sitk.ReadImage(str(shared_data / "elastix_3dct_lung" / "3DCT_lung_baseline_small.mha")), 3.0)


def _centre(image: sitk.Image) -> np.ndarray:
    return np.array(image.TransformContinuousIndexToPhysicalPoint(((np.array(image.GetSize()) - 1) / 2).tolist()))


def test_start_transform_is_the_simulated_rigid_offset(lung_ct):
    sim = simulate_case(lung_ct, SimulationConfig(seed=3, amplitude_mm=0.01, rigid_offset=(20.0, 8.0), noise_hu=0,
                                                  n_points=10, n_body_points=0))
    exact = PairSettings(residual_mm=0.0, residual_deg=0.0)
    t0 = start_transform(sim.meta["rigid_offset"], _centre(sim.fixed), exact, np.random.default_rng(0))
    gt = sitk.DisplacementFieldTransform(sitk.Image(sim.gt_disp))
    for index in ([5, 6, 7], [20, 30, 10], [40, 25, 30]):
        x = np.array(sim.fixed.TransformIndexToPhysicalPoint(index))
        np.testing.assert_allclose(t0.TransformPoint(x.tolist()), gt.TransformPoint(x.tolist()), atol=0.05)
    # with the residual: T0 differs from the exact rigid part by at most residual_mm + rotation at the lungs' reach
    rough = start_transform(sim.meta["rigid_offset"], _centre(sim.fixed), PairSettings(), np.random.default_rng(1))
    x = _centre(sim.fixed)
    assert 0 < np.linalg.norm(np.subtract(rough.TransformPoint(x.tolist()), gt.TransformPoint(x.tolist()))) <= 5.0


def test_pool_replaces_the_oldest_pair_every_refresh_steps(shared_data):
    scans, skipped = load_scans([str(shared_data / "elastix_3dct_lung" / "3DCT_lung_baseline_small.mha")], 3.0)
    assert not skipped
    settings = PairSettings(pool_size=2, refresh_every=3, crop_size=(16, 16, 16), parametric_share=1.0)
    pool = PairPool(scans, settings, NetConfig(nb_features=(4, 4)), {}, seed=5)
    batch = pool.batch(0, 2)
    assert [p.index for p in pool.pool] == [0, 1]
    assert set(batch) == {"fixed", "moving", "body"} and batch["fixed"].shape == (2, 1, 16, 16, 16)
    pool.batch(2, 1)
    assert [p.index for p in pool.pool] == [0, 1]
    pool.batch(3, 1)
    assert [p.index for p in pool.pool] == [1, 2]
    again = PairPool(scans, settings, NetConfig(nb_features=(4, 4)), {}, seed=5)
    assert np.array_equal(again.make_pair(2).fixed.numpy(), pool.pool[1].fixed.numpy())  # pair n from (seed, n)
