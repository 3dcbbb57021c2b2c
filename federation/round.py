"""One round's replies, from messages to committed slots, with every refusal audited.

Order per reply: is it a reply to a task we sent; did the client fail (dropout);
is its payload within the slot's size; can it be decoded; does its envelope
match the task; does the envelope verify (signature, principal, run, round,
replay, digest). A task with no reply at all is a dropout too. A claimed number
of examples above the layer's local budget (``steps * batch_size``) is capped
there, so no reply outweighs a full honest one. Then per slot: validate and
aggregate (:func:`validate_and_aggregate`), scale by the server rate, run the
vetoes, commit. A slot with tasks but too few surviving replies is skipped.
Every refusal, clip, cap and skip is audited; none stops the round.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Any

import numpy as np
from flwr.app import Message

from layerfed.errors import LayerfedError
from layerfed.federation.aggregate import Reply
from layerfed.federation.privacy import slot_outcome
from layerfed.federation.probes import ProbeRunner
from layerfed.federation.redline_gate import redline_breach
from layerfed.federation.round_context import RoundContext, RoundReport
from layerfed.federation.round_metrics import finish_metrics, layer_metrics
from layerfed.federation.secure_sum import SecureSum
from layerfed.federation.validate import ReplyChecks
from layerfed.federation.vetoes import check_slot
from layerfed.governance.audit_events import AuditKind
from layerfed.governance.envelope import ReplayGuard, check_update, envelope_from_dict
from layerfed.governance.patterns import in_scope, matches_any
from layerfed.governance.schema import LayerPolicy, NormCondition, Policy
from layerfed.layers.arrays import apply_step, global_norm, server_step
from layerfed.layers.slots import SlotId, parse_array_name
from layerfed.wire.protocol import ENVELOPE, METRICS, NO_FEEDBACK, UPDATE, Task, arrays_from_record

__all__ = ["RoundContext", "RoundReport", "process_replies"]  # context types re-exported

log = logging.getLogger("layerfed")
MAX_REPLY_BYTES = 64 * 1024 * 1024
"""Most bytes any reply's update may carry."""
PAYLOAD_SLACK = 64 * 1024
"""Bytes allowed beyond twice a slot's float32 arrays (``.npy`` headers, wrong dtypes)."""


def _array_scope(layer: LayerPolicy, policy: Policy) -> tuple[Any, Any]:
    def scoped(name: str) -> bool:
        try:
            parameter = parse_array_name(name).parameter
        except LayerfedError:
            return False
        return in_scope(parameter, layer.scope.include, layer.scope.exclude)

    def red(name: str) -> bool:
        try:
            parameter = parse_array_name(name).parameter
        except LayerfedError:
            return False
        return matches_any(parameter, policy.red_lines.parameters)

    return scoped, red


def _refuse(ctx: RoundContext, stats: dict[str, Any], task: Task, reason: str, detail: str) -> None:
    stats["refused"][reason] += 1
    ctx.audit.append(
        AuditKind.UPDATE_REFUSED,
        round=ctx.round,
        instance=task.instance_id,
        layer=task.layer,
        slot=str(task.slot),
        reason=reason,
        detail=detail[:500],
    )


def _payload_limit(ctx: RoundContext, slot: SlotId) -> int:
    """Most update bytes a reply for ``slot`` may carry (decided before decoding)."""
    if not ctx.policy.layer(slot.layer).updates_leave_instance:
        return PAYLOAD_SLACK
    arrays = sum(4 * math.prod(s) for s in ctx.stack.spec(slot).shapes().values())
    return min(MAX_REPLY_BYTES, 2 * arrays + PAYLOAD_SLACK)


def _weight(ctx: RoundContext, task: Task, claimed: int) -> float:
    """The claimed number of examples, capped at the layer's local budget (audited)."""
    local = ctx.policy.layer(task.layer).local
    cap = local.steps * local.batch_size
    if claimed <= cap:
        return float(claimed)
    ctx.audit.append(
        AuditKind.WEIGHT_CAPPED,
        round=ctx.round,
        instance=task.instance_id,
        slot=str(task.slot),
        claimed=claimed,
        cap=cap,
    )
    return float(cap)


