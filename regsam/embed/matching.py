"""Match world points between two embedded images (SAM's coarse-to-fine nearest neighbour).

For each template point ``p`` (mm, LPS):

1. its fine and coarse embeddings are read from the template (trilinear, re-normalised);
2. coarse similarity is computed against every coarse voxel of the target; its ``coarse_candidates``
   best local maxima (non-maximum suppressed) pick candidate regions;
3. in a cube of half-width ``fine_radius_mm`` around each region the score is
   ``fine similarity + coarse similarity``, the coarse embedding being trilinearly interpolated to the
   fine voxels and re-normalised (as SAM combines the two maps); the maximum over all cubes is the match;
4. the match is refined below the voxel size by fitting a parabola through the score along each axis;
5. optionally (``cycle_tolerance_mm``) the match is matched back into the template and kept only if it
   lands within the tolerance of ``p``.

All points are processed at once with torch, in chunks that bound memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from regsam.embed.affines import image_affine, normalized_grid
from regsam.embed.inference import Embedding
from regsam.devices import resolve_device
from regsam.errors import InputError
from regsam.io.landmarks import as_points

#: default half-width (mm) of the fine search cube around the coarse maximum
DEFAULT_FINE_RADIUS_MM = 16.0
#: default number of coarse maxima searched at the fine level
DEFAULT_COARSE_CANDIDATES = 5
#: memory budget (bytes) for gathered fine features per chunk
_CHUNK_BYTES = 192 * 2**20


@dataclass
class MatchResult:
    """Result of :func:`match_points` for N template points.

    Attributes:
        matched: (N, 3) matched points in the target, mm (world LPS).
        score: (N,) similarity at the match, (fine cosine + coarse cosine) / 2, in [-1, 1].
        valid: (N,) bool; all True without a cycle check, else whether the point came back within tolerance.
        cycle_error_mm: (N,) distance (mm) between a point and its round trip template -> target -> template,
            or None without a cycle check.
    """

    matched: np.ndarray
    score: np.ndarray
    valid: np.ndarray
    cycle_error_mm: np.ndarray | None = None


class _Level:
    """One embedding level as a flat (N, C) tensor with its grid."""

    def __init__(self, array: np.ndarray, geometry, valid: np.ndarray, device: torch.device) -> None:
        c = array.shape[0]
        dhwc = np.ascontiguousarray(array.transpose(1, 2, 3, 0))
        self.flat = torch.from_numpy(dhwc).reshape(-1, c).to(device)
        self.size = tuple(int(s) for s in geometry.GetSize())  # (x, y, z)
        self.affine = image_affine(geometry)
        self.inverse = np.linalg.inv(self.affine)
        self.valid = torch.from_numpy(np.ascontiguousarray(valid)).reshape(-1).to(device)
        self.device = device

    def linear(self, index: torch.Tensor) -> torch.Tensor:
        """Integer (..., 3) (x, y, z) -> flat row numbers."""
        nx, ny, _ = self.size
        return (index[..., 2] * ny + index[..., 1]) * nx + index[..., 0]

    def to_index(self, world: torch.Tensor) -> torch.Tensor:
        a = torch.as_tensor(self.inverse, dtype=world.dtype, device=world.device)
        return world @ a[:3, :3].T + a[:3, 3]

    def to_world(self, index: torch.Tensor) -> torch.Tensor:
        a = torch.as_tensor(self.affine, dtype=index.dtype, device=index.device)
        return index @ a[:3, :3].T + a[:3, 3]

    def sample(self, index: torch.Tensor) -> torch.Tensor:
        """Trilinear features at continuous indices (n, 3) (clamped to the grid) -> (n, C) unit vectors."""
        hi = torch.as_tensor(self.size, dtype=index.dtype, device=index.device) - 1
        index = torch.minimum(index.clamp_min(0.0), hi)
        base = torch.minimum(index.floor(), (hi - 1).clamp_min(0.0)).long()
        frac = (index - base).float()
        out = torch.zeros(len(index), self.flat.shape[1], device=index.device)
        for corner in range(8):
            bits = torch.tensor([(corner >> 0) & 1, (corner >> 1) & 1, (corner >> 2) & 1], device=index.device)
            weight = torch.where(bits.bool(), frac, 1.0 - frac).prod(dim=1)
            idx = torch.minimum(base + bits, hi.long())
            out += weight[:, None] * self.flat[self.linear(idx)].float()
        return F.normalize(out, dim=1)


def _linear_corners(position: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1D linear interpolation at continuous indices (n,), clamped to the grid as ``grid_sample(padding_mode=
    "border", align_corners=True)`` clamps them: (lower neighbour (n,) long, weight of the upper one (n,))."""
    pos = position.clamp(0.0, max(size - 1, 0))
    low = pos.floor().long().clamp(max=max(size - 2, 0))
    return low, (pos - low).float()


