"""The SAM embedding network: a small 3D residual encoder with an FPN-style decoder and two heads.

Outputs for an input ``x`` of shape (B, 1, D, H, W) (D, H, W multiples of :attr:`SAMEmbedder.stride`):

* ``fine``   (B, Cf, D/2, H/2, W/2)  local embedding, L2-normalised along C;
* ``coarse`` (B, Cc, D/8, H/8, W/8)  global embedding with a large receptive field, L2-normalised.

Level geometry (used identically in training and inference): every strided convolution has
kernel 3 and padding 1, so output voxel ``i`` of a level with factor ``f`` is centred on input voxel
``f * i``. A level therefore has the input grid's origin and direction and ``f`` times its spacing
(see :func:`regsam.embed.fused.level_geometry`).

Building blocks are MONAI's :class:`~monai.networks.blocks.Convolution` and
:class:`~monai.networks.blocks.ResidualUnit`. Normalisation is batch norm, so that in eval mode an
embedding does not depend on the field of view or on how a scan is split into windows.

This is the network that trains. Inference runs its folded, MONAI-free form
(:class:`regsam.embed.fused.FusedEmbedder`, same values); :meth:`SAMEmbedder.embed_volume` goes through it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn

from regsam.devices import resolve_device
from regsam.embed.fused import LEAKY_SLOPE, fuse, level_geometry
from regsam.embed.preprocess import DEFAULT_SPACING_MM, HU_WINDOW
from regsam.embed.weights import DEFAULT_WEIGHTS, WEIGHTS_FORMAT, read_weights
from regsam.errors import InputError
from regsam.io.atomic import atomic_path

# re-exported: callers import the weights' location and the level geometry from here
__all__ = ["DEFAULT_WEIGHTS", "SAMEmbedder", "count_parameters", "level_geometry", "load_embedder", "save_weights"]

_ACT = ("leakyrelu", {"negative_slope": LEAKY_SLOPE, "inplace": True})


class SAMEmbedder(nn.Module):
    """3D CNN producing fine (1/2) and coarse (1/8) L2-normalised embeddings.

    Args:
        channels: encoder channels at 1/2, 1/4, 1/8, 1/16 of the input resolution.
        fine_dim: Cf, channels of the fine embedding (SAM: 128).
        coarse_dim: Cc, channels of the coarse embedding (SAM: 128).
        coarse_head_channels: decoder width at 1/16 and 1/8 (coarse path).
        fine_head_channels: decoder width at 1/4 and 1/2 (fine path).
        context_dilation: dilation of the extra residual unit at 1/16 that widens the receptive field.
        min_input_size: smallest accepted input side in voxels (before padding to the stride).
    """

    #: inputs must be padded to a multiple of this along every axis
    stride: int = 16
    #: output level -> down-sampling factor relative to the input
    level_factors: dict[str, int] = {"fine": 2, "coarse": 8}

    def __init__(
        self,
        channels: Sequence[int] = (16, 32, 64, 128),
        fine_dim: int = 128,
        coarse_dim: int = 128,
        coarse_head_channels: int = 64,
        fine_head_channels: int = 32,
        context_dilation: int = 2,
        min_input_size: int = 32,
    ) -> None:
        super().__init__()
        if len(channels) != 4:
            raise InputError(f"SAMEmbedder: channels needs 4 values (1/2, 1/4, 1/8, 1/16), got {list(channels)}")
        c0, c1, c2, c3 = (int(c) for c in channels)
        hc, hf = int(coarse_head_channels), int(fine_head_channels)
        self.config: dict[str, Any] = {
            "channels": [c0, c1, c2, c3],
            "fine_dim": int(fine_dim),
            "coarse_dim": int(coarse_dim),
            "coarse_head_channels": hc,
            "fine_head_channels": hf,
            "context_dilation": int(context_dilation),
            "min_input_size": int(min_input_size),
        }
        self.min_input_size = int(min_input_size)
        self.fine_dim, self.coarse_dim = int(fine_dim), int(coarse_dim)
        #: input spacing (mm) and HU window the model was trained with (set by :func:`load_embedder`)
        self.spacing_mm: float = DEFAULT_SPACING_MM
        self.hu_window: tuple[float, float] = HU_WINDOW

        def conv(cin: int, cout: int, k: int = 3, s: int = 1, plain: bool = False) -> Convolution:
            return Convolution(3, cin, cout, strides=s, kernel_size=k, act=_ACT, norm="batch", conv_only=plain)

        def res(cin: int, cout: int, s: int = 1, dilation: int = 1) -> ResidualUnit:
            return ResidualUnit(3, cin, cout, strides=s, kernel_size=3, subunits=2, act=_ACT, norm="batch", dilation=dilation)

        # encoder
        self.enc1 = nn.Sequential(conv(1, c0, s=2), conv(c0, c0))  # 1/2
        self.enc2 = res(c0, c1, s=2)  # 1/4
        self.enc3 = res(c1, c2, s=2)  # 1/8
        self.enc4 = res(c2, c3, s=2)  # 1/16
        self.context = res(c3, c3, dilation=context_dilation)  # 1/16, receptive field ~ 440 input voxels
        # coarse (global) path: 1/16 -> 1/8
        self.lat4 = conv(c3, hc, k=1, plain=True)
        self.lat3 = conv(c2, hc, k=1, plain=True)
        self.coarse_block = conv(hc, hc)
        self.coarse_out = conv(hc, coarse_dim, k=1, plain=True)
        # fine (local) path: 1/8 -> 1/4 -> 1/2
        self.top3 = conv(hc, hf, k=1, plain=True)
        self.lat2 = conv(c1, hf, k=1, plain=True)
        self.fine_block = conv(hf, hf)
        self.lat1 = conv(c0, hf, k=1, plain=True)
        self.fine_mix = conv(hf, 2 * hf, k=1)
        self.fine_out = conv(2 * hf, fine_dim, k=1, plain=True)

    @staticmethod
    def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=like.shape[2:], mode="trilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Embed a batch.

        Args:
            x: (B, 1, D, H, W) normalised intensities (see :func:`regsam.embed.preprocess.preprocess`),
                D, H, W multiples of :attr:`stride`.

        Returns:
            ``{"fine": (B, Cf, D/2, H/2, W/2), "coarse": (B, Cc, D/8, H/8, W/8)}``, unit vectors along C.
        """
        if x.ndim != 5 or x.shape[1] != 1:
            raise InputError(f"SAMEmbedder expects a (B, 1, D, H, W) tensor, got shape {tuple(x.shape)}")
        if any(int(s) % self.stride for s in x.shape[2:]):
            raise InputError(f"SAMEmbedder: spatial size {tuple(x.shape[2:])} is not a multiple of {self.stride}")
        x1 = self.enc1(x)
        x2 = self.enc2(x1)
        x3 = self.enc3(x2)
        x4 = self.context(self.enc4(x3))
        p3 = self.lat3(x3) + self._up(self.lat4(x4), x3)
        coarse = self.coarse_out(self.coarse_block(p3))
        p2 = self.fine_block(self.lat2(x2) + self._up(self.top3(p3), x2))
        p1 = self.lat1(x1) + self._up(p2, x1)
        fine = self.fine_out(self.fine_mix(p1))
        return {"fine": F.normalize(fine, dim=1), "coarse": F.normalize(coarse, dim=1)}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_weights(self, path: str | os.PathLike, config: dict | None = None) -> Path:
        """Write this model's weights and architecture (+ the training ``config``) atomically; see :func:`save_weights`."""
        return save_weights(self, path, config)

    @torch.inference_mode()
    def embed_volume(self, x: torch.Tensor, fine_dtype: torch.dtype = torch.float16, rows: int = 65536) -> dict[str, torch.Tensor]:
        """Eval-mode forward for one large volume with bounded memory; same values as :meth:`forward`.

        Runs :meth:`regsam.embed.fused.FusedEmbedder.embed_volume` on this network's current weights
        (batch norm folded, encoder channels-last, the fine head ``rows`` voxels at a time).

        Args:
            x: (1, 1, D, H, W), D, H, W multiples of :attr:`stride`.
            fine_dtype: dtype of the returned fine embedding (float16 halves its memory).
            rows: fine-level voxels per step of the fine head.

        Returns:
            ``{"fine": (1, Cf, D/2, H/2, W/2) fine_dtype, "coarse": (1, Cc, D/8, H/8, W/8) float32}``; both tensors
            are channels-last in memory (``.permute(0, 2, 3, 4, 1)`` is contiguous).
        """
        if self.training:
            raise RuntimeError("embed_volume needs eval mode (call model.eval())")
        return fuse(self).embed_volume(x, fine_dtype=fine_dtype, rows=rows)


