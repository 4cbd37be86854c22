"""``--method sam``: SAM correspondences -> robust affine -> smooth coarse field -> deformable refinement.

Each stage lives in its own module and can be switched off (``stages``):

1. **affine** (:mod:`regsam.embed.correspondences`): grid points inside the fixed body are matched
   into the moving image by embedding nearest-neighbour search; matches that fail the
   backward (cycle) check or score low are dropped; RANSAC then least squares.
2. **coarse** (:mod:`regsam.fit.smooth`): a smooth dense displacement fitted to all
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
import torch

from regsam.data.masks import body_mask
from regsam.embed.correspondences import MatchSettings, fit_correspondence_affine, match_correspondences
from regsam.embed.inference import embed_image
from regsam.embed.model import load_embedder
from regsam.errors import InputError
from regsam.fit.correspondences import Correspondences
from regsam.fit.smooth import fit_smooth_field
from regsam.io.images import AIR_HU
from regsam.io.transforms import transform_to_field, warp_image
from regsam.register.deformable import refine_deformable
from regsam.register.result import RegistrationResult

STAGES = ("affine", "coarse", "deformable")


@dataclass(frozen=True)
class SamPreset(MatchSettings):
    """Settings of one ``--preset`` of the SAM method (distances in mm); the matching fields come from MatchSettings."""

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


def parse_stages(stages: Sequence[str] | str, known: Sequence[str], method: str) -> list[str]:
    """``"affine,coarse"`` or a list -> the stage names, each one of ``known``; InputError otherwise (or if none)."""
    wanted = [s.strip() for s in (stages.split(",") if isinstance(stages, str) else stages) if s.strip()]
    unknown = [s for s in wanted if s not in known]
    if unknown or not wanted:
        raise InputError(f"unknown {method} stage(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(known)}")
    return wanted


def embed_pair(fixed: sitk.Image, moving: sitk.Image, weights: str | None = None, device: str | None = None):
    """Embed both images with the embedder ``weights`` (default: the shipped one): ``(fixed_emb, moving_emb, device)``."""
    model = load_embedder(weights, device=device)
    dev = next(model.parameters()).device
    return embed_image(model, fixed, device=dev), embed_image(model, moving, device=dev), dev


def affine_summary(fit) -> dict[str, Any]:
    """The summary.json entry of a SAM affine fit."""
    return {"inliers": int(fit.n_inliers), "rms_inlier_mm": float(fit.rms_inlier_mm), "matrix": fit.matrix.tolist()}


def shared_pca_features(fixed_fine: np.ndarray, moving_fine: np.ndarray, components: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Project two (C, D, H, W) embeddings onto their top principal components (one shared basis).

    The deformable loss warps the moving embedding every iteration; 16 components keep almost all
    of the cosine structure at a fraction of the cost of all C channels. Outputs are float32,
    (components, D, H, W), re-normalised to unit length along the channels.
    """
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
