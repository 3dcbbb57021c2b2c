"""Record names and (de)serialisation of layerfed's messages on Flower's Message API.

Server -> client (``train``): ConfigRecord ``lf.task`` (run id, round, instance,
layer, slot, the instance's slot versions) and one ArrayRecord ``lf.slot.<slot>``
per slot the node does not hold at that version. Client -> server: ArrayRecord
``lf.update`` (B deltas, only when the layer's updates leave the instance),
ConfigRecord ``lf.envelope`` (the signed envelope) and MetricRecord ``lf.metrics``.
``query`` replies carry ConfigRecord ``lf.identity``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from layerfed.errors import LayerfedError
from layerfed.layers.slots import SlotId

__all__ = [
    "ENVELOPE",
    "IDENTITY",
    "METRICS",
    "TASK",
    "UPDATE",
    "Identity",
    "MessageError",
    "Task",
    "arrays_from_record",
    "arrays_to_record",
    "slot_record_name",
]

TASK = "lf.task"
UPDATE = "lf.update"
ENVELOPE = "lf.envelope"
METRICS = "lf.metrics"
IDENTITY = "lf.identity"
SLOT_PREFIX = "lf.slot."


class MessageError(LayerfedError):
    """A message that does not carry what layerfed expects; names the record and field."""


def slot_record_name(slot: SlotId) -> str:
    """Record name of a slot's arrays."""
    return SLOT_PREFIX + str(slot)


def arrays_to_record(arrays: Mapping[str, np.ndarray[Any, Any]]) -> ArrayRecord:
    """Numpy arrays as a Flower ArrayRecord (names kept)."""
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})


def arrays_from_record(record: ArrayRecord, *, where: str) -> dict[str, np.ndarray[Any, Any]]:
    """A Flower ArrayRecord as numpy arrays; malformed contents raise MessageError."""
    out: dict[str, np.ndarray[Any, Any]] = {}
    try:
        for name, array in record.items():
            out[str(name)] = array.numpy()
    except Exception as e:
        raise MessageError(f"{where}: expected numpy arrays, got undecodable data ({e})") from e
    return out


@dataclass(frozen=True)
class Identity:
    """Who a node is: its instance, jurisdiction, groups and feedback layers."""

    index: int
    instance_id: str
    jurisdiction: str
    groups: tuple[str, ...]
    layers: tuple[str, ...]

    def to_record(self) -> ConfigRecord:
        """As a ConfigRecord."""
        return ConfigRecord(
            {
                "index": self.index,
                "instance_id": self.instance_id,
                "jurisdiction": self.jurisdiction,
                "groups": list(self.groups),
                "layers": list(self.layers),
            }
        )

    @classmethod
    def from_message(cls, message: Message) -> Identity:
        """Read a query reply; raise MessageError when it lacks the identity."""
        try:
            rec = message.content.config_records[IDENTITY]
            return cls(
                index=int(rec["index"]),  # type: ignore[arg-type]
                instance_id=str(rec["instance_id"]),
                jurisdiction=str(rec["jurisdiction"]),
                groups=tuple(str(g) for g in rec["groups"]),  # type: ignore[union-attr]
                layers=tuple(str(x) for x in rec["layers"]),  # type: ignore[union-attr]
            )
        except (KeyError, TypeError, ValueError) as e:
            raise MessageError(f"{IDENTITY}: expected an identity record, got {e}") from e


@dataclass(frozen=True)
class Task:
    """What the server asks one instance to do this round."""

    run_id: str
    round: int
    index: int
    instance_id: str
    layer: str
    slot: SlotId
    versions: dict[str, int]

    def to_record(self) -> ConfigRecord:
        """As a ConfigRecord."""
        return ConfigRecord(
            {
                "run_id": self.run_id,
                "round": self.round,
                "index": self.index,
                "instance_id": self.instance_id,
                "layer": self.layer,
                "slot": str(self.slot),
                "version_slots": list(self.versions),
                "version_numbers": list(self.versions.values()),
            }
        )

    @classmethod
    def from_content(cls, content: RecordDict) -> Task:
        """Read a train instruction; raise MessageError when malformed."""
        try:
            rec = content.config_records[TASK]
            slots = [str(s) for s in rec["version_slots"]]  # type: ignore[union-attr]
            numbers = [int(v) for v in rec["version_numbers"]]  # type: ignore[union-attr]
            return cls(
                run_id=str(rec["run_id"]),
                round=int(rec["round"]),  # type: ignore[arg-type]
                index=int(rec["index"]),  # type: ignore[arg-type]
                instance_id=str(rec["instance_id"]),
                layer=str(rec["layer"]),
                slot=SlotId.parse(str(rec["slot"])),
                versions=dict(zip(slots, numbers, strict=True)),
            )
        except (KeyError, TypeError, ValueError, LayerfedError) as e:
            raise MessageError(f"{TASK}: expected a train task, got {e}") from e
