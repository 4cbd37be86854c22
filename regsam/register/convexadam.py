"""ConvexAdam (Siebert, Hansen, Heinrich; IEEE TMI 2024) as a regsam registration method.

Uses the PyPI package ``convexadam==0.2.0`` (module ``convexAdam.convex_adam_MIND``, function
``convex_adam_pt``): MIND-SSC features, a discrete coupled-convex optimisation on a coarse grid
(made inverse consistent) and an Adam instance optimisation with diffusion regularisation.

How the package is driven:

1. The fixed image is resampled onto an isotropic working grid (``spacing_mm``, corner-aligned with
   the fixed grid, see :func:`regsam.register.torch_fields.corner_aligned_grid`) and the moving image
   onto the SAME grid by the identity in world coordinates. ConvexAdam has no affine stage: its
   capture range is ``disp_hw * grid_sp`` working voxels, so large offsets defeat it.
2. Both arrays (``sitk.GetArrayFromImage`` order z, y, x) are padded at their far ends (edge values)
   to a multiple of ``grid_sp`` and ``grid_sp_adam`` (the package assumes divisible sizes).
3. ``convex_adam_pt`` returns ``(Z, Y, X, 3)`` displacements in working voxels, component ``k`` along
   array axis ``k``, mapping a fixed voxel to its moving voxel (its own ``apply_convex`` warps with
   ``map_coordinates(moving, identity + disp)``). That is exactly a MONAI-Warp voxel DDF, converted
   to a world field by :func:`regsam.register.torch_fields.ddf_to_field` and resampled (linear) onto
   the fixed grid. ``tests/register/test_convexadam.py`` checks axis order and sign with a planted
   shift along each axis separately.

Presets (:class:`~regsam.register.presets.ConvexAdamPreset`, in :mod:`regsam.register.presets`; every value
can be overridden by keyword, which builds a new validated preset with ``dataclasses.replace``):

``lung`` (default)
    the package's Learn2Reg 2021 lung-CT (task 2) submission, ``l2r_2021_convexAdam_task2_docker.py``
    in github.com/multimodallearning/convexAdam: MIND-SSC radius 1, dilation 2, ``grid_sp=4``,
    ``disp_hw=6``, Adam on a 2-voxel grid for 50 iterations with ``lambda_weight=0.65`` and a final
    3x3x3 box smoothing applied three times (``selected_smooth=3``), on a 1.5 mm grid (NLST spacing).
    Inverse consistency is on (``ic=True``): in convexadam 0.2.0 ``ic=False`` skips the rescaling of
    the coarse displacement to full-resolution voxels, which makes its output wrong.
``default``
    the package's own defaults (``grid_sp=6``, ``disp_hw=4``, ``lambda_weight=1.25``, 80 iterations, no
    final smoothing), 1.5 mm.
``fast``
    ``lung`` on a 2.5 mm grid with 30 Adam iterations.

Masks: with both a fixed and a moving mask, ConvexAdam's own masking is used (intensities outside
the masks are replaced by the nearest inside values before MIND features are computed, as in its
lung submission). A single mask is ignored (recorded in ``extras``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from regsam.devices import resolve_device
from regsam.errors import InputError
from regsam.io.geometry import antialias
from regsam.io.images import AIR_HU
from regsam.io.transforms import jacobian_determinant, warp_image
from regsam.register import torch_fields as tf
from regsam.register.presets import (
    CONVEXADAM_DEFAULT_PRESET,
    CONVEXADAM_PRESETS,
    ConvexAdamPreset,
    choose_preset,
    preset_settings,
)
from regsam.register.result import RegistrationResult
from regsam.register.stages import timed

#: Preset name -> :class:`~regsam.register.presets.ConvexAdamPreset`.
PRESETS: dict[str, ConvexAdamPreset] = CONVEXADAM_PRESETS
DEFAULT_PRESET = CONVEXADAM_DEFAULT_PRESET


def _convex_adam_pt():
    """Import ``convex_adam_pt`` lazily, undoing the package's global ``warnings.filterwarnings("ignore")``."""
    try:
        with warnings.catch_warnings():  # restores the filters the package's import overwrites
            from convexAdam.convex_adam_MIND import convex_adam_pt
    except ImportError as exc:
        raise InputError(
            f"method 'convexadam' needs the package convexadam==0.2.0 (pip install convexadam==0.2.0): {exc}"
        ) from None
    return convex_adam_pt


def _package_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("convexadam")
    except Exception:  # noqa: BLE001 - informative only
        return None