def _linear_weights(position: torch.Tensor, size: int) -> torch.Tensor:
    """(n, size) matrix of the interpolation of :func:`_linear_corners`."""
    low, frac = _linear_corners(position, size)
    weights = torch.zeros(len(low), size, device=position.device)
    rows = torch.arange(len(low), device=position.device)
    weights[rows, low] = 1.0 - frac
    if size > 1:
        weights[rows, low + 1] += frac
    return weights


def _interpolated_norm(coarse: _Level, fine: _Level, slab: int = 8) -> torch.Tensor:
    """(N_fine,) length of the coarse embedding trilinearly interpolated at every fine voxel.

    Interpolated unit vectors are shorter than 1; dividing an interpolated coarse *similarity* by this
    length gives the similarity with the re-normalised interpolated coarse embedding (SAM up-samples the
    coarse map and normalises it before combining it with the fine map).
    """
    to_coarse = torch.as_tensor(coarse.inverse @ fine.affine, dtype=torch.float64, device=fine.device)
    linear = to_coarse[:3, :3]
    if torch.count_nonzero(linear - torch.diag(torch.diagonal(linear))) == 0:
        return _interpolated_norm_separable(coarse, fine, to_coarse)
    return _interpolated_norm_sampled(coarse, fine, to_coarse, slab)


def _interpolated_norm_sampled(coarse: _Level, fine: _Level, to_coarse: torch.Tensor, slab: int = 8) -> torch.Tensor:
    """:func:`_interpolated_norm` for any pair of grids: ``grid_sample`` of all channels, ``slab`` fine slices at a time."""
    linear = to_coarse[:3, :3]
    nxc, nyc, nzc = coarse.size
    grid_c = coarse.flat.float().t().reshape(1, -1, nzc, nyc, nxc)
    nx, ny, nz = fine.size
    out = torch.empty(nz, ny, nx, device=fine.device)
    yy, xx = torch.meshgrid(torch.arange(ny, device=fine.device), torch.arange(nx, device=fine.device), indexing="ij")
    for z0 in range(0, nz, slab):
        z1 = min(z0 + slab, nz)
        zz = torch.arange(z0, z1, device=fine.device)[:, None, None].expand(-1, ny, nx)
        index = torch.stack((xx.expand(z1 - z0, -1, -1), yy.expand(z1 - z0, -1, -1), zz), dim=-1).double()
        pos = index @ linear.T + to_coarse[:3, 3]
        grid = normalized_grid(pos, coarse.size).float()[None]
        vals = F.grid_sample(grid_c, grid, mode="bilinear", padding_mode="border", align_corners=True)
        out[z0:z1] = vals[0].norm(dim=0)
    return out.reshape(-1).clamp_min(1e-6)


def _interpolated_norm_separable(coarse: _Level, fine: _Level, to_coarse: torch.Tensor) -> torch.Tensor:
    """:func:`_interpolated_norm` for grids whose axes are parallel (the levels of one embedding).

    Trilinear interpolation is then separable: in-plane it is two matrix products; along z each fine slice mixes
    two coarse slices k, k+1 with weights 1-f, f, so its squared length is (1-f)^2 |a_k|^2 + 2f(1-f) a_k.a_k+1 +
    f^2 |a_k+1|^2, from per-pixel dot products of neighbouring in-plane slices (no C x N_fine tensor).
    """
    nxc, nyc, nzc = coarse.size
    axis = [torch.arange(n, device=fine.device, dtype=torch.float64) * to_coarse[a, a] + to_coarse[a, 3]
            for a, n in enumerate(fine.size)]
    grid_c = coarse.flat.float().t().reshape(-1, nzc, nyc, nxc)
    in_plane = _linear_weights(axis[1], nyc) @ grid_c @ _linear_weights(axis[0], nxc).T  # (C, nzc, ny, nx)
    square = (in_plane * in_plane).sum(dim=0)  # (nzc, ny, nx)
    cross = (in_plane[:, :-1] * in_plane[:, 1:]).sum(dim=0) if nzc > 1 else square[:0]
    del in_plane
    low, frac = _linear_corners(axis[2], nzc)
    f = frac[:, None, None]
    upper = (low + 1).clamp(max=nzc - 1)
    norm2 = (1 - f) ** 2 * square[low] + f**2 * square[upper]
    if nzc > 1:
        norm2 = norm2 + 2 * f * (1 - f) * cross[low]
    return norm2.clamp_min(0.0).sqrt().reshape(-1).clamp_min(1e-6)


