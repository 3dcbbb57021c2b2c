"""How a reply reports which training mechanisms acted, per layer, as numbers only.

A reply's MetricRecord ``lf.metrics`` carries, besides its own metrics, one entry
``lf.mech.<layer>.<counter>`` per layer the instance trained this round (the task's slot
and every instance-only slot it trained and committed itself) and per counter of
:data:`COUNTERS`. Only counts and one norm ratio travel: never arrays or text, so an
instance-only layer's content stays on the instance. The values are the instance's own
report (they steer no decision of the server; they are recorded in the round's metrics).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

__all__ = ["COUNTERS", "PREFIX", "decode", "encode"]

PREFIX = "lf.mech."
"""Key prefix of the mechanism entries in a reply's MetricRecord."""

COUNTERS = (
    "trainings",
    "superego_steps",
    "superego_interventions",
    "clipped_local",
    "protected",
    "protection_removed",
)
"""Per trained slot: ``trainings`` 1; optimizer steps the superego joined; steps it
intervened on; 1 when the local norm cap clipped the delta; 1 when the slot's A is projected
off the red-line activations; and then the share of the update's effective change the
projection removed, ``||ΔB A₀ P||_F / ||ΔB A₀||_F`` (0 when unprotected or ΔB is zero)."""


def encode(per_layer: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """``{layer: {counter: value}}`` as flat MetricRecord entries (unknown counters refused)."""
    out: dict[str, float] = {}
    for layer, counts in per_layer.items():
        for name, value in counts.items():
            if name not in COUNTERS:
                raise ValueError(f"mechanism counter: expected one of {COUNTERS}, got {name!r}")
            out[f"{PREFIX}{layer}.{name}"] = float(value)
    return out


def decode(record: Mapping[str, Any], layers: Collection[str]) -> dict[str, dict[str, float]]:
    """The entries of ``record`` for ``layers`` as ``{layer: {counter: value}}``.

    Entries naming another layer or counter, or holding a value that is not a finite
    non-negative number, are left out (a reply cannot add to a layer it did not train
    under another name, nor add a negative count).
    """
    out: dict[str, dict[str, float]] = {}
    for key, value in record.items():
        if not key.startswith(PREFIX) or isinstance(value, list | bool):
            continue
        layer, _, name = key[len(PREFIX) :].rpartition(".")
        if layer not in layers or name not in COUNTERS:
            continue
        number = float(value)
        if not (number >= 0.0 and number != float("inf")):
            continue
        out.setdefault(layer, {})[name] = number
    return out
