"""Inference form of the embedder: batch norm folded into the convolutions, plain torch, no MONAI import.

:class:`FusedEmbedder` computes what :meth:`regsam.embed.model.SAMEmbedder.forward` computes in eval mode
(same values up to float rounding; ``tests/embed/test_model.py`` and ``tests/embed/test_inference.py``
compare them), from the same state dict, for one large volume at a time with bounded memory:

* every ``Convolution`` (conv, batch norm, leaky ReLU) becomes one convolution with folded weights and an
  in-place activation, and a ``ResidualUnit`` two of them plus its residual path;
* every layer runs channels-last (the weights are stored so);
* the fine head (all 1x1x1 after the last up-sampling) runs slab by slab along D as matrix products and
  writes straight into a ``fine_dtype`` output, so the (Cf, D/2, H/2, W/2) float32 map never exists.

It exists for speed: importing MONAI costs 2-4 s, more than the forward pass of a whole chest at 2 mm on
two cores, and folding the batch norms saves a pass over every feature map. Training keeps the MONAI
network of :mod:`regsam.embed.model`; the state-dict names read here are MONAI's (``<block>.conv.weight``,
``<block>.adn.N.running_mean``, ``<unit>.conv.unit0...``, ``<unit>.residual.weight``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from regsam.devices import DeviceLike, resolve_device
from regsam.embed.weights import read_weights
from regsam.errors import InputError

#: negative slope of every leaky ReLU of the network
LEAKY_SLOPE = 0.1
#: batch-norm epsilon (torch's default, which MONAI's ``ADN`` keeps)
BN_EPS = 1e-5


@dataclass
class _Conv:
    """One convolution with batch norm folded in: ``act(conv(x, weight) + bias)``; weight (Cout, Cin, k, k, k)."""

    weight: torch.Tensor
    bias: torch.Tensor
    stride: int = 1
    dilation: int = 1
    act: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.dilation * (int(self.weight.shape[-1]) // 2)
        y = F.conv3d(x, self.weight, self.bias, self.stride, pad, self.dilation)
        return F.leaky_relu_(y, LEAKY_SLOPE) if self.act else y

    def matrix(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A 1x1x1 convolution as ``(weight (Cin, Cout), bias (Cout,))`` for ``rows @ weight + bias``."""
        return self.weight.reshape(self.weight.shape[0], -1).t().contiguous(), self.bias

    def to(self, device: torch.device) -> _Conv:
        return _Conv(self.weight.to(device), self.bias.to(device), self.stride, self.dilation, self.act)


@dataclass
class _Residual:
    """MONAI ``ResidualUnit`` in eval mode: ``units(x) + residual(x)`` (identity residual when ``residual`` is None)."""

    units: list[_Conv]
    residual: _Conv | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for unit in self.units:
            y = unit(y)
        return y.add_(self.residual(x) if self.residual is not None else x)

    def to(self, device: torch.device) -> _Residual:
        return _Residual([u.to(device) for u in self.units], self.residual.to(device) if self.residual else None)


