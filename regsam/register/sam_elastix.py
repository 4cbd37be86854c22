"""``--method sam+elastix``: Elastix B-spline started from the SAM affine and guided by SAM correspondences.

SAM enhancing the standard tool:

1. **affine** (:mod:`regsam.register.sam`): both images are embedded, grid points of the fixed
   body are matched into the moving image (cycle-checked, scored), RANSAC fits the affine.
   This replaces elastix's own affine stage, which needs the images roughly aligned already.
2. **bspline** (:mod:`regsam.register.elastix`): the B-spline stage of the elastix preset
   (``lung`` or ``fast``) starts from the SAM affine (elastix ``initial transform``) and gets
   the affine-inlier correspondences as a third metric,
   ``CorrespondingPointsEuclideanDistanceMetric``, next to NCC and bending energy.

Weight of the points. The regsam elastix presets use relative weights: each metric's gradient is
rescaled every iteration to ``weight x`` the magnitude of the NCC gradient (elastix reads
``Metric2RelativeWeight`` once per resolution). The SAM matches carry a few mm of error (median
~2.5 mm, 90th percentile ~6 mm after the cycle check; see the model card), well above what NCC
reaches (< 1 mm). So the points act only at the two coarsest B-spline resolutions, at half the
NCC gradient's magnitude at the coarsest and a quarter at the next, where they pull large motion
into NCC's capture range; the finer resolutions are NCC and bending energy alone, which set the
final accuracy. Measured with ``fast`` on planted motion (3 mm held-out CT, 20 mm breathing plus a
25-40 mm, 8-20 degree rigid offset), mean TRE on one pair: no points 1.8 mm, 0.5 at every level
2.3, (0.5, 0.25, 0.1) 1.1, (0.5, 0.25, 0) 0.83, (1.0, 0.5, 0) 0.44; on another pair the stronger
(1.0, 0.5, 0) raised the body-point error to 1.44 mm against 0.92 with (0.5, 0.25, 0) and 0.79
without points. The weaker weights were kept: the points never outweigh the image.

The displacement field is elastix's final transform (SAM affine, then B-spline) evaluated by
transformix on the fixed grid (fixed ``x`` -> moving ``x + u(x)``); ``affine.tfm`` is the SAM
affine; ``correspondences.csv`` lists the matches (the ``affine_inlier`` rows went to elastix);
``elastix/`` holds the TransformParameters files (the first is the SAM affine), the point
files and the log.

Each stage is a :class:`~regsam.register.stages.Stage` object in this module that reads and extends one
:class:`SamElastixState`; :func:`register_sam_elastix` embeds the pair and runs them in order.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

from regsam.embed.correspondences import fit_correspondence_affine, match_correspondences
from regsam.errors import InputError
from regsam.fit.affine import AffineFit
from regsam.fit.correspondences import Correspondences
from regsam.io.images import AIR_HU
from regsam.io.transforms import transform_to_field, warp_image
from regsam.register import sam
from regsam.register.presets import ELASTIX_PRESETS, choose_preset, preset_settings
from regsam.register.result import RegistrationResult
from regsam.register.stages import Stage, timed

STAGES = ("affine", "bspline")


@dataclass(frozen=True)
class SamElastixPreset:
    """One ``--preset`` of ``sam+elastix``."""

    elastix: str  # elastix preset whose B-spline stage is run (regsam.register.elastix.PRESETS)
    points_weights: tuple[float, ...]  # relative weight of the points metric, one per B-spline resolution
    sam: str = "fast"  # sam preset giving the matching and RANSAC settings (regsam.register.sam.PRESETS)
    min_points: int = 8  # fewest affine-inlier correspondences accepted

    def __post_init__(self) -> None:
        if self.elastix not in ELASTIX_PRESETS:
            known = ", ".join(ELASTIX_PRESETS)
            raise InputError(f"sam+elastix preset: unknown elastix preset '{self.elastix}' (known: {known})")
        if self.sam not in sam.PRESETS:
            raise InputError(f"sam+elastix preset: unknown sam preset '{self.sam}' (known: {', '.join(sam.PRESETS)})")
        if not self.points_weights or any(not w >= 0 for w in self.points_weights):
            raise InputError(
                f"sam+elastix preset: points_weights must be >= 0, one per resolution, got {self.points_weights}"
            )
        if isinstance(self.min_points, bool) or not isinstance(self.min_points, int) or self.min_points < 4:
            raise InputError(
                f"sam+elastix preset: min_points must be an integer >= 4 (an affine), got {self.min_points!r}"
            )


PRESETS: dict[str, SamElastixPreset] = {
    # B-spline grids 80, 40, 20, 10 mm: points at the two coarsest
    "lung": SamElastixPreset(elastix="lung", points_weights=(0.5, 0.25, 0.0, 0.0)),
    # B-spline grids 64, 32, 16 mm: points at the two coarsest
    "fast": SamElastixPreset(elastix="fast", points_weights=(0.5, 0.25, 0.0)),
}
DEFAULT_PRESET = "lung"


# ------------------------------------------------------------------ stages
@dataclass
class SamElastixState:
    """What the stages of one sam+elastix registration share: inputs, settings, and what each stage adds."""

    fixed: sitk.Image
    moving: sitk.Image
    cfg: SamElastixPreset
    sam_cfg: sam.SamPreset
    seed: int
    device: Any  # torch device of the embedder
    fixed_emb: Any  # the embeddings, dropped once matched
    moving_emb: Any
    points_weights: float | Sequence[float]
    fixed_mask: sitk.Image | None = None
    moving_mask: sitk.Image | None = None
    elastix_options: dict[str, Any] = field(default_factory=dict)
    corr: Correspondences | None = None
    fit: AffineFit | None = None  # the SAM affine
    displacement: sitk.Image | None = None  # final field on the fixed grid
    warped: sitk.Image | None = None
    timings: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)


class AffineStage:
    """SAM matches of the fixed body's grid points, and the RANSAC affine fitted to them."""

    name = "affine"

    def run(self, state: SamElastixState) -> None:
        with timed(state.timings, "match"):
            corr = match_correspondences(state.fixed, state.fixed_emb, state.moving_emb, state.sam_cfg,
                                         device=state.device, min_kept=state.cfg.min_points)
        state.fixed_emb = state.moving_emb = None  # free the embeddings before elastix runs
        with timed(state.timings, self.name):
            fit = fit_correspondence_affine(corr, state.sam_cfg, state.seed)
        if fit.n_inliers < state.cfg.min_points:
            raise InputError(
                f"only {fit.n_inliers} affine-consistent SAM correspondences (of {len(corr.fixed)} matched); "
                f"sam+elastix needs at least {state.cfg.min_points}"
            )
        state.corr, state.fit = corr, fit
        state.extras["correspondences"] = {"matched": int(len(corr.fixed)), "kept": int(corr.valid.sum()),
                                           "to_elastix": 0}
        state.extras["affine"] = sam.affine_summary(fit)
        state.artifacts["correspondences.csv"] = corr.to_csv()


