"""Training pairs for the registration network, simulated on the fly (:func:`regsam.data.simulate.simulate_case`).

Each pair: one training CT (resampled once to ``scan_spacing_mm``; scans without aerated lungs are left
out), breathing motion from a DIR-Lab 4DCT case (1-5, landmark-driven, rescaled so that the 99th percentile of
lung head-feet motion is a random ``amplitude_mm``) or the parametric model, sliding lungs, and a random rigid
offset. The simulator knows that offset exactly: instead of running the SAM affine (what inference does), the
moving image is resampled through ``T0`` = the exact rigid part composed with a small random rigid residual
(<= ``residual_mm``, <= ``residual_deg``), so the network sees what it will see after a good affine. The
fixed image, the moving image through ``T0``, the fixed body and lungs (and, when the loss or the inputs
need them, the frozen SAM fine embeddings of both images, PCA-reduced with one basis per pair for the loss, and
projected on the network's fixed input basis for ``feature_channels`` inputs, resampled the same way) are put on
the network grid (``spacing_mm``) once per pair.

A pool of ``pool_size`` pairs bounds the simulation cost: every ``refresh_every`` steps one new pair replaces
the oldest. Each batch element is a random crop (``crop_size`` voxels x, y, z) of a random pool pair, centred
on a random lung voxel with probability ``lung_crop_share``.

Deterministic by seed: pair ``n`` of rank ``r`` is simulated from ``seed, r, n`` alone and the crops come from
one generator, so :meth:`PairPool.state_dict` (the crop generator) and the step are all a resume needs (the
pool is re-simulated from the pair indices the step implies).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from scipy.spatial.transform import Rotation

from regsam.data.fetch import fetch_sample_ct
from regsam.data.manifests import find_case, load_manifest
from regsam.data.masks import chest_masks
from regsam.data.simulate import SimulationConfig, simulate_case
from regsam.embed.inference import embed_image
from regsam.embed.model import SAMEmbedder
from regsam.embed.train import SAMPLE_CT
from regsam.embed.weights import embedder_fingerprint
from regsam.errors import InputError
from regsam.io.images import check_volume, read_image, standardize
from regsam.register.embedding_pca import pca_basis, project_features, shared_pca_features
from regsam.register.net.model import NetConfig, image_on_grid, network_grid
from regsam.register.torch_fields import sample_world


@dataclass(frozen=True)
class PairSettings:
    """The ``pairs`` section of a deformable config (mm, degrees, voxels at the network spacing)."""

    pool_size: int = 4
    refresh_every: int = 25
    crop_size: tuple[int, int, int] = (64, 64, 48)
    scan_spacing_mm: float = 2.0
    landmarks: str = "../shared/data/dirlab4dct_landmarks"
    dirlab_cases: tuple[int, ...] = (1, 2, 3, 4, 5)
    parametric_share: float = 0.25
    amplitude_mm: tuple[float, float] = (10.0, 40.0)
    sliding: bool = True
    rigid_offset_mm: tuple[float, float] = (0.0, 30.0)
    rigid_offset_deg: tuple[float, float] = (0.0, 10.0)
    residual_mm: float = 5.0
    residual_deg: float = 3.0
    lung_crop_share: float = 0.8
    noise_hu: float = 20.0
    embed_components: int = 16

    def __post_init__(self) -> None:
        if self.pool_size < 1 or self.refresh_every < 1:
            raise InputError("pairs.pool_size and pairs.refresh_every must be >= 1")
        if len(self.crop_size) != 3 or min(self.crop_size) < 8:
            raise InputError(f"pairs.crop_size must be 3 sizes >= 8 voxels (x, y, z), got {list(self.crop_size)}")
        lo, hi = self.amplitude_mm
        if not 0 < lo <= hi <= 60:
            raise InputError(f"pairs.amplitude_mm must be 0 < low <= high <= 60, got {list(self.amplitude_mm)}")
        if not 0 <= self.parametric_share <= 1 or not 0 <= self.lung_crop_share <= 1:
            raise InputError("pairs.parametric_share and pairs.lung_crop_share must be in [0, 1]")
        if any(c not in (1, 2, 3, 4, 5) for c in self.dirlab_cases):
            raise InputError(f"pairs.dirlab_cases must be within 1-5, got {list(self.dirlab_cases)}")
        if self.embed_components < 1:
            raise InputError("pairs.embed_components must be >= 1")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PairSettings:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class Scan:
    """A training CT on its ``scan_spacing_mm`` grid (LPS, HU)."""

    name: str
    image: sitk.Image


@dataclass
class Pair:
    """One simulated pair on the network grid: tensors (C, D, H, W) (features float16) and masks (D, H, W)."""

    index: int
    fixed: torch.Tensor
    moving: torch.Tensor
    body: torch.Tensor
    lung_voxels: np.ndarray  # (N, 3) z, y, x indices of the fixed lungs
    fixed_features: torch.Tensor | None
    moving_features: torch.Tensor | None
    meta: dict
    fixed_inputs: torch.Tensor | None = None  # network input channels (fixed input basis), float16
    moving_inputs: torch.Tensor | None = None


def load_scans(paths: Sequence[str], spacing_mm: float) -> tuple[list[Scan], list[str]]:
    """Read every training CT once at ``spacing_mm``; scans without aerated lungs are left out.

    Returns ``(scans, skipped names)``. Raises InputError when no scan has lungs.
    """
    scans, skipped = [], []
    for path in paths:
        source = str(fetch_sample_ct()["ct"]) if path == SAMPLE_CT else path
        image = standardize(check_volume(read_image(source, "training CT"), Path(source).name), float(spacing_mm))
        try:
            chest_masks(image)
        except InputError:
            skipped.append(Path(source).name)
            continue
        scans.append(Scan(Path(source).name, image))
    if not scans:
        raise InputError("no training CT has aerated lungs to simulate breathing in (data: " + ", ".join(skipped) + ")")
    return scans, skipped


def landmark_files(folder: Path, cases: Sequence[int]) -> dict[int, tuple[Path, Path]]:
    """DIR-Lab ``CaseN_300_T00_xyz.txt``/``T50`` per case; InputError naming the first missing file."""
    out = {}
    for case in cases:
        pair = (folder / f"Case{case}_300_T00_xyz.txt", folder / f"Case{case}_300_T50_xyz.txt")
        for path in pair:
            if not path.is_file():
                raise InputError(f"pairs.landmarks: DIR-Lab landmark file not found: {path}")
        out[int(case)] = pair
    return out


def input_feature_basis(scan: Scan, embedder: SAMEmbedder, channels: int, seed: int,
                        device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed PCA basis of the network's SAM input channels: the top ``channels`` directions of ``scan``'s
    fine embedding (the first training scan: the same on every rank and after a resume)."""
    fine = embed_image(embedder, scan.image, device=device).fine
    return pca_basis(fine, fine, channels, seed)


