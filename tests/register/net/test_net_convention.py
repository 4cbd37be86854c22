"""The network's field follows the project's convention: voxelmorph's displacement (voxels, tensor axes z, y, x)
becomes a world field in mm (fixed x -> moving x + u(x)) on grids with a non-trivial direction, checked with a
planted shift through the whole sam-net path (network stage -> residual -> RegistrationResult.map_points/warp)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from regsam.io.geometry import direction_matrix
from regsam.register.net.model import (
    NetConfig,
    build_network,
    network_field_to_world,
    network_grid,
    predict_residual,
    save_network,
)

#: a proper rotation that permutes and flips axes: index x -> world y, index y -> world x, index z -> world -z
DIRECTION = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SPACING = 3.0


def constant_network(cfg: NetConfig, voxels_zyx) -> torch.nn.Module:
    """A VxmPairwise whose velocity is the constant ``voxels_zyx`` (flow layer: zero weights, bias = the shift)."""
    net = build_network(cfg)
    with torch.no_grad():
        net.flow_layer.conv0.weight.zero_()
        net.flow_layer.conv0.bias.copy_(torch.tensor(voxels_zyx, dtype=torch.float32))
    return net.eval()


def local_voxels(world_mm: np.ndarray, grid: sitk.Image) -> list[float]:
    """World shift (mm) -> voxel components along the grid's index axes, in tensor channel order z, y, x."""
    along = direction_matrix(grid).T @ world_mm / np.array(grid.GetSpacing())
    return along[::-1].tolist()


@pytest.fixture(scope="module")
def rotated_ct(shared_data) -> sitk.Image:
    """A real lung CT on a 3 mm grid whose direction permutes and flips the axes (float32 HU)."""
    ct = sitk.ReadImage(str(shared_data / "elastix_3dct_lung" / "3DCT_lung_baseline_small.mha"), sitk.sitkFloat32)
    centre = np.array(ct.TransformContinuousIndexToPhysicalPoint(((np.array(ct.GetSize()) - 1) / 2).tolist()))
    size = np.array([40, 40, 36])
    d = np.array(DIRECTION).reshape(3, 3)
    origin = centre - d @ ((size - 1) / 2 * SPACING)
    return sitk.Resample(ct, size.tolist(), sitk.Transform(), sitk.sitkLinear, origin.tolist(), (SPACING,) * 3,
                         DIRECTION, -1024.0, sitk.sitkFloat32)


def test_field_conversion_scales_by_spacing_and_rotates_through_the_direction():
    grid = sitk.Image([8, 10, 12], sitk.sitkUInt8)
    grid.SetSpacing((2.0, 3.0, 4.0))
    grid.SetDirection(DIRECTION)
    for channel, (index_axis, spacing) in enumerate(((2, 4.0), (1, 3.0), (0, 2.0))):  # channels z, y, x
        ddf = torch.zeros(1, 3, 12, 10, 8)
        ddf[:, channel] = 1.0
        field = sitk.GetArrayFromImage(network_field_to_world(ddf, grid))
        expected = spacing * np.array(DIRECTION).reshape(3, 3)[:, index_axis]
        np.testing.assert_allclose(field[5, 4, 3], expected, atol=1e-6)


def test_voxelmorph_samples_the_moving_image_at_x_plus_d():
    """Channel k of the displacement moves along tensor axis k, and the warp reads moving(i + d)."""
    net = constant_network(NetConfig(nb_features=(4, 4), integration_steps=0), [0.0, 0.0, 0.0])
    image = torch.zeros(1, 1, 16, 16, 16)
    image[0, 0, 8, 8, 8] = 1.0
    for k in range(3):
        d = torch.zeros(1, 3, 16, 16, 16)
        d[:, k] = 1.0
        warped = net.spatial_transformer(image, d)
        peak = [8, 8, 8]
        peak[k] = 7
        assert warped[0, 0].argmax() == np.ravel_multi_index(peak, (16, 16, 16))


@pytest.mark.parametrize("steps", [0, 5], ids=["velocity", "scaling-and-squaring"])
def test_predicted_constant_shift_is_the_planted_world_shift(rotated_ct, steps):
    cfg = NetConfig(spacing_mm=4.0, nb_features=(4, 4), integration_steps=steps)
    grid = network_grid(rotated_ct, cfg.spacing_mm, cfg.stride)
    shift = np.array([6.0, -4.0, 8.0])  # mm, world
    net = constant_network(cfg, local_voxels(shift, grid))
    x = torch.zeros((1, 1) + tuple(grid.GetSize()[::-1]))
    with torch.no_grad():
        field = sitk.GetArrayFromImage(network_field_to_world(predict_residual(net, x, x), grid))
    centre = tuple(n // 2 for n in field.shape[:3])
    np.testing.assert_allclose(field[centre], shift, atol=1e-3)


def test_sam_net_network_stage_maps_points_and_warps_by_the_planted_shift(rotated_ct, tmp_path):
    """moving(x + s) = fixed(x): the network stage's residual, turned into the result's field, maps fixed
    points to x + s and warps the moving image back onto the fixed one."""
    from regsam.register.api import register

    shift = np.array([6.0, -9.0, 4.5])
    moving = sitk.Resample(rotated_ct, rotated_ct, sitk.TranslationTransform(3, (-shift).tolist()), sitk.sitkLinear,
                           -1024.0)
    cfg = NetConfig(spacing_mm=4.0, nb_features=(4, 4), integration_steps=0)
    grid = network_grid(rotated_ct, cfg.spacing_mm, cfg.stride)
    weights = save_network(constant_network(cfg, local_voxels(shift, grid)), cfg, tmp_path / "shift.pt")
    result = register(rotated_ct, moving, method="sam-net", stages="network", net_weights=str(weights), device="cpu")
    assert result.method == "sam-net" and result.extras["network"]["spacing_mm"] == 4.0
    points = np.array([rotated_ct.TransformContinuousIndexToPhysicalPoint(p) for p in ([20, 20, 18], [10, 25, 12])])
    np.testing.assert_allclose(result.map_points(points), points + shift, atol=1e-3)
    inner = (slice(8, -8),) * 3
    warped = sitk.GetArrayFromImage(result.warped)[inner]
    fixed = sitk.GetArrayFromImage(rotated_ct)[inner]
    assert np.abs(warped - fixed).mean() < 0.05 * np.abs(fixed - sitk.GetArrayFromImage(moving)[inner]).mean() + 5.0
