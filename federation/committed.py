"""Committed slot arrays as one slot update's judgement sees them: each read (and decayed) once."""

from __future__ import annotations

from layerfed.federation.server_state import ServerState
from layerfed.layers.arrays import Arrays
from layerfed.layers.slots import SlotId
from layerfed.layers.stack import LayerStack

__all__ = ["CommittedArrays"]


class CommittedArrays:
    """``committed(slot)``: the slot's committed arrays as of ``round_``, read on first use only.

    One is made per slot update, before its step: the judge's veto probes and the
    red-line gate share it, so no slot is read twice and none after a commit.
    """

    def __init__(self, state: ServerState, stack: LayerStack, round_: int) -> None:
        self._state, self._stack, self._round = state, stack, round_
        self._read: dict[SlotId, Arrays] = {}

    def __call__(self, slot: SlotId) -> Arrays:
        """The committed arrays of ``slot`` (the same object every call)."""
        if slot not in self._read:
            self._read[slot] = self._state.current(slot, self._stack.spec(slot), self._round)
        return self._read[slot]
