"""The audit log: append-only JSONL, each record hash-chained to the one before.

A record is ``{"seq", "time", "kind", "fields", "prev", "hash"}``: ``prev`` is the
previous record's ``hash`` (64 zeros for the first) and ``hash`` is the hex SHA-256
of the canonical bytes of the record without ``hash``. Every append is flushed and
fsynced before it returns, except inside :meth:`AuditLog.batch`, which fsyncs once
when the batch ends (group commit: the server wraps one round's replies in a
batch, so all of them are durable before the round is checkpointed). One :class:`AuditLog` holds an exclusive lock on its
file, so two writers can never fork the chain.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from layerfed.governance.audit_events import AuditKind
from layerfed.governance.canonical import canonical_bytes, policy_bytes
from layerfed.governance.envelope import UpdateCheck, UpdateEnvelope
from layerfed.governance.keys import TrustError
from layerfed.governance.schema import Policy

__all__ = [
    "GENESIS",
    "AuditError",
    "AuditKind",
    "AuditLog",
    "AuditReport",
    "record_hash",
    "verify_audit",
    "verify_audit_strict",
]

log = logging.getLogger("layerfed")
GENESIS = "0" * 64
_KEYS = frozenset({"seq", "time", "kind", "fields", "prev", "hash"})


class AuditError(TrustError):
    """The audit log is broken at ``.line`` (1-based), or cannot be written."""

    def __init__(self, path: str, line: int, reason: str) -> None:
        self.path = path
        self.line = line
        self.reason = reason
        super().__init__(f"{path}:{line}: {reason}")


@dataclass(frozen=True)
class AuditReport:
    """Outcome of :func:`verify_audit`; never raised."""

    ok: bool
    records: int
    first_broken_line: int | None = None
    reason: str = ""
    torn_tail: bool = False
    last_hash: str = GENESIS


def record_hash(record: Mapping[str, Any]) -> str:
    """Hex SHA-256 of the canonical bytes of ``record`` without its ``hash``."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical_bytes(body)).hexdigest()


