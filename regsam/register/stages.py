"""The shared contract of multi-stage registration methods: a :class:`Stage` runs on a state, :func:`timed` clocks it.

A method (``sam``, ``sam+elastix``, ``elastix``) keeps one state object per registration (its inputs, settings,
and what each stage adds), runs its stages in their fixed order with ``with timed(timings, stage.name):``, and
builds its :class:`~regsam.register.result.RegistrationResult` from the state. Each stage is usable alone on a
state that holds what it reads.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol


@contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall time (s) of the ``with`` block to ``timings[name]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


class Stage(Protocol):
    """One step of a registration method: reads and extends the method's state."""

    name: str

    def run(self, state: Any) -> None: ...
