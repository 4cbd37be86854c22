"""Training objectives behind one interface.

An objective is a class constructed from its config section (keyword arguments) and called as
``objective(model, batch) -> dict`` with at least ``loss`` (scalar tensor with gradient) and the
float components it wants logged (SAM: ``fine`` and ``coarse``). ``batch`` is what
:class:`regsam.embed.crops.TwoViewSampler` returns. Besides ``__call__`` an objective offers
``part_grids(view_size)`` (the sub-crop grids its sampler must draw), ``input_groups(batch)`` (what to
embed) and ``compute(outputs, batch)`` (the loss from the embedded groups), so that
:class:`CombinedObjective` can embed once and sum several objectives.

Config section (``objective`` in a training config; :func:`objective_config` fills the defaults):

* one objective: ``{name: sam|ace|adam, <its constants>}``;
* several: ``{name: [sam, ace], weights: {sam: 1.0, ace: 0.5}, sam: {...}, ace: {...}}`` (weights may also
  be a list in ``name`` order; default 1 each): ``loss = sum_i weight_i * loss_i``.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Protocol

import torch

from regsam.embed.objectives.ace import ACELossConfig, ACEObjective
from regsam.embed.objectives.adam import AdamLossConfig, AdamObjective
from regsam.embed.objectives.base import embed_groups
from regsam.embed.objectives.sam import SAMLossConfig, SAMObjective
from regsam.errors import InputError


class Objective(Protocol):
    """What the training loop needs from an objective."""

    #: names of the float components returned besides ``loss`` (logged as CSV columns)
    components: tuple[str, ...]

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


#: objective name (config key ``objective.name``) -> class
OBJECTIVES: dict[str, type] = {"sam": SAMObjective, "ace": ACEObjective, "adam": AdamObjective}
#: objective name -> its constants (dataclass with the defaults)
LOSS_CONFIGS: dict[str, type] = {"sam": SAMLossConfig, "ace": ACELossConfig, "adam": AdamLossConfig}


def _defaults(name: str) -> dict:
    values = asdict(LOSS_CONFIGS[name]())
    values.pop("seed", None)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or name not in OBJECTIVES:
        raise InputError(f"config: unknown objective '{name}' (known: {', '.join(OBJECTIVES)})")
    return name


def objective_config(section: dict) -> dict:
    """The full ``objective`` section: defaults filled in, names, keys and weights checked.

    Raises:
        InputError: unknown objective or key, repeated name, bad weights.
    """
    section = dict(section or {})
    name = section.pop("name", "sam")
    if not isinstance(name, (list, tuple)):
        out = {"name": _check_name(name), **_defaults(name), **section}
        OBJECTIVES[name](**out)  # validates the keys
        return out
    names = [_check_name(n) for n in name]
    if not names or len(set(names)) != len(names):
        raise InputError(f"config: objective.name must list distinct objectives, got {list(name)}")
    weights = section.pop("weights", None)
    if weights is None:
        weights = {n: 1.0 for n in names}
    elif isinstance(weights, (list, tuple)):
        if len(weights) != len(names):
            raise InputError(f"config: objective.weights needs {len(names)} values, got {list(weights)}")
        weights = dict(zip(names, weights))
    if not isinstance(weights, dict) or set(weights) != set(names):
        raise InputError(f"config: objective.weights must give a weight to each of {names}, got {weights}")
    if any(float(w) < 0 for w in weights.values()):
        raise InputError(f"config: objective.weights must be >= 0, got {weights}")
    extra = set(section) - set(names)
    if extra:
        raise InputError(f"config: unknown key(s) {sorted(extra)} in a combined objective (known: name, weights, {', '.join(names)})")
    out: dict = {"name": names, "weights": {n: float(weights[n]) for n in names}}
    for n in names:
        out[n] = objective_config({**(section.get(n) or {}), "name": n})
        out[n].pop("name")
    return out


class CombinedObjective:
    """A weighted sum of objectives that share one embedding pass (see the module docstring).

    Components: each member's (unweighted) loss under its name, then its components as ``name.component``.
    """

    def __init__(self, name: list[str], weights: dict[str, float], seed: int = 0, **sections: dict) -> None:
        self.names = list(name)
        self.weights = {n: float(weights[n]) for n in self.names}
        self.members = {n: OBJECTIVES[n](**{**sections.get(n, {}), "seed": int(seed) + 7 * i}) for i, n in enumerate(self.names)}
        self.components = tuple(self.names) + tuple(f"{n}.{c}" for n in self.names for c in self.members[n].components)

    def state_dict(self) -> dict:
        return {n: m.state_dict() for n, m in self.members.items()}

    def load_state_dict(self, state: dict) -> None:
        for n, m in self.members.items():
            m.load_state_dict(state[n])

    def reseed(self, seed: int) -> None:
        for i, m in enumerate(self.members.values()):
            m.reseed(int(seed) + 7 * i)

    def part_grids(self, view_size) -> list[tuple[int, int, int]]:
        grids: list[tuple[int, int, int]] = []
        for m in self.members.values():
            grids += [tuple(g) for g in m.part_grids(view_size) if tuple(g) not in grids]
        return grids

    def input_groups(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        groups: dict[str, torch.Tensor] = {}
        for m in self.members.values():
            groups.update(m.input_groups(batch))
        return groups

    def compute(self, outputs: dict, batch: dict[str, torch.Tensor]) -> dict:
        out: dict[str, Any] = {}
        loss = None
        for n, m in self.members.items():
            result = m.compute(outputs, batch)
            term = self.weights[n] * result["loss"]
            loss = term if loss is None else loss + term
            out[n] = float(result["loss"].detach())
            out.update({f"{n}.{c}": result[c] for c in m.components})
        out["loss"] = loss
        return out

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict:
        return self.compute(embed_groups(model, self.input_groups(batch)), batch)


def build_objective(section: dict, seed: int) -> Any:
    """The objective of a (complete, :func:`objective_config`) ``objective`` section, seeded with ``seed``."""
    name = section["name"]
    if isinstance(name, (list, tuple)):
        return CombinedObjective(**{k: v for k, v in section.items()}, seed=seed)
    return OBJECTIVES[name](**{**section, "seed": seed})


__all__ = ["OBJECTIVES", "LOSS_CONFIGS", "ACEObjective", "AdamObjective", "CombinedObjective", "Objective",
           "SAMObjective", "build_objective", "objective_config"]