def _levels(embedding: Embedding, device: torch.device) -> tuple[_Level, _Level]:
    return (
        _Level(embedding.fine, embedding.fine_geometry, embedding.level_valid("fine"), device),
        _Level(embedding.coarse, embedding.coarse_geometry, embedding.level_valid("coarse"), device),
    )


def _near(centre: torch.Tensor, size_xyz: tuple[int, int, int], radius: float) -> torch.Tensor:
    """(n, N) flat (z, y, x) mask of the grid voxels within ``radius`` voxels of each integer centre (n, 3) (x, y, z);
    built from per-axis squared distances, not an (n, N, 3) difference tensor."""
    n = len(centre)
    d2 = [(torch.arange(s, device=centre.device, dtype=torch.float32)[None] - centre[:, a, None].float()) ** 2
          for a, s in enumerate(size_xyz)]
    total = d2[2][:, :, None, None] + d2[1][:, None, :, None] + d2[0][:, None, None, :]
    return (total <= radius**2).reshape(n, -1)


def _parabola(minus: torch.Tensor, centre: torch.Tensor, plus: torch.Tensor) -> torch.Tensor:
    """Sub-voxel offset of the vertex of the parabola through (-1, minus), (0, centre), (1, plus), in [-0.5, 0.5]."""
    ok = torch.isfinite(minus) & torch.isfinite(plus)
    minus, plus = torch.where(ok, minus, centre), torch.where(ok, plus, centre)
    curvature = minus - 2.0 * centre + plus
    offset = torch.where(curvature < -1e-12, 0.5 * (minus - plus) / curvature.clamp(max=-1e-12), torch.zeros_like(centre))
    return offset.clamp(-0.5, 0.5)


