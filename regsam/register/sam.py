"""``--method sam``: SAM correspondences -> robust affine -> smooth coarse field -> deformable refinement.

Each stage lives in its own module and can be switched off (``stages``):

1. **affine** (:mod:`regsam.register.affine`): grid points inside the fixed body are matched
   into the moving image by embedding nearest-neighbour search; matches that fail the
   backward (cycle) check or score low are dropped; RANSAC then least squares.
2. **coarse** (:mod:`regsam.register.coarse`): a smooth dense displacement fitted to all
   kept correspondences, composed with the affine.
3. **deformable** (:mod:`regsam.register.deformable`): per-pair optimisation of LNCC + embedding
   dissimilarity + bending energy, started from the coarse field.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

from regsam.errors import InputError
from regsam.io.images import AIR_HU
from regsam.io.transforms import transform_to_field, warp_image
from regsam.register.result import RegistrationResult

STAGES = ("affine", "coarse", "deformable")


@dataclass(frozen=True)
class SamPreset:
    """Settings of one ``--preset`` of the SAM method (distances in mm)."""

    point_spacing_mm: float = 20.0  # grid of fixed points matched into the moving image
    cycle_tolerance_mm: float = 8.0  # backward match must return this close
    match_candidates: int = 2  # coarse maxima searched finely per point (the cycle check catches the rest)
    match_radius_mm: float = 12.0  # half-width of the fine search cube
    min_score: float = 0.3  # (fine + coarse cosine) / 2
    ransac_threshold_mm: float = 8.0
    coarse_smoothing_mm: float = 20.0
    coarse_grid_mm: float = 24.0
    deformable: str = "fast"  # preset of regsam.register.deformable
    feature_components: int = 16  # PCA components of the fine embedding used by the deformable loss
    deformable_overrides: dict[str, Any] = field(default_factory=dict)


# 8, 4 and 2 mm levels, few steps: the SAM coarse field already starts within ~1-1.5 mm. The embedding term only at
# 8 mm (it guides large motion; at 4 and 2 mm it cost ~40 % of the time and no accuracy), the 2 mm level on a 4 mm
# control grid, and less bending weight (the control grid already smooths). Explored on held-out breathing pairs
# (DIR-Lab case 3-5 motion; the bending weight on case 3 only), see benchmarks/register_heldout.md.
_DEFORMABLE_2MM: dict[str, Any] = {
    "spacing_mm": 2.0, "levels": 3, "iterations": (20, 20, 10), "finest_control_ratio": 2, "embed_levels": 1, "weight_smooth": 0.005,
}
PRESETS: dict[str, SamPreset] = {
    "fast": SamPreset(deformable_overrides=_DEFORMABLE_2MM),
    # twice the steps at 4 mm, three times at 2 mm: DIR-Lab case 3 motion pairs 0.188 -> 0.166 mm mean TRE for ~1.7 x
    # the time (the former accurate preset, denser matches + the deformable "accurate" budget, gave 0.218 mm in ~6 x)
    "accurate": SamPreset(deformable_overrides={**_DEFORMABLE_2MM, "iterations": (20, 40, 30)}),
}
DEFAULT_PRESET = "fast"


@dataclass
class Correspondences:
    """Matched point pairs: fixed (N, 3) mm -> moving (N, 3) mm, with score, cycle validity and affine inlier flags."""

    fixed: np.ndarray
    moving: np.ndarray
    score: np.ndarray
    valid: np.ndarray
    inlier: np.ndarray

    def to_csv(self) -> str:
        rows = ["fixed_x,fixed_y,fixed_z,moving_x,moving_y,moving_z,score,cycle_ok,affine_inlier"]
        for f, m, s, v, i in zip(self.fixed, self.moving, self.score, self.valid, self.inlier):
            rows.append(",".join(f"{c:.4f}" for c in (*f, *m)) + f",{s:.4f},{int(v)},{int(i)}")
        return "\n".join(rows) + "\n"


def grid_points_in_mask(mask: sitk.Image, spacing_mm: float) -> np.ndarray:
    """World points (N, 3) on a regular ``spacing_mm`` grid that fall inside ``mask`` (non-zero)."""
    array = sitk.GetArrayViewFromImage(mask)
    step = [max(1, int(round(spacing_mm / s))) for s in reversed(mask.GetSpacing())]  # z, y, x
    sub = array[:: step[0], :: step[1], :: step[2]]
    zyx = np.argwhere(sub > 0) * np.array(step)
    index = zyx[:, ::-1].astype(np.float64)
    direction = np.array(mask.GetDirection()).reshape(3, 3)
    return np.asarray(mask.GetOrigin()) + (index * np.asarray(mask.GetSpacing())) @ direction.T


def body_mask(image: sitk.Image) -> sitk.Image:
    """The body (or, for a non-chest image, everything denser than air): where the fixed points are matched from."""
    from regsam.data.masks import threshold_masks

    try:
        body, _ = threshold_masks(image)
    except InputError:
        # Not a chest CT with aerated lungs: use everything denser than air.
        body = sitk.Cast(image > -500, sitk.sitkUInt8)
    if not np.any(sitk.GetArrayViewFromImage(body)):
        raise InputError("fixed image: no body voxels found (nothing denser than air)")
    return body


def find_correspondences(fixed_emb, moving_emb, fixed_body: sitk.Image, preset: SamPreset, device=None) -> Correspondences:
    """Match grid points inside the fixed body into the moving image (cycle-checked)."""
    from regsam.embed.matching import match_points

    points = grid_points_in_mask(fixed_body, preset.point_spacing_mm)
    points = points[fixed_emb.contains(points)]
    if len(points) < 8:
        raise InputError(f"only {len(points)} fixed body points to match; the fixed image is too small or empty")
    result = match_points(
        fixed_emb, points, moving_emb, cycle_tolerance_mm=preset.cycle_tolerance_mm,
        fine_radius_mm=preset.match_radius_mm, coarse_candidates=preset.match_candidates, device=device,
    )
    keep = result.valid & (result.score >= preset.min_score)
    return Correspondences(points, result.matched, result.score, keep, np.zeros(len(points), bool))


def parse_stages(stages: Sequence[str] | str, known: Sequence[str], method: str) -> list[str]:
    """``"affine,coarse"`` or a list -> the stage names, each one of ``known``; InputError otherwise (or if none)."""
    wanted = [s.strip() for s in (stages.split(",") if isinstance(stages, str) else stages) if s.strip()]
    unknown = [s for s in wanted if s not in known]
    if unknown or not wanted:
        raise InputError(f"unknown {method} stage(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(known)}")
    return wanted


def embed_pair(fixed: sitk.Image, moving: sitk.Image, weights: str | None = None, device: str | None = None):
    """Embed both images with the embedder ``weights`` (default: the shipped one): ``(fixed_emb, moving_emb, device)``."""
    from regsam.embed.inference import embed_image
    from regsam.embed.model import load_embedder

    model = load_embedder(weights, device=device)
    dev = next(model.parameters()).device
    return embed_image(model, fixed, device=dev), embed_image(model, moving, device=dev), dev


def match_correspondences(
    fixed: sitk.Image, fixed_emb, moving_emb, preset: SamPreset, device=None, min_kept: int = 8, body: sitk.Image | None = None
) -> Correspondences:
    """:func:`find_correspondences` from the fixed body (``body``, default :func:`body_mask`); InputError if fewer than ``min_kept`` are kept."""
    corr = find_correspondences(fixed_emb, moving_emb, body if body is not None else body_mask(fixed), preset, device=device)
    if corr.valid.sum() < min_kept:
        raise InputError(
            f"only {int(corr.valid.sum())} reliable SAM correspondences (of {len(corr.fixed)}); "
            "the images may not show the same anatomy"
        )
    return corr


def fit_correspondence_affine(corr: Correspondences, preset: SamPreset, seed: int = 0):
    """RANSAC affine (fixed -> moving) of the kept correspondences; marks ``corr.inlier``, returns the ``AffineFit``."""
    from regsam.register.affine import fit_affine_ransac

    keep = np.flatnonzero(corr.valid)
    try:
        fit = fit_affine_ransac(
            corr.fixed[keep], corr.moving[keep], weights=corr.score[keep], threshold_mm=preset.ransac_threshold_mm, seed=seed
        )
    except InputError as exc:
        raise InputError(f"SAM correspondences: {exc}") from None
    corr.inlier[:] = False
    corr.inlier[keep[fit.inliers]] = True
    return fit


def affine_summary(fit) -> dict[str, Any]:
    """The summary.json entry of a SAM affine fit."""
    return {"inliers": int(fit.n_inliers), "rms_inlier_mm": float(fit.rms_inlier_mm), "matrix": fit.matrix.tolist()}


def shared_pca_features(fixed_fine: np.ndarray, moving_fine: np.ndarray, components: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Project two (C, D, H, W) embeddings onto their top principal components (one shared basis).

    The deformable loss warps the moving embedding every iteration; 16 components keep almost all
    of the cosine structure at a fraction of the cost of all C channels. Outputs are float32,
    (components, D, H, W), re-normalised to unit length along the channels.
    """
    import torch

    channels = fixed_fine.shape[0]
    if components >= channels:
        return fixed_fine.astype(np.float32), moving_fine.astype(np.float32)
    # torch converts float16 and multiplies several times faster than numpy here (~1 s -> ~0.35 s per pair)
    flats = [torch.from_numpy(np.ascontiguousarray(a)).reshape(channels, -1).float() for a in (fixed_fine, moving_fine)]
    generator = torch.Generator().manual_seed(int(seed))
    samples = [f[:, torch.randperm(f.shape[1], generator=generator)[:20000]] for f in flats]
    both = torch.cat(samples, dim=1).double()
    mean = both.mean(dim=1, keepdim=True)
    centred = both - mean
    _, vectors = torch.linalg.eigh(centred @ centred.T)  # ascending eigenvalues of the (C, C) scatter matrix
    basis = vectors[:, -components:].flip(1).T.float()  # (k, C), largest variance first

    def project(flat: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
        out = basis @ (flat - mean.float())
        out /= out.norm(dim=0, keepdim=True) + 1e-6
        return out.reshape((components,) + shape).numpy()

    return project(flats[0], fixed_fine.shape[1:]), project(flats[1], moving_fine.shape[1:])


def register_sam(
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
) -> RegistrationResult:
    """Register ``moving`` onto ``fixed`` with SAM embeddings (images validated by ``api.register``).

    Args:
        preset: ``fast`` (default) or ``accurate`` (see :data:`PRESETS`).
        fixed_mask: optional (lung) mask weighting the deformable similarity (default: the automatic body
            mask); the points for the affine and coarse stages always come from the automatic body mask.
        stages: any of ``affine``, ``coarse``, ``deformable`` (comma-separated string or list).
        device: ``cpu`` or ``cuda`` (default: CUDA when available).
        weights: embedder weights file (default: the shipped ``regsam/weights/sam_chest.pt``).
    """
    from regsam.register.coarse import fit_smooth_field
    from regsam.register.deformable import refine_deformable

    start = time.perf_counter()
    name = preset or DEFAULT_PRESET
    if name not in PRESETS:
        raise InputError(f"unknown sam preset '{name}' (known: {', '.join(PRESETS)})")
    cfg = PRESETS[name]
    wanted = parse_stages(stages, STAGES, "sam")
    timings: dict[str, float] = {}

    t = time.perf_counter()
    fixed_emb, moving_emb, dev = embed_pair(fixed, moving, weights, device)
    timings["embed"] = time.perf_counter() - t

    affine: sitk.Transform | None = None
    field_img: sitk.Image | None = None
    corr: Correspondences | None = None
    extras: dict[str, Any] = {"stages": wanted, "preset": name}
    matching = "affine" in wanted or "coarse" in wanted
    # the body mask places the matched points, and weights the deformable similarity when no mask is given
    body = body_mask(fixed) if matching or fixed_mask is None else None
    if matching:
        t = time.perf_counter()
        corr = match_correspondences(fixed, fixed_emb, moving_emb, cfg, device=dev, body=body)
        timings["match"] = time.perf_counter() - t
        extras["correspondences"] = {"matched": int(len(corr.fixed)), "kept": int(corr.valid.sum())}
    if "affine" in wanted:
        t = time.perf_counter()
        fit = fit_correspondence_affine(corr, cfg, seed)
        affine = fit.transform
        timings["affine"] = time.perf_counter() - t
        extras["affine"] = affine_summary(fit)
    if "coarse" in wanted:
        t = time.perf_counter()
        use = corr.inlier if affine is not None else corr.valid
        field_img = fit_smooth_field(
            corr.fixed[use], corr.moving[use], fixed, affine, weights=corr.score[use],
            smoothing_mm=cfg.coarse_smoothing_mm, grid_spacing_mm=cfg.coarse_grid_mm,
        )
        timings["coarse"] = time.perf_counter() - t
    if "deformable" in wanted:
        t = time.perf_counter()
        initial = field_img if field_img is not None else affine
        fixed_feat, moving_feat = shared_pca_features(fixed_emb.fine, moving_emb.fine, cfg.feature_components, seed)
        # without a mask the similarity is weighted by the automatic body mask: air outside the body carries no
        # motion, and the mask's box keeps the cost to the body on a full field-of-view scan
        result = refine_deformable(
            fixed, moving, initial, preset=cfg.deformable, fixed_mask=fixed_mask if fixed_mask is not None else body,
            fixed_features=fixed_feat, moving_features=moving_feat,
            fixed_feature_geometry=fixed_emb.fine_geometry, moving_feature_geometry=moving_emb.fine_geometry,
            device=str(dev), seed=seed, **cfg.deformable_overrides,
        )
        field_img = result.field
        timings["deformable"] = time.perf_counter() - t
        extras["deformable"] = {"folding_share": result.folding_share,
                                "similarity_mask": "given" if fixed_mask is not None else "automatic body"}
    if field_img is None:
        field_img = transform_to_field(affine, fixed)

    t = time.perf_counter()
    warped = warp_image(sitk.Cast(moving, sitk.sitkFloat32), fixed, field_img, "linear", AIR_HU)
    timings["warp"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - start
    artifacts = {"correspondences.csv": corr.to_csv()} if corr is not None else {}
    return RegistrationResult(
        displacement=field_img, warped=warped, method="sam", preset=name, timings=timings,
        affine=affine, extras=extras, artifacts=artifacts,
    )
