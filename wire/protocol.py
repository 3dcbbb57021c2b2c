"""Record names and (de)serialisation of layerfed's messages on Flower's Message API.

Server -> client (``train``): ConfigRecord ``lf.task`` (run id, round, instance,
layer, slot, the instance's slot versions) and one ArrayRecord ``lf.slot.<slot>``
per slot the node does not hold at that version. Client -> server: ArrayRecord
``lf.update`` (B deltas, only when the layer's updates leave the instance),
ConfigRecord ``lf.envelope`` (the signed envelope) and MetricRecord ``lf.metrics``.
``query`` replies carry ConfigRecord ``lf.identity``.
"""

from __future__ import annotations

import functools
import io
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from layerfed.errors import LayerfedError
from layerfed.layers.slots import SlotId

__all__ = [
    "ENVELOPE",
    "IDENTITY",
    "METRICS",
    "NAME_RULE",
    "NO_FEEDBACK",
    "TASK",
    "UPDATE",
    "Identity",
    "MessageError",
    "Roster",
    "Task",
    "arrays_from_record",
    "arrays_to_record",
    "npy_view",
    "slot_record_name",
]

TASK = "lf.task"
UPDATE = "lf.update"
ENVELOPE = "lf.envelope"
METRICS = "lf.metrics"
IDENTITY = "lf.identity"
NO_FEEDBACK = "no_feedback"
"""Metric of a train reply that carries no update: the instance had no pending feedback."""
SLOT_PREFIX = "lf.slot."
NUMPY_STYPE = "numpy.ndarray"
"""Flower's ``Array.stype`` for ``.npy`` bytes, the only serialisation accepted."""


NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""What an instance id, jurisdiction, group or layer name a node declares must match
(no path separators, no ``..``, at most 64 characters): names become slot keys and paths."""


class MessageError(LayerfedError):
    """A message that does not carry what layerfed expects; names the record and field."""


def slot_record_name(slot: SlotId) -> str:
    """Record name of a slot's arrays."""
    return SLOT_PREFIX + str(slot)


def arrays_to_record(arrays: Mapping[str, np.ndarray[Any, Any]]) -> ArrayRecord:
    """Numpy arrays as a Flower ArrayRecord (names kept)."""
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})


def arrays_from_record(record: ArrayRecord, *, where: str) -> dict[str, np.ndarray[Any, Any]]:
    """A Flower ArrayRecord as read-only numpy views of its bytes (no copy; see :func:`npy_view`).

    Malformed contents raise MessageError naming ``where`` and the array.
    """
    out: dict[str, np.ndarray[Any, Any]] = {}
    for name, array in record.items():
        if array.stype != NUMPY_STYPE:
            detail = f"array {name!r}: expected stype {NUMPY_STYPE!r}, got {array.stype!r}"
            raise MessageError(f"{where}: {detail}")
        try:
            out[str(name)] = npy_view(array.data, name=str(name))
        except MessageError as e:
            raise MessageError(f"{where}: {e}") from e
    return out


_MAX_HEADER = 16_384
"""Longest ``.npy`` header read (numpy itself refuses headers over 10,000 bytes)."""


def _npy_header_end(view: memoryview) -> int:
    """Where the data of the ``.npy`` bytes start, at most :data:`_MAX_HEADER`."""
    end = _MAX_HEADER
    if len(view) >= 12 and bytes(view[:6]) == b"\x93NUMPY":
        width = {1: 2, 2: 4}.get(view[6], 0)
        if width:
            end = 8 + width + int.from_bytes(view[8 : 8 + width], "little")
    return min(len(view), end, _MAX_HEADER)


@functools.lru_cache(maxsize=256)
def _npy_header(head: bytes) -> tuple[tuple[int, ...], bool, np.dtype[Any], int]:
    """Shape, Fortran order, dtype and data offset of a ``.npy`` header (v1.0/v2.0 only).

    Cached: a round's replies for one slot carry the same few headers.
    """
    stream = io.BytesIO(head)
    read_header = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }[np.lib.format.read_magic(stream)]
    shape, fortran, dtype = read_header(stream)
    return tuple(shape), bool(fortran), dtype, stream.tell()


