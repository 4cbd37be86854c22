"""The registry of registration methods: one :class:`MethodSpec` per method, built once in :data:`METHODS`.

Everything that lists or checks methods reads it: ``regsam register --method`` (choices, and
which options and masks each method takes), ``regsam bench --methods``, the Python API
:func:`regsam.register.api.register`, and the README's method table
(:func:`methods_table_markdown`; ``tests/register/test_methods.py`` checks the README against it).

Importing this module is cheap: each method's module is imported when the method runs, and its
preset table when a preset is resolved. That laziness avoids a real cost: itk-elastix takes ~20 s
to import, and the torch-based methods (``sam``, ``sam+elastix``, ``convexadam``) import torch,
MONAI and the embedder (~2-4 s), which ``regsam register --method elastix`` or a
``regsam bench`` parent process never need.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from regsam.errors import InputError
from regsam.register.presets import choose_preset

if TYPE_CHECKING:
    import SimpleITK as sitk

    from regsam.register.result import RegistrationResult

#: The method ``regsam register`` and :func:`regsam.register.api.register` use when none is named: the headline.
DEFAULT_METHOD = "sam"
#: What ``regsam bench`` runs when no ``--methods`` are named: the headline beside the baseline.
DEFAULT_BENCH_METHODS = ("sam", "elastix:lung")

#: The masks a method may use: ``uses_masks`` holds a subset.
MASKS = ("fixed", "moving")


class MethodFailure(RuntimeError):
    """A registration method failed inside (elastix, ConvexAdam, torch ...), as opposed to bad input.

    Its message is one line naming the method and the cause; ``regsam`` prints it and exits with code 1.
    """


@dataclass(frozen=True)
class MethodSpec:
    """One registration method.

    Attributes:
        name: the ``--method`` name.
        run: ``run(fixed, moving, *, preset, fixed_mask, moving_mask, **options) -> RegistrationResult``;
            it gets validated images, a known preset name, only ``options`` it takes, and no mask it
            does not use.
        presets: the preset names, default first as listed in the README (the table itself is
            ``preset_table``; a test checks that the two agree).
        default_preset: the preset used when none is given.
        options: keyword options the method takes beyond preset and masks (``register(..., **options)``).
        uses_masks: which of ``fixed``/``moving`` masks it uses; any other mask is refused.
        summary: one line for the README's method table ("what it is").
        preset_table: ``"module:ATTRIBUTE"`` of the method's preset table (name -> frozen dataclass),
            imported on first use by :meth:`load_presets`.
        mask_note: how the method uses its masks, when that needs saying (README, ``--help``).
    """

    name: str
    run: Callable[..., RegistrationResult]
    presets: tuple[str, ...]
    default_preset: str
    options: frozenset[str]
    uses_masks: frozenset[str]
    summary: str
    preset_table: str = ""
    mask_note: str = ""

    def __post_init__(self) -> None:
        if self.default_preset not in self.presets:
            raise ValueError(f"method {self.name}: default preset {self.default_preset!r} not in {self.presets}")
        if not self.uses_masks <= set(MASKS):
            raise ValueError(f"method {self.name}: uses_masks must be within {MASKS}, got {sorted(self.uses_masks)}")

    def load_presets(self) -> Mapping[str, Any]:
        """The method's preset table (imports the module that holds it)."""
        if not self.preset_table:
            raise LookupError(f"method {self.name} names no preset table")
        module, _, attribute = self.preset_table.partition(":")
        return getattr(importlib.import_module(module), attribute)

    def check_call(self, preset: str | None, options: Mapping[str, object], masks: Mapping[str, object]) -> str:
        """Raise InputError for a preset, option or mask this method does not take; return the preset name."""
        name, _ = choose_preset(dict.fromkeys(self.presets), preset, self.default_preset, self.name)
        refused = sorted(set(options) - self.options)
        if refused:
            takes = ", ".join(sorted(self.options)) or "none"
            raise InputError(
                f"method '{self.name}' does not take the option(s) {', '.join(refused)} (it takes: {takes})"
            )
        unused = [m for m in MASKS if masks.get(m) is not None and m not in self.uses_masks]
        if unused:
            uses = " and ".join(f"a {m} mask" for m in MASKS if m in self.uses_masks) or "no mask"
            raise InputError(f"method '{self.name}' does not use a {' or '.join(unused)} mask (it uses {uses})")
        return name

    def __call__(
        self,
        fixed: sitk.Image,
        moving: sitk.Image,
        *,
        preset: str | None = None,
        fixed_mask: sitk.Image | None = None,
        moving_mask: sitk.Image | None = None,
        **options: object,
    ) -> RegistrationResult:
        """Check the call (:meth:`check_call`), then run the method."""
        name = self.check_call(preset, options, {"fixed": fixed_mask, "moving": moving_mask})
        return self.run(fixed, moving, preset=name, fixed_mask=fixed_mask, moving_mask=moving_mask, **options)


