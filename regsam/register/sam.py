"""``--method sam``: SAM correspondences -> robust affine -> large-motion capture -> finish -> deformable refinement.

Each stage is a :class:`Stage` object in this module, reads and writes one :class:`SamState`, and can be
switched off (``stages``; a preset names its default stages):

1. **affine** (:mod:`regsam.embed.correspondences`): grid points inside the fixed body are matched
   into the moving image by embedding nearest-neighbour search; matches that fail the
   backward (cycle) check or score low are dropped; RANSAC then least squares.
2. **coarse** (:mod:`regsam.fit.smooth`): a smooth dense displacement fitted to all kept correspondences,
   composed with the affine (off by default: the capture stage replaces it).
3. **capture** (:mod:`regsam.register.capture`): coarse-to-fine discrete displacement search over MIND-SSC
   and SAM features with a convex coupling that lets the lungs slide: carries the 20-40 mm of a breathing
   lung base that the smooth fit and a few gradient steps cannot.
4. **finish** (:mod:`regsam.register.finish`): a few Adam steps on MIND-SSC at sample points of the body near
   the lungs add a smooth correction (one inside the lungs, one outside) to the capture residual: the capture's
   2 mm candidate step becomes continuous, without any full-resolution work.
5. **network** (``--method sam-net`` only; :mod:`regsam.register.net.stage`): one pass of the trained
   registration network on the pair after the affine gives the residual (in place of the capture).
6. **deformable** (:mod:`regsam.register.deformable`): per-pair optimisation of LNCC + bending energy,
   started from the capture residual, one smooth field inside the lungs and one outside (sliding), steps
   stopped on convergence.

Masks: the automatic body and lung masks of the fixed image (:func:`regsam.data.masks.threshold_masks`, on
a copy of at most ``mask_spacing_mm``) place the matched points, bound the capture search and the
similarity (lungs' box), and give the sliding surface; a given ``fixed_mask`` replaces the lungs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from regsam.data.masks import body_mask, threshold_masks
from regsam.devices import resolve_device
from regsam.embed.correspondences import MatchSettings, fit_correspondence_affine, match_correspondences
from regsam.embed.fused import load_fused
from regsam.embed.inference import embed_image
from regsam.errors import InputError
from regsam.fit.correspondences import Correspondences
from regsam.fit.smooth import fit_smooth_field
from regsam.io.images import AIR_HU, resample_to_spacing
from regsam.io.transforms import transform_to_field, warp_image
from regsam.register.capture import CaptureSettings, box_grid, capture_motion
from regsam.register.deformable import refine_deformable
from regsam.register.embedding_pca import pca_basis, project_seen, shared_pca_features
from regsam.register.finish import FinishSettings, finish_motion
from regsam.register.net.model import network_embedder
from regsam.register.net.stage import NetworkStage
from regsam.register.presets import choose_preset
from regsam.register.result import RegistrationResult
from regsam.register.stages import Stage, timed
from regsam.register.torch_fields import extend_over

#: every stage in run order; ``sam`` takes :data:`SAM_STAGES`, ``sam-net`` :data:`NET_STAGES`
STAGES = ("affine", "coarse", "capture", "network", "finish", "deformable")
SAM_STAGES = ("affine", "coarse", "capture", "finish", "deformable")
NET_STAGES = ("affine", "network", "finish", "deformable")


@dataclass(frozen=True)
class SamPreset(MatchSettings):
    """Settings of one ``--preset`` of the SAM method (distances in mm); the matching fields come from MatchSettings."""

    stages: tuple[str, ...] = ("affine", "capture", "deformable")  # run when no ``stages`` are given
    coarse_smoothing_mm: float = 20.0
    coarse_grid_mm: float = 24.0
    capture: CaptureSettings = field(default_factory=CaptureSettings)
    finish: FinishSettings = field(default_factory=FinishSettings)
    sliding: bool = True  # lungs slide along the chest wall in the capture coupling and the deformable stage
    mask_spacing_mm: float = 2.0  # the automatic masks are computed on a copy of at most this spacing
    lung_margin_mm: float = 20.0  # the deformable similarity covers the body within this distance of the lungs
    deformable: str = "fast"  # preset of regsam.register.deformable
    feature_components: int = 16  # PCA components of the fine embedding (capture and deformable terms)
    deformable_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown or not self.stages:
            raise InputError(f"sam preset: unknown stage(s) {', '.join(unknown) or '(none)'}")
        if self.mask_spacing_mm <= 0 or self.lung_margin_mm < 0 or self.feature_components < 1:
            raise InputError("sam preset: mask_spacing_mm must be > 0, lung_margin_mm >= 0, feature_components >= 1")


# The capture stage alone ends at 0.58 mm on a held-out full-thorax pair with 38 mm lung-base motion. The LNCC
# refinement of the deformable stage helps small motion (there: 0.52 -> 0.36 mm for points moving < 10 mm; a
# held-out heart crop with DIR-Lab case 4 motion: 0.61 -> 0.20 mm) but pulls the lung base (> 20 mm: 0.65 ->
# 1.5 mm) and costs minutes on a full thorax, so it is in ``accurate`` only, with small steps (lr 0.03 voxel).
# The finish stage (MIND-SSC at sample points, a few seconds) makes the capture's 2 mm steps continuous: on
# pairs simulated from CTs outside the held-out set, 0.43 -> 0.29 mm (sample CT, DIR-Lab case 4, 2 mm) and
# 0.84 -> 0.64 mm (sample CT full thorax, 38 mm), so ``fast`` runs it.
_DEFORMABLE_CAPTURED: dict[str, Any] = {
    "spacing_mm": 2.0, "levels": 2, "iterations": (40, 30), "finest_control_ratio": 2, "embed_levels": 0,
    "weight_smooth": 0.005, "tolerance": 0.002, "lr": 0.03,
}
PRESETS: dict[str, SamPreset] = {
    "fast": SamPreset(stages=("affine", "capture", "finish"), deformable_overrides=_DEFORMABLE_CAPTURED),
    "accurate": SamPreset(stages=("affine", "capture", "finish", "deformable"), deformable_overrides=_DEFORMABLE_CAPTURED),
}
DEFAULT_PRESET = "fast"
#: ``--method sam-net``: the network replaces the capture; ``fast`` finishes the network's residual with the same
#: instance optimisation as ``sam``'s ``fast`` (the MIND-SSC finish stage), ``instant`` stops after the network pass.
NET_PRESETS: dict[str, SamPreset] = {
    "fast": SamPreset(stages=("affine", "network", "finish"), deformable_overrides=_DEFORMABLE_CAPTURED),
    "instant": SamPreset(stages=("affine", "network"), deformable_overrides=_DEFORMABLE_CAPTURED),
}
#: method name -> (preset table, stages it takes)
METHOD_TABLES: dict[str, tuple[dict[str, SamPreset], tuple[str, ...]]] = {
    "sam": (PRESETS, SAM_STAGES), "sam-net": (NET_PRESETS, NET_STAGES),
}


def parse_stages(stages: Sequence[str] | str, known: Sequence[str], method: str) -> list[str]:
    """``"affine,coarse"`` or a list -> the stage names, each one of ``known``; InputError otherwise (or if none)."""
    wanted = [s.strip() for s in (stages.split(",") if isinstance(stages, str) else stages) if s.strip()]
    unknown = [s for s in wanted if s not in known]
    if unknown or not wanted:
        raise InputError(f"unknown {method} stage(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(known)}")
    return wanted


def embed_pair(fixed: sitk.Image, moving: sitk.Image, weights: str | None = None, device: str | None = None):
    """Embed both images with the embedder ``weights`` (default: the shipped one): ``(fixed_emb, moving_emb, device)``."""
    dev = resolve_device(device)
    model = load_fused(weights, device=dev)  # the inference form: same embedding, no MONAI import
    return embed_image(model, fixed, device=dev), embed_image(model, moving, device=dev), dev


def affine_summary(fit) -> dict[str, Any]:
    """The summary.json entry of a SAM affine fit."""
    return {"inliers": int(fit.n_inliers), "rms_inlier_mm": float(fit.rms_inlier_mm), "matrix": fit.matrix.tolist()}


# ------------------------------------------------------------------ stages
@dataclass
class SamState:
    """What the stages of one SAM registration share: inputs, settings, and what each stage adds."""

    fixed: sitk.Image
    moving: sitk.Image
    cfg: SamPreset
    seed: int
    device: torch.device
    fixed_emb: Any
    moving_emb: Any
    body: sitk.Image | None = None  # automatic body mask (mask grid)
    lungs: sitk.Image | None = None  # given fixed mask, else automatic lungs (None: not a chest CT)
    similarity_mask: sitk.Image | None = None
    features: tuple[np.ndarray, np.ndarray] | None = None  # PCA-reduced fine embeddings
    corr: Correspondences | None = None
    affine: sitk.Transform | None = None
    coarse: sitk.Image | None = None  # fixed -> moving field of the coarse stage
    residual: sitk.Image | None = None  # capture / network: r of x -> T0(x + r(x))
    displacement: sitk.Image | None = None  # final field on the fixed grid
    timings: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    net_weights: str | None = None  # network stage: weights file (None: the shipped ones)

    @property
    def start(self) -> sitk.Transform | sitk.Image | None:
        """The mapping the capture and deformable stages start from (``T0``)."""
        return self.coarse if self.coarse is not None else self.affine

    def pca_features(self) -> tuple[np.ndarray, np.ndarray]:
        if self.features is None:
            self.features = shared_pca_features(self.fixed_emb.fine, self.moving_emb.fine, self.cfg.feature_components, self.seed)
        return self.features

    def pca_seen(self, target: sitk.Image) -> tuple[tuple[torch.Tensor, sitk.Image], tuple[torch.Tensor, sitk.Image]]:
        """The PCA features (:meth:`pca_features`) of the parts of both fine embeddings that ``target`` reads (the
        moving one through :attr:`start`), each with its part's grid: the same values there, a fraction of the work."""
        fixed, moving = self.fixed_emb, self.moving_emb
        if self.features is not None or self.cfg.feature_components >= fixed.fine.shape[0]:
            ff, mf = self.pca_features()
            return (torch.from_numpy(ff), fixed.fine_geometry), (torch.from_numpy(mf), moving.fine_geometry)
        basis = pca_basis(fixed.fine, moving.fine, self.cfg.feature_components, self.seed)
        ff, f_geo = project_seen(fixed.fine, fixed.fine_geometry, *basis, target)
        mf, m_geo = project_seen(moving.fine, moving.fine_geometry, *basis, target, self.start)
        return (torch.from_numpy(ff), f_geo), (torch.from_numpy(mf), m_geo)


