"""Step: a slot's mean in, the step the server would take and the arrays it would commit out.

The layer's server learning rate is applied here, once, by
:func:`~layerfed.layers.arrays.server_step` (the one function that applies it,
on the server and the instance alike); the candidate, the committed arrays plus
that step (:func:`~layerfed.layers.arrays.apply_step`), is computed here once and
handed to the judge and the commit. A step that cannot be applied (not finite)
leaves the candidate None with the reason; the judge raises it if it would commit.
"""

from __future__ import annotations

from dataclasses import dataclass

from layerfed.layers.arrays import Arrays, apply_step, server_step
from layerfed.layers.errors import ArrayError
from layerfed.layers.slots import SlotId

__all__ = ["Step", "StepInput", "take_step"]


@dataclass(frozen=True)
class StepInput:
    """A slot's aggregated mean, its committed arrays, and its layer's server rate."""

    slot: SlotId
    mean: Arrays
    current: Arrays
    server_lr: float


@dataclass(frozen=True)
class Step:
    """``step = server_lr * mean`` and ``candidate = current + step`` (None: ``error`` says why)."""

    slot: SlotId
    step: Arrays
    current: Arrays
    candidate: Arrays | None
    error: ArrayError | None = None


def take_step(given: StepInput) -> Step:
    """The server step of ``given.mean`` and the candidate it leads to."""
    step = server_step(given.mean, given.server_lr)
    try:
        candidate: Arrays | None = apply_step(given.current, step)
    except ArrayError as e:  # e.g. a float32 overflow; the vetoes may still reject it
        return Step(given.slot, step, given.current, None, e)
    return Step(given.slot, step, given.current, candidate)