def _missing(
    ctx: RoundContext,
    replies: list[Message],
    by_layer: dict[str, dict[str, Any]],
    report: RoundReport,
) -> None:
    """Count and audit the tasks that got no reply at all (time-outs, lost nodes)."""
    answered = {reply.metadata.src_node_id for reply in replies}
    for node, task in sorted(ctx.pending.items()):
        if node in answered:
            continue
        by_layer[task.layer]["dropouts"] += 1
        report.unreachable.append(node)
        ctx.audit.append(
            AuditKind.UPDATE_MISSING,
            round=ctx.round,
            instance=task.instance_id,
            layer=task.layer,
            node=str(node),
        )


def _decode(ctx: RoundContext, reply: Message, task: Task) -> tuple[Any, Any] | str:
    """The envelope and arrays of a reply, or why they cannot be had."""
    try:
        record = reply.content.array_records[UPDATE]
        size = sum(len(array.data) for array in record.values())
        limit = _payload_limit(ctx, task.slot)
        if size > limit:
            return f"oversized:{UPDATE}: expected at most {limit} bytes, got {size}"
        envelope = envelope_from_dict(dict(reply.content.config_records[ENVELOPE]))
        arrays = arrays_from_record(record, where=UPDATE)
    except (KeyError, TypeError, LayerfedError) as e:
        return f"malformed:{e}"
    return envelope, arrays


def _no_feedback(reply: Message) -> bool:
    """A reply that says the instance had nothing to train on (no envelope, no update)."""
    content = reply.content
    if ENVELOPE in content.config_records or METRICS not in content.metric_records:
        return False
    return bool(content.metric_records[METRICS].get(NO_FEEDBACK, 0.0))


def _collect(
    ctx: RoundContext,
    replies: list[Message],
    by_layer: dict[str, dict[str, Any]],
    report: RoundReport,
) -> dict[SlotId, list[Reply]]:
    groups: dict[SlotId, list[Reply]] = defaultdict(list)
    guard = ReplayGuard()
    for task in ctx.pending.values():
        by_layer[task.layer]["sampled"] += 1
    _missing(ctx, replies, by_layer, report)
    for reply in replies:
        node = reply.metadata.src_node_id
        pending = ctx.pending.get(node)
        if pending is None:
            ctx.audit.append(AuditKind.REPLY_UNEXPECTED, round=ctx.round, node=str(node))
            continue
        task = pending
        stats = by_layer[task.layer]
        if reply.has_error():
            stats["dropouts"] += 1
            report.unreachable.append(node)
            ctx.audit.append(
                AuditKind.UPDATE_DROPPED,
                round=ctx.round,
                instance=task.instance_id,
                layer=task.layer,
                error=str(reply.error.reason)[:300],
            )
            continue
        if _no_feedback(reply):
            stats["no_feedback"] += 1
            ctx.audit.append(
                AuditKind.NO_FEEDBACK, round=ctx.round, instance=task.instance_id, layer=task.layer
            )
            continue
        decoded = _decode(ctx, reply, task)
        if isinstance(decoded, str):
            reason, _, detail = decoded.partition(":")
            _refuse(ctx, stats, task, reason, detail)
            continue
        envelope, arrays = decoded
        claim = (envelope.layer, envelope.slot_key, envelope.instance_id)
        if claim != (task.layer, task.slot.key, task.instance_id):
            _refuse(
                ctx,
                stats,
                task,
                "forged_claim",
                f"expected {task.layer}/{task.slot.key} from {task.instance_id}, got {'/'.join(claim)}",
            )
            continue
        check = check_update(
            envelope, arrays, ctx.policy, run_id=ctx.run_id, round=ctx.round, replay_guard=guard
        )
        if not check.ok:
            _refuse(ctx, stats, task, check.reason or "refused", check.detail)
            continue
        layer = ctx.policy.layer(task.layer)
        if not layer.updates_leave_instance:
            if arrays:
                _refuse(
                    ctx,
                    stats,
                    task,
                    "must_stay_on_instance",
                    "this layer's updates never leave the instance",
                )
                continue
            stats["local_commits"] += 1
            stats["accepted"] += 1
            report.accepted[task.instance_id] = envelope.ack_id
            continue
        weight = _weight(ctx, task, envelope.num_examples)
        groups[task.slot].append(Reply(arrays, weight, envelope.instance_id))
        report.digests[envelope.instance_id] = envelope.ack_id
        ctx.audit.append(
            AuditKind.UPDATE_RECEIVED,
            round=ctx.round,
            instance=task.instance_id,
            slot=str(task.slot),
            digest=envelope.digest,
            num_examples=envelope.num_examples,
        )
    return groups


