"""ANTs SyN (antspyx, the ``peers`` extra) as a regsam registration method: the peer users know.

``ants.registration(type_of_transform="SyNRA")``: rigid, then affine, then symmetric normalisation
(SyN) with the package's standard settings (Mattes mutual information for the linear stages, SyN
with ``syn_metric="mattes"``, ``reg_iterations=(40, 20, 0)`` on 8/4/2/1 shrink factors, grad step
0.2, flow sigma 3, total sigma 0). ``preset="cc"`` uses SyN's cross-correlation metric
(``syn_metric="CC"``, radius 4), ANTs' usual choice for same-modality CT, at a higher cost.

Both images are resampled (antialiased) onto ``spacing_mm`` grids first (default 2 mm, like the
other methods' working grids; ``None`` keeps them), written to temporary NIfTI files and read by
ANTs, so both libraries see the same ITK (LPS) world coordinates. ANTs' forward transforms map a
fixed point to its moving point (they resample moving onto fixed), which is regsam's convention;
they are composed into one displacement field (``apply_transforms(..., compose=...)``) and
resampled onto the fixed grid.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from regsam.errors import InputError
from regsam.io.geometry import antialias
from regsam.io.images import AIR_HU, resample_to_spacing
from regsam.io.transforms import check_displacement_field, warp_image
from regsam.register.presets import choose_preset
from regsam.register.result import RegistrationResult


@dataclass(frozen=True)
class AntsPreset:
    """Settings of ``ants.registration`` and the working grid (mm)."""

    type_of_transform: str = "SyNRA"
    syn_metric: str = "mattes"
    syn_sampling: int = 32
    reg_iterations: tuple[int, ...] = (40, 20, 0)
    spacing_mm: float | None = 2.0

    def __post_init__(self) -> None:
        if self.spacing_mm is not None and not self.spacing_mm > 0:
            raise InputError(f"ants preset: spacing_mm must be positive or None, got {self.spacing_mm}")
        if not self.reg_iterations or min(self.reg_iterations) < 0:
            raise InputError("ants preset: reg_iterations must be non-negative counts, one per level")


ANTS_PRESETS: dict[str, AntsPreset] = {
    "synra": AntsPreset(),
    "cc": AntsPreset(syn_metric="CC", syn_sampling=4),
}
DEFAULT_PRESET = "synra"


def _ants():
    try:
        import ants
    except ImportError as exc:
        raise InputError(f"method 'ants' needs antspyx (pip install 'regsam[peers]'): {exc}") from None
    return ants


@contextmanager
def _seeded(ants, seed: int) -> Iterator[None]:
    """Run ANTs with ``--random-seed seed``: antspyx 0.6 swallows ``registration(random_seed=...)`` in its ``**kwargs``
    and reads the seed from a package setting instead. Unseeded, every run samples the affine metric anew, and the
    rigid stage of a small image sometimes lands tens of mm off (seen on CI)."""
    config = getattr(ants, "config", None)
    if config is None or not hasattr(config, "_random_seed"):
        yield
        return
    previous = config._random_seed
    config._random_seed = int(seed)
    try:
        yield
    finally:
        config._random_seed = previous


def _working_copy(image: sitk.Image, spacing_mm: float | None) -> sitk.Image:
    image = sitk.Cast(image, sitk.sitkFloat32)
    if spacing_mm is None or min(image.GetSpacing()) >= spacing_mm:
        return image
    target = [max(s, spacing_mm) for s in image.GetSpacing()]
    return resample_to_spacing(antialias(image, np.array(target)), target)


def register_ants(
    fixed: sitk.Image, moving: sitk.Image, *, preset: str | None = None, seed: int = 0
) -> RegistrationResult:
    """Register ``moving`` onto ``fixed`` with ANTs SyNRA (images validated by ``api.register``)."""
    start = time.perf_counter()
    name, cfg = choose_preset(ANTS_PRESETS, preset, DEFAULT_PRESET, "ants")
    ants = _ants()
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="regsam-ants-") as tmp:
        t = time.perf_counter()
        paths = {}
        for key, image in (("fixed", fixed), ("moving", moving)):
            paths[key] = str(Path(tmp) / f"{key}.nii.gz")
            sitk.WriteImage(_working_copy(image, cfg.spacing_mm), paths[key])
        fixed_a, moving_a = ants.image_read(paths["fixed"]), ants.image_read(paths["moving"])
        timings["resample"] = time.perf_counter() - t
        t = time.perf_counter()
        with _seeded(ants, seed):
            out = ants.registration(
                fixed_a, moving_a, type_of_transform=cfg.type_of_transform, syn_metric=cfg.syn_metric,
                syn_sampling=cfg.syn_sampling, reg_iterations=tuple(cfg.reg_iterations),
                outprefix=str(Path(tmp) / "ants_"), random_seed=int(seed),
            )
        timings["ants"] = time.perf_counter() - t
        t = time.perf_counter()
        composed = ants.apply_transforms(fixed_a, moving_a, out["fwdtransforms"], compose=str(Path(tmp) / "composed_"))
        field = check_displacement_field(sitk.ReadImage(composed, sitk.sitkVectorFloat64), "ANTs composed field")
    displacement = sitk.Resample(field, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64, True)
    timings["field"] = time.perf_counter() - t
    t = time.perf_counter()
    warped = warp_image(sitk.Cast(moving, sitk.sitkFloat32), fixed, displacement, "linear", AIR_HU)
    timings["warp"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - start
    extras = {"ants": {"settings": asdict(cfg), "version": getattr(ants, "__version__", None)}}
    return RegistrationResult(displacement=displacement, warped=warped, method="ants", preset=name, timings=timings,
                              affine=None, extras=extras)
