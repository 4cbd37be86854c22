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
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from regsam.embed.correspondences import fit_correspondence_affine, match_correspondences
from regsam.errors import InputError
from regsam.io.images import AIR_HU
from regsam.io.transforms import transform_to_field, warp_image
from regsam.register import sam
from regsam.register.presets import ELASTIX_PRESETS, choose_preset, preset_settings
from regsam.register.result import RegistrationResult

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
    point_w = cfg.points_weights if points_weights is None else points_weights
    timings: dict[str, float] = {}

    t = time.perf_counter()
    fixed_emb, moving_emb, dev = sam.embed_pair(fixed, moving, weights, device)
    timings["embed"] = time.perf_counter() - t
    t = time.perf_counter()
    corr = match_correspondences(fixed, fixed_emb, moving_emb, sam_cfg, device=dev, min_kept=cfg.min_points)
    timings["match"] = time.perf_counter() - t
    del fixed_emb, moving_emb
    t = time.perf_counter()
    fit = fit_correspondence_affine(corr, sam_cfg, seed)
    timings["affine"] = time.perf_counter() - t
    if fit.n_inliers < cfg.min_points:
        raise InputError(
            f"only {fit.n_inliers} affine-consistent SAM correspondences (of {len(corr.fixed)} matched); "
            f"sam+elastix needs at least {cfg.min_points}"
        )
    extras: dict[str, Any] = {
        "stages": wanted,
        "preset": name,
        "preset_settings": preset_settings(cfg),
        "sam_preset": cfg.sam,
        "correspondences": {"matched": int(len(corr.fixed)), "kept": int(corr.valid.sum()), "to_elastix": 0},
        "affine": sam.affine_summary(fit),
    }
    artifacts = {"correspondences.csv": corr.to_csv()}

    if "bspline" in wanted:
        # lazy: importing itk-elastix takes ~20 s, paid only when the B-spline stage runs
        from regsam.register.elastix import register_elastix

        use_points = np.any(np.asarray(point_w, dtype=np.float64) > 0)
        points = (corr.fixed[corr.inlier], corr.moving[corr.inlier]) if use_points else None
        options = dict(elastix_options or {})
        result = register_elastix(
            fixed, moving, preset=cfg.elastix, fixed_mask=fixed_mask, moving_mask=moving_mask,
            stages=("bspline",), initial_transform=fit.transform,
            corresponding_points=points, points_weights=point_w if use_points else 0.0, **options,
        )
        timings.update({k: v for k, v in result.timings.items() if k != "total"})
        displacement, warped = result.displacement, result.warped
        extras["elastix"] = result.extras["elastix"]
        extras["correspondences"]["to_elastix"] = int(len(points[0])) if points is not None else 0
        artifacts.update(result.artifacts)
    else:
        t = time.perf_counter()
        displacement = transform_to_field(fit.transform, fixed)
        timings["field"] = time.perf_counter() - t
        t = time.perf_counter()
        warped = warp_image(sitk.Cast(moving, sitk.sitkFloat32), fixed, displacement, "linear", AIR_HU)
        timings["warp"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - start
    return RegistrationResult(
        displacement=displacement, warped=warped, method="sam+elastix", preset=name, timings=timings,
        affine=fit.transform, extras=extras, artifacts=artifacts,
    )
