"""The shared slots a ``train`` message brings, and the node's cache of them.

The server sends a slot's arrays only when the node's cached version is stale;
otherwise the node reuses what it keeps in its Flower context (per run: a new
run forgets the old run's arrays). Slots whose updates never leave the instance
are not here: the instance keeps them on its own disk
(:class:`~layerfed.clients.local_slots.LocalSlots`). A deployed node also saves
the slots a message carries, once verified, where its instance's SDK and page read
them (:mod:`layerfed.clients.synced`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from flwr.app import ConfigRecord, Context, Message

from layerfed.governance.schema import Policy
from layerfed.layers.arrays import Arrays
from layerfed.layers.slots import SlotId
from layerfed.wire.protocol import Task, arrays_from_record, slot_record_name

__all__ = ["RUN", "VERSIONS", "received_slots"]

VERSIONS = "lf.versions"
"""The node context's record of the version of each cached slot."""
RUN = "lf.run"
"""The node context's record of the run its cache belongs to."""


def received_slots(
    msg: Message,
    context: Context,
    policy: Policy,
    task: Task,
    slots: Iterable[SlotId],
    zeros: Callable[[SlotId], Arrays],
    save: Callable[[Mapping[SlotId, Arrays]], object] | None = None,
) -> dict[SlotId, Arrays]:
    """Arrays of each of ``slots`` whose updates leave the instance: sent, cached, or zero.

    The slots the message carries are first handed to ``save`` (the node's
    :meth:`SyncedSlots.accept <layerfed.clients.synced.SyncedSlots.accept>`: it verifies
    and saves them, raising before anything is cached when they are not vouched for),
    then cached with the task's version of the slot; cached arrays are used only while
    their version is the task's.
    """
    _forget_other_runs(context, task.run_id)
    shared = [slot for slot in slots if policy.layer(slot.layer).updates_leave_instance]
    sent = {
        slot: arrays_from_record(msg.content.array_records[name], where=name)
        for slot in shared
        if (name := slot_record_name(slot)) in msg.content.array_records
    }
    if save is not None and sent:
        save(sent)
    return {slot: _slot_arrays(msg, context, task, slot, sent.get(slot), zeros) for slot in shared}


def _slot_arrays(
    msg: Message,
    context: Context,
    task: Task,
    slot: SlotId,
    sent: Arrays | None,
    zeros: Callable[[SlotId], Arrays],
) -> Arrays:
    name = slot_record_name(slot)
    versions = context.state.config_records.get(VERSIONS, ConfigRecord())
    if sent is not None:
        context.state.array_records[name] = msg.content.array_records[name]
        versions[str(slot)] = task.versions.get(str(slot), 0)
        context.state.config_records[VERSIONS] = versions
        return sent
    if name in context.state.array_records and versions.get(str(slot)) == task.versions.get(
        str(slot)
    ):
        return arrays_from_record(context.state.array_records[name], where=name)
    return zeros(slot)


def _forget_other_runs(context: Context, run_id: str) -> None:
    """Drop slot arrays a node cached for an earlier run (several runs share one simulation)."""
    runs = context.state.config_records.get(RUN, ConfigRecord())
    if runs.get("run_id") == run_id:
        return
    for name in list(context.state.array_records.keys()):
        del context.state.array_records[name]
    context.state.config_records[VERSIONS] = ConfigRecord()
    context.state.config_records[RUN] = ConfigRecord({"run_id": run_id})