def verify_audit(path: Path, anchor: str | None = None) -> AuditReport:
    """Check every record's shape, sequence, link and hash; name the first broken line.

    A chain alone cannot show that whole records were cut from its end: pass
    ``anchor``, the hash of a record known to be in the log (say, the head saved
    in a checkpoint), to refuse a log that ends before it.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return AuditReport(False, 0, 1, f"expected a readable file, got {e.strerror}")
    lines = data.split(b"\n")
    torn = lines.pop() != b""
    prev, count, anchored = GENESIS, 0, anchor is None
    for number, raw in enumerate(lines, start=1):
        problem = _check_line(raw, number - 1, prev)
        if problem is not None:
            return AuditReport(False, count, number, problem, last_hash=prev)
        prev = json.loads(raw)["hash"]
        anchored = anchored or prev == anchor
        count += 1
    if not anchored:
        reason = f"expected a record with anchor hash {anchor}, got a log that ends before it"
        return AuditReport(False, count, count + 1, reason, last_hash=prev)
    if torn:
        reason = "expected a newline-terminated record, got a torn last line (partial write)"
        return AuditReport(False, count, count + 1, reason, torn_tail=True, last_hash=prev)
    return AuditReport(True, count, last_hash=prev)


def verify_audit_strict(path: Path, anchor: str | None = None) -> AuditReport:
    """:func:`verify_audit` raising AuditError at the first broken record."""
    report = verify_audit(path, anchor)
    if not report.ok:
        raise AuditError(str(path), report.first_broken_line or 1, report.reason)
    return report


class AuditLog:
    """An append-only, hash-chained, fsynced JSONL log; continues an existing chain."""

    def __init__(self, path: Path, clock: Callable[[], datetime] | None = None) -> None:
        self.path = Path(path)
        self._clock = clock or (lambda: datetime.now(UTC))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: BinaryIO = open(self.path, "ab")  # noqa: SIM115 - held for the log's life
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self._file.close()
            raise AuditError(str(self.path), 1, "expected no other writer, got a locked log") from e
        report = verify_audit(self.path)
        if not report.ok:
            self._file.close()
            raise AuditError(str(self.path), report.first_broken_line or 1, report.reason)
        self._seq, self._prev = report.records, report.last_hash
        self._batching = False

    @property
    def head(self) -> str:
        """Hash of the last record (the anchor to save in a checkpoint)."""
        return self._prev

    @property
    def records(self) -> int:
        """Number of records in the log."""
        return self._seq

    def append(self, kind: AuditKind, **fields: Any) -> dict[str, Any]:
        """Write one record of a typed ``kind``, flush and fsync it; return the record."""
        if not isinstance(kind, AuditKind):
            raise TypeError(f"audit kind: expected an AuditKind, got {kind!r}")
        if self._file.closed:
            raise AuditError(
                str(self.path), self._seq + 1, "expected an open log, got a closed one"
            )
        record: dict[str, Any] = {
            "seq": self._seq,
            "time": self._clock().astimezone(UTC).isoformat(),
            "kind": kind.value,
            "fields": fields,
            "prev": self._prev,
        }
        record["hash"] = record_hash(record)
        self._file.write(canonical_bytes(record) + b"\n")
        self._file.flush()
        if not self._batching:
            os.fsync(self._file.fileno())
        self._seq, self._prev = self._seq + 1, record["hash"]
        log.debug("audit %s seq %s", kind, record["seq"])
        return record

    @contextlib.contextmanager
    def batch(self) -> Iterator[AuditLog]:
        """Defer fsync to the end of the block (one fsync for many records)."""
        outer = self._batching
        self._batching = True
        try:
            yield self
        finally:
            self._batching = outer
            if not outer and not self._file.closed:
                self._file.flush()
                os.fsync(self._file.fileno())

    def append_policy_load(self, policy: Policy, source: str, signed_by: list[str]) -> None:
        """Record that a policy was verified and loaded."""
        digest = hashlib.sha256(policy_bytes(policy)).hexdigest()
        self.append(
            AuditKind.POLICY_LOAD,
            name=policy.name,
            version=policy.version,
            policy_sha256=digest,
            source=source,
            signed_by=sorted(signed_by),
        )

    def append_update(self, envelope: UpdateEnvelope, check: UpdateCheck) -> None:
        """Record an update accepted or refused, with its reason."""
        self.append(
            AuditKind.UPDATE_ACCEPTED if check.ok else AuditKind.UPDATE_REFUSED,
            run_id=envelope.run_id,
            round=envelope.round,
            layer=envelope.layer,
            slot_key=envelope.slot_key,
            instance_id=envelope.instance_id,
            principal=envelope.principal,
            digest=envelope.digest,
            reason=check.reason,
            detail=check.detail,
        )

    @staticmethod
    def repair(path: Path, clock: Callable[[], datetime] | None = None) -> dict[str, Any]:
        """Cut a torn last line and append an ``audit_repair`` record saying what was cut.

        Only a torn tail is repairable; any other break raises AuditError.
        """
        report = verify_audit(path)
        if report.ok:
            raise AuditError(
                str(path), report.records + 1, "expected a torn log, got an intact one"
            )
        if not report.torn_tail:
            raise AuditError(str(path), report.first_broken_line or 1, report.reason)
        data = Path(path).read_bytes()
        keep = data.rfind(b"\n") + 1
        cut = data[keep:]
        with open(path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        with AuditLog(path, clock) as audit:
            return audit.append(
                AuditKind.AUDIT_REPAIR,
                cut_line=report.first_broken_line,
                cut_bytes=len(cut),
                cut_sha256=hashlib.sha256(cut).hexdigest(),
            )

    def close(self) -> None:
        """Release the lock and close the file."""
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _check_line(raw: bytes, seq: int, prev: str) -> str | None:
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return "expected a JSON record, got unparsable text"
    if not isinstance(record, dict) or set(record) != _KEYS:
        return f"expected a record with keys {sorted(_KEYS)}, got another shape"
    if record["seq"] != seq or isinstance(record["seq"], bool):
        return f"expected seq {seq}, got {record['seq']!r}"
    if record["prev"] != prev:
        return "expected prev to be the previous record's hash, got another value"
    try:
        expected = record_hash(record)
    except TrustError:
        return "expected canonical JSON values, got others"
    if record["hash"] != expected:
        return "expected hash of the record's content, got a mismatch (edited record)"
    if canonical_bytes(record) != raw:
        return "expected the canonical form of the record, got another encoding"
    return None
