"""Aggregate: one slot's verified replies (or its secure sum) in, the slot's mean out.

A shared slot's replies are validated and aggregated in one pass over their data
(:func:`~layerfed.federation.aggregate.validate_and_aggregate`): names, scope,
red-line parameters, size, dtypes, shapes, finiteness and the norm cap (a
layer under a clipping norm veto clips to the cap instead of refusing). Central
DP wraps that aggregation (:func:`~layerfed.federation.privacy.slot_aggregator`:
clip, aggregate, noise once). A secure-aggregation slot enters here with the
unmasked mean SecAgg+ produced; only that mean is judged (docs/privacy.md). A
slot with fewer than ``min_clients`` survivors is skipped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from layerfed.federation.aggregate import Reply
from layerfed.federation.events import AuditEvent, Count, Events, event, update_refused
from layerfed.federation.privacy import slot_aggregator
from layerfed.federation.round_context import RoundContext
from layerfed.federation.secure_sum import SecureSum
from layerfed.federation.validate import ReplyChecks, array_scope
from layerfed.governance.audit_events import AuditKind
from layerfed.governance.schema import NormCondition
from layerfed.layers.arrays import Arrays
from layerfed.layers.slots import SlotId

__all__ = [
    "Aggregated",
    "SlotReplies",
    "Unreached",
    "aggregate_secure",
    "aggregate_slot",
    "slot_checks",
    "unreached",
]


@dataclass(frozen=True)
class SlotReplies:
    """One shared slot's verified replies (by client id) and the most bytes one may carry."""

    slot: SlotId
    replies: tuple[Reply, ...]
    max_bytes: int


@dataclass(frozen=True)
class Aggregated:
    """A slot's mean (None: skipped), the replies in it, and what the stage produced."""

    slot: SlotId
    mean: Arrays | None
    used: tuple[str, ...]
    released: bool = False
    """A central-DP noisy mean was computed: one privacy release."""
    digests: Mapping[str, str] = field(default_factory=dict)
    """Secure slots only: instance id -> ack id of each contributor."""
    unreachable: tuple[int, ...] = ()
    """Secure slots only: nodes that failed during secure aggregation."""
    counts: tuple[Count, ...] = ()
    events: Events = ()


def slot_checks(ctx: RoundContext, slot: SlotId, max_bytes: int) -> ReplyChecks:
    """What every reply for ``slot`` is validated against."""
    layer = ctx.policy.layer(slot.layer)
    scoped, red = array_scope(layer, ctx.policy)
    clip = any(
        v.action == "clip" and isinstance(v.condition, NormCondition) and layer.name in v.applies_to
        for v in ctx.policy.vetoes
    )
    return ReplyChecks(
        expected={n: (s, np.float32) for n, s in ctx.stack.spec(slot).shapes().items()},
        in_scope=scoped,
        redline=red,
        norm_cap=layer.norm_cap,
        clip=clip,
        max_bytes=max_bytes,
    )


def aggregate_slot(ctx: RoundContext, given: SlotReplies) -> Aggregated:
    """Validate and aggregate a shared slot's replies (under central DP when its layer asks)."""
    slot, replies = given.slot, given.replies
    layer = ctx.policy.layer(slot.layer)
    checks = slot_checks(ctx, slot, given.max_bytes)
    run = slot_aggregator(layer, checks, round_=ctx.round, slot=slot, noise_seed=ctx.noise_seed)
    aggregation = run(replies)
    outcome = aggregation.outcome
    counts: list[Count] = []
    events: list[AuditEvent] = list(aggregation.events)
    for client, validation in outcome.validations.items():
        if validation.ok:
            assert validation.norm is not None  # an accepted reply's norm is measured
            counts.append(Count(slot.layer, "accepted"))
            counts.append(Count(slot.layer, "norms", norm=validation.norm))
            if validation.clipped:
                counts.append(Count(slot.layer, "mechanisms", key="norm_clipped", value=1.0))
                events.append(
                    event(
                        AuditKind.UPDATE_CLIPPED,
                        round=ctx.round,
                        instance=client,
                        slot=str(slot),
                        detail=validation.detail,
                    )
                )
        else:
            reason = validation.reason or "invalid"
            counts.append(Count(slot.layer, "refused", key=reason))
            events.append(
                update_refused(ctx.round, client, slot.layer, str(slot), reason, validation.detail)
            )
    if outcome.result is None:
        counts.append(Count(slot.layer, "slots_skipped"))
        events.append(
            event(
                AuditKind.SLOT_SKIPPED,
                round=ctx.round,
                slot=str(slot),
                survivors=len(replies) - len(outcome.refused),
                min_clients=layer.min_clients,
            )
        )
        return Aggregated(
            slot, None, (), aggregation.released, counts=tuple(counts), events=tuple(events)
        )
    result = outcome.result
    return Aggregated(
        slot,
        result.arrays,
        result.used,
        aggregation.released,
        counts=tuple(counts),
        events=tuple(events),
    )


def aggregate_secure(ctx: RoundContext, slot: SlotId, secure: SecureSum) -> Aggregated:
    """A secure-aggregation slot: its unmasked mean, or skipped with SecAgg+'s reason."""
    layer = ctx.policy.layer(slot.layer)
    counts = (
        Count(slot.layer, "sampled", n=secure.cohort),
        Count(slot.layer, "dropouts", n=secure.cohort - secure.survivors),
        Count(slot.layer, "accepted", n=len(secure.digests)),
    )
    unreachable = tuple(secure.unreachable)
    if secure.mean is None:
        skipped = event(
            AuditKind.SLOT_SKIPPED,
            round=ctx.round,
            slot=str(slot),
            survivors=secure.survivors,
            min_clients=layer.min_clients,
            reason=secure.reason[:300],
        )
        return Aggregated(
            slot,
            None,
            (),
            digests=dict(secure.digests),
            unreachable=unreachable,
            counts=(*counts, Count(slot.layer, "slots_skipped")),
            events=(skipped,),
        )
    return Aggregated(
        slot,
        secure.mean,
        tuple(sorted(secure.digests)),
        digests=dict(secure.digests),
        unreachable=unreachable,
        counts=counts,
    )


@dataclass(frozen=True)
class Unreached:
    """Shared slots that had tasks but no reply left to aggregate: each skipped."""

    slots: tuple[SlotId, ...]
    counts: tuple[Count, ...] = ()
    events: Events = ()


def unreached(ctx: RoundContext, reached: frozenset[SlotId]) -> Unreached:
    """Skip every shared slot that was tasked this round but reached no aggregation."""
    tasked = {t.slot for t in ctx.pending.values()}
    slots: list[SlotId] = []
    counts: list[Count] = []
    events: list[AuditEvent] = []
    for slot in sorted(tasked - reached):
        layer = ctx.policy.layer(slot.layer)
        if not layer.updates_leave_instance:
            continue
        slots.append(slot)
        counts.append(Count(slot.layer, "slots_skipped"))
        events.append(
            event(
                AuditKind.SLOT_SKIPPED,
                round=ctx.round,
                slot=str(slot),
                survivors=0,
                min_clients=layer.min_clients,
            )
        )
    return Unreached(tuple(slots), tuple(counts), tuple(events))
