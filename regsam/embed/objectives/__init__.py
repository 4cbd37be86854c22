"""Training objectives behind one interface.

An objective is a class constructed from its config section (keyword arguments) and called as
``objective(model, batch) -> dict`` with at least ``loss`` (scalar tensor with gradient) and the
float components it wants logged (SAM: ``fine`` and ``coarse``). ``batch`` is what
:class:`regsam.embed.crops.TwoViewSampler` returns. New objectives (e.g. ACE, Adam) register here.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from regsam.embed.objectives.sam import SAMObjective


class Objective(Protocol):
    """What the training loop needs from an objective."""

    #: names of the float components returned besides ``loss`` (logged as CSV columns)
    components: tuple[str, ...]

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


#: objective name (config key ``objective.name``) -> class
OBJECTIVES: dict[str, type] = {"sam": SAMObjective}

__all__ = ["OBJECTIVES", "Objective", "SAMObjective"]