def save_weights(model: nn.Module, path: str | os.PathLike, config: dict | None = None, extra: dict | None = None) -> Path:
    """Write ``model``'s weights, its architecture and the training ``config`` to ``path`` atomically.

    The file is a ``torch.save`` dict: ``format``, ``model_config`` (kwargs of :class:`SAMEmbedder`),
    ``state_dict`` (float32) and ``config`` (the training configuration, for the record).
    """
    net = model.module if hasattr(model, "module") else model
    if not isinstance(net, SAMEmbedder):
        raise TypeError(f"save_weights expects a SAMEmbedder, got {type(net).__name__}")
    payload = {
        "format": WEIGHTS_FORMAT,
        "model_config": dict(net.config),
        "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
        "config": config or {},
        **(extra or {}),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_embedder(path: str | os.PathLike | None = None, device: str | torch.device | None = None) -> SAMEmbedder:
    """Load a :class:`SAMEmbedder` in eval mode.

    Args:
        path: a file written by :func:`save_weights` (or a training checkpoint); ``None`` means the shipped
            default ``regsam/weights/sam_chest.pt``.
        device: where to put the model (default: ``"cuda"`` when available, else ``"cpu"``).

    Raises:
        InputError: the file is missing, unreadable or not regsam embedder weights.
    """
    weights = read_weights(path)
    model = SAMEmbedder(**weights.model_config)
    try:
        model.load_state_dict(weights.state_dict)
    except RuntimeError as exc:
        raise InputError(f"{weights.path}: weights do not fit the stored architecture ({str(exc).splitlines()[0][:160]})") from None
    model.spacing_mm, model.hu_window = weights.spacing_mm, weights.hu_window
    model.eval()
    return model.to(resolve_device(device))


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return int(sum(p.numel() for p in model.parameters()))