def _match(
    template: tuple[_Level, _Level],
    points: torch.Tensor,
    target: tuple[_Level, _Level],
    fine_radius_mm: float,
    chunk_size: int | None,
    candidates: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Core matcher: (N, 3) float64 world points -> (matched (N, 3) float64, score (N,) float32)."""
    t_fine, t_coarse = template
    g_fine, g_coarse = target
    device = points.device
    fine_spacing = float(np.linalg.norm(g_fine.affine[:3, :3], axis=0).min())
    radius = max(1, int(math.ceil(fine_radius_mm / fine_spacing)))
    side = 2 * radius + 1
    r = torch.arange(-radius, radius + 1, device=device)
    oz, oy, ox = torch.meshgrid(r, r, r, indexing="ij")
    offsets = torch.stack((ox, oy, oz), dim=-1).reshape(-1, 3)  # (K, 3) x, y, z; K ordered (z, y, x)
    k = len(offsets)
    c = g_fine.flat.shape[1]
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_BYTES // (candidates * k * c * 4))
    fine_hi = torch.as_tensor(g_fine.size, dtype=torch.int64, device=device) - 1
    nxf, nyf, _ = g_fine.size
    nxc, nyc, nzc = g_coarse.size
    coarse_to_fine = torch.as_tensor(g_fine.inverse @ g_coarse.affine, dtype=torch.float64, device=device)
    fine_to_coarse = torch.as_tensor(g_coarse.inverse @ g_fine.affine, dtype=torch.float64, device=device)
    # grid_sample coordinates of a fine voxel in the coarse grid are affine in its index: base + offset part
    coarse_scale = 2.0 / torch.as_tensor([max(s - 1, 1) for s in g_coarse.size], dtype=torch.float64, device=device)
    off_grid = ((offsets.double() @ fine_to_coarse[:3, :3].T) * coarse_scale).float()  # (K, 3)
    off_rows = (offsets[:, 2] * nyf + offsets[:, 1]) * nxf + offsets[:, 0]  # (K,)
    coarse_flat = g_coarse.flat.float()
    cz_, cy_, cx_ = torch.meshgrid(
        torch.arange(nzc, device=device), torch.arange(nyc, device=device), torch.arange(nxc, device=device), indexing="ij"
    )
    coarse_index = torch.stack((cx_, cy_, cz_), dim=-1).reshape(-1, 3).double()  # (Nc, 3) x, y, z per flat row
    coarse_spacing = float(np.linalg.norm(g_coarse.affine[:3, :3], axis=0).min())
    suppress = max(1.0, fine_radius_mm / coarse_spacing)  # candidate cubes barely overlap
    coarse_norm = _interpolated_norm(g_coarse, g_fine)
    matched, scores = [], []
    for start in range(0, len(points), chunk_size):
        pts = points[start : start + chunk_size]
        n = len(pts)
        q_fine = t_fine.sample(t_fine.to_index(pts))
        q_coarse = t_coarse.sample(t_coarse.to_index(pts))
        # 1) coarse similarity over the whole target; its best `candidates` maxima, at least
        #    `suppress` coarse voxels apart (non-maximum suppression)
        sim_c = q_coarse @ coarse_flat.T  # (n, Nc)
        sim_c = sim_c.masked_fill(~g_coarse.valid[None], -1.0)
        search = sim_c.clone()
        centres, alive = [], []
        for _ in range(candidates):
            value, best_c = search.max(dim=1)
            alive.append(value > -1.5)
            cidx = coarse_index[best_c]  # (n, 3)
            centres.append((cidx @ coarse_to_fine[:3, :3].T + coarse_to_fine[:3, 3]).round().long())
            if candidates > 1:
                search = search.masked_fill(_near(cidx, g_coarse.size, suppress), -2.0)
        m = len(centres)
        centre = torch.stack(centres, dim=1).reshape(n * m, 3)
        # keep each cube inside the fine grid (shifting it rather than cropping it)
        centre = torch.minimum(centre.clamp_min(radius), (fine_hi - radius).clamp_min(radius))
        # 2) fine + coarse similarity in a cube around each candidate
        rows = g_fine.linear(centre)[:, None] + off_rows[None]  # (n * m, K)
        win = centre[:, None, :] + offsets[None]
        inside = ((win >= 0) & (win <= fine_hi)).all(dim=2)
        rows = torch.where(inside, rows, torch.zeros_like(rows))
        usable = inside & g_fine.valid[rows] & torch.stack(alive, dim=1).reshape(-1, 1)
        feats = g_fine.flat[rows.reshape(-1)].reshape(n, m * k, c)
        sim_f = torch.einsum("nkc,nc->nk", feats.float(), q_fine).reshape(n * m, k)
        del feats
        base = (centre.double() @ fine_to_coarse[:3, :3].T + fine_to_coarse[:3, 3]) * coarse_scale - 1.0
        grid = (base.float()[:, None, :] + off_grid[None]).reshape(n, m * k, 1, 1, 3)
        sim_cf = F.grid_sample(sim_c.reshape(n, 1, nzc, nyc, nxc), grid, mode="bilinear", padding_mode="border", align_corners=True)
        sim_cf = sim_cf.reshape(n * m, k) / coarse_norm[rows]
        total = (sim_f + sim_cf).masked_fill(~usable, float("-inf")).reshape(n, m, k)
        flat_best = total.reshape(n, m * k).argmax(dim=1)
        pick = torch.arange(n, device=device) * m + flat_best // k  # winning candidate's row in (n * m)
        total, win, best = total.reshape(n * m, k)[pick], win[pick], flat_best % k
        best_score = total.gather(1, best[:, None])[:, 0]
        # 3) parabola through the neighbours along each axis
        cube = total.reshape(n, side, side, side)  # (z, y, x)
        bz, rem = best // (side * side), best % (side * side)
        by, bx = rem // side, rem % side
        pos = torch.stack((bx, by, bz), dim=1)  # x, y, z within the cube
        offset = torch.zeros(n, 3, dtype=torch.float64, device=device)
        ar = torch.arange(n, device=device)
        for axis in range(3):
            lo = pos.clone()
            hi = pos.clone()
            lo[:, axis] -= 1
            hi[:, axis] += 1
            lo_ok, hi_ok = lo[:, axis] >= 0, hi[:, axis] < side
            lo, hi = lo.clamp(0, side - 1), hi.clamp(0, side - 1)
            v_lo = torch.where(lo_ok, cube[ar, lo[:, 2], lo[:, 1], lo[:, 0]], torch.full_like(best_score, float("-inf")))
            v_hi = torch.where(hi_ok, cube[ar, hi[:, 2], hi[:, 1], hi[:, 0]], torch.full_like(best_score, float("-inf")))
            offset[:, axis] = _parabola(v_lo, best_score, v_hi).double()
        index = win[ar, best].double() + offset
        matched.append(g_fine.to_world(index))
        scores.append(best_score / 2.0)
    return torch.cat(matched), torch.cat(scores)


def match_points(
    template_emb: Embedding,
    points_mm: np.ndarray,
    target_emb: Embedding,
    cycle_tolerance_mm: float | None = None,
    fine_radius_mm: float = DEFAULT_FINE_RADIUS_MM,
    coarse_candidates: int = DEFAULT_COARSE_CANDIDATES,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
) -> MatchResult:
    """Find the anatomical counterparts of template points in the target.

    Args:
        template_emb: embedding of the image the points are given in (:func:`regsam.embed.inference.embed_image`).
        points_mm: (N, 3) world points (mm, LPS) inside the template image.
        target_emb: embedding of the image to search.
        cycle_tolerance_mm: if given, match each result back into the template and mark it invalid unless it
            returns within this distance (mm) of the original point.
        fine_radius_mm: half-width of the fine search cube around a coarse maximum.
        coarse_candidates: how many coarse maxima (non-maximum suppressed) get a fine search cube; the best
            fine + coarse score over all cubes wins (1 = the single coarse maximum).
        chunk_size: points per batch (default: sized for ~200 MB of gathered features).
        device: torch device for the search (default CUDA when available).

    Returns:
        :class:`MatchResult` with ``matched`` (N, 3) mm, ``score`` (N,), ``valid`` (N,), ``cycle_error_mm``.

    Raises:
        InputError: points not an (N, 3) finite array, or any point outside the template image.
    """
    points = as_points(points_mm, "points_mm")
    if len(points) == 0:
        empty = np.zeros((0, 3))
        return MatchResult(empty, np.zeros(0, np.float32), np.zeros(0, bool), None if cycle_tolerance_mm is None else np.zeros(0))
    outside = ~template_emb.contains(points)
    if outside.any():
        first = int(np.flatnonzero(outside)[0])
        raise InputError(
            f"{int(outside.sum())} of {len(points)} point(s) lie outside the template image "
            f"(first: row {first}, {np.round(points[first], 2).tolist()} mm)"
        )
    if fine_radius_mm <= 0:
        raise InputError(f"fine_radius_mm must be positive, got {fine_radius_mm}")
    if int(coarse_candidates) < 1:
        raise InputError(f"coarse_candidates must be at least 1, got {coarse_candidates}")
    dev = resolve_device(device)
    template, target = _levels(template_emb, dev), _levels(target_emb, dev)
    pts = torch.from_numpy(points).to(dev)
    with torch.inference_mode():
        matched, score = _match(template, pts, target, fine_radius_mm, chunk_size, int(coarse_candidates))
        cycle = None
        valid = torch.ones(len(points), dtype=torch.bool)
        if cycle_tolerance_mm is not None:
            back, _ = _match(target, matched, template, fine_radius_mm, chunk_size, int(coarse_candidates))
            cycle = (back - pts).norm(dim=1)
            valid = cycle <= float(cycle_tolerance_mm)
    return MatchResult(
        matched=matched.cpu().numpy(),
        score=score.float().cpu().numpy(),
        valid=valid.cpu().numpy(),
        cycle_error_mm=None if cycle is None else cycle.cpu().numpy(),
    )


def similarity_at(
    template_emb: Embedding,
    points_mm: np.ndarray,
    target_emb: Embedding,
    target_points_mm: np.ndarray,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """(N,) score ((fine cosine + coarse cosine) / 2, as :class:`MatchResult`) of template point i at target point i.

    Both point sets are (N, 3) world mm; embeddings are read trilinearly (points outside a grid are clamped to it).
    """
    points = as_points(points_mm, "points_mm")
    targets = as_points(target_points_mm, "target_points_mm")
    if len(points) != len(targets):
        raise InputError(f"{len(points)} template points but {len(targets)} target points")
    dev = resolve_device(device)
    (t_fine, t_coarse), (g_fine, g_coarse) = _levels(template_emb, dev), _levels(target_emb, dev)
    p, q = torch.from_numpy(points).to(dev), torch.from_numpy(targets).to(dev)
    with torch.inference_mode():
        fine = (t_fine.sample(t_fine.to_index(p)) * g_fine.sample(g_fine.to_index(q))).sum(dim=1)
        coarse = (t_coarse.sample(t_coarse.to_index(p)) * g_coarse.sample(g_coarse.to_index(q))).sum(dim=1)
    return ((fine + coarse) / 2.0).cpu().numpy()
