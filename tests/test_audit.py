"""The hash-chained audit log: appends, continuation, tamper and truncation detection."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerfed.governance.audit import (
    GENESIS,
    AuditError,
    AuditLog,
    record_hash,
    verify_audit,
    verify_audit_strict,
)
from layerfed.governance.audit_events import AuditKind
from layerfed.governance.envelope import UpdateCheck, sign_update

CLOCK = datetime(2027, 3, 4, 5, 6, 7, tzinfo=UTC)


def write_log(path: Path, n: int = 4) -> list[dict[str, object]]:
    """A log of ``n`` records of mixed kinds; the records written."""
    with AuditLog(path, clock=lambda: CLOCK) as audit:
        return [
            audit.append(AuditKind.COMMIT, round=i, slot="government/eu", norm=0.5 * i)
            for i in range(n)
        ]


def test_records_are_chained_and_verify(tmp_path: Path) -> None:
    """Each record links to the previous hash and the whole log verifies."""
    path = tmp_path / "audit.jsonl"
    records = write_log(path)
    assert records[0]["prev"] == GENESIS
    assert all(b["prev"] == a["hash"] for a, b in itertools.pairwise(records))
    assert all(r["hash"] == record_hash(r) for r in records)
    assert records[2]["time"] == CLOCK.isoformat() and records[2]["fields"] == {
        "round": 2,
        "slot": "government/eu",
        "norm": 1.0,
    }
    report = verify_audit_strict(path)
    assert report.ok and report.records == 4 and report.last_hash == records[-1]["hash"]


def test_reopening_continues_the_chain(tmp_path: Path) -> None:
    """A log opened again appends after its last record and stays intact."""
    path = tmp_path / "audit.jsonl"
    first = write_log(path, 2)
    with AuditLog(path) as audit:
        assert audit.records == 2 and audit.head == first[-1]["hash"]
        record = audit.append(AuditKind.VETO, veto="government_norm", action="clip")
    assert record["seq"] == 2 and record["prev"] == first[-1]["hash"]
    assert verify_audit(path).records == 3


def test_edited_record_is_named(tmp_path: Path) -> None:
    """Changing a value inside record 3 makes verification name line 3."""
    path = tmp_path / "audit.jsonl"
    write_log(path)
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace('"round":2', '"round":7')
    path.write_text("".join(lines))
    report = verify_audit(path)
    assert not report.ok and report.first_broken_line == 3 and "edited" in report.reason
    with pytest.raises(AuditError) as info:
        verify_audit_strict(path)
    assert info.value.line == 3


def test_rehashed_edit_breaks_the_next_link(tmp_path: Path) -> None:
    """Editing a record and recomputing its hash breaks the following record's prev."""
    path = tmp_path / "audit.jsonl"
    write_log(path)
    lines = path.read_text().splitlines()
    record = json.loads(lines[1])
    record["fields"]["round"] = 9
    record["hash"] = record_hash(record)
    lines[1] = json.dumps(record, sort_keys=True, separators=(",", ":"))
    path.write_text("\n".join(lines) + "\n")
    assert verify_audit(path).first_broken_line == 3


def test_deleted_middle_record_is_named(tmp_path: Path) -> None:
    """Removing record 2 is found at line 2 (sequence and link broken)."""
    path = tmp_path / "audit.jsonl"
    write_log(path)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:1] + lines[2:]))
    assert verify_audit(path).first_broken_line == 2


def test_truncated_log_is_detected(tmp_path: Path) -> None:
    """A log cut mid-record is torn; one cut at a record boundary fails its anchor."""
    path = tmp_path / "audit.jsonl"
    records = write_log(path)
    data = path.read_bytes()
    path.write_bytes(data[:-30])
    report = verify_audit(path)
    assert not report.ok and report.torn_tail and report.first_broken_line == 4
    cut = data[: data.rfind(b"\n", 0, len(data) - 1) + 1]
    path.write_bytes(cut)
    assert verify_audit(path).ok
    anchored = verify_audit(path, anchor=str(records[-1]["hash"]))
    assert not anchored.ok and anchored.first_broken_line == 4


def test_repair_cuts_torn_line_and_records_it(tmp_path: Path) -> None:
    """Repair truncates a partial last line and appends an audit_repair record."""
    path = tmp_path / "audit.jsonl"
    write_log(path, 3)
    with open(path, "ab") as f:
        f.write(b'{"seq":3,"time":"20')
    with pytest.raises(AuditError):
        AuditLog(path)
    record = AuditLog.repair(path)
    assert record["kind"] == "audit_repair" and record["fields"]["cut_bytes"] == 19
    assert record["seq"] == 3 and verify_audit(path).ok


def test_repair_refuses_tampered_log(tmp_path: Path) -> None:
    """Repair fixes only torn tails; an edited record still raises AuditError."""
    path = tmp_path / "audit.jsonl"
    write_log(path)
    path.write_text(path.read_text().replace('"round":1', '"round":5'))
    with pytest.raises(AuditError) as info:
        AuditLog.repair(path)
    assert info.value.line == 2


def test_second_writer_is_refused(tmp_path: Path) -> None:
    """While one AuditLog holds the file, another cannot open it for writing."""
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as audit:
        audit.append(AuditKind.POLICY_LOAD, version=1)
        with pytest.raises(AuditError, match="other writer"):
            AuditLog(path)
    AuditLog(path).close()


def test_update_and_policy_records(tmp_path: Path) -> None:
    """Accepted and refused updates are recorded with their reason."""
    key = Ed25519PrivateKey.generate()
    envelope = sign_update(
        {"w": np.zeros(3, np.float32)},
        run_id="r",
        round=1,
        layer="government",
        slot_key="eu",
        instance_id="i",
        num_examples=2,
        principal_name="gov",
        private_key=key,
    )
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as audit:
        audit.append_update(envelope, UpdateCheck(True))
        audit.append_update(envelope, UpdateCheck(False, "stale_round", "old"))
    kinds = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["kind"] for r in kinds] == ["update_accepted", "update_refused"]
    assert kinds[1]["fields"]["reason"] == "stale_round"


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_single_byte_change_is_detected(tmp_path: Path, data: st.DataObject) -> None:
    """Changing any one byte of a log makes verification fail."""
    path = tmp_path / "one.jsonl"
    if not path.exists():
        write_log(path, 3)
    original = path.read_bytes()
    at = data.draw(st.integers(0, len(original) - 1))
    new = data.draw(st.integers(0, 255).filter(lambda b: b != original[at]))
    changed = bytearray(original)
    changed[at] = new
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(bytes(changed))
    assert not verify_audit(broken).ok


def test_append_refuses_an_untyped_kind(tmp_path: Path) -> None:
    """A kind spelled as a plain string is refused before anything is written."""
    from layerfed.governance.audit import AuditLog

    with AuditLog(tmp_path / "audit.jsonl") as log:
        with pytest.raises(TypeError, match="AuditKind"):
            log.append("commit", n=1)  # type: ignore[arg-type]
        assert log.records == 0


def test_batched_records_chain_and_verify_like_single_ones(tmp_path: Path) -> None:
    """Records written in a batch (one fsync) form the same intact chain as single appends."""
    from layerfed.governance.audit import AuditLog, verify_audit

    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        log.append(AuditKind.ROUND_START, n=1)
        with log.batch():
            for i in range(5):
                log.append(AuditKind.COMMIT, n=i)
        log.append(AuditKind.ROUND_END)
        assert log.records == 7
    report = verify_audit(path)
    assert report.ok and report.records == 7
