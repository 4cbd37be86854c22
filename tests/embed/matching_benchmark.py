"""Matching accuracy on a deformed copy of a real CT with exactly known correspondence.

The *target* is the CT resampled through a known transform ``T`` (rigid shift/rotation plus a smooth
random displacement): ``target(x) = ct(T(x))``. Points ``x`` drawn inside the body of the target are
matched into the original CT, and the error is ``|match(x) - T(x)|`` in mm.

Used by ``tests/embed/test_matching.py`` and, for the model card, as a script::

    python tests/embed/matching_benchmark.py [--weights W] [--ct CT] [--points 300] [--mode nearest|consensus]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
HELD_OUT_CT = REPO.parent / "shared" / "data" / "totalseg" / "aorta_ct_cropped.nii.gz"


def deformation(
    image: sitk.Image,
    shift_mm=(6.3, -4.1, 8.7),
    rotation_deg: float = 4.0,
    amplitude_mm: float = 4.0,
    smoothness_mm: float = 30.0,
    seed: int = 0,
) -> sitk.Transform:
    """A composite transform: rotation about the image centre + shift, then a smooth random displacement."""
    rng = np.random.default_rng(seed)
    centre = image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in image.GetSize()])
    rigid = sitk.Euler3DTransform()
    rigid.SetCenter(centre)
    rigid.SetRotation(*np.deg2rad([rotation_deg, -rotation_deg / 2.0, rotation_deg / 3.0]).tolist())
    rigid.SetTranslation([float(v) for v in shift_mm])
    # smooth random displacement on a coarse grid, scaled to the requested peak amplitude
    spacing = 4.0
    size = [int(np.ceil(s * sp / spacing)) + 1 for s, sp in zip(image.GetSize(), image.GetSpacing())]
    field = rng.standard_normal((size[2], size[1], size[0], 3))
    from scipy.ndimage import gaussian_filter

    field = np.stack([gaussian_filter(field[..., a], smoothness_mm / spacing) for a in range(3)], axis=-1)
    field *= amplitude_mm / max(np.abs(field).max(), 1e-9)
    disp = sitk.GetImageFromArray(field.astype(np.float64), isVector=True)
    disp.SetSpacing((spacing,) * 3)
    disp.SetOrigin(image.GetOrigin())
    disp.SetDirection(image.GetDirection())
    smooth = sitk.DisplacementFieldTransform(disp)
    # T(x) = rigid(smooth(x)): SimpleITK composite transforms apply the last-added transform first
    return sitk.CompositeTransform([rigid, smooth])


def deformed_copy(image: sitk.Image, transform: sitk.Transform) -> sitk.Image:
    """``target(x) = image(T(x))`` on the image's own grid (air outside)."""
    return sitk.Resample(image, image, transform, sitk.sitkLinear, -1024.0, sitk.sitkFloat32)


def body_points(image: sitk.Image, count: int, seed: int = 1, margin_mm: float = 12.0, min_hu: float = -300.0) -> np.ndarray:
    """``count`` random voxel-centre points of ``image`` above ``min_hu`` and ``margin_mm`` inside its edges."""
    rng = np.random.default_rng(seed)
    array = sitk.GetArrayViewFromImage(image)
    margin = np.ceil(margin_mm / np.array(image.GetSpacing()[::-1])).astype(int)
    mask = np.zeros(array.shape, bool)
    inner = tuple(slice(m, s - m) for m, s in zip(margin, array.shape))
    mask[inner] = array[inner] > min_hu
    zyx = np.argwhere(mask)
    pick = zyx[rng.choice(len(zyx), size=min(count, len(zyx)), replace=False)]
    return np.array([image.TransformIndexToPhysicalPoint([int(i) for i in p[::-1]]) for p in pick])


@dataclass
class BenchmarkResult:
    points: int
    identity_median_mm: float
    median_mm: float
    mean_mm: float
    p90_mm: float
    within_4mm: float
    within_8mm: float
    cycle_kept: float
    cycle_median_mm: float
    cycle_p90_mm: float
    embed_seconds: float
    match_seconds: float


def run(
    model, ct: sitk.Image, n_points: int = 300, cycle_tolerance_mm: float = 6.0, seed: int = 0, mode: str = "nearest"
) -> tuple[BenchmarkResult, dict]:
    """Embed ``ct`` and its deformed copy with ``model``, match body points of the copy back, measure errors.

    ``mode``: ``nearest`` (per-point search) or ``consensus`` (see ``regsam.embed.commands.MATCH_MODES``).
    """
    from regsam.embed.commands import make_matcher
    from regsam.embed.inference import embed_image

    transform = deformation(ct, seed=seed)
    target = deformed_copy(ct, transform)
    points = body_points(target, n_points, seed=seed + 1)
    truth = np.array([transform.TransformPoint(p.tolist()) for p in points])
    t0 = time.perf_counter()
    emb_ct, emb_target = embed_image(model, ct), embed_image(model, target)
    t1 = time.perf_counter()
    result = make_matcher(mode, target, emb_target, ct, emb_ct, cycle_tolerance_mm=cycle_tolerance_mm)(points)
    t2 = time.perf_counter()
    err = np.linalg.norm(result.matched - truth, axis=1)
    kept = result.valid
    summary = BenchmarkResult(
        points=len(points),
        identity_median_mm=float(np.median(np.linalg.norm(points - truth, axis=1))),
        median_mm=float(np.median(err)),
        mean_mm=float(err.mean()),
        p90_mm=float(np.percentile(err, 90)),
        within_4mm=float((err <= 4).mean()),
        within_8mm=float((err <= 8).mean()),
        cycle_kept=float(kept.mean()),
        cycle_median_mm=float(np.median(err[kept])) if kept.any() else float("nan"),
        cycle_p90_mm=float(np.percentile(err[kept], 90)) if kept.any() else float("nan"),
        embed_seconds=t1 - t0,
        match_seconds=t2 - t1,
    )
    return summary, {"points": points, "truth": truth, "matched": result.matched, "error": err, "score": result.score}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None, help="weights file (default: the shipped regsam/weights/sam_chest.pt)")
    parser.add_argument("--ct", default=str(HELD_OUT_CT), help="CT to deform (default: the held-out aorta_ct_cropped)")
    parser.add_argument("--points", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", choices=["nearest", "consensus"], default="nearest")
    args = parser.parse_args(argv)
    from regsam.embed.model import load_embedder
    from regsam.io.images import read_image

    model = load_embedder(args.weights, device="cpu")
    summary, _ = run(model, read_image(args.ct), args.points, seed=args.seed, mode=args.mode)
    print(json.dumps(asdict(summary), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
