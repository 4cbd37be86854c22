"""What ``regsam train-embedder``, ``regsam embed`` and ``regsam match`` do, callable from Python.

* :func:`train_embedder_command`: :func:`regsam.embed.train.train_embedder` (torchrun-aware).
* :func:`embed_command`: embed one image, write an ``.npz`` (:func:`regsam.embed.inference.save_embedding`).
* :func:`match_images`: template points -> target points for in-memory images (optionally after
  test-time adaptation, ``adapt_steps``); :func:`match_command` does the same from files and writes a
  CSV ``x,y,z,score,valid`` (matched point in the target, mm world LPS; score in [-1, 1]; valid 1/0).

All bad input (2D image, image smaller than the network's minimum input, points outside the template,
unknown device...) raises :class:`regsam.errors.InputError` *before* any output file is written, and
outputs are written atomically.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from regsam.errors import InputError
from regsam.io.atomic import atomic_path
from regsam.io.geometry import world_to_index
from regsam.io.images import check_volume, read_image
from regsam.io.landmarks import as_points, read_points

# torch and the model (MONAI) cost ~5 s to import: the modules that need them (regsam.devices, the embed modules
# other than this one) are imported inside the functions, after the arguments are checked, so bad input fails fast
if TYPE_CHECKING:
    from regsam.embed.fused import FusedEmbedder
    from regsam.embed.matching import MatchResult
    from regsam.embed.model import SAMEmbedder

#: header of the CSV written by :func:`write_matches_csv`
MATCH_COLUMNS = ("x", "y", "z", "score", "valid")
#: how template points are found in the target: ``consensus`` (the default; a smooth map fitted to dense
#: embedding matches, :mod:`regsam.embed.consensus`) or ``nearest`` (per-point coarse-to-fine nearest
#: neighbour, SAM's own inference, :func:`regsam.embed.matching.match_points`)
MATCH_MODES = ("consensus", "nearest")
DEFAULT_MATCH_MODE = "consensus"


def check_match_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`MATCH_MODES`, else :class:`InputError`."""
    if mode not in MATCH_MODES:
        raise InputError(f"unknown match mode '{mode}' (choose {' or '.join(MATCH_MODES)})")
    return mode


def make_matcher(mode, template, template_emb, target, target_emb, cycle_tolerance_mm=None, device=None):
    """A function (N, 3) template points (mm) -> :class:`~regsam.embed.matching.MatchResult` for one image pair.

    ``mode`` is one of :data:`MATCH_MODES`; a consensus matcher fits its maps once and reuses them.
    """
    check_match_mode(mode)
    if mode == "consensus":
        from regsam.embed.consensus import ConsensusMatcher

        return ConsensusMatcher(template, template_emb, target, target_emb, cycle_tolerance_mm=cycle_tolerance_mm, device=device)
    from regsam.embed.matching import match_points

    return lambda points: match_points(template_emb, points, target_emb, cycle_tolerance_mm=cycle_tolerance_mm, device=device)


def check_embeddable(
    image: sitk.Image, model: SAMEmbedder | FusedEmbedder, spacing_mm: float | None = None, name: str = "image"
) -> None:
    """Raise :class:`InputError` unless ``image`` is a 3D scalar volume of at least the model's minimum size.

    Cheap (no resampling): the size at the network spacing is computed as
    :func:`regsam.io.images.resample_to_spacing` would.
    """
    check_volume(image, name)
    spacing = float(spacing_mm if spacing_mm is not None else model.spacing_mm)
    if not spacing > 0:
        raise InputError(f"spacing must be positive, got {spacing_mm}")
    extent = np.array(image.GetSize(), dtype=np.float64) * np.array(image.GetSpacing(), dtype=np.float64)
    size = np.maximum(1, np.round(extent / spacing))
    if (size < model.min_input_size).any():
        raise InputError(
            f"{name} is {' x '.join(f'{e:.0f}' for e in extent)} mm; the embedder needs at least "
            f"{model.min_input_size * spacing:.0f} mm ({model.min_input_size} voxels at {spacing:g} mm) along every axis"
        )