def _config(preset: str | None, options: dict) -> tuple[str, ConvexAdamPreset]:
    """The preset's name and its settings with ``options`` applied (validated by ``ConvexAdamPreset``)."""
    name, cfg = choose_preset(PRESETS, preset, DEFAULT_PRESET, "convexadam")
    known = [f.name for f in dataclasses.fields(cfg)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise InputError(
            f"unknown convexadam option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))}, device)"
        )
    return name, dataclasses.replace(cfg, **options)


def _pad_to(arr: np.ndarray, multiple: int, mode: str = "edge") -> np.ndarray:
    pad = [(0, (-s) % multiple) for s in arr.shape]
    return np.pad(arr, pad, mode=mode) if any(p for _, p in pad) else arr


def _mask_file(mask: sitk.Image, grid: sitk.Image, multiple: int, folder: str, name: str) -> str:
    """A NIfTI whose nibabel array equals the mask's (z, y, x) array on the padded working grid."""
    import nibabel as nib

    binary = sitk.Cast(mask != 0, sitk.sitkUInt8)
    on = sitk.Resample(binary, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    arr = _pad_to(sitk.GetArrayFromImage(on).astype(np.float32), multiple, mode="constant")
    if not arr.any():
        raise InputError(f"{name} is empty on the convexadam working grid")
    path = os.path.join(folder, f"{name.replace(' ', '_')}.nii.gz")
    nib.save(nib.Nifti1Image(arr, np.eye(4)), path)  # nibabel hands this array back unchanged
    return path


@dataclass
class _WorkingPair:
    """Both images on ConvexAdam's working grid, as the arrays it takes."""

    grid: sitk.Image  # the working grid (corner-aligned with the fixed grid)
    shape: tuple[int, int, int]  # (z, y, x) voxels of the grid, before padding
    fixed_arr: np.ndarray  # (z, y, x), padded at the far ends to a multiple of ``multiple``
    moving_arr: np.ndarray
    multiple: int


def _working_pair(
    fixed_f: sitk.Image, moving_f: sitk.Image, cfg: ConvexAdamPreset, both_masks: bool
) -> _WorkingPair:
    """Resample both (float32) images onto the working grid and pad them to what the package assumes."""
    if cfg.spacing_mm is None:
        work = tf.corner_aligned_grid(fixed_f, size_xyz=fixed_f.GetSize())
    else:
        work = tf.corner_aligned_grid(fixed_f, float(cfg.spacing_mm))
    spacing = np.array(work.GetSpacing())
    identity = sitk.Transform()
    fixed_w = sitk.Resample(antialias(fixed_f, spacing), work, identity, sitk.sitkLinear, AIR_HU, sitk.sitkFloat32)
    moving_w = sitk.Resample(antialias(moving_f, spacing), work, identity, sitk.sitkLinear, AIR_HU, sitk.sitkFloat32)
    shape = tf.grid_shape(work)
    multiple = math.lcm(cfg.grid_sp, cfg.grid_sp_adam)
    if any(s < 2 * cfg.grid_sp + 1 for s in shape):
        raise InputError(
            f"image too small for convexadam: working grid {work.GetSize()} voxels at {cfg.spacing_mm} mm; "
            f"every axis needs more than 2 * grid_sp = {2 * cfg.grid_sp} voxels (use a finer spacing_mm)"
        )
    if multiple % 2 and both_masks:
        multiple *= 2  # its mask handling subsamples by 2
    fixed_arr = _pad_to(sitk.GetArrayFromImage(fixed_w), multiple)
    moving_arr = _pad_to(sitk.GetArrayFromImage(moving_w), multiple)
    return _WorkingPair(work, shape, fixed_arr, moving_arr, multiple)


def _run_convexadam(
    convex_adam_pt: Callable[..., Any],
    pair: _WorkingPair,
    cfg: ConvexAdamPreset,
    dev: torch.device,
    fixed_mask: sitk.Image | None,
    moving_mask: sitk.Image | None,
) -> Any:
    """``convex_adam_pt`` on the padded arrays: (Z, Y, X, 3) displacements in working voxels (array axis order)."""
    use_mask = fixed_mask is not None and moving_mask is not None
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory(prefix="regsam-convexadam-") as tmp:
        mask_paths = {}
        if fixed_mask is not None and moving_mask is not None:
            mask_paths["path_fixed_mask"] = _mask_file(fixed_mask, pair.grid, pair.multiple, tmp, "fixed mask")
            mask_paths["path_moving_mask"] = _mask_file(moving_mask, pair.grid, pair.multiple, tmp, "moving mask")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.enable_grad():  # its Adam stage back-propagates, even if the caller disabled grad
                disp = convex_adam_pt(
                    img_fixed=torch.from_numpy(np.ascontiguousarray(pair.fixed_arr)),
                    img_moving=torch.from_numpy(np.ascontiguousarray(pair.moving_arr)),
                    mind_r=cfg.mind_r,
                    mind_d=cfg.mind_d,
                    lambda_weight=float(cfg.lambda_weight),
                    grid_sp=cfg.grid_sp,
                    disp_hw=cfg.disp_hw,
                    selected_niter=cfg.selected_niter,
                    selected_smooth=cfg.selected_smooth,
                    grid_sp_adam=cfg.grid_sp_adam,
                    ic=cfg.ic,
                    use_mask=use_mask,
                    dtype=dtype,
                    verbose=False,
                    device=dev,
                    **mask_paths,
                )
    return disp


def _field_on_fixed(disp: Any, pair: _WorkingPair, fixed: sitk.Image) -> tuple[sitk.Image, sitk.Image]:
    """ConvexAdam's padded voxel displacements as a world field: ``(on the fixed grid, on the working grid)``."""
    shape, work = pair.shape, pair.grid
    disp = np.asarray(disp, dtype=np.float64)[: shape[0], : shape[1], : shape[2]]  # (z, y, x, 3) working voxels
    ddf = torch.from_numpy(np.ascontiguousarray(disp.transpose(3, 0, 1, 2)))[None]  # channels = array axes z, y, x
    on_work = tf.ddf_to_field(ddf, work)
    if tf.grid_shape(work) == tf.grid_shape(fixed) and np.allclose(work.GetSpacing(), fixed.GetSpacing()):
        on_work.CopyInformation(fixed)
        return on_work, on_work
    displacement = sitk.Resample(on_work, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64, True)
    return displacement, on_work


def register_convexadam(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    preset: str | None = None,
    fixed_mask: sitk.Image | None = None,
    moving_mask: sitk.Image | None = None,
    device: str | torch.device = "cpu",
    **options,
) -> RegistrationResult:
    """Register ``moving`` onto ``fixed`` with ConvexAdam (MIND-SSC); images assumed validated by ``api.register``.

    Args:
        preset: ``lung`` (default), ``default`` or ``fast`` (see the module docstring).
        fixed_mask, moving_mask: optional masks on their images' grids; used only when both are given.
        device: ``'cpu'`` or ``'cuda'`` (float16 features on CUDA, as upstream; float32 on CPU).
        options: overrides of preset keys: ``spacing_mm`` (working grid, mm; ``None`` = the fixed grid),
            ``mind_r``, ``mind_d``, ``lambda_weight``, ``grid_sp``, ``disp_hw``, ``selected_niter``,
            ``selected_smooth``, ``grid_sp_adam``, ``ic``.

    Returns:
        RegistrationResult with method ``"convexadam"``, no affine, timings ``resample``, ``convexadam``,
        ``field``, ``warp``, ``total`` (s), and ``extras["convexadam"]`` (settings, grid, version).

    Raises:
        InputError: unknown preset or option, package missing, or an image too small for the settings.
    """
    start = time.perf_counter()
    name, cfg = _config(preset, options)
    dev = resolve_device(device)
    convex_adam_pt = _convex_adam_pt()
    timings: dict[str, float] = {}
    use_mask = fixed_mask is not None and moving_mask is not None
    with timed(timings, "resample"):
        fixed_f = sitk.Cast(fixed, sitk.sitkFloat32)
        moving_f = sitk.Cast(moving, sitk.sitkFloat32)
        pair = _working_pair(fixed_f, moving_f, cfg, use_mask)
    mask_note = None
    if (fixed_mask is None) != (moving_mask is None):
        mask_note = "one mask given; ConvexAdam's masking needs both, so it was not used"
    with timed(timings, "convexadam"):
        disp = _run_convexadam(convex_adam_pt, pair, cfg, dev, fixed_mask, moving_mask)
    with timed(timings, "field"):
        displacement, on_work = _field_on_fixed(disp, pair, fixed)
    with timed(timings, "warp"):
        warped = warp_image(moving_f, fixed_f, displacement, "linear", AIR_HU)
    timings["total"] = time.perf_counter() - start
    det = sitk.GetArrayFromImage(jacobian_determinant(on_work))
    work = pair.grid
    extras = {
        "convexadam": {
            "settings": preset_settings(cfg),
            "working_grid": {"size": list(work.GetSize()), "spacing_mm": [float(s) for s in work.GetSpacing()]},
            "padded_shape_zyx": list(pair.fixed_arr.shape),
            "masks_used": use_mask,
            "mask_note": mask_note,
            "device": str(dev),
            "working_grid_folding_share": float(np.mean(det <= 0)),
            "package_version": _package_version(),
        }
    }
    return RegistrationResult(
        displacement=displacement,
        warped=warped,
        method="convexadam",
        preset=name,
        timings=timings,
        affine=None,
        extras=extras,
    )
