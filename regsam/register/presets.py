"""Preset tables of the registration methods whose modules are expensive to import, and the preset idiom.

A preset is a frozen dataclass that checks its own values on construction (``__post_init__``
raises :class:`~regsam.errors.InputError`), so a table entry, or one changed with
:func:`dataclasses.replace` by per-call options, is valid or never exists. Its
:func:`preset_settings` (``dataclasses.asdict``) go into ``summary.json``.

The elastix and ConvexAdam tables live here rather than in their methods' modules so that the
method registry (:mod:`regsam.register.methods`), the CLI and ``regsam bench`` can read them without
importing itk-elastix (~20 s) or torch (~2 s). :func:`choose_preset` is the one place that turns a
preset name into a table entry (and words the "unknown preset" error);
:func:`regsam.register.methods.resolve_preset` applies it to a registered method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from regsam.errors import InputError

#: Folder of the elastix parameter files named by :class:`ElastixPreset`.
ELASTIX_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "elastix"

P = TypeVar("P")


def choose_preset(table: Mapping[str, P], name: str | None, default: str, what: str) -> tuple[str, P]:
    """``(name, table[name])``, ``default`` when ``name`` is None; InputError naming ``what`` for an unknown name."""
    chosen = name or default
    if chosen not in table:
        raise InputError(f"unknown {what} preset '{chosen}' (known: {', '.join(table)})")
    return chosen, table[chosen]


def preset_settings(preset: Any) -> dict[str, Any]:
    """A preset's values for summary.json: ``dataclasses.asdict`` of a preset dataclass (a plain dict is copied)."""
    if dataclasses.is_dataclass(preset) and not isinstance(preset, type):
        return dataclasses.asdict(preset)
    return dict(preset)


def _check_int(owner: str, name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}")


# ------------------------------------------------------------------ elastix
@dataclass(frozen=True)
class ElastixPreset:
    """An elastix preset: parameter files in :data:`ELASTIX_CONFIG_DIR`, one per stage, run in order."""

    files: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.files:
            raise InputError("elastix preset: at least one parameter file is needed")
        missing = [f for f in self.files if not (ELASTIX_CONFIG_DIR / f).is_file()]
        if missing:
            raise InputError(
                f"elastix preset: parameter file(s) not found in {ELASTIX_CONFIG_DIR}: {', '.join(missing)}"
            )

    @property
    def paths(self) -> list[Path]:
        return [ELASTIX_CONFIG_DIR / f for f in self.files]


ELASTIX_PRESETS: dict[str, ElastixPreset] = {
    "lung": ElastixPreset(files=("lung_affine.txt", "lung_bspline.txt")),
    "fast": ElastixPreset(files=("fast_affine.txt", "fast_bspline.txt")),
}
ELASTIX_DEFAULT_PRESET = "lung"


# ------------------------------------------------------------------ ConvexAdam
@dataclass(frozen=True)
class ConvexAdamPreset:
    """Settings of ``convex_adam_pt`` (convexadam 0.2.0) and the working grid; see :mod:`regsam.register.convexadam`."""

    spacing_mm: float | None  # isotropic working grid (mm); None: the fixed grid
    lambda_weight: float  # diffusion regularisation of the Adam stage
    grid_sp: int  # coarse grid of the discrete optimisation (working voxels)
    disp_hw: int  # search half-width of the discrete optimisation (coarse voxels)
    selected_niter: int  # Adam iterations
    selected_smooth: int  # final box smoothing size: 0 (none) or odd
    mind_r: int = 1  # MIND-SSC radius
    mind_d: int = 2  # MIND-SSC dilation
    grid_sp_adam: int = 2  # grid of the Adam stage (working voxels)
    ic: bool = True  # inverse consistency (False is broken in convexadam 0.2.0: see the module docstring)

    def __post_init__(self) -> None:
        owner = "convexadam"
        for name in ("grid_sp", "disp_hw", "grid_sp_adam", "mind_r", "mind_d"):
            _check_int(owner, name, getattr(self, name), 1)
        _check_int(owner, "selected_niter", self.selected_niter, 0)
        _check_int(owner, "selected_smooth", self.selected_smooth, 0)
        if self.selected_smooth % 2 == 0 and self.selected_smooth:
            raise InputError(
                f"convexadam: selected_smooth must be 0 or odd (a box-filter size), got {self.selected_smooth}"
            )
        if self.spacing_mm is not None and not float(self.spacing_mm) > 0:
            raise InputError(f"convexadam: spacing_mm must be positive, got {self.spacing_mm}")
        if not float(self.lambda_weight) >= 0:
            raise InputError(f"convexadam: lambda_weight must be >= 0, got {self.lambda_weight}")
        if not isinstance(self.ic, bool):
            raise InputError(f"convexadam: ic must be True or False, got {self.ic!r}")


_CONVEXADAM_LUNG = ConvexAdamPreset(
    spacing_mm=1.5, lambda_weight=0.65, grid_sp=4, disp_hw=6, selected_niter=50, selected_smooth=3
)
CONVEXADAM_PRESETS: dict[str, ConvexAdamPreset] = {
    # the package's Learn2Reg 2021 lung-CT (task 2) submission, on NLST's 1.5 mm
    "lung": _CONVEXADAM_LUNG,
    # the package's own defaults
    "default": ConvexAdamPreset(
        spacing_mm=1.5, lambda_weight=1.25, grid_sp=6, disp_hw=4, selected_niter=80, selected_smooth=0
    ),
    # lung on a 2.5 mm grid with 30 Adam iterations
    "fast": dataclasses.replace(_CONVEXADAM_LUNG, spacing_mm=2.5, selected_niter=30),
}
CONVEXADAM_DEFAULT_PRESET = "lung"
