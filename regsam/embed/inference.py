"""Embed a whole CT with a trained :class:`~regsam.embed.model.SAMEmbedder`.

``embed_image(model, image)`` preprocesses the scan (:func:`regsam.embed.preprocess.preprocess`), runs
the network's inference form (:mod:`regsam.embed.fused`) over the whole scan in one pass when it fits
:data:`MAX_WINDOW_VOXELS` (any chest at 2 mm), else over overlapping windows (memory stays bounded on
large scans) of which it keeps only the central parts (each output voxel comes from the window where it
is farthest from an edge), and returns an :class:`Embedding`: fine (1/2) and coarse (1/8) embedding
arrays with the world geometry of each level, so any world point (mm, LPS) can be looked up.

This module does not import MONAI (``regsam embed`` runs without it); the MONAI network of
:mod:`regsam.embed.model` is accepted and folded into the inference form.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk
import torch

from regsam.devices import resolve_device
from regsam.embed.fused import FusedEmbedder, fuse, level_geometry
from regsam.embed.preprocess import preprocess, valid_size
from regsam.errors import InputError
from regsam.io.atomic import atomic_path
from regsam.io.geometry import empty_like_grid, index_to_world, world_to_index

if TYPE_CHECKING:  # the MONAI network is only named here: this module runs without importing MONAI
    from regsam.embed.model import SAMEmbedder

#: most voxels (at the network spacing) embedded in one pass by default: 256^3 at 2 mm = 512 mm, any chest in one
#: pass; peak memory ~1.6 GB on CPU (the fine output alone is 0.5 GB in float16)
MAX_WINDOW_VOXELS = 256**3
#: default overlap between neighbouring windows (voxels); must be a multiple of the network stride
DEFAULT_OVERLAP = 64


@dataclass
class Embedding:
    """Dense embeddings of one image.

    Attributes:
        fine: (Cf, Df, Hf, Wf) float16 (or float32), unit vectors along C; memory is channels-last
            (``fine.transpose(1, 2, 3, 0)`` is contiguous).
        coarse: (Cc, Dc, Hc, Wc), unit vectors along C, same layout.
        fine_geometry / coarse_geometry: uint8 reference images whose size (x, y, z), origin, spacing (mm)
            and direction (LPS) are the grid of ``fine`` / ``coarse``: voxel (i, j, k) of the geometry is
            ``fine[:, k, j, i]``.
        image_geometry: the image's grid at the network spacing, without padding; world points outside it
            are outside the image.
        spacing_mm: the network input spacing (mm).
    """

    fine: np.ndarray
    coarse: np.ndarray
    fine_geometry: sitk.Image
    coarse_geometry: sitk.Image
    image_geometry: sitk.Image
    spacing_mm: float

    def index_of(self, level: str, points_mm: np.ndarray) -> np.ndarray:
        """(N, 3) world mm -> (N, 3) continuous voxel indices (x, y, z) of ``level`` ("fine", "coarse" or "image")."""
        geometry = {"fine": self.fine_geometry, "coarse": self.coarse_geometry, "image": self.image_geometry}[level]
        return world_to_index(geometry, np.asarray(points_mm, dtype=np.float64).reshape(-1, 3))

    def world_of(self, level: str, index: np.ndarray) -> np.ndarray:
        """(N, 3) continuous voxel indices (x, y, z) of ``level`` -> (N, 3) world mm."""
        geometry = {"fine": self.fine_geometry, "coarse": self.coarse_geometry, "image": self.image_geometry}[level]
        return index_to_world(geometry, np.asarray(index, dtype=np.float64).reshape(-1, 3))

    def contains(self, points_mm: np.ndarray) -> np.ndarray:
        """(N,) bool: the points lie inside the image (within half a voxel of its outermost voxel centres)."""
        index = self.index_of("image", points_mm)
        size = np.array(self.image_geometry.GetSize(), dtype=np.float64)
        return ((index >= -0.5) & (index <= size - 0.5)).all(axis=1)

    def level_valid(self, level: str) -> np.ndarray:
        """(z, y, x) bool mask of level voxels whose footprint overlaps the image (not padding)."""
        geometry = self.fine_geometry if level == "fine" else self.coarse_geometry
        factor = geometry.GetSpacing()[0] / self.image_geometry.GetSpacing()[0]
        limit = np.array(self.image_geometry.GetSize(), dtype=np.float64) - 1 + factor / 2.0
        nx, ny, nz = geometry.GetSize()
        ok = [np.arange(n) * factor <= limit[a] for a, n in enumerate((nx, ny, nz))]
        return ok[2][:, None, None] & ok[1][None, :, None] & ok[0][None, None, :]


def _window_starts(size: int, window: int, overlap: int) -> list[int]:
    if size <= window:
        return [0]
    step = window - overlap
    starts = list(range(0, size - window, step))
    starts.append(size - window)
    return sorted(set(starts))


def _keep_ranges(starts: list[int], window: int, size: int, align: int) -> list[tuple[int, int]]:
    """For each window, the sub-range [a, b) of the axis it is responsible for (cuts at overlap midpoints)."""
    ends = [min(s + window, size) for s in starts]
    cuts = [0]
    for i in range(len(starts) - 1):
        mid = (starts[i + 1] + ends[i]) / 2.0
        cuts.append(int(mid // align * align))
    cuts.append(size)
    return [(cuts[i], cuts[i + 1]) for i in range(len(starts))]


def as_fused(model: SAMEmbedder | FusedEmbedder, device: str | torch.device | None = None) -> FusedEmbedder:
    """The inference form of ``model`` on ``device`` (default: the model's device).

    A :class:`~regsam.embed.model.SAMEmbedder` is put in eval mode and moved to ``device`` (as before this
    existed), then folded (:func:`regsam.embed.fused.fuse`, a few milliseconds); a
    :class:`~regsam.embed.fused.FusedEmbedder` is moved.
    """
    if isinstance(model, FusedEmbedder):
        return model.to(device) if device is not None else model
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    model.eval()
    model.to(dev)
    return fuse(model)


def choose_windows(dims: Sequence[int], stride: int, overlap: int, max_voxels: int = MAX_WINDOW_VOXELS) -> list[int]:
    """Default window (z, y, x voxels) for a padded volume of size ``dims``: the whole volume if it has at most
    ``max_voxels`` voxels, else the longest axes cut (to multiples of ``stride``, not below ``overlap + stride``)
    until a window has at most ``max_voxels``; a cut along few axes costs less overlap than cubes."""
    window = [int(d) for d in dims]
    smallest = int(overlap) + int(stride)
    while math.prod(window) > max_voxels:
        shrinkable = [a for a in range(3) if window[a] > smallest]
        if not shrinkable:
            break
        a = max(shrinkable, key=lambda i: window[i])
        others = math.prod(window) // window[a]
        window[a] = max(smallest, min(window[a] - stride, max_voxels // others // stride * stride))
    return window


def _run_windows(
    engine: FusedEmbedder, tensor: torch.Tensor, windows: list[int], overlap: int, fine_dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """Fine (D/2, H/2, W/2, Cf) and coarse (D/8, H/8, W/8, Cc) arrays of a padded (1, 1, D, H, W) input, window by window."""
    dims = [int(n) for n in tensor.shape[2:]]
    ff, cf = engine.level_factors["fine"], engine.level_factors["coarse"]
    torch_dtype = torch.float16 if np.dtype(fine_dtype) == np.float16 else torch.float32
    starts = [_window_starts(dims[a], windows[a], overlap) for a in range(3)]
    if all(len(s) == 1 for s in starts):  # one window: its output is the result, no copy
        out = engine.embed_volume(tensor.to(engine.device), fine_dtype=torch_dtype)
        return tuple(out[name][0].permute(1, 2, 3, 0).cpu().numpy() for name in ("fine", "coarse"))  # type: ignore[return-value]
    fine = np.empty((dims[0] // ff, dims[1] // ff, dims[2] // ff, engine.fine_dim), dtype=fine_dtype)
    coarse = np.empty((dims[0] // cf, dims[1] // cf, dims[2] // cf, engine.coarse_dim), dtype=np.float32)
    keeps = [_keep_ranges(starts[a], windows[a], dims[a], cf) for a in range(3)]
    for iz, z0 in enumerate(starts[0]):
        for iy, y0 in enumerate(starts[1]):
            for ix, x0 in enumerate(starts[2]):
                sl = tuple(slice(s, min(s + w, n)) for s, w, n in zip((z0, y0, x0), windows, dims))
                out = engine.embed_volume(tensor[(slice(None), slice(None), *sl)].to(engine.device), fine_dtype=torch_dtype)
                kz, ky, kx = keeps[0][iz], keeps[1][iy], keeps[2][ix]
                for name, factor, target in (("fine", ff, fine), ("coarse", cf, coarse)):
                    level = out[name][0].permute(1, 2, 3, 0)  # (d, h, w, C)
                    src = tuple(slice((k[0] - s) // factor, (k[1] - s) // factor) for k, s in zip((kz, ky, kx), (z0, y0, x0)))
                    dst = tuple(slice(k[0] // factor, k[1] // factor) for k in (kz, ky, kx))
                    target[dst] = level[src].cpu().numpy()
                del out
    return fine, coarse


def embed_image(
    model: SAMEmbedder | FusedEmbedder,
    image: sitk.Image,
    spacing_mm: float | None = None,
    device: str | torch.device | None = None,
    window: int | Sequence[int] | None = None,
    overlap: int = DEFAULT_OVERLAP,
    fine_dtype: np.dtype = np.float16,
) -> Embedding:
    """Embed a CT.

    Args:
        model: a trained embedder, the network (:func:`regsam.embed.model.load_embedder`; put in eval mode here)
            or its inference form (:func:`regsam.embed.fused.load_fused`, which needs no MONAI import); both give
            the same embedding.
        image: 3D CT in HU (any orientation/spacing).
        spacing_mm: network input spacing; default the model's training spacing (``model.spacing_mm``, 2 mm).
        device: default the model's device.
        window: window size in voxels at ``spacing_mm``, one value or (z, y, x); multiples of ``model.stride``.
            Default (None): :func:`choose_windows`, one pass over the whole scan up to
            :data:`MAX_WINDOW_VOXELS` (a whole chest at 2 mm), so no window seams.
        overlap: overlap of neighbouring windows in voxels (multiple of ``model.stride``).
        fine_dtype: dtype of the returned fine embedding (float16 halves memory).

    Returns:
        :class:`Embedding`.

    Raises:
        InputError: not a 3D volume, smaller than the model's minimum input size, or bad window/overlap.
    """
    engine = as_fused(model, device)
    stride = int(engine.stride)
    windows = None if window is None else [int(window)] * 3 if np.isscalar(window) else [int(w) for w in window]
    if windows is not None and (len(windows) != 3 or any(w % stride or w <= 0 for w in windows)) or overlap % stride or overlap < 0:
        raise InputError(f"window {window} and overlap {overlap} must be positive multiples of the network stride {stride}")
    spacing = float(spacing_mm if spacing_mm is not None else engine.spacing_mm)
    tensor, geometry = preprocess(image, spacing, stride=stride, min_size=engine.min_input_size, hu_window=engine.hu_window)
    dims = [int(n) for n in tensor.shape[2:]]  # (D, H, W)
    windows = windows or choose_windows(dims, stride, overlap)
    if any(n > w and overlap >= w for n, w in zip(dims, windows)):
        raise InputError(f"overlap {overlap} must be smaller than the window {window}")
    fine, coarse = _run_windows(engine, tensor, windows, overlap, fine_dtype)
    ff, cf = engine.level_factors["fine"], engine.level_factors["coarse"]
    origin, spacing_xyz, direction = geometry.GetOrigin(), geometry.GetSpacing(), geometry.GetDirection()
    fine_geo = empty_like_grid([s // ff for s in geometry.GetSize()], *level_geometry(origin, spacing_xyz, direction, ff))
    coarse_geo = empty_like_grid([s // cf for s in geometry.GetSize()], *level_geometry(origin, spacing_xyz, direction, cf))
    image_geo = empty_like_grid(valid_size(geometry), origin, spacing_xyz, direction)
    return Embedding(fine.transpose(3, 0, 1, 2), coarse.transpose(3, 0, 1, 2), fine_geo, coarse_geo, image_geo, spacing)


# ---------------------------------------------------------------- files
def _geometry_fields(prefix: str, image: sitk.Image) -> dict[str, np.ndarray]:
    return {
        f"{prefix}_size": np.array(image.GetSize(), dtype=np.int64),
        f"{prefix}_origin": np.array(image.GetOrigin(), dtype=np.float64),
        f"{prefix}_spacing": np.array(image.GetSpacing(), dtype=np.float64),
        f"{prefix}_direction": np.array(image.GetDirection(), dtype=np.float64),
    }


def save_embedding(embedding: Embedding, path: str | os.PathLike) -> Path:
    """Write an :class:`Embedding` as an (uncompressed) ``.npz`` with its geometry, atomically."""
    path = Path(path)
    arrays = {
        "format": np.array(1),
        # stored channels-last (contiguous), restored to (C, D, H, W) views on load
        "fine_dhwc": np.ascontiguousarray(embedding.fine.transpose(1, 2, 3, 0)),
        "coarse_dhwc": np.ascontiguousarray(embedding.coarse.transpose(1, 2, 3, 0)),
        "spacing_mm": np.array(embedding.spacing_mm, dtype=np.float64),
        **_geometry_fields("fine", embedding.fine_geometry),
        **_geometry_fields("coarse", embedding.coarse_geometry),
        **_geometry_fields("image", embedding.image_geometry),
    }
    with atomic_path(path) as tmp:
        _write_npz(tmp, arrays)
    return path


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """What ``np.savez`` writes (uncompressed .npy members of a zip), each array's bytes handed over in one piece:
    ``np.savez`` copies them twice on the way (buffered iteration, then ``tobytes``), which doubled the write time."""
    with open(path, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, value in arrays.items():
            array = np.asarray(value, order="C")
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, np.lib.format.header_data_from_array_1_0(array))
                member.write(memoryview(array.reshape(-1)).cast("B"))


def load_embedding(path: str | os.PathLike) -> Embedding:
    """Read a file written by :func:`save_embedding`.

    Raises:
        InputError: missing file or not a regsam embedding.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"embedding file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not an .npz embedding ({exc})") from None
    needed = {"fine_dhwc", "coarse_dhwc", "spacing_mm"} | {f"{p}_{k}" for p in ("fine", "coarse", "image") for k in ("size", "origin", "spacing", "direction")}
    missing = needed - set(data.files)
    if missing:
        raise InputError(f"{path}: not a regsam embedding (missing {sorted(missing)})")

    def geometry(prefix: str) -> sitk.Image:
        return empty_like_grid(data[f"{prefix}_size"].tolist(), data[f"{prefix}_origin"], data[f"{prefix}_spacing"], data[f"{prefix}_direction"])

    return Embedding(
        fine=data["fine_dhwc"].transpose(3, 0, 1, 2),
        coarse=data["coarse_dhwc"].transpose(3, 0, 1, 2),
        fine_geometry=geometry("fine"),
        coarse_geometry=geometry("coarse"),
        image_geometry=geometry("image"),
        spacing_mm=float(data["spacing_mm"]),
    )
