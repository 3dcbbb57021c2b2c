"""Judge: a slot's step and candidate in, commit-or-not out: vetoes, then the red-line gate.

The vetoes of higher layers (:func:`~layerfed.federation.vetoes.check_slot`) run
on the step, with the approvals the pipeline gathered for it; a clip they order
rewrites the step, and only then is the candidate recomputed from the clipped
step. The red-line gate (:func:`~layerfed.federation.redline_gate.redline_breach`)
measures the candidate it is handed, composed with the committed slots it is
handed (each read once, :class:`~layerfed.federation.committed.CommittedArrays`);
it never recomputes the commit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from layerfed.federation.events import AuditEvent, Count, Events, event
from layerfed.federation.redline_gate import redline_breach
from layerfed.federation.round_context import RoundContext
from layerfed.federation.validate import array_scope
from layerfed.federation.vetoes import check_slot
from layerfed.governance.audit_events import AuditKind
from layerfed.layers.arrays import Arrays, apply_step
from layerfed.layers.errors import ArrayError
from layerfed.layers.slots import SlotId

__all__ = ["JudgeInput", "Verdict", "judge"]


@dataclass(frozen=True)
class JudgeInput:
    """What the judge weighs: the step, the candidate it leads to, approvals, committed reads."""

    slot: SlotId
    step: Arrays
    current: Arrays
    candidate: Arrays | None
    """``current + step`` from the step stage (None: ``error``)."""
    approvals: frozenset[str]
    committed: Callable[[SlotId], Arrays]
    error: ArrayError | None = None


@dataclass(frozen=True)
class Verdict:
    """Whether to commit; the step after any clips and the candidate to commit."""

    slot: SlotId
    commit: bool
    step: Arrays
    candidate: Arrays | None
    counts: tuple[Count, ...] = ()
    events: Events = ()


def judge(ctx: RoundContext, given: JudgeInput) -> Verdict:
    """Run the vetoes on ``given.step``, then the red-line gate on the candidate."""
    slot = given.slot
    layer = ctx.policy.layer(slot.layer)
    scoped, _ = array_scope(layer, ctx.policy)
    globals_ = [SlotId(g.name, "global") for g in ctx.policy.layers if g.slot_key == "global"]
    decision = check_slot(
        ctx.policy,
        layer.name,
        given.step,
        in_scope=lambda layer_name, name: scoped(name),
        probe=ctx.probes.for_slot(slot, given.committed, globals_, ctx.composition_key),
        approvals=set(given.approvals),
    )
    counts: list[Count] = []
    events: list[AuditEvent] = []
    for hit in decision.hits:
        counts.append(Count(slot.layer, "vetoes", key=f"{hit.veto_name}:{hit.action}"))
        events.append(
            event(
                AuditKind.VETO,
                round=ctx.round,
                slot=str(slot),
                veto=hit.veto_name,
                holder=hit.holder,
                action=hit.action,
                reason=hit.reason[:300],
            )
        )
    if not decision.commit:
        counts.append(Count(slot.layer, "slots_skipped"))
        return Verdict(slot, False, decision.arrays, None, tuple(counts), tuple(events))
    candidate = given.candidate
    if any(h.action == "clip" for h in decision.hits):  # the step was rewritten
        candidate = apply_step(given.current, decision.arrays)
    elif candidate is None:
        assert given.error is not None
        raise given.error
    breach = redline_breach(ctx, slot, candidate, given.committed)
    if breach is not None:
        counts.append(Count(slot.layer, "vetoes", key="red_line:reject"))
        counts.append(Count(slot.layer, "slots_skipped"))
        events.append(
            event(
                AuditKind.RED_LINE_BREACH,
                round=ctx.round,
                slot=str(slot),
                composition=list(breach.composition),
                suite=breach.suite,
                rate=breach.rate,
                committed_rate=breach.committed_rate,
                max_violation_rate=breach.max_rate,
            )
        )
        return Verdict(slot, False, decision.arrays, None, tuple(counts), tuple(events))
    return Verdict(slot, True, decision.arrays, candidate, tuple(counts), tuple(events))
