"""Small helpers below every layer: JSON encoding of numpy values, and the last line of an error message."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def json_default(value):
    """``json.dumps(..., default=json_default)``: numpy scalars and arrays, paths, sets and tuples."""
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def last_line(message: object, default: str = "", limit: int | None = None) -> str:
    """The last non-blank line of ``message`` (text or an exception), stripped; ``default`` when there is none.

    Tools (ITK, elastix, pip, a child ``regsam``) end their error output with the line that says what went
    wrong; this keeps that line for a one-line error. ``limit`` cuts it to that many characters.
    """
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    line = lines[-1] if lines else default
    return line[:limit] if limit is not None else line