def check_points_inside(image: sitk.Image, points_mm: np.ndarray, name: str = "template") -> None:
    """Raise :class:`InputError` if any point lies outside ``image`` (more than half a voxel beyond its outer voxel centres)."""
    if len(points_mm) == 0:
        return
    index = world_to_index(image, points_mm)
    size = np.array(image.GetSize(), dtype=np.float64)
    outside = ~((index >= -0.5) & (index <= size - 0.5)).all(axis=1)
    if outside.any():
        first = int(np.flatnonzero(outside)[0])
        raise InputError(
            f"{int(outside.sum())} of {len(points_mm)} point(s) lie outside the {name} image "
            f"(first: row {first}, {np.round(points_mm[first], 2).tolist()} mm)"
        )


# ---------------------------------------------------------------- train-embedder
def train_embedder_command(
    config: str | os.PathLike,
    out: str | os.PathLike,
    resume: bool = False,
    max_steps: int | None = None,
    device: str | None = None,
    progress: bool = True,
    init_weights: str | os.PathLike | None = None,
) -> Path:
    """Train an embedder (see :func:`regsam.embed.train.train_embedder`); return the weights path.

    Under ``torchrun`` the process group is torn down afterwards, as ``python -m regsam.embed.train`` does.
    """
    from regsam.devices import resolve_device
    from regsam.embed.train import train_embedder

    if max_steps is not None and int(max_steps) < 1:
        raise InputError(f"--max-steps must be at least 1, got {max_steps}")
    if device is not None:
        resolve_device(device)
    try:
        return train_embedder(
            config, out, resume=resume, device=device, max_steps=max_steps, progress=progress, init_weights=init_weights
        )
    finally:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


# ---------------------------------------------------------------- embed
def embed_command(
    image: str | os.PathLike,
    out: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    device: str | None = None,
    spacing_mm: float | None = None,
) -> Path:
    """Embed one image file and write fine + coarse embeddings with their geometry to ``out`` (``.npz``)."""
    out = Path(out)
    if out.suffix != ".npz":
        raise InputError(f"--out must name an .npz file, got '{out}'")
    if spacing_mm is not None and not (np.isfinite(spacing_mm) and spacing_mm > 0):
        raise InputError(f"--spacing must be a positive number of mm, got {spacing_mm}")
    ct = read_image(image)
    from regsam.devices import resolve_device
    from regsam.embed.fused import load_fused
    from regsam.embed.inference import embed_image, save_embedding

    dev = resolve_device(device)
    # the inference form: same embedding as the MONAI network, without MONAI's 2-4 s import
    model = load_fused(weights, device=dev)
    check_embeddable(ct, model, spacing_mm, name=str(image))
    embedding = embed_image(model, ct, spacing_mm=spacing_mm, device=dev)
    return save_embedding(embedding, out)


# ---------------------------------------------------------------- match
def match_images(
    template: sitk.Image,
    points_mm: np.ndarray,
    target: sitk.Image,
    model: SAMEmbedder | None = None,
    weights: str | os.PathLike | None = None,
    cycle_tolerance_mm: float | None = None,
    adapt_steps: int = 0,
    adapt_seed: int = 0,
    adapt_config: dict | None = None,
    device: str | torch.device | None = None,
    timings: dict | None = None,
    mode: str = DEFAULT_MATCH_MODE,
) -> MatchResult:
    """Find the counterparts of template points (N, 3 mm world LPS) in the target.

    Args:
        model: an embedder (default: :func:`regsam.embed.model.load_embedder` of ``weights``).
        mode: ``consensus`` (default) or ``nearest`` (see :data:`MATCH_MODES`).
        cycle_tolerance_mm: keep (``valid``) only matches that come back within this distance.
        adapt_steps: test-time adaptation steps on (template, target) before embedding
            (:func:`regsam.embed.adapt.adapt_embedder`); 0 = none (the default: see
            ``benchmarks/embedder.md`` for what it buys and costs).
        adapt_seed / adapt_config: passed to :func:`~regsam.embed.adapt.adapt_embedder`.
        timings: if given, filled with ``adapt_s``, ``embed_template_s``, ``embed_target_s``, ``match_s``.

    Raises:
        InputError: bad images or points (see the module docstring) or bad options.
    """
    from regsam.devices import resolve_device
    from regsam.embed.inference import embed_image
    from regsam.embed.model import load_embedder

    check_match_mode(mode)
    points = as_points(points_mm, "points")
    check_points_inside(template, points, "template")
    if cycle_tolerance_mm is not None and not (np.isfinite(cycle_tolerance_mm) and cycle_tolerance_mm > 0):
        raise InputError(f"cycle tolerance must be a positive number of mm, got {cycle_tolerance_mm}")
    if int(adapt_steps) < 0:
        raise InputError(f"adaptation steps must be >= 0, got {adapt_steps}")
    dev = resolve_device(device) if device is not None else None
    if model is None:
        model = load_embedder(weights, device=dev)
    check_embeddable(template, model, name="template")
    check_embeddable(target, model, name="target")
    times = timings if timings is not None else {}
    t0 = time.perf_counter()
    if adapt_steps:
        from regsam.embed.adapt import adapt_embedder

        model = adapt_embedder(model, [template, target], int(adapt_steps), config=adapt_config, seed=adapt_seed, device=dev)
    t1 = time.perf_counter()
    template_emb = embed_image(model, template, device=dev)
    t2 = time.perf_counter()
    target_emb = embed_image(model, target, device=dev)
    t3 = time.perf_counter()
    result = make_matcher(mode, template, template_emb, target, target_emb, cycle_tolerance_mm, dev)(points)
    t4 = time.perf_counter()
    times.update(adapt_s=t1 - t0, embed_template_s=t2 - t1, embed_target_s=t3 - t2, match_s=t4 - t3)
    return result


