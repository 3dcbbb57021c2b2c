"""The server's slot-update pipeline: one round's replies to committed, audited slots.

Read :func:`process_replies` top to bottom, like python-tuf's ``Updater.refresh()``:
each stage is a function of the read-only :class:`RoundContext` and a frozen
input, and returns a frozen result carrying the audit events and metric counts it
produced; the one :class:`~layerfed.federation.recorder.Recorder` writes the
events (inside one ``audit.batch()``), :class:`RoundTally` folds the counts.

    intake      replies -> verified updates by slot            (stages/intake.py)
    aggregate   validate + aggregate; central DP wraps it      (stages/aggregate.py)
    step        server_lr once; candidate = committed + step   (stages/step.py)
    judge       vetoes, then the red-line gate on the candidate (stages/judge.py)
    commit      state.commit(candidate)                        (stages/commit.py)
    checkpoint  ε, round end, signed checkpoint                (stages/checkpoint.py)

Each slot goes through aggregate, step, judge and commit before the next slot
starts (sorted slots, then secure-aggregation slots): a later slot's judge sees
the earlier slot's commit. Every refusal, clip, cap, veto and skip is an event;
none stops the round.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flwr.app import Message

from layerfed.federation.committed import CommittedArrays
from layerfed.federation.events import Events
from layerfed.federation.privacy_ledger import PrivacyLedger
from layerfed.federation.recorder import Recorder
from layerfed.federation.round_context import RoundContext, RoundReport
from layerfed.federation.round_metrics import RoundTally, round_metrics
from layerfed.federation.stages.aggregate import (
    Aggregated,
    SlotReplies,
    aggregate_secure,
    aggregate_slot,
    unreached,
)
from layerfed.federation.stages.checkpoint import CheckpointInput, close_round
from layerfed.federation.stages.commit import CommitInput, commit
from layerfed.federation.stages.intake import intake, payload_limit
from layerfed.federation.stages.judge import JudgeInput, judge
from layerfed.federation.stages.step import StepInput, take_step
from layerfed.layers.slots import SlotId

__all__ = ["RoundContext", "RoundReport", "checkpoint_round", "process_replies"]


def process_replies(
    ctx: RoundContext, replies: Sequence[Message], *, earlier: Events = ()
) -> RoundReport:
    """Turn one round's replies into committed slots, audited, with metrics.

    ``earlier``: events that happened before (secure aggregation's stages), recorded
    first. The round's audit records are written as one batch: fsynced together
    before this returns, and so before the round is checkpointed.
    """
    with ctx.audit.batch():
        recorder = Recorder(ctx.audit)
        recorder.record(earlier)
        report = RoundReport({}, {})
        tally = RoundTally()
        taken = recorder.take(intake(ctx, replies))
        tally.add(taken.counts)
        report.accepted.update(taken.accepted)
        report.digests.update(taken.digests)
        report.unreachable.extend(taken.unreachable)
        for slot, group in taken.groups.items():
            given = SlotReplies(slot, group, payload_limit(ctx, slot))
            _update_slot(ctx, recorder, tally, report, aggregate_slot(ctx, given))
        for slot, secure in sorted(ctx.secure.items()):
            _update_slot(ctx, recorder, tally, report, aggregate_secure(ctx, slot, secure))
        tally.add(recorder.take(unreached(ctx, frozenset(taken.groups))).counts)
        report.metrics = round_metrics(ctx, tally)
        report.summary = _summary(report)
        return report


def _update_slot(
    ctx: RoundContext,
    recorder: Recorder,
    tally: RoundTally,
    report: RoundReport,
    aggregated: Aggregated,
) -> None:
    """One slot after its aggregate: step, judge, commit."""
    agg = recorder.take(aggregated)
    tally.add(agg.counts)
    report.digests.update(agg.digests)
    report.unreachable.extend(agg.unreachable)
    if agg.released:
        report.released.append(str(agg.slot))
    if agg.mean is None:
        return
    slot = agg.slot
    committed = CommittedArrays(ctx.state, ctx.stack, ctx.round)
    current = committed(slot)
    step = take_step(StepInput(slot, agg.mean, current, ctx.policy.layer(slot.layer).server_lr))
    approvals = ctx.state.approvals.gather(
        ctx.policy, ctx.run_id, recorder.lend(), ctx.round, slot, step.step
    )
    if ctx.keep is not None:  # keep_candidates: what the judge weighs, for replay
        recorder.take(ctx.keep.keep(ctx, slot, agg.mean, approvals))
    verdict = recorder.take(
        judge(
            ctx,
            JudgeInput(
                slot,
                step.step,
                current,
                step.candidate,
                frozenset(approvals),
                committed,
                step.error,
            ),
        )
    )
    tally.add(verdict.counts)
    if not verdict.commit or verdict.candidate is None:
        return
    done = recorder.take(commit(ctx, CommitInput(slot, verdict.candidate, verdict.step, agg.used)))
    tally.add(done.counts)
    report.committed.append(str(slot))
    for client in agg.used:
        report.accepted[client] = report.digests[client]


def _summary(report: RoundReport) -> dict[str, float]:
    layers: dict[str, Any] = report.metrics["layers"]
    return {
        "accepted": float(sum(s["accepted"] for s in layers.values())),
        "refused": float(sum(sum(s["refused"].values()) for s in layers.values())),
        "slots_committed": float(len(report.committed)),
    }


def checkpoint_round(
    ctx: RoundContext,
    report: RoundReport,
    ledger: PrivacyLedger,
    sent: Sequence[SlotId],
    wall_s: float,
) -> dict[str, Any]:
    """Close the round: ε spent and ``round_end`` recorded, then the signed checkpoint.

    Returns the round's final metrics (what ``metrics.json`` holds for it).
    """
    privacy = ledger.finish_round(ctx.round, report.released, sent)
    closing = close_round(
        CheckpointInput(ctx.round, report.metrics, tuple(report.committed), privacy, wall_s)
    )
    Recorder(ctx.audit).take(closing)
    ctx.state.checkpoint(ctx.round, ctx.audit.head, closing.metrics)
    return closing.metrics