#: The affine is kept only if it explains the inlier matches this much better (rms) than no motion at all; the
#: matches are quantised to the embedding grid (~2 mm rms on an image and itself), so an affine fitted to an
#: unmoved pair is off by a few tenths of a mm that no later stage can resolve below its search step.
AFFINE_MIN_GAIN = 1.05


class AffineStage:
    name = "affine"

    def run(self, state: SamState) -> None:
        corr = _ensure_matches(state)
        fit = fit_correspondence_affine(corr, state.cfg, state.seed)
        summary = affine_summary(fit)
        inliers = corr.inlier
        rms_identity = float(np.sqrt(np.mean(np.sum((corr.moving[inliers] - corr.fixed[inliers]) ** 2, axis=1))))
        summary["rms_identity_mm"] = rms_identity
        summary["kept"] = rms_identity > AFFINE_MIN_GAIN * float(fit.rms_inlier_mm)
        state.affine = fit.transform if summary["kept"] else sitk.AffineTransform(3)
        state.extras["affine"] = summary


class CoarseStage:
    name = "coarse"

    def run(self, state: SamState) -> None:
        corr = _ensure_matches(state)
        use = corr.inlier if state.affine is not None else corr.valid
        state.coarse = fit_smooth_field(
            corr.fixed[use], corr.moving[use], state.fixed, state.affine, weights=corr.score[use],
            smoothing_mm=state.cfg.coarse_smoothing_mm, grid_spacing_mm=state.cfg.coarse_grid_mm,
        )


