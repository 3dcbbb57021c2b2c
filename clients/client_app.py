"""The Flower ClientApp: a thin adapter over :class:`~layerfed.clients.instance.Instance`.

Per ``train`` message it finds the instance (:class:`InstanceSource`), composes the
slots the server sent (or the node cached, or the instance's own disk holds),
trains the task's slot on a batch of the instance's journal, signs, and replies.
Deployment builds each node's instance from its node config (:class:`NodeSource`:
an instance TOML or flat keys, see :mod:`layerfed.clients.config`); the gym plugs
in its own source from above (simulated people writing into the journal).
"""

from __future__ import annotations

import logging
import time

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from layerfed.clients.instance import Instance, NoFeedback
from layerfed.clients.node import NodeSource
from layerfed.clients.secagg_client import handle_secagg, secagg_setup
from layerfed.clients.source import InstanceSource, NodeRuntime, TrainPlan
from layerfed.governance.envelope import envelope_to_dict
from layerfed.governance.schema import Policy
from layerfed.layers.arrays import Arrays
from layerfed.layers.instance_disk import InstanceDisk
from layerfed.layers.memory import apply_update, decay_arrays, seconds_between
from layerfed.layers.slots import SlotId, slots_for_instance
from layerfed.wire.protocol import (
    ENVELOPE,
    IDENTITY,
    METRICS,
    NO_FEEDBACK,
    UPDATE,
    MessageError,
    Task,
    arrays_from_record,
    arrays_to_record,
    slot_record_name,
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
VERSIONS = "lf.versions"
RUN = "lf.run"


def handle_query(msg: Message, context: Context, source: InstanceSource) -> Message:
    """Tell the server who this node is."""
    rt = source.runtime(msg, context)
    identity = source.identity(msg, context, rt, None)
    return Message(RecordDict({IDENTITY: identity.to_record()}), reply_to=msg)


def handle_train(msg: Message, context: Context, source: InstanceSource) -> Message:
    """Train the task's slot on the instance's journal and reply with a signed update."""
    rt = source.runtime(msg, context)
    task = Task.from_content(msg.content)
    if rt.policy_hash and task.policy_hash != rt.policy_hash:
        raise MessageError(
            f"lf.task.policy_hash: expected this node's verified policy {rt.policy_hash}, "
            f"got {task.policy_hash or 'none'}"
        )
    identity = source.identity(msg, context, rt, task)
    if task.instance_id != identity.instance_id:
        raise MessageError(f"{task.instance_id}: expected a task for {identity.instance_id}")
    layer = rt.policy.layer(task.layer)
    slots = slots_for_instance(
        rt.policy, identity.instance_id, identity.jurisdiction, list(identity.groups)
    )
    _forget_other_runs(context, task.run_id)
    disk = source.disk(context, identity)
    current = {slot: _slot_arrays(msg, context, rt, task, slot, disk) for slot in slots}
    # A slot whose B is all zero adds nothing to the forward pass: compose only the others.
    composed = [s for s in slots if s == task.slot or any(a.any() for a in current[s].values())]
    inst = source.instance(msg, context, rt, identity)
    _settle_local(inst, rt.policy, task, disk)
    inst.mount({s: current[s] for s in composed})
    try:
        plan = source.plan(inst, identity, task)
        update = inst.train_round(
            task.run_id,
            task.round,
            task.slot,
            seed=plan.seed,
            layer=plan.layer,
            acks=task.acks,
            noise_seed=plan.noise_seed,
        )
    except NoFeedback:
        log.info("instance %s: no pending feedback for round %s", identity.instance_id, task.round)
        content = RecordDict({METRICS: MetricRecord({"num_examples": 0.0, NO_FEEDBACK: 1.0})})
        return Message(content, reply_to=msg)
    finally:
        _release(rt, composed)
    result = update.result
    if SECAGG in msg.content.config_records:  # secure aggregation: keys now, masked vector later
        return secagg_setup(msg, context, update, task)
    if not layer.updates_leave_instance:
        own = {
            s: a for s, a in current.items() if not rt.policy.layer(s.layer).updates_leave_instance
        }
        own[task.slot] = apply_update(own[task.slot], result.delta, layer.server_lr)
        disk.save(task.round, {k: v for arrays in own.values() for k, v in arrays.items()})
        inst.journal.consume(update.batch_id)
    metrics: dict[str, int | float | list[int] | list[float]] = {
        "num_examples": float(result.num_events),
        "loss_before": result.loss_first,
        "loss_after": result.loss_last,
        "norm": result.norm,
        "superego_interventions": float(result.superego_interventions),
        "local_commit": 0.0 if layer.updates_leave_instance else 1.0,
    }
    content = RecordDict(
        {
            UPDATE: arrays_to_record(update.arrays),
            ENVELOPE: ConfigRecord(dict(envelope_to_dict(update.envelope).items())),
            METRICS: MetricRecord(metrics),
        }
    )
    return Message(content, reply_to=msg)


def _settle_local(inst: Instance, policy: Policy, task: Task, disk: InstanceDisk) -> None:
    """Batches of instance-only slots left by a crash: consumed iff their round is on disk."""
    saved = set(disk.rounds())
    for batch in inst.journal.batches():
        if batch.state not in ("open", "signed") or batch.round >= task.round:
            continue
        slot = SlotId.parse(batch.slot)
        if policy.layer(slot.layer).updates_leave_instance:
            continue
        if batch.run_id == task.run_id and batch.round in saved:
            inst.journal.consume(batch.id)
        else:
            inst.journal.release(batch.id)


def _slot_arrays(
    msg: Message, context: Context, rt: NodeRuntime, task: Task, slot: SlotId, disk: InstanceDisk
) -> Arrays:
    """A slot's arrays for this round: from the message, the node's cache, its disk, or zero."""
    layer = rt.policy.layer(slot.layer)
    name = slot_record_name(slot)
    if not layer.updates_leave_instance:
        saved = disk.load_before(task.round)
        if saved is None:
            return rt.zeros(slot)
        saved_round, arrays = saved
        own = {k: v for k, v in arrays.items() if k.startswith(f"{slot}/")}
        if not own:
            return rt.zeros(slot)
        timed = any(m.half_life_seconds is not None for m in layer.memories)
        seconds = seconds_between(disk.saved_at(saved_round), time.time()) if timed else 0.0
        return decay_arrays(own, layer, rounds=task.round - saved_round, seconds=seconds)
    versions = context.state.config_records.get(VERSIONS, ConfigRecord())
    if name in msg.content.array_records:
        record = msg.content.array_records[name]
        context.state.array_records[name] = record
        versions[str(slot)] = task.versions.get(str(slot), 0)
        context.state.config_records[VERSIONS] = versions
        return arrays_from_record(record, where=name)
    if name in context.state.array_records and versions.get(str(slot)) == task.versions.get(
        str(slot)
    ):
        return arrays_from_record(context.state.array_records[name], where=name)
    return rt.zeros(slot)


def _release(rt: NodeRuntime, slots: list[SlotId]) -> None:
    """Keep shared slots in RAM; drop instance-keyed ones so instances do not pile up."""
    shared = [s for s in slots if rt.policy.layer(s.layer).slot_key != "instance"]
    top = rt.policy.layers_by_rank()[0]
    rt.stack.activate(
        shared or [SlotId(top.name, "global" if top.slot_key == "global" else "idle")]
    )
    for slot in slots:
        if slot not in shared:
            rt.stack.evict(slot, recycle=True)


def _forget_other_runs(context: Context, run_id: str) -> None:
    """Drop slot arrays a node cached for an earlier run (several runs share one simulation)."""
    runs = context.state.config_records.get(RUN, ConfigRecord())
    if runs.get("run_id") == run_id:
        return
    for name in list(context.state.array_records.keys()):
        del context.state.array_records[name]
    context.state.config_records[VERSIONS] = ConfigRecord()
    context.state.config_records[RUN] = ConfigRecord({"run_id": run_id})


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
