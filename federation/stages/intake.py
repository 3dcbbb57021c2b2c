"""Intake: one round's replies in, verified updates grouped by slot out.

Order per reply: is it a reply to a task we sent; did the client fail (dropout);
did it have nothing to train on; is its payload within the slot's size; can it be
decoded; does its envelope claim the task's layer, slot and instance; does the
envelope verify (signature, principal, run, round, replay, digest). A task with
no reply at all is a dropout too. A claimed number of examples above the layer's
local budget (``steps * batch_size``) is capped there, so no reply outweighs a
full honest one. An instance-local layer's reply must carry no arrays (its
commit happens on the instance). Every refusal and cap is an event; none stops
the round. The arrays themselves are validated by the aggregate stage, in the
same pass that sums them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from flwr.app import Message

from layerfed.errors import LayerfedError
from layerfed.federation.aggregate import Reply
from layerfed.federation.events import AuditEvent, Count, Events, event, update_refused
from layerfed.federation.round_context import RoundContext
from layerfed.governance.audit_events import AuditKind
from layerfed.governance.envelope import (
    ReplayGuard,
    UpdateEnvelope,
    check_update,
    envelope_from_dict,
)
from layerfed.layers.arrays import Arrays
from layerfed.layers.slots import SlotId
from layerfed.wire.mechanisms import decode
from layerfed.wire.protocol import ENVELOPE, METRICS, NO_FEEDBACK, UPDATE, Task, arrays_from_record

__all__ = [
    "MAX_REPLY_BYTES",
    "PAYLOAD_SLACK",
    "Intake",
    "intake",
    "payload_limit",
]

MAX_REPLY_BYTES = 64 * 1024 * 1024
"""Most bytes any reply's update may carry."""
PAYLOAD_SLACK = 64 * 1024
"""Bytes allowed beyond twice a slot's float32 arrays (``.npy`` headers, wrong dtypes)."""


@dataclass(frozen=True)
class Intake:
    """The verified shared updates by slot (each slot's replies by client id) and what was refused."""

    groups: Mapping[SlotId, tuple[Reply, ...]]
    accepted: Mapping[str, str]
    """Instance id -> ack id of instance-local layers' replies (committed on the instance)."""
    digests: Mapping[str, str]
    """Instance id -> ack id of every verified shared update."""
    unreachable: tuple[int, ...]
    counts: tuple[Count, ...]
    events: Events


def payload_limit(ctx: RoundContext, slot: SlotId) -> int:
    """Most update bytes a reply for ``slot`` may carry (decided before decoding)."""
    if not ctx.policy.layer(slot.layer).updates_leave_instance:
        return PAYLOAD_SLACK
    arrays = sum(4 * math.prod(s) for s in ctx.stack.spec(slot).shapes().values())
    return min(MAX_REPLY_BYTES, 2 * arrays + PAYLOAD_SLACK)