# ------------------------------------------------------------------ the methods (modules imported on use)
def _run_elastix(fixed, moving, **kwargs):
    from regsam.register.elastix import register_elastix

    return register_elastix(fixed, moving, **kwargs)


def _run_sam(fixed, moving, **kwargs):
    from regsam.register.sam import register_sam

    return register_sam(fixed, moving, **kwargs)


def _run_sam_net(fixed, moving, **kwargs):
    from regsam.register.sam import register_sam

    return register_sam(fixed, moving, method="sam-net", **kwargs)


def _run_sam_elastix(fixed, moving, **kwargs):
    from regsam.register.sam_elastix import register_sam_elastix

    return register_sam_elastix(fixed, moving, **kwargs)


def _run_ants(fixed, moving, **kwargs):
    from regsam.register.ants import register_ants

    return register_ants(fixed, moving, **kwargs)


def _run_convexadam(fixed, moving, **kwargs):
    from regsam.register.convexadam import register_convexadam

    return register_convexadam(fixed, moving, **kwargs)


_CONVEXADAM_SETTINGS = frozenset(
    {"spacing_mm", "mind_r", "mind_d", "lambda_weight", "grid_sp", "disp_hw", "selected_niter", "selected_smooth",
     "grid_sp_adam", "ic"}
)