class CaptureStage:
    name = "capture"

    def run(self, state: SamState) -> None:
        lungs = state.lungs if state.cfg.sliding else None
        settings = state.cfg.capture
        # every level's grid spans the same box: the SAM features are needed only where it reads them
        sam = state.pca_seen(box_grid(state.fixed, lungs, settings.feature_spacing_mm[0], settings.box_margin_mm))
        state.residual, info = capture_motion(
            state.fixed, state.moving, state.start, lungs=lungs,
            sam_features=sam, settings=settings, device=state.device,
        )
        state.extras["capture"] = {"levels": info["levels"], "sliding": state.cfg.sliding and state.lungs is not None}


class FinishStage:
    name = "finish"

    def run(self, state: SamState) -> None:
        state.residual, info = finish_motion(
            state.fixed, state.moving, state.start, state.residual, lungs=state.lungs,
            similarity_mask=state.similarity_mask, sliding=state.cfg.sliding, settings=state.cfg.finish, device=state.device,
        )
        state.extras["finish"] = {k: info[k] for k in ("grid_size", "spacing_mm", "points", "iterations", "loss_first",
                                                       "loss_last", "mean_correction_mm", "seconds")}


class DeformableStage:
    name = "deformable"

    def run(self, state: SamState) -> None:
        embed = int(state.cfg.deformable_overrides.get("embed_levels", 1) or 0) > 0
        fixed_feat, moving_feat = state.pca_features() if embed else (None, None)
        result = refine_deformable(
            state.fixed, state.moving, state.start, preset=state.cfg.deformable, fixed_mask=state.similarity_mask,
            fixed_features=fixed_feat, moving_features=moving_feat,
            fixed_feature_geometry=state.fixed_emb.fine_geometry if embed else None,
            moving_feature_geometry=state.moving_emb.fine_geometry if embed else None,
            initial_residual=state.residual, sliding_mask=state.lungs if state.cfg.sliding else None,
            device=str(state.device), seed=state.seed, **state.cfg.deformable_overrides,
        )
        state.displacement = result.field
        state.extras["deformable"] = {"folding_share": result.folding_share, "levels": result.info["levels"],
                                      "sliding": result.info["sliding"]}


