"""Commit: a judged candidate in, the slot's new version out (the only stage that writes state)."""

from __future__ import annotations

from dataclasses import dataclass

from layerfed.federation.events import Count, Events, event
from layerfed.federation.round_context import RoundContext
from layerfed.governance.audit_events import AuditKind
from layerfed.layers.arrays import Arrays, global_norm
from layerfed.layers.slots import SlotId

__all__ = ["Commit", "CommitInput", "commit"]


@dataclass(frozen=True)
class CommitInput:
    """The candidate to write, the step that led to it, and whose replies are in it."""

    slot: SlotId
    candidate: Arrays
    step: Arrays
    used: tuple[str, ...]


@dataclass(frozen=True)
class Commit:
    """The slot's new version."""

    slot: SlotId
    version: int
    counts: tuple[Count, ...] = ()
    events: Events = ()


def commit(ctx: RoundContext, given: CommitInput) -> Commit:
    """Write ``given.candidate`` as the slot's next version (``state.commit``)."""
    slot = given.slot
    layer = ctx.policy.layer(slot.layer)
    version = ctx.state.commit(slot, given.candidate, ctx.stack.spec(slot), ctx.round)
    done = event(
        AuditKind.COMMIT,
        round=ctx.round,
        slot=str(slot),
        version=version,
        aggregator=layer.aggregator.kind,
        replies=len(given.used),
        norm=global_norm(given.step),
    )
    return Commit(slot, version, (Count(slot.layer, "slots_committed"),), (done,))