#: Method name -> :class:`MethodSpec`, in the README's order (the default, ``sam``, first).
METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            name="sam",
            run=_run_sam,
            presets=("fast", "accurate"),
            default_preset="fast",
            options=frozenset({"stages", "device", "weights", "seed"}),
            uses_masks=frozenset({"fixed"}),
            summary="SAM embedding matches -> RANSAC affine -> large-motion capture (discrete search over MIND-SSC "
            "and SAM features at 4 and 2 mm, +-24 mm, convex coupling smoothed separately inside and outside the "
            "lungs so they slide, folds smoothed locally) -> finish (Adam on MIND-SSC and the CT's local contrast at "
            "up to 200k sample points of the body near the lungs on a 1.5 mm grid, coarser beyond 3 M voxels: a smooth "
            "correction inside and one outside the lungs, at most 40 steps, stopped on convergence); `accurate` "
            "adds the deformable stage (MONAI LNCC + bending energy at 4 and 2 mm from the capture residual, "
            "sliding, steps stopped on convergence): more precise for small motion, slower, and worse at the lung "
            "base of a full thorax",
            preset_table="regsam.register.sam:PRESETS",
            mask_note="lungs: the search box and the sliding surface; default: the automatic lung mask",
        ),
        MethodSpec(
            name="sam-net",
            run=_run_sam_net,
            presets=("fast", "instant"),
            default_preset="fast",
            options=frozenset({"stages", "device", "weights", "net_weights", "seed"}),
            uses_masks=frozenset({"fixed"}),
            summary="SAM affine, then one pass of a registration network trained with SAM embedding guidance "
            "(voxelmorph U-Net, diffeomorphic, 4 mm; input: the images and the correlation volume of their PCA'd SAM "
            "embeddings; `regsam train-deformable`, weights "
            "`regsam/weights/sam_net_chest.pt`); `fast` finishes the network's field with the MIND-SSC finish "
            "stage of `sam` (instance optimisation), `instant` stops after the network",
            preset_table="regsam.register.sam:NET_PRESETS",
            mask_note="lungs: the sliding surface and the similarity's region of the finish",
        ),
        MethodSpec(
            name="elastix",
            run=_run_elastix,
            presets=("lung", "fast"),
            default_preset="lung",
            options=frozenset(
                {"parameter_files", "overrides", "stage_overrides", "stages", "seed", "keep_logs", "initial_transform",
                 "corresponding_points", "points_weights", "points_stages"}
            ),
            uses_masks=frozenset(MASKS),
            summary="itk-elastix, affine then B-spline, after the elastix model zoo's Par0011 "
            "(parameter files in `configs/elastix/`)",
            preset_table="regsam.register.presets:ELASTIX_PRESETS",
            mask_note="elastix samples inside them",
        ),
        MethodSpec(
            name="sam+elastix",
            run=_run_sam_elastix,
            presets=("lung", "fast"),
            default_preset="lung",
            options=frozenset({"stages", "device", "weights", "seed", "points_weights", "elastix_options"}),
            uses_masks=frozenset(MASKS),
            summary="SAM affine as elastix's initial transform (replaces elastix's affine stage), then the elastix "
            "preset's B-spline stage with the affine-inlier SAM matches added through "
            "`CorrespondingPointsEuclideanDistanceMetric` (relative weight 0.5, 0.25 at the two coarsest "
            "resolutions, 0 after)",
            preset_table="regsam.register.sam_elastix:PRESETS",
            mask_note="passed to elastix",
        ),
        MethodSpec(
            name="convexadam",
            run=_run_convexadam,
            presets=("lung", "default", "fast"),
            default_preset="lung",
            options=frozenset({"device"}) | _CONVEXADAM_SETTINGS,
            uses_masks=frozenset(MASKS),
            summary="ConvexAdam (convexadam 0.2.0, MIND-SSC); no affine stage",
            preset_table="regsam.register.presets:CONVEXADAM_PRESETS",
            mask_note="both or none: one alone is not used",
        ),
        MethodSpec(
            name="ants",
            run=_run_ants,
            presets=("synra", "cc"),
            default_preset="synra",
            options=frozenset({"seed"}),
            uses_masks=frozenset(),
            summary="ANTs SyN (antspyx 0.6.3, the `peers` extra): `SyNRA` (rigid + affine + SyN, Mattes MI) with "
            "antspyx's standard settings on 2 mm copies; `cc`: SyN with cross-correlation",
            preset_table="regsam.register.ants:ANTS_PRESETS",
        ),
    )
}


def get_method(name: str) -> MethodSpec:
    """The :class:`MethodSpec` of ``name``; InputError listing the known methods otherwise."""
    spec = METHODS.get(name)
    if spec is None:
        raise InputError(f"unknown registration method '{name}' (known: {', '.join(METHODS)})")
    return spec


def resolve_preset(method: str, name: str | None) -> tuple[str, Any]:
    """``(preset name, preset)`` of a registered method (its default when ``name`` is None); InputError if unknown."""
    spec = get_method(method)
    return choose_preset(spec.load_presets(), name, spec.default_preset, method)


def methods_table_markdown() -> str:
    """The README's method table (markdown), from :data:`METHODS`."""
    rows = ["| method | presets | masks | what it is |", "| --- | --- | --- | --- |"]
    for spec in METHODS.values():
        presets = ", ".join(f"`{p}`" + (" (default)" if p == spec.default_preset else "") for p in spec.presets)
        masks = ", ".join(m for m in MASKS if m in spec.uses_masks) or "none"
        note = f" ({spec.mask_note})" if spec.mask_note else ""
        rows.append(f"| `{spec.name}` | {presets} | {masks}{note} | {spec.summary} |")
    return "\n".join(rows) + "\n"
