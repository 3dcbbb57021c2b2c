"""An instance's own slots on its own disk: the slots whose updates never leave it.

A layer with ``updates_leave_instance: false`` (the individual layer by default)
is never aggregated: the instance itself takes the server's step for it, with the
very functions the server's pipeline uses (:func:`~layerfed.layers.arrays.server_step`
then :func:`~layerfed.layers.arrays.apply_step`), and commits the result to its
:class:`~layerfed.layers.instance_disk.InstanceDisk`. Before a round the newest
commit from an earlier round is read back and each memory decays by the rounds
(or the wall-clock time) since. :class:`LocalSlots` does that maths and that I/O;
the :class:`~layerfed.clients.instance.Instance` decides when, and settles its
journal around it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from layerfed.clients.events import FieldError
from layerfed.governance.schema import Policy
from layerfed.layers.arrays import Arrays, ArraysIn, apply_step, server_step
from layerfed.layers.instance_disk import InstanceDisk
from layerfed.layers.memory import decay_arrays, seconds_between
from layerfed.layers.slots import SlotId

__all__ = ["LocalSlots"]


class LocalSlots:
    """Load, step and commit an instance's instance-only slots on its disk.

    ``zeros`` gives a slot's arrays before its first commit (all B zero).
    ``clock`` is the wall clock duration half-lives are measured with.
    """

    def __init__(
        self,
        policy: Policy,
        disk: InstanceDisk,
        zeros: Callable[[SlotId], Arrays],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy
        self.disk = disk
        self._zeros = zeros
        self._clock = clock

    def owns(self, slot: SlotId) -> bool:
        """Whether ``slot``'s updates stay on the instance (committed here, never sent)."""
        return not self.policy.layer(slot.layer).updates_leave_instance

    def saved_rounds(self) -> set[int]:
        """Rounds with a commit on disk."""
        return set(self.disk.rounds())

    def load(self, slot: SlotId, round_: int) -> Arrays:
        """``slot``'s arrays for round ``round_``: the newest earlier commit, decayed since.

        Each memory fades by the rounds since that commit, or by the seconds since it
        when its half-life is a duration; zeros when nothing of the slot was committed.
        """
        saved = self.disk.load_before(round_)
        if saved is None:
            return self._zeros(slot)
        saved_round, arrays = saved
        own = {k: v for k, v in arrays.items() if k.startswith(f"{slot}/")}
        if not own:
            return self._zeros(slot)
        layer = self.policy.layer(slot.layer)
        timed = any(m.half_life_seconds is not None for m in layer.memories)
        seconds = seconds_between(self.disk.saved_at(saved_round), self._clock()) if timed else 0.0
        return decay_arrays(own, layer, rounds=round_ - saved_round, seconds=seconds)

    def commit(
        self, round_: int, current: Mapping[SlotId, ArraysIn], slot: SlotId, delta: ArraysIn
    ) -> Arrays:
        """Step ``slot`` by its layer's ``server_lr`` along ``delta`` and commit every own slot.

        ``current`` holds the round's arrays of the instance's slots (others are
        ignored); the stepped arrays of ``slot`` are returned. The step is
        :func:`server_step` (the one place a server rate is applied) and
        :func:`apply_step`, as on the server.
        """
        if not self.owns(slot):
            expected = "a slot of a layer whose updates stay on the instance"
            raise FieldError("slot", expected, str(slot))
        layer = self.policy.layer(slot.layer)
        own = {s: dict(a) for s, a in current.items() if self.owns(s)}
        own[slot] = apply_step(current[slot], server_step(delta, layer.server_lr))
        self.disk.save(round_, {k: v for arrays in own.values() for k, v in arrays.items()})
        return own[slot]