def write_matches_csv(result: MatchResult, path: str | os.PathLike) -> Path:
    """Write ``x,y,z,score,valid`` (one row per point; valid 1/0) atomically."""
    path = Path(path)
    rows = [
        f"{x:.4f},{y:.4f},{z:.4f},{s:.4f},{int(v)}"
        for (x, y, z), s, v in zip(np.asarray(result.matched), np.asarray(result.score), np.asarray(result.valid))
    ]
    with atomic_path(path) as tmp:
        tmp.write_text(",".join(MATCH_COLUMNS) + "\n" + "".join(r + "\n" for r in rows))
    return path


def read_matches_csv(path: str | os.PathLike) -> MatchResult:
    """Read a file written by :func:`write_matches_csv` (``cycle_error_mm`` is not stored: None)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"matches file not found: {path}")
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if not lines or tuple(c.strip() for c in lines[0].split(",")) != MATCH_COLUMNS:
        raise InputError(f"{path}: expected the header {','.join(MATCH_COLUMNS)}")
    try:
        data = np.array([[float(v) for v in ln.split(",")] for ln in lines[1:]], dtype=np.float64).reshape(-1, 5)
    except ValueError:
        raise InputError(f"{path}: rows must be 5 numbers") from None
    from regsam.embed.matching import MatchResult

    return MatchResult(data[:, :3], data[:, 3].astype(np.float32), data[:, 4] > 0.5, None)


def match_command(
    template: str | os.PathLike,
    points: str | os.PathLike,
    target: str | os.PathLike,
    out: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    cycle_tolerance_mm: float | None = None,
    adapt_steps: int = 0,
    device: str | None = None,
    mode: str = DEFAULT_MATCH_MODE,
) -> Path:
    """Match the points of a points file (any format :func:`regsam.io.landmarks.read_points` reads;
    voxel-index formats refer to the template) from the template image into the target image; write ``out``."""
    check_match_mode(mode)
    template_image = read_image(template, "template")
    target_image = read_image(target, "target")
    pts = read_points(points, reference=template_image)
    check_points_inside(template_image, np.asarray(pts, dtype=np.float64).reshape(-1, 3), "template")
    if cycle_tolerance_mm is not None and not (np.isfinite(cycle_tolerance_mm) and cycle_tolerance_mm > 0):
        raise InputError(f"--cycle-tolerance must be a positive number of mm, got {cycle_tolerance_mm}")
    if int(adapt_steps) < 0:
        raise InputError(f"--adapt-steps must be >= 0, got {adapt_steps}")
    result = match_images(
        template_image, pts, target_image, weights=weights, cycle_tolerance_mm=cycle_tolerance_mm,
        adapt_steps=adapt_steps, device=device, mode=mode,
    )
    return write_matches_csv(result, out)
