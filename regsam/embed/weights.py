"""Embedder weight files: where the shipped ones are, and reading one without building the network.

Reading needs torch only (no MONAI), so both :func:`regsam.embed.model.load_embedder` (the trainable
network) and :func:`regsam.embed.fused.load_fused` (inference without MONAI) start here.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from regsam.embed.preprocess import DEFAULT_SPACING_MM, HU_WINDOW
from regsam.errors import InputError

#: Where :func:`read_weights` looks when no path is given.
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "sam_chest.pt"

#: file-format version of :func:`regsam.embed.model.save_weights`
WEIGHTS_FORMAT = 1


@dataclass
class WeightsFile:
    """The content of an embedder weights file.

    Attributes:
        path: the file read.
        model_config: keyword arguments of :class:`regsam.embed.model.SAMEmbedder` (the architecture).
        state_dict: parameter and buffer tensors (CPU), by module path.
        spacing_mm: network input spacing the model was trained at (mm).
        hu_window: HU range the model's input was scaled from, mapped to [-1, 1].
    """

    path: Path
    model_config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    spacing_mm: float
    hu_window: tuple[float, float]


def read_weights(path: str | os.PathLike | None = None) -> WeightsFile:
    """Read a file written by :func:`regsam.embed.model.save_weights` (or a training checkpoint).

    Args:
        path: the file; ``None`` means the shipped default ``regsam/weights/sam_chest.pt``.

    Raises:
        InputError: the file is missing, unreadable or not regsam embedder weights.
    """
    weights = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not weights.is_file():
        if path is None:
            raise InputError(
                f"no default embedder weights at {weights}; train them with "
                "'python -m regsam.embed.train --config regsam/configs/embedder/sam_chest.yaml --out runs/sam_chest' "
                "or pass a weights file"
            )
        raise InputError(f"embedder weights not found: {weights}")
    try:
        payload = torch.load(weights, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is bad input
        raise InputError(f"{weights}: not a readable torch file ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not isinstance(payload, dict) or "state_dict" not in payload or "model_config" not in payload:
        raise InputError(f"{weights}: not regsam embedder weights (no state_dict/model_config)")
    crops = (payload.get("config") or {}).get("crops") or {}
    lo, hi = (float(v) for v in crops.get("hu_window", HU_WINDOW))
    return WeightsFile(
        path=weights,
        model_config=dict(payload["model_config"]),
        state_dict=dict(payload["state_dict"]),
        spacing_mm=float(crops.get("base_spacing_mm", DEFAULT_SPACING_MM)),
        hu_window=(lo, hi),
    )


def embedder_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A 16-hex-digit SHA-256 of an embedder's tensors (names, shapes, dtypes, values): the same for its weights
    file (:attr:`WeightsFile.state_dict`) and for the model loaded from it (``model.state_dict()``).

    A network trained on an embedder's features records it (:mod:`regsam.register.net`), so that the features it
    reads at inference come from the same embedder even after the shipped default changes.
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