class BsplineStage:
    """The elastix preset's B-spline stage from the SAM affine, with the affine-inlier matches as points."""

    name = "bspline"

    def run(self, state: SamElastixState) -> None:
        # lazy: importing itk-elastix takes ~20 s, paid only when the B-spline stage runs
        from regsam.register.elastix import register_elastix

        corr, point_w = state.corr, state.points_weights
        assert corr is not None and state.fit is not None, "the bspline stage starts from the affine stage"
        use_points = np.any(np.asarray(point_w, dtype=np.float64) > 0)
        points = (corr.fixed[corr.inlier], corr.moving[corr.inlier]) if use_points else None
        result = register_elastix(
            state.fixed, state.moving, preset=state.cfg.elastix, fixed_mask=state.fixed_mask,
            moving_mask=state.moving_mask, stages=("bspline",), initial_transform=state.fit.transform,
            corresponding_points=points, points_weights=point_w if use_points else 0.0, **state.elastix_options,
        )
        state.timings.update({k: v for k, v in result.timings.items() if k != "total"})
        state.displacement, state.warped = result.displacement, result.warped
        state.extras["elastix"] = result.extras["elastix"]
        state.extras["correspondences"]["to_elastix"] = int(len(points[0])) if points is not None else 0
        state.artifacts.update(result.artifacts)