def process_replies(ctx: RoundContext, replies: list[Message]) -> RoundReport:
    """Turn one round's replies into committed slots, audited, with metrics.

    The round's audit records are written as one batch: fsynced together before
    this returns, and so before the round is checkpointed.
    """
    with ctx.audit.batch():
        return _process(ctx, replies)


def _process(ctx: RoundContext, replies: list[Message]) -> RoundReport:
    by_layer: dict[str, dict[str, Any]] = defaultdict(layer_metrics)
    report = RoundReport({}, {})
    groups = _collect(ctx, replies, by_layer, report)
    runner = ctx.probes
    for slot in sorted(groups):
        ordered = sorted(groups[slot], key=lambda r: r.client_id)  # arrival order must not matter
        _commit_slot(ctx, slot, ordered, by_layer[slot.layer], runner, report)
    for slot, secure in sorted(ctx.secure.items()):
        _commit_secure(ctx, slot, secure, by_layer[slot.layer], runner, report)
    _skip_empty(ctx, set(groups), by_layer)
    report.metrics = finish_metrics(ctx, by_layer, runner)
    report.summary = {
        "accepted": float(sum(s["accepted"] for s in report.metrics["layers"].values())),
        "refused": float(
            sum(sum(s["refused"].values()) for s in report.metrics["layers"].values())
        ),
        "slots_committed": float(len(report.committed)),
    }
    return report


def _skip_empty(
    ctx: RoundContext, reached: set[SlotId], by_layer: dict[str, dict[str, Any]]
) -> None:
    """Audit as skipped every shared slot that had tasks but no reply left to aggregate."""
    tasked = {t.slot for t in ctx.pending.values()}
    for slot in sorted(tasked - reached):
        layer = ctx.policy.layer(slot.layer)
        if not layer.updates_leave_instance:
            continue
        by_layer[slot.layer]["slots_skipped"] += 1
        ctx.audit.append(
            AuditKind.SLOT_SKIPPED,
            round=ctx.round,
            slot=str(slot),
            survivors=0,
            min_clients=layer.min_clients,
        )


def _commit_slot(
    ctx: RoundContext,
    slot: SlotId,
    replies: list[Reply],
    stats: dict[str, Any],
    runner: ProbeRunner,
    report: RoundReport,
) -> None:
    layer = ctx.policy.layer(slot.layer)
    spec = ctx.stack.spec(slot)
    scoped, red = _array_scope(layer, ctx.policy)
    clip = any(
        v.action == "clip" and isinstance(v.condition, NormCondition) and layer.name in v.applies_to
        for v in ctx.policy.vetoes
    )
    checks = ReplyChecks(
        expected={n: (s, np.float32) for n, s in spec.shapes().items()},
        in_scope=scoped,
        redline=red,
        norm_cap=layer.norm_cap,
        clip=clip,
        max_bytes=_payload_limit(ctx, slot),
    )
    outcome = slot_outcome(ctx, slot, replies, layer, checks, report)  # central DP clips, noises
    by_id = {r.client_id: r for r in replies}
    for client, validation in outcome.validations.items():
        if validation.ok:
            stats["accepted"] += 1
            stats["norms"].append(validation.norm)
            if validation.clipped:
                ctx.audit.append(
                    AuditKind.UPDATE_CLIPPED,
                    round=ctx.round,
                    instance=client,
                    slot=str(slot),
                    detail=validation.detail,
                )
        else:
            task = Task(ctx.run_id, ctx.round, 0, client, slot.layer, slot, {})
            _refuse(ctx, stats, task, validation.reason or "invalid", validation.detail)
    del by_id
    if outcome.result is None:
        stats["slots_skipped"] += 1
        ctx.audit.append(
            AuditKind.SLOT_SKIPPED,
            round=ctx.round,
            slot=str(slot),
            survivors=len(replies) - len(outcome.refused),
            min_clients=layer.min_clients,
        )
        return
    _veto_and_commit(
        ctx, slot, layer, scoped, outcome.result.arrays, outcome.result.used, stats, runner, report
    )