def npy_view(data: bytes | bytearray | memoryview, *, name: str = "array") -> np.ndarray[Any, Any]:
    """A read-only view of the ``.npy`` bytes ``data`` (Flower's numpy Array), without copying.

    Gives the numbers ``Array.numpy()`` gives, which copies them (``np.load``).
    Refuses unknown headers, pickled objects and lengths that disagree with the
    header with MessageError.
    """
    view = memoryview(data).cast("B")
    try:
        shape, fortran, dtype, offset = _npy_header(bytes(view[: _npy_header_end(view)]))
    except (ValueError, KeyError, OSError, EOFError) as e:
        raise MessageError(f"array {name!r}: bad .npy header: {e}") from e
    if dtype.hasobject:
        raise MessageError(f"array {name!r}: expected a numeric dtype, got {dtype}")
    count = math.prod(shape)
    if len(view) - offset != count * dtype.itemsize:
        want = f"{count * dtype.itemsize} data bytes for {shape} {dtype}"
        raise MessageError(f"array {name!r}: expected {want}, got {len(view) - offset}")
    try:
        flat = np.frombuffer(view, dtype=dtype, count=count, offset=offset)
        return flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)
    except (ValueError, TypeError) as e:  # e.g. a zero-sized dtype
        raise MessageError(f"array {name!r}: undecodable {dtype} data: {e}") from e


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
            identity = cls(
                index=int(rec["index"]),  # type: ignore[arg-type]
                instance_id=str(rec["instance_id"]),
                jurisdiction=str(rec["jurisdiction"]),
                groups=tuple(str(g) for g in rec["groups"]),  # type: ignore[union-attr]
                layers=tuple(str(x) for x in rec["layers"]),  # type: ignore[union-attr]
            )
        except (KeyError, TypeError, ValueError) as e:
            raise MessageError(f"{IDENTITY}: expected an identity record, got {e}") from e
        identity.validate()
        return identity

    def validate(self) -> None:
        """Raise MessageError unless every declared name follows :data:`NAME_RULE`."""
        names = [
            ("instance_id", self.instance_id),
            ("jurisdiction", self.jurisdiction),
            *(("groups", g) for g in self.groups),
            *(("layers", x) for x in self.layers),
        ]
        for field_name, value in names:
            if not NAME_RULE.fullmatch(value) or ".." in value:
                raise MessageError(
                    f"{IDENTITY}.{field_name}: expected a name of 1-64 letters, digits, "
                    f"'_', '.' or '-' (no '..'), got {value[:80]!r}"
                )
        if self.index < 0:
            raise MessageError(f"{IDENTITY}.index: expected an index >= 0, got {self.index}")


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
    acks: tuple[str, ...] = field(default=())
    """Digests of this instance's updates the server accepted since it last asked it."""
    policy_hash: str = ""
    """Canonical hash of the verified policy the server runs (empty: not checked)."""

    def to_record(self) -> ConfigRecord:
        """As a ConfigRecord."""
        return ConfigRecord(
            {
                "acks": list(self.acks),
                "policy_hash": self.policy_hash,
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
                acks=tuple(str(a) for a in rec.get("acks", [])),  # type: ignore[union-attr]
                policy_hash=str(rec.get("policy_hash", "")),
            )
        except (KeyError, TypeError, ValueError, LayerfedError) as e:
            raise MessageError(f"{TASK}: expected a train task, got {e}") from e


class Roster(Protocol):
    """Simulated instances the server routes to virtual nodes by index (no discovery).

    Only simulation has one; a deployment discovers its nodes with ``query`` messages.
    """

    def __len__(self) -> int:
        """How many instances exist."""
        ...

    def identity(self, index: int) -> Identity:
        """The identity of instance ``index``."""
        ...

    def eligible(self, layer: str, round_: int | None = None) -> np.ndarray[Any, Any]:
        """Indices of the instances that may train ``layer`` in ``round_``."""
        ...

    def profiles(self) -> frozenset[tuple[str, tuple[str, ...]]]:
        """The distinct (jurisdiction, groups) of all instances (without listing them)."""
        ...