#: The stages in their fixed order. Each clocks itself: the affine stage its matching (``match``) and its fit
#: (``affine``), the bspline stage passes on elastix's own timings (``setup``, ``convert``, ``bspline``, ``field``,
#: ``warp``).
STAGE_OBJECTS: dict[str, Stage] = {stage.name: stage for stage in (AffineStage(), BsplineStage())}


def register_sam_elastix(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    preset: str | None = None,
    fixed_mask: sitk.Image | None = None,
    moving_mask: sitk.Image | None = None,
    stages: Sequence[str] | str = STAGES,
    device: str | None = None,
    weights: str | None = None,
    seed: int = 0,
    points_weights: float | Sequence[float] | None = None,
    elastix_options: dict[str, Any] | None = None,
) -> RegistrationResult:
    """Register ``moving`` onto ``fixed``: SAM affine, then elastix B-spline with SAM points.

    The images are assumed validated by ``api.register``.

    Args:
        preset: ``lung`` (default) or ``fast``: the elastix preset of the B-spline stage (:data:`PRESETS`).
        fixed_mask, moving_mask: passed to elastix (its samples, and the points inside the fixed
            mask); the SAM points come from an automatic body mask.
        stages: ``affine`` (required) and ``bspline`` (comma-separated string or list).
        device: torch device of the embedder (``cpu``/``cuda``; default CUDA when available).
        weights: embedder weights file (default: the shipped ``regsam/weights/sam_chest.pt``).
        seed: RANSAC seed (elastix keeps its parameter files' ``RandomSeed`` unless
            ``elastix_options={"seed": ...}``).
        points_weights: relative weight(s) of the points metric, overriding the preset's; all zero
            (or 0) runs the B-spline stage without points (SAM affine initialisation only).
        elastix_options: more keyword arguments of :func:`regsam.register.elastix.register_elastix`
            (e.g. ``overrides``, ``keep_logs``).

    Raises:
        InputError: unknown preset or stage, too few reliable or affine-consistent SAM correspondences.
    """
    start = time.perf_counter()
    name, cfg = choose_preset(PRESETS, preset, DEFAULT_PRESET, "sam+elastix")
    _, sam_cfg = choose_preset(sam.PRESETS, cfg.sam, sam.DEFAULT_PRESET, "sam")
    wanted = sam.parse_stages(stages, STAGES, "sam+elastix")
    if "affine" not in wanted:
        raise InputError("sam+elastix needs the affine stage (it initialises elastix); stages: affine[,bspline]")
    timings: dict[str, float] = {}
    with timed(timings, "embed"):
        fixed_emb, moving_emb, dev = sam.embed_pair(fixed, moving, weights, device)
    state = SamElastixState(
        fixed, moving, cfg, sam_cfg, seed, dev, fixed_emb, moving_emb,
        points_weights=cfg.points_weights if points_weights is None else points_weights,
        fixed_mask=fixed_mask, moving_mask=moving_mask, elastix_options=dict(elastix_options or {}), timings=timings,
        extras={"stages": wanted, "preset": name, "preset_settings": preset_settings(cfg), "sam_preset": cfg.sam},
    )
    del fixed_emb, moving_emb  # the state holds them until the affine stage has matched
    for stage_name in STAGES:  # the stages run in their own order, whatever the order asked
        if stage_name in wanted:
            STAGE_OBJECTS[stage_name].run(state)
    assert state.fit is not None
    if state.displacement is None:  # no B-spline stage: the SAM affine alone
        with timed(timings, "field"):
            state.displacement = transform_to_field(state.fit.transform, fixed)
        with timed(timings, "warp"):
            state.warped = warp_image(sitk.Cast(moving, sitk.sitkFloat32), fixed, state.displacement, "linear", AIR_HU)
    timings["total"] = time.perf_counter() - start
    return RegistrationResult(
        displacement=state.displacement, warped=state.warped, method="sam+elastix", preset=name, timings=timings,
        affine=state.fit.transform, extras=state.extras, artifacts=state.artifacts,
    )