def _rigid_matrix(axis: Sequence[float], degrees: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=np.float64)
    return Rotation.from_rotvec(axis / np.linalg.norm(axis) * math.radians(degrees)).as_matrix()


def start_transform(
    rigid_info: dict | None, centre: np.ndarray, settings: PairSettings, rng: np.random.Generator
) -> sitk.AffineTransform:
    """``T0`` = the simulator's exact rigid map ``y -> R (y - c) + c + t`` after a random small rigid residual
    ``P`` about the image centre (what a good SAM affine leaves): ``T0 = T_rigid o P``."""
    if rigid_info is None:
        rot, centre_r, trans = np.eye(3), centre, np.zeros(3)
    else:
        rot = _rigid_matrix(rigid_info["rotation_axis"], rigid_info["rotation_deg"])
        centre_r, trans = np.array(rigid_info["centre_mm"]), np.array(rigid_info["translation_mm"])
    axis = rng.standard_normal(3)
    rot_p = _rigid_matrix(axis, rng.uniform(-settings.residual_deg, settings.residual_deg))
    direction = rng.standard_normal(3)
    trans_p = direction / np.linalg.norm(direction) * rng.uniform(0.0, settings.residual_mm)
    # P(y) = Rp (y - c) + c + tp; T(y) = R (y - cr) + cr + t; T(P(y)) = R Rp y + R (c - Rp c + tp - cr) + cr + t
    matrix = rot @ rot_p
    offset = rot @ (centre - rot_p @ centre + trans_p - centre_r) + centre_r + trans
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(matrix.ravel().tolist())
    transform.SetTranslation(offset.tolist())
    return transform