class _StateReader:
    """Reads folded layers out of a state dict and remembers which keys it used."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.state = {k: v.detach().float() for k, v in state_dict.items()}
        self.used: set[str] = set()

    def _take(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise KeyError(key)
        self.used.add(key)
        return self.state[key]

    def conv(self, prefix: str, stride: int = 1, dilation: int = 1) -> _Conv:
        """``prefix.conv`` (+ ``prefix.adn.N`` batch norm and an activation when present)."""
        weight, bias = self._take(f"{prefix}.conv.weight"), self._take(f"{prefix}.conv.bias")
        act = f"{prefix}.adn.N.weight" in self.state
        if act:
            gamma, beta = self._take(f"{prefix}.adn.N.weight"), self._take(f"{prefix}.adn.N.bias")
            mean, var = self._take(f"{prefix}.adn.N.running_mean"), self._take(f"{prefix}.adn.N.running_var")
            self.used.add(f"{prefix}.adn.N.num_batches_tracked")
            scale = gamma / torch.sqrt(var + BN_EPS)
            weight = weight * scale.reshape(-1, 1, 1, 1, 1)
            bias = (bias - mean) * scale + beta
        return _Conv(_channels_last(weight), bias.contiguous(), stride, dilation, act)

    def residual(self, prefix: str, stride: int = 1, dilation: int = 1) -> _Residual:
        units = [self.conv(f"{prefix}.conv.unit0", stride, dilation), self.conv(f"{prefix}.conv.unit1", 1, dilation)]
        skip = None
        if f"{prefix}.residual.weight" in self.state:
            skip = _Conv(_channels_last(self._take(f"{prefix}.residual.weight")), self._take(f"{prefix}.residual.bias"), stride)
        return _Residual(units, skip)

    def unused(self) -> list[str]:
        return sorted(k for k in self.state if k not in self.used and not k.endswith("num_batches_tracked"))


class FusedEmbedder:
    """An eval-mode embedder for inference; same outputs as :class:`regsam.embed.model.SAMEmbedder`.

    Args:
        state_dict: a ``SAMEmbedder`` state dict (any device; folded copies are kept).
        model_config: its architecture (``SAMEmbedder``'s keyword arguments; ``context_dilation``,
            ``min_input_size``, ``fine_dim``, ``coarse_dim`` are read here, the widths come from the tensors).
        spacing_mm: network input spacing (mm).
        hu_window: HU range mapped to [-1, 1].

    Raises:
        InputError: the state dict lacks a layer, has layers this network does not have, or layers whose
            channel counts do not chain.
    """

    #: inputs must be padded to a multiple of this along every axis
    stride: int = 16
    #: output level -> down-sampling factor relative to the input
    level_factors: dict[str, int] = {"fine": 2, "coarse": 8}

    def __init__(
        self,
        state_dict: Mapping[str, torch.Tensor],
        model_config: Mapping[str, Any],
        spacing_mm: float,
        hu_window: tuple[float, float],
    ) -> None:
        self.spacing_mm = float(spacing_mm)
        self.hu_window = (float(hu_window[0]), float(hu_window[1]))
        self.min_input_size = int(model_config.get("min_input_size", 32))
        self.fine_dim = int(model_config.get("fine_dim", 128))
        self.coarse_dim = int(model_config.get("coarse_dim", 128))
        read = _StateReader(state_dict)
        try:
            self.enc1 = [read.conv("enc1.0", stride=2), read.conv("enc1.1")]
            self.encoders = [read.residual(name, stride=2) for name in ("enc2", "enc3", "enc4")]
            self.context = read.residual("context", dilation=int(model_config.get("context_dilation", 2)))
            self.lat4, self.lat3, self.lat2 = read.conv("lat4"), read.conv("lat3"), read.conv("lat2")
            self.coarse_block, self.coarse_out = read.conv("coarse_block"), read.conv("coarse_out")
            self.top3, self.fine_block = read.conv("top3"), read.conv("fine_block")
            self.fine_tail = [read.conv(name) for name in ("lat1", "fine_mix", "fine_out")]
        except KeyError as exc:
            raise InputError(f"embedder weights lack the layer {exc.args[0]}") from None
        if read.unused():
            raise InputError(f"embedder weights hold layers this network does not have: {read.unused()[:4]}")
        self._check_widths()

    def _check_widths(self) -> None:
        """Every layer takes the channels its input has (a static check: a trial forward pass costs ~1 s on a busy CPU)."""

        def ins(c: _Conv) -> int:
            return int(c.weight.shape[1])

        def outs(c: _Conv | _Residual) -> int:
            return int((c.units[-1] if isinstance(c, _Residual) else c).weight.shape[0])

        steps: list[tuple[str, int, int]] = [("enc1.0", ins(self.enc1[0]), 1), ("enc1.1", ins(self.enc1[1]), outs(self.enc1[0]))]
        width = outs(self.enc1[1])
        widths = [width]
        for name, unit in zip(("enc2", "enc3", "enc4", "context"), (*self.encoders, self.context)):
            steps += [(f"{name}.unit0", ins(unit.units[0]), width), (f"{name}.unit1", ins(unit.units[1]), outs(unit.units[0]))]
            skip = outs(unit.residual) if unit.residual is not None else width
            steps.append((f"{name}.residual", skip, outs(unit)))
            width = outs(unit)
            widths.append(width)
        x1, x2, x3, x4 = widths[0], widths[1], widths[2], widths[4]
        lat1, fine_mix, fine_out = self.fine_tail
        steps += [
            ("lat4", ins(self.lat4), x4), ("lat3", ins(self.lat3), x3), ("lat3 + lat4", outs(self.lat3), outs(self.lat4)),
            ("coarse_block", ins(self.coarse_block), outs(self.lat3)), ("coarse_out", ins(self.coarse_out), outs(self.coarse_block)),
            ("top3", ins(self.top3), outs(self.lat3)), ("lat2", ins(self.lat2), x2), ("lat2 + top3", outs(self.lat2), outs(self.top3)),
            ("fine_block", ins(self.fine_block), outs(self.lat2)), ("lat1", ins(lat1), x1), ("lat1 + up", outs(lat1), outs(self.fine_block)),
            ("fine_mix", ins(fine_mix), outs(lat1)), ("fine_out", ins(fine_out), outs(fine_mix)),
            ("fine_dim", outs(fine_out), self.fine_dim), ("coarse_dim", outs(self.coarse_out), self.coarse_dim),
        ]
        wrong = [f"{name} has {got} channels where {want} arrive" for name, got, want in steps if got != want]
        if wrong:
            raise InputError(f"embedder weights do not fit the network: {wrong[0]}")

    @property
    def device(self) -> torch.device:
        return self.enc1[0].weight.device

    def to(self, device: DeviceLike) -> FusedEmbedder:
        """Move the folded weights to ``device`` (in place); returns ``self``."""
        dev = resolve_device(device)
        self.enc1 = [c.to(dev) for c in self.enc1]
        self.encoders = [r.to(dev) for r in self.encoders]
        self.context = self.context.to(dev)
        for name in ("lat4", "lat3", "lat2", "coarse_block", "coarse_out", "top3", "fine_block"):
            setattr(self, name, getattr(self, name).to(dev))
        self.fine_tail = [c.to(dev) for c in self.fine_tail]
        return self

    @torch.inference_mode()
    def embed_volume(self, x: torch.Tensor, fine_dtype: torch.dtype = torch.float16, rows: int = 65536) -> dict[str, torch.Tensor]:
        """Embed one volume.

        Args:
            x: (1, 1, D, H, W) normalised intensities, D, H, W multiples of :attr:`stride`, on :attr:`device`.
            fine_dtype: dtype of the returned fine embedding (float16 halves its memory).
            rows: fine-level voxels per step of the fine head (its float32 intermediates take ~ 8 * rows * Cf bytes).

        Returns:
            ``{"fine": (1, Cf, D/2, H/2, W/2) fine_dtype, "coarse": (1, Cc, D/8, H/8, W/8) float32}``, unit vectors
            along C; both channels-last in memory (``.permute(0, 2, 3, 4, 1)`` is contiguous).
        """
        if x.ndim != 5 or x.shape[0] != 1 or x.shape[1] != 1:
            raise InputError(f"embed_volume expects a (1, 1, D, H, W) tensor, got shape {tuple(x.shape)}")
        if any(int(s) % self.stride for s in x.shape[2:]):
            raise InputError(f"embed_volume: spatial size {tuple(x.shape[2:])} is not a multiple of {self.stride}")
        x1 = self.enc1[1](self.enc1[0](x.float().contiguous(memory_format=torch.channels_last_3d)))
        x2 = self.encoders[0](x1)
        x3 = self.encoders[1](x2)
        x4 = self.context(self.encoders[2](x3))
        p3 = self.lat3(x3).add_(_up(self.lat4(x4), x3))
        del x3, x4
        coarse = F.normalize(self.coarse_out(self.coarse_block(p3)), dim=1).contiguous(memory_format=torch.channels_last_3d)
        p2 = self.fine_block(self.lat2(x2).add_(_up(self.top3(p3), x2)))
        del x2, p3
        return {"fine": self._fine_head(x1, p2, fine_dtype, rows), "coarse": coarse}

    def _fine_head(self, x1: torch.Tensor, p2: torch.Tensor, fine_dtype: torch.dtype, rows: int) -> torch.Tensor:
        """``fine_out(fine_mix(lat1(x1) + up(p2)))``, L2-normalised; (1, Cf, D/2, H/2, W/2) channels-last.

        The head is a chain of matrix products per voxel, run over ``rows`` voxels at a time so that its
        (rows, Cf) float32 intermediates stay in cache; only the ``fine_dtype`` result is written in full.
        """
        d2, h2, w2 = (int(s) for s in x1.shape[2:])
        fine = torch.empty((d2 * h2 * w2, self.fine_dim), dtype=fine_dtype, device=x1.device)
        # up-sampled as a whole: channels-last in, channels-last out, so both flatten to (voxels, C) views
        up = F.interpolate(p2, size=(d2, h2, w2), mode="trilinear", align_corners=False)
        up = up.contiguous(memory_format=torch.channels_last_3d).permute(0, 2, 3, 4, 1).reshape(-1, up.shape[1])
        low = x1.contiguous(memory_format=torch.channels_last_3d).permute(0, 2, 3, 4, 1).reshape(-1, x1.shape[1])
        (lat_w, lat_b, _), *tail = [(*c.matrix(), c.act) for c in self.fine_tail]
        step = max(1, min(int(rows), fine.shape[0]))
        # buffers reused for every block: fresh large tensors would cost a page fault per 4 kB on every block
        buffers = [torch.empty((step, int(w.shape[1])), device=x1.device) for w in (lat_w, *(w for w, _, _ in tail))]
        norm = torch.empty((step, 1), device=x1.device)
        for r0 in range(0, fine.shape[0], step):
            n = min(step, fine.shape[0] - r0)
            h = torch.addmm(lat_b, low[r0 : r0 + n], lat_w, out=buffers[0][:n]).add_(up[r0 : r0 + n])
            for (w, bias, act), out in zip(tail, buffers[1:]):
                h = torch.addmm(bias, h, w, out=out[:n])
                if act:
                    F.leaky_relu_(h, LEAKY_SLOPE)
            scale = torch.linalg.vector_norm(h, dim=1, keepdim=True, out=norm[:n]).clamp_min_(1e-12)
            fine[r0 : r0 + n].copy_(h.div_(scale))
        return fine.reshape(1, d2, h2, w2, self.fine_dim).permute(0, 4, 1, 2, 3)


def level_geometry(origin: Sequence[float], spacing: Sequence[float], direction: Sequence[float], factor: int) -> tuple:
    """Origin, spacing, direction (mm, LPS) of an output level ``factor`` times coarser than the input grid.

    Output voxel ``i`` is centred on input voxel ``factor * i`` (kernel-3, padding-1 strided convolutions),
    so the origin and direction are unchanged and the spacing is multiplied by ``factor``.
    """
    return tuple(float(o) for o in origin), tuple(float(s) * factor for s in spacing), tuple(float(d) for d in direction)


def _channels_last(weight: torch.Tensor) -> torch.Tensor:
    # a convolution's output takes its weight's layout when the input's is ambiguous (one channel), so channels-last
    # weights keep the whole network channels-last: ~25 % faster than channels-first with oneDNN on CPU
    return weight.contiguous(memory_format=torch.channels_last_3d)


def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[2:], mode="trilinear", align_corners=False)


def fuse(model: Any) -> FusedEmbedder:
    """The :class:`FusedEmbedder` of a :class:`regsam.embed.model.SAMEmbedder` (its current weights, on its device).

    Batch norm is folded with its running statistics, i.e. as in eval mode, whatever mode ``model`` is in.
    """
    net = getattr(model, "module", model)  # DistributedDataParallel wraps the network
    return FusedEmbedder(net.state_dict(), net.config, net.spacing_mm, net.hu_window)


def load_fused(path: str | os.PathLike | None = None, device: DeviceLike = None) -> FusedEmbedder:
    """Read embedder weights (:func:`regsam.embed.weights.read_weights`) into a :class:`FusedEmbedder` on ``device``.

    Raises:
        InputError: missing or unreadable file, or weights that do not fit the network.
    """
    weights = read_weights(path)
    try:
        fused = FusedEmbedder(weights.state_dict, weights.model_config, weights.spacing_mm, weights.hu_window)
    except InputError as exc:
        raise InputError(f"{weights.path}: {exc}") from None
    return fused.to(device)