class _Intake:
    """The intake's working lists (private to :func:`intake`; the result is frozen)."""

    def __init__(self, ctx: RoundContext) -> None:
        self.ctx = ctx
        self.groups: dict[SlotId, list[Reply]] = defaultdict(list)
        self.accepted: dict[str, str] = {}
        self.digests: dict[str, str] = {}
        self.unreachable: list[int] = []
        self.counts: list[Count] = []
        self.events: list[AuditEvent] = []

    def refuse(self, task: Task, reason: str, detail: str) -> None:
        self.counts.append(Count(task.layer, "refused", key=reason))
        self.events.append(
            update_refused(
                self.ctx.round, task.instance_id, task.layer, str(task.slot), reason, detail
            )
        )

    def weight(self, task: Task, claimed: int) -> float:
        """The claimed number of examples, capped at the layer's local budget."""
        local = self.ctx.policy.layer(task.layer).local
        cap = local.steps * local.batch_size
        if claimed <= cap:
            return float(claimed)
        self.events.append(
            event(
                AuditKind.WEIGHT_CAPPED,
                round=self.ctx.round,
                instance=task.instance_id,
                slot=str(task.slot),
                claimed=claimed,
                cap=cap,
            )
        )
        return float(cap)

    def missing(self, replies: Sequence[Message]) -> None:
        """Count the tasks that got no reply at all (time-outs, lost nodes)."""
        answered = {reply.metadata.src_node_id for reply in replies}
        for node, task in sorted(self.ctx.pending.items()):
            if node in answered:
                continue
            self.counts.append(Count(task.layer, "dropouts"))
            self.unreachable.append(node)
            self.events.append(
                event(
                    AuditKind.UPDATE_MISSING,
                    round=self.ctx.round,
                    instance=task.instance_id,
                    layer=task.layer,
                    node=str(node),
                )
            )

    def reply(self, reply: Message, guard: ReplayGuard) -> None:
        ctx = self.ctx
        node = reply.metadata.src_node_id
        task = ctx.pending.get(node)
        if task is None:
            self.events.append(event(AuditKind.REPLY_UNEXPECTED, round=ctx.round, node=str(node)))
            return
        if reply.has_error():
            self.counts.append(Count(task.layer, "dropouts"))
            self.unreachable.append(node)
            self.events.append(
                event(
                    AuditKind.UPDATE_DROPPED,
                    round=ctx.round,
                    instance=task.instance_id,
                    layer=task.layer,
                    error=str(reply.error.reason)[:300],
                )
            )
            return
        if _no_feedback(reply):
            self.counts.append(Count(task.layer, "no_feedback"))
            self.events.append(
                event(
                    AuditKind.NO_FEEDBACK,
                    round=ctx.round,
                    instance=task.instance_id,
                    layer=task.layer,
                )
            )
            return
        decoded = _decode(ctx, reply, task)
        if isinstance(decoded, str):
            reason, _, detail = decoded.partition(":")
            self.refuse(task, reason, detail)
            return
        envelope, arrays = decoded
        if self.verified(task, envelope, arrays, guard) and self.take(task, envelope, arrays):
            self.mechanisms(task, reply)

    def mechanisms(self, task: Task, reply: Message) -> None:
        """Count the mechanisms an accepted reply says acted: its task's layer and the
        instance-only layers it trained beside it (:mod:`layerfed.wire.mechanisms`)."""
        layers = {task.layer} | {
            layer.name for layer in self.ctx.policy.layers if not layer.updates_leave_instance
        }
        records = reply.content.metric_records
        if METRICS not in records:
            return
        for layer, counts in sorted(decode(records[METRICS], layers).items()):
            self.counts.extend(
                Count(layer, "mechanisms", key=name, value=value) for name, value in counts.items()
            )

    def verified(
        self, task: Task, envelope: UpdateEnvelope, arrays: Arrays, guard: ReplayGuard
    ) -> bool:
        claim = (envelope.layer, envelope.slot_key, envelope.instance_id)
        if claim != (task.layer, task.slot.key, task.instance_id):
            expected = f"{task.layer}/{task.slot.key} from {task.instance_id}"
            self.refuse(task, "forged_claim", f"expected {expected}, got {'/'.join(claim)}")
            return False
        ctx = self.ctx
        check = check_update(
            envelope, arrays, ctx.policy, run_id=ctx.run_id, round=ctx.round, replay_guard=guard
        )
        if not check.ok:
            self.refuse(task, check.reason or "refused", check.detail)
            return False
        return True

    def take(self, task: Task, envelope: UpdateEnvelope, arrays: Arrays) -> bool:
        """Keep a verified reply (False: refused after all)."""
        ctx = self.ctx
        if not ctx.policy.layer(task.layer).updates_leave_instance:
            if arrays:
                detail = "this layer's updates never leave the instance"
                self.refuse(task, "must_stay_on_instance", detail)
                return False
            self.counts.append(Count(task.layer, "local_commits"))
            self.counts.append(Count(task.layer, "accepted"))
            self.accepted[task.instance_id] = envelope.ack_id
            return True
        weight = self.weight(task, envelope.num_examples)
        self.groups[task.slot].append(Reply(arrays, weight, envelope.instance_id))
        self.digests[envelope.instance_id] = envelope.ack_id
        self.events.append(
            event(
                AuditKind.UPDATE_RECEIVED,
                round=ctx.round,
                instance=task.instance_id,
                slot=str(task.slot),
                digest=envelope.digest,
                num_examples=envelope.num_examples,
            )
        )
        return True


def intake(ctx: RoundContext, replies: Sequence[Message]) -> Intake:
    """Verify every reply against its task; group the shared updates by slot."""
    work = _Intake(ctx)
    work.counts.extend(Count(task.layer, "sampled") for task in ctx.pending.values())
    work.missing(replies)
    guard = ReplayGuard()
    for reply in replies:
        work.reply(reply, guard)
    groups = {  # slots in order; within one, by client id: arrival order must not matter
        slot: tuple(sorted(work.groups[slot], key=lambda r: r.client_id))
        for slot in sorted(work.groups)
    }
    return Intake(
        groups=groups,
        accepted=dict(work.accepted),
        digests=dict(work.digests),
        unreachable=tuple(work.unreachable),
        counts=tuple(work.counts),
        events=tuple(work.events),
    )


def _decode(ctx: RoundContext, reply: Message, task: Task) -> tuple[UpdateEnvelope, Arrays] | str:
    """The envelope and arrays of a reply, or why they cannot be had (``reason:detail``)."""
    try:
        record = reply.content.array_records[UPDATE]
        size = sum(len(array.data) for array in record.values())
        limit = payload_limit(ctx, task.slot)
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