class PairPool:
    """The pool of simulated pairs and the crops drawn from it (see the module docstring)."""

    def __init__(self, scans: list[Scan], settings: PairSettings, net: NetConfig,
                 landmarks: dict[int, tuple[Path, Path]], seed: int, embedder: SAMEmbedder | None = None,
                 device: torch.device | None = None, input_basis: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.scans, self.settings, self.net, self.landmarks = scans, settings, net, landmarks
        self.seed, self.embedder, self.device, self.input_basis = int(seed), embedder, device, input_basis
        #: recorded with the trained network (:func:`regsam.register.net.model.network_embedder`)
        self.embedder_fingerprint = None if embedder is None else embedder_fingerprint(embedder.state_dict())
        self.rng = np.random.default_rng([self.seed, 1])
        self.pool: list[Pair] = []

    # -------------------------------------------------------------- pairs
    def _simulation(self, rng: np.random.Generator) -> SimulationConfig:
        s = self.settings
        amplitude = float(rng.uniform(*s.amplitude_mm))
        offset = (float(rng.uniform(*s.rigid_offset_mm)), float(rng.uniform(*s.rigid_offset_deg)))
        seed = int(rng.integers(2**31))
        if not self.landmarks or rng.uniform() < s.parametric_share:
            return SimulationConfig(seed=seed, motion="parametric", amplitude_mm=amplitude, sliding=s.sliding,
                                    rigid_offset=offset, noise_hu=s.noise_hu, n_points=10, n_body_points=0)
        case = int(rng.choice(sorted(self.landmarks)))
        spacing = tuple(float(v) for v in find_case(load_manifest("dirlab4dct"), case)["spacing"])
        return SimulationConfig(seed=seed, motion="landmarks", motion_landmarks=self.landmarks[case],
                                motion_spacing=spacing, amplitude_mm=amplitude, sliding=s.sliding, rigid_offset=offset,
                                noise_hu=s.noise_hu, n_points=10, n_body_points=0)

    def make_pair(self, index: int) -> Pair:
        """Pair ``index``, simulated from ``(seed, index)`` alone (a failed simulation retries with a new draw)."""
        for attempt in range(5):
            rng = np.random.default_rng([self.seed, 2, index, attempt])
            scan = self.scans[int(rng.integers(len(self.scans)))]
            config = self._simulation(rng)
            try:
                sim = simulate_case(scan.image, config)
            except InputError:
                continue
            return self._on_grid(index, scan, sim, rng)
        raise InputError(f"could not simulate training pair {index} in 5 attempts")

    def _on_grid(self, index: int, scan: Scan, sim, rng: np.random.Generator) -> Pair:
        fixed = sim.fixed
        middle = ((np.array(fixed.GetSize()) - 1) / 2.0).tolist()
        centre = np.array(fixed.TransformContinuousIndexToPhysicalPoint(middle))
        t0 = start_transform(sim.meta["rigid_offset"], centre, self.settings, rng)
        grid = network_grid(fixed, self.net.spacing_mm, self.net.stride, min_size_xyz=self.settings.crop_size)

        def mask(image: sitk.Image) -> torch.Tensor:
            on = sitk.Resample(sitk.Cast(image, sitk.sitkUInt8), grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
            return torch.from_numpy(sitk.GetArrayFromImage(on) > 0)

        lungs = mask(sim.fixed_mask)
        meta = {"scan": scan.name, "motion": sim.meta["motion"], "amplitude_mm": sim.meta["amplitude_mm"],
                "rigid_offset": sim.meta["rigid_offset"]}
        pair = Pair(index, image_on_grid(fixed, grid, None, self.net.hu_window)[0],
                    image_on_grid(sim.moving, grid, t0, self.net.hu_window)[0], mask(sim.fixed_body),
                    lungs.nonzero().numpy(), None, None, meta)
        if self.embedder is not None:
            self._add_features(pair, sim.fixed, sim.moving, grid, t0)
        return pair

    def _add_features(self, pair: Pair, fixed: sitk.Image, moving: sitk.Image, grid: sitk.Image,
                      t0: sitk.Transform) -> None:
        """Frozen SAM fine embeddings of both images on ``grid`` (moving through t0): PCA-reduced with the pair's
        own basis (loss), and on the fixed input basis (network inputs, when there is one)."""
        assert self.embedder is not None
        f_emb = embed_image(self.embedder, fixed, device=self.device)
        m_emb = embed_image(self.embedder, moving, device=self.device)

        def on_grid(f: np.ndarray, m: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            f_on = sample_world(torch.from_numpy(f).float(), f_emb.fine_geometry, grid)
            return f_on.half(), sample_world(torch.from_numpy(m).float(), m_emb.fine_geometry, grid, t0).half()

        pair.fixed_features, pair.moving_features = on_grid(
            *shared_pca_features(f_emb.fine, m_emb.fine, self.settings.embed_components, self.seed))
        if self.input_basis is not None:
            pair.fixed_inputs, pair.moving_inputs = on_grid(
                project_features(f_emb.fine, *self.input_basis), project_features(m_emb.fine, *self.input_basis))

    def refresh(self, step: int) -> None:
        """Make the pool hold pairs ``[n - pool_size, n)`` with ``n = pool_size + step // refresh_every``: the
        first call fills it, every ``refresh_every`` steps the newest pair replaces the oldest, and after a resume
        the pool is re-simulated from those indices."""
        size = self.settings.pool_size
        target = size + step // self.settings.refresh_every
        keep = {p.index: p for p in self.pool if p.index >= target - size}
        for index in range(target - size, target):
            if index not in keep:
                keep[index] = self.make_pair(index)
        self.pool = [keep[i] for i in sorted(keep)]

    # -------------------------------------------------------------- crops
    def _crop(self, pair: Pair) -> dict[str, torch.Tensor]:
        size_zyx = np.array(self.settings.crop_size[::-1])
        shape = np.array(pair.fixed.shape[-3:])
        if len(pair.lung_voxels) and self.rng.uniform() < self.settings.lung_crop_share:
            centre = pair.lung_voxels[int(self.rng.integers(len(pair.lung_voxels)))]
        else:
            centre = np.array([self.rng.integers(n) for n in shape])
        lo = np.clip(centre - size_zyx // 2, 0, shape - size_zyx)
        sl = tuple(slice(int(a), int(a + n)) for a, n in zip(lo, size_zyx))
        out = {"fixed": pair.fixed[(slice(None), *sl)], "moving": pair.moving[(slice(None), *sl)],
               "body": pair.body[sl][None].float()}
        for name in ("fixed_features", "moving_features", "fixed_inputs", "moving_inputs"):
            values = getattr(pair, name)
            if values is not None:
                out[name] = values[(slice(None), *sl)].float()
        return out

    def batch(self, step: int, batch_size: int) -> dict[str, torch.Tensor]:
        """The crops of (0-based) ``step``: dict of (B, C, d, h, w) tensors ``fixed``, ``moving``, ``body`` and,
        with embeddings, ``fixed_features``/``moving_features`` (loss) and ``fixed_inputs``/``moving_inputs``
        (network input channels, with an input basis)."""
        self.refresh(step)
        crops = [self._crop(self.pool[int(self.rng.integers(len(self.pool)))]) for _ in range(batch_size)]
        return {k: torch.stack([c[k] for c in crops]) for k in crops[0]}

    def state_dict(self) -> dict:
        """The crop generator's state (the pool follows from the step)."""
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.pool = []


__all__ = ["Pair", "PairPool", "PairSettings", "Scan", "input_feature_basis", "landmark_files", "load_scans",
           "start_transform"]