def _commit_secure(
    ctx: RoundContext,
    slot: SlotId,
    secure: SecureSum,
    stats: dict[str, Any],
    runner: ProbeRunner,
    report: RoundReport,
) -> None:
    """A secure-aggregation slot: only its unmasked mean is judged (docs/privacy.md)."""
    layer = ctx.policy.layer(slot.layer)
    stats["sampled"] += secure.cohort
    stats["dropouts"] += secure.cohort - secure.survivors
    stats["accepted"] += len(secure.digests)
    report.digests.update(secure.digests)
    report.unreachable.extend(secure.unreachable)
    if secure.mean is None:
        stats["slots_skipped"] += 1
        ctx.audit.append(
            AuditKind.SLOT_SKIPPED,
            round=ctx.round,
            slot=str(slot),
            survivors=secure.survivors,
            min_clients=layer.min_clients,
            reason=secure.reason[:300],
        )
        return
    scoped, _ = _array_scope(layer, ctx.policy)
    used = tuple(sorted(secure.digests))
    _veto_and_commit(ctx, slot, layer, scoped, secure.mean, used, stats, runner, report)


def _veto_and_commit(
    ctx: RoundContext,
    slot: SlotId,
    layer: LayerPolicy,
    scoped: Any,
    aggregate: dict[str, Any],
    used: tuple[str, ...],
    stats: dict[str, Any],
    runner: ProbeRunner,
    report: RoundReport,
) -> None:
    spec = ctx.stack.spec(slot)
    current = ctx.state.current(slot, spec, ctx.round)
    candidate = server_step(aggregate, layer.server_lr)
    globals_ = [SlotId(g.name, "global") for g in ctx.policy.layers if g.slot_key == "global"]
    committed = lambda s: ctx.state.current(s, ctx.stack.spec(s), ctx.round)  # noqa: E731
    decision = check_slot(
        ctx.policy,
        layer.name,
        candidate,
        in_scope=lambda layer_name, name: scoped(name),
        probe=runner.for_slot(slot, committed, globals_, ctx.composition_key),
        approvals=ctx.state.approvals.gather(
            ctx.policy, ctx.run_id, ctx.audit, ctx.round, slot, candidate
        ),
    )
    for hit in decision.hits:
        stats["vetoes"][f"{hit.veto_name}:{hit.action}"] += 1
        ctx.audit.append(
            AuditKind.VETO,
            round=ctx.round,
            slot=str(slot),
            veto=hit.veto_name,
            holder=hit.holder,
            action=hit.action,
            reason=hit.reason[:300],
        )
    if not decision.commit:
        stats["slots_skipped"] += 1
        return
    breach = redline_breach(ctx, slot, decision.arrays, runner, ctx.profiles)
    if breach is not None:
        stats["vetoes"]["red_line:reject"] += 1
        stats["slots_skipped"] += 1
        ctx.audit.append(
            AuditKind.RED_LINE_BREACH,
            round=ctx.round,
            slot=str(slot),
            composition=list(breach.composition),
            suite=breach.suite,
            rate=breach.rate,
            committed_rate=breach.committed_rate,
            max_violation_rate=breach.max_rate,
        )
        return
    new = apply_step(current, decision.arrays)
    version = ctx.state.commit(slot, new, spec, ctx.round)
    stats["slots_committed"] += 1
    report.committed.append(str(slot))
    for client in used:
        report.accepted[client] = report.digests[client]
    ctx.audit.append(
        AuditKind.COMMIT,
        round=ctx.round,
        slot=str(slot),
        version=version,
        aggregator=layer.aggregator.kind,
        replies=len(used),
        norm=global_norm(decision.arrays),
    )
