"""The Flower ClientApp: a thin adapter over :class:`~layerfed.clients.instance.Instance`.

Per ``train`` message it decodes the task and the slots the server sent (or the
node cached, :mod:`layerfed.clients.slot_cache`), finds the instance
(:class:`InstanceSource`), hands the round to :meth:`Instance.run_round
<layerfed.clients.instance.Instance.run_round>` (which settles, composes, trains,
signs and commits instance-only slots on the instance's disk) and encodes the reply.
Deployment builds each node's instance from its node config (:class:`NodeSource`:
an instance TOML or flat keys, see :mod:`layerfed.clients.config`); the gym plugs
in its own source from above (simulated people giving the instance feedback).
"""

from __future__ import annotations

import logging
from functools import partial

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from layerfed.clients.instance import NoFeedback, RoundUpdate
from layerfed.clients.local_slots import LocalSlots
from layerfed.clients.mechanisms import round_mechanisms
from layerfed.clients.node import NodeSource
from layerfed.clients.secagg_client import handle_secagg, secagg_setup
from layerfed.clients.slot_cache import received_slots
from layerfed.clients.source import InstanceSource, NodeRuntime, TrainPlan
from layerfed.governance.envelope import envelope_to_dict
from layerfed.wire.mechanisms import encode
from layerfed.wire.protocol import (
    ENVELOPE,
    IDENTITY,
    METRICS,
    NO_FEEDBACK,
    UPDATE,
    Identity,
    MessageError,
    Task,
    arrays_to_record,
)
from layerfed.wire.secagg import SECAGG

__all__ = [
    "InstanceSource",
    "NodeRuntime",
    "TrainPlan",
    "client_app",
    "handle_query",
    "handle_train",
    "make_client_app",
]

log = logging.getLogger("layerfed")


def handle_query(msg: Message, context: Context, source: InstanceSource) -> Message:
    """Tell the server who this node is."""
    rt = source.runtime(msg, context)
    identity = source.identity(msg, context, rt, None)
    return Message(RecordDict({IDENTITY: identity.to_record()}), reply_to=msg)


def handle_train(msg: Message, context: Context, source: InstanceSource) -> Message:
    """Train the task's slot on the instance's journal and reply with a signed update."""
    rt = source.runtime(msg, context)
    task = Task.from_content(msg.content)
    identity = source.identity(msg, context, rt, task)
    _check_task(task, rt, identity)
    inst = source.instance(msg, context, rt, identity)
    plan = source.prepare_round(inst, identity, task)
    local = LocalSlots(rt.policy, source.disk(context, identity), rt.zeros)
    synced = source.synced(context, identity)
    save = None if synced is None else partial(synced.accept, msg.content, task, stack=rt.stack)
    received = received_slots(msg, context, rt.policy, task, inst.slots, rt.zeros, save)
    try:
        update = inst.run_round(
            task.run_id, task.round, task.slot, received, local, plan, acks=task.acks
        )
    except NoFeedback:
        log.info("instance %s: no pending feedback for round %s", identity.instance_id, task.round)
        content = RecordDict({METRICS: MetricRecord({"num_examples": 0.0, NO_FEEDBACK: 1.0})})
        return Message(content, reply_to=msg)
    if SECAGG in msg.content.config_records:  # secure aggregation: keys now, masked vector later
        return secagg_setup(msg, context, update, task, inst)
    mechanisms = round_mechanisms((update.result, *update.local), rt.stack.spec)
    return Message(_reply(update, encode(mechanisms)), reply_to=msg)


def _check_task(task: Task, rt: NodeRuntime, identity: Identity) -> None:
    """Refuse a task for another policy or another instance than this node's."""
    if rt.policy_hash and task.policy_hash != rt.policy_hash:
        raise MessageError(
            f"lf.task.policy_hash: expected this node's verified policy {rt.policy_hash}, "
            f"got {task.policy_hash or 'none'}"
        )
    if task.instance_id != identity.instance_id:
        raise MessageError(f"{task.instance_id}: expected a task for {identity.instance_id}")


def _reply(update: RoundUpdate, mechanisms: dict[str, float] | None = None) -> RecordDict:
    """The reply's records: the signed update's arrays and envelope, and the round's metrics
    (with ``mechanisms``: the per-layer counters of :mod:`layerfed.wire.mechanisms`)."""
    result = update.result
    metrics: dict[str, int | float | list[int] | list[float]] = {
        "num_examples": float(result.num_events),
        "loss_before": result.loss_first,
        "loss_after": result.loss_last,
        "norm": result.norm,
        "superego_interventions": float(result.superego_interventions),
        "local_commit": 1.0 if update.committed_locally else 0.0,
        **(mechanisms or {}),
    }
    return RecordDict(
        {
            UPDATE: arrays_to_record(update.arrays),
            ENVELOPE: ConfigRecord(dict(envelope_to_dict(update.envelope).items())),
            METRICS: MetricRecord(metrics),
        }
    )


def make_client_app(source: InstanceSource | None = None) -> ClientApp:
    """A ClientApp over ``source`` (default: each node's own config, :class:`NodeSource`)."""
    app = ClientApp()
    holder: list[InstanceSource] = [source if source is not None else NodeSource()]

    def _source() -> InstanceSource:
        return holder[0]

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle_query(msg, context, _source())

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, _source())

    @app.train("secagg")
    def secagg(msg: Message, context: Context) -> Message:
        return handle_secagg(msg, context, _source())

    return app


client_app = make_client_app()
"""The ClientApp `flwr run` loads (``[tool.flwr.app.components]`` in pyproject.toml)."""