STAGE_OBJECTS: dict[str, Stage] = {stage.name: stage for stage in (AffineStage(), CoarseStage(), CaptureStage(), FinishStage(), NetworkStage(), DeformableStage())}


def _ensure_matches(state: SamState) -> Correspondences:
    if state.corr is None:
        with timed(state.timings, "match"):
            state.corr = match_correspondences(state.fixed, state.fixed_emb, state.moving_emb, state.cfg,
                                               device=state.device, body=state.body)
        state.extras["correspondences"] = {"matched": int(len(state.corr.fixed)), "kept": int(state.corr.valid.sum())}
    return state.corr


def automatic_masks(fixed: sitk.Image, spacing_mm: float) -> tuple[sitk.Image, sitk.Image | None]:
    """(body, lungs or None) of the fixed image, computed on a copy of at most ``spacing_mm`` (the masks' grid)."""
    small = fixed
    if min(fixed.GetSpacing()) < spacing_mm:
        small = resample_to_spacing(sitk.Cast(fixed, sitk.sitkFloat32), [max(s, spacing_mm) for s in fixed.GetSpacing()])
    try:
        return threshold_masks(small)
    except InputError:
        return body_mask(small), None  # not a chest CT with aerated lungs: no sliding surface


def _similarity_mask(body: sitk.Image, lungs: sitk.Image | None, margin_mm: float) -> sitk.Image:
    """The body within ``margin_mm`` of the lungs (the whole body without lungs): where the deformable similarity counts."""
    if lungs is None:
        return body
    distance = sitk.SignedMaurerDistanceMap(sitk.Cast(lungs != 0, sitk.sitkUInt8), insideIsPositive=False,
                                            squaredDistance=False, useImageSpacing=True)
    near = sitk.Resample(sitk.Cast(distance <= margin_mm, sitk.sitkUInt8), body, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.And(sitk.Cast(body != 0, sitk.sitkUInt8), near)


def register_sam(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    preset: str | None = None,
    fixed_mask: sitk.Image | None = None,
    stages: Sequence[str] | str | None = None,
    device: str | None = None,
    weights: str | None = None,
    seed: int = 0,
    net_weights: str | None = None,
    method: str = "sam",
) -> RegistrationResult:
    """Register ``moving`` onto ``fixed`` with SAM embeddings (images validated by ``api.register``).

    Args:
        preset: ``sam``: ``fast`` (default) or ``accurate`` (see :data:`PRESETS`); ``sam-net``: ``fast``
            (default) or ``instant`` (:data:`NET_PRESETS`).
        fixed_mask: optional lung mask of the fixed image: the sliding surface and the similarity's region
            (default: the automatic lung mask); the matched points always come from the automatic body mask.
        stages: ``sam``: any of ``affine``, ``coarse``, ``capture``, ``deformable``; ``sam-net``: any of ``affine``,
            ``network``, ``deformable`` (comma-separated string or list; default: the preset's).
        device: ``cpu`` or ``cuda`` (default: CUDA when available).
        weights: embedder weights file (default: the shipped ``regsam/weights/sam_chest.pt``; with the ``network``
            stage, the embedder the network was trained on, :func:`~regsam.register.net.model.network_embedder`).
        net_weights: ``sam-net``: network weights file (default: the shipped ``regsam/weights/sam_net_chest.pt``).
        method: ``sam`` or ``sam-net`` (:data:`METHOD_TABLES`: its presets and stages; the result's method).
    """
    start = time.perf_counter()
    presets, known = METHOD_TABLES[method]
    name, cfg = choose_preset(presets, preset, DEFAULT_PRESET, method)
    wanted = parse_stages(stages if stages is not None else cfg.stages, known, method)
    if "network" in wanted:  # a missing network or a wrong embedder fails before the embedding work
        pinned = network_embedder(net_weights, weights)
        weights = None if pinned is None else str(pinned)
    timings: dict[str, float] = {}
    with timed(timings, "embed"):
        fixed_emb, moving_emb, dev = embed_pair(fixed, moving, weights, device)
    state = SamState(fixed, moving, cfg, seed, dev, fixed_emb, moving_emb, timings=timings,
                     extras={"stages": wanted, "preset": name}, net_weights=net_weights)
    with timed(timings, "masks"):
        state.body, lungs = automatic_masks(fixed, cfg.mask_spacing_mm)
        state.lungs = fixed_mask if fixed_mask is not None else lungs
        state.similarity_mask = _similarity_mask(state.body, state.lungs, cfg.lung_margin_mm)
    state.extras["masks"] = {"lungs": "given" if fixed_mask is not None else ("automatic" if lungs is not None else "none"),
                             "similarity": "body within {:g} mm of the lungs".format(cfg.lung_margin_mm)
                             if state.lungs is not None else "automatic body"}
    for stage_name in STAGES:  # the stages run in their own order, whatever the order asked
        if stage_name in wanted:
            with timed(timings, stage_name):
                STAGE_OBJECTS[stage_name].run(state)
    if state.displacement is None:
        with timed(timings, "field"):  # the fixed-grid field of T0(x + r(x)): seconds on a full thorax
            state.displacement = _field_without_refinement(state)
    with timed(timings, "warp"):
        warped = warp_image(sitk.Cast(moving, sitk.sitkFloat32), fixed, state.displacement, "linear", AIR_HU)
    timings["total"] = time.perf_counter() - start
    artifacts = {"correspondences.csv": state.corr.to_csv()} if state.corr is not None else {}
    return RegistrationResult(
        displacement=state.displacement, warped=warped, method=method, preset=name, timings=timings,
        affine=state.affine, extras=state.extras, artifacts=artifacts,
    )


def _field_without_refinement(state: SamState) -> sitk.Image:
    """The fixed-grid field of T0(x + r(x)) when no deformable stage ran (identity when nothing ran)."""
    start = state.start if state.start is not None else sitk.Transform()
    if state.residual is None:
        return transform_to_field(start, state.fixed)
    # the residual lives on the lungs' box: continue it flat beyond the box on its own lattice (no jump, no fold)
    grown, _ = extend_over(state.residual, state.fixed)
    t0 = sitk.DisplacementFieldTransform(sitk.Image(start)) if isinstance(start, sitk.Image) else start
    # the field transform interpolates the grown lattice linearly at each fixed voxel, as a Resample onto the fixed
    # grid would, without a second full-size field (the grown lattice covers the fixed grid: nothing is extrapolated)
    composite = sitk.CompositeTransform([t0, sitk.DisplacementFieldTransform(grown)])  # residual first, then T0
    return transform_to_field(composite, state.fixed)
