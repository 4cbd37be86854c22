"""The torch device a command runs on: one parser for every module that takes ``--device``."""

from __future__ import annotations

import torch

from regsam.errors import InputError

DeviceLike = str | torch.device | None


def resolve_device(device: DeviceLike = None) -> torch.device:
    """``'cpu'``, ``'cuda'``, ``'cuda:N'`` or a ``torch.device`` -> ``torch.device``; ``None``: CUDA if there, else CPU.

    Raises:
        InputError: an unparseable name, a device type other than CPU/CUDA, or CUDA asked for but absent.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"unknown device '{device}' ({exc})") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"device must be 'cpu' or 'cuda', got '{device}'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device '{device}' requested but CUDA is not available on this machine (use --device cpu)")
    return dev


__all__ = ["DeviceLike", "resolve_device"]
