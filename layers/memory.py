"""Pure array maths for memories: decay and the server's update step.

Decay multiplies a memory's B by ``2 ** (-elapsed / half_life)``, in rounds or
in seconds according to how the policy gives the half-life: callers pass both
the rounds and the wall-clock seconds elapsed since the slot was committed, and
each memory uses the one its half-life is written in. The factor lies in
``(0, 1]``, so a float32 product never grows in magnitude nor changes sign: a
decayed component tends to zero and never overshoots it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from layerfed.governance.schema import LayerPolicy, Memory, Policy
from layerfed.layers.aliases import Aliases
from layerfed.layers.arrays import apply_step, server_step
from layerfed.layers.errors import ArrayError, DecayError
from layerfed.layers.redlines import check_update_names
from layerfed.layers.slots import parse_array_name

__all__ = ["apply_update", "decay_arrays", "decay_factor", "seconds_between"]


def _elapsed(value: float, what: str) -> float:
    if not math.isfinite(value) or value < 0:
        raise DecayError(f"decay {what}: expected a finite number >= 0, got {value!r}")
    return float(value)


def seconds_between(start: float | None, end: float) -> float:
    """Wall-clock seconds from ``start`` to ``end`` (POSIX times), for duration half-lives.

    ``None`` (a commit recorded before times were kept) and a clock that went
    backwards both give 0: no time-based decay rather than growth.
    """
    if start is None:
        return 0.0
    if not (math.isfinite(start) and math.isfinite(end)):
        raise DecayError(f"decay times: expected finite POSIX times, got {start!r} -> {end!r}")
    return max(0.0, float(end) - float(start))


def decay_factor(memory: Memory, *, rounds: float = 0, seconds: float = 0.0) -> float:
    """The factor in ``(0, 1]`` a memory's B is multiplied by after the elapsed time.

    A half-life in rounds uses ``rounds``, one given as a duration uses ``seconds``;
    a memory without a half-life never decays.
    """
    r, s = _elapsed(rounds, "rounds"), _elapsed(seconds, "seconds")
    if memory.half_life_rounds is not None:
        return float(2.0 ** (-r / memory.half_life_rounds))
    if memory.half_life_seconds is not None:
        return float(2.0 ** (-s / memory.half_life_seconds))
    return 1.0


def decay_arrays(
    arrays: Mapping[str, np.ndarray],
    layer: LayerPolicy,
    *,
    rounds: float = 0,
    seconds: float = 0.0,
) -> dict[str, np.ndarray]:
    """New arrays with each memory's B decayed by its own half-life; inputs untouched.

    ``rounds`` drives memories whose half-life is a number of rounds, ``seconds``
    (wall-clock time since the commit) those whose half-life is a duration such as
    ``"6h"``; the default 0 means no decay of that kind. Non-finite values raise
    :class:`ArrayError` before any array is decayed.
    """
    memories = {m.name: m for m in layer.memories}
    factors = {
        name: decay_factor(m, rounds=rounds, seconds=seconds) for name, m in memories.items()
    }
    out: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        parsed = parse_array_name(name)
        if parsed.slot.layer != layer.name or parsed.memory not in memories:
            raise ArrayError(
                f"decay of layer {layer.name!r}: array {name!r}: expected memory in "
                f"{sorted(memories)} of that layer, got layer {parsed.slot.layer!r}, "
                f"memory {parsed.memory!r}"
            )
        if not np.all(np.isfinite(value)):
            raise ArrayError(f"decay: array {name!r}: expected finite values, got NaN or inf")
    for name, value in arrays.items():
        arr = np.asarray(value)
        out[name] = arr * arr.dtype.type(factors[parse_array_name(name).memory])
    return out


def apply_update(
    current: Mapping[str, np.ndarray],
    aggregated_delta: Mapping[str, np.ndarray],
    server_lr: float,
    *,
    policy: Policy | None = None,
    aliases: Aliases | None = None,
) -> dict[str, np.ndarray]:
    """``current + server_lr * aggregated_delta`` as new arrays; inputs untouched.

    The delta may cover a subset of ``current``'s arrays; every name it carries
    must exist in ``current`` with the same shape, and both sides must be finite
    (:class:`ArrayError` otherwise, before any sum). With ``policy``, names are also
    checked against the layer's scope, memories and red lines, resolved over the
    base model's tied parameters when ``aliases`` is given.
    """
    if policy is not None:
        check_update_names(policy, aggregated_delta, aliases=aliases)
    return apply_step(current, server_step(aggregated_delta, server_lr))
