"""Quorum approvals: a held candidate waits for its holders' signed approvals, then commits
or expires, through the hostile-round harness's ``process_replies`` (issue 13).

The harness's policy gains a quorum veto: the creator layer's principals must approve
every community candidate (one signature, a short timeout). Holders approve with
``layerfed approve`` into ``<out>/approvals/`` while the round waits.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from deploy_helpers import write_private_key
from round_helpers import COMMUNITY, RUN, SEED, Harness
from round_helpers import policy as sim_policy_of_harness
from typer.testing import CliRunner

from layerfed.cli import app
from layerfed.governance.approvals import (
    ApprovalError,
    ApprovalGate,
    approvals_for,
    sign_approval,
    verify_approval,
    write_approval,
)
from layerfed.governance.audit import AuditLog
from layerfed.governance.canonical import arrays_digest
from layerfed.governance.schema import Policy, QuorumCondition, Veto
from layerfed.simulation.keys import layer_principal, sim_layer_key

CREATOR_HOLDER = layer_principal("creator")
"""``sim_creator``: a principal of the creator layer, whose key the test holds."""


def quorum(policy: Policy, timeout_s: float) -> Policy:
    """``policy`` plus: the creator layer must approve every community candidate."""
    veto = Veto(
        name="creator_quorum",
        holder="creator",
        applies_to=["community"],
        condition=QuorumCondition(kind="quorum", min_signatures=1, timeout_s=timeout_s),
        action="hold",
    )
    return policy.model_copy(update={"vetoes": [*policy.vetoes, veto]})


def harness(root: Path, timeout_s: float) -> Harness:
    """A harness whose round has two honest community replies under the quorum veto."""
    h = Harness(root)
    h.policy = quorum(h.policy, timeout_s)
    h.state.approvals.poll_s = 0.05
    for node in (1, 2):
        h.task(node, COMMUNITY)
    return h


def replies(h: Harness) -> list[Any]:
    """The round's two honest replies."""
    return [h.reply(n, h.arrays(COMMUNITY, seed=n)) for n in (1, 2)]


def wait_for_request(audit: Path, timeout: float = 120.0) -> dict[str, Any]:
    """The ``approval_requested`` record, once the waiting round has written it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if audit.exists():
            for line in audit.read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                if record["kind"] == "approval_requested":
                    return dict(record["fields"])
        time.sleep(0.05)
    raise AssertionError("no approval_requested record")


def test_held_candidate_commits_once_its_holder_approves(tmp_path: Path) -> None:
    """The round audits the request with the candidate digest and waits; `layerfed approve`
    by a creator principal releases it, and the slot commits, audited as granted."""
    h = harness(tmp_path / "run", timeout_s=300.0)
    key = write_private_key(sim_layer_key(SEED, "creator"), tmp_path / "keys" / "creator.pem")
    done: list[Any] = []
    worker = threading.Thread(target=lambda: done.append(h.run(replies(h))))
    worker.start()
    request = wait_for_request(h.root / "audit.jsonl")
    assert request["slot"] == str(COMMUNITY) and request["missing"] == {"creator_quorum": 1}
    args = ["approve", "--out", str(h.root), "--run-id", RUN, "--round", "1"]
    args += ["--slot", str(COMMUNITY), "--candidate", request["candidate"]]
    args += ["--principal", CREATOR_HOLDER, "--key", str(key)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    worker.join(timeout=120)
    assert not worker.is_alive() and done[0].committed == [str(COMMUNITY)]
    (granted,) = h.records("approval_granted")
    assert granted["principals"] == [CREATOR_HOLDER]
    assert granted["candidate"] == request["candidate"]
    assert not h.records("veto")


def test_held_candidate_expires_without_quorum(tmp_path: Path) -> None:
    """Approvals for another candidate, or by a principal that holds no veto, do not count:
    after the veto's timeout the candidate expires, is audited, and is not committed."""
    h = harness(tmp_path / "run", timeout_s=1.0)
    creator = sim_layer_key(SEED, "creator")
    community = sim_layer_key(SEED, "community")
    folder = h.root / "approvals"
    other = sign_approval(
        run_id=RUN,
        round=1,
        slot=str(COMMUNITY),
        candidate="0" * 64,
        principal=CREATOR_HOLDER,
        private_key=creator,
    )
    write_approval(other, folder)
    started = time.monotonic()
    report = h.run(replies(h))
    assert time.monotonic() - started >= 1.0
    assert report.committed == []
    (expired,) = h.records("approval_expired")
    assert expired["missing"] == {"creator_quorum": 1} and expired["principals"] == []
    (veto,) = h.records("veto")
    assert veto["veto"] == "creator_quorum" and veto["action"] == "hold"
    not_holder = sign_approval(
        run_id=RUN,
        round=1,
        slot=str(COMMUNITY),
        candidate=expired["candidate"],
        principal=layer_principal("community"),
        private_key=community,
    )
    write_approval(not_holder, folder)
    found = approvals_for(
        folder, h.policy, run_id=RUN, round=1, slot=str(COMMUNITY), candidate=expired["candidate"]
    )
    assert found == {layer_principal("community")}  # verified, but holds no creator veto


def test_approval_signature_binds_every_field(tmp_path: Path) -> None:
    """An approval verifies only under its principal's own key and unchanged fields."""
    policy = sim_policy_of_harness()
    creator = sim_layer_key(SEED, "creator")
    approval = sign_approval(
        run_id=RUN,
        round=1,
        slot=str(COMMUNITY),
        candidate="a" * 64,
        principal=CREATOR_HOLDER,
        private_key=creator,
    )
    verify_approval(approval, policy)
    for change in ({"round": 2}, {"candidate": "b" * 64}, {"run_id": "other"}):
        with pytest.raises(ApprovalError, match="signature"):
            verify_approval(approval.model_copy(update=change), policy)
    impostor = sign_approval(
        run_id=RUN,
        round=1,
        slot=str(COMMUNITY),
        candidate="a" * 64,
        principal=CREATOR_HOLDER,
        private_key=sim_layer_key(SEED, "community"),
    )
    with pytest.raises(ApprovalError, match="expected key"):
        verify_approval(impostor, policy)
    unknown = approval.model_copy(update={"principal": "nobody"})
    with pytest.raises(ApprovalError, match="policy principal"):
        verify_approval(unknown, policy)
    assert write_approval(approval, tmp_path / "a").name.startswith("community__global-r1-")


def gate_case(
    root: Path, timeout_s: float
) -> tuple[ApprovalGate, Policy, AuditLog, dict[str, Any]]:
    """A gate on ``root/approvals`` under a one-signature creator quorum, with its candidate."""
    folder = root / "approvals"
    folder.mkdir(parents=True)
    gate = ApprovalGate(folder, poll_s=0.05)
    candidate = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    return (
        gate,
        quorum(sim_policy_of_harness(), timeout_s),
        AuditLog(root / "audit.jsonl"),
        candidate,
    )


def valid(digest: str, layer: str) -> Any:
    """``layer``'s simulated principal's approval of ``digest`` for round 1's community slot."""
    return sign_approval(
        run_id=RUN,
        round=1,
        slot=str(COMMUNITY),
        candidate=digest,
        principal=layer_principal(layer),
        private_key=sim_layer_key(SEED, layer),
    )


def audit_kinds(root: Path) -> list[dict[str, Any]]:
    """Every audit record of ``root/audit.jsonl``."""
    return [json.loads(line) for line in (root / "audit.jsonl").read_text().splitlines()]


def test_a_fifo_in_the_approvals_folder_cannot_hang_the_gate(tmp_path: Path) -> None:
    """A FIFO (and a symlink) named ``*.json`` are refused unread, audited, and the two
    valid approvals beside them grant the candidate well within ``timeout_s``."""
    gate, policy, audit, candidate = gate_case(tmp_path, timeout_s=5.0)
    digest = arrays_digest(candidate)
    fifo = gate.folder / "0000-fifo.json"
    os.mkfifo(fifo)
    (gate.folder / "0001-link.json").symlink_to("/dev/zero")
    for layer in ("creator", "community"):
        write_approval(valid(digest, layer), gate.folder)
    done: list[set[str]] = []
    worker = threading.Thread(
        target=lambda: done.append(gate.gather(policy, RUN, audit, 1, COMMUNITY, candidate)),
        daemon=True,
    )
    try:
        worker.start()
        worker.join(timeout=30.0)
        hung = worker.is_alive()
    finally:
        with contextlib.suppress(OSError):  # free a reader blocked in open() (old code)
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(timeout=30.0)
    assert not hung, "the gate blocked on the FIFO"
    assert done == [{CREATOR_HOLDER, layer_principal("community")}]
    records = audit_kinds(tmp_path)
    assert [r["kind"] for r in records][-1] == "approval_granted"
    refused = {
        r["fields"]["file"]: r["fields"]["reason"]
        for r in records
        if r["kind"] == "approval_refused"
    }
    assert "not a regular file" in refused["0000-fifo.json"]
    assert "not a regular file" in refused["0001-link.json"]


def test_ten_thousand_junk_files_do_not_hide_a_valid_approval(tmp_path: Path) -> None:
    """10,000 junk ``*.json`` files that sort first cannot starve the candidate's own
    approval file: the gate grants at once instead of letting the candidate expire."""
    gate, policy, audit, candidate = gate_case(tmp_path, timeout_s=2.0)
    digest = arrays_digest(candidate)
    for i in range(10_000):
        (gate.folder / f"0000-junk-{i:05d}.json").write_text("{}", encoding="utf-8")
    write_approval(valid(digest, "creator"), gate.folder)
    started = time.monotonic()
    got = gate.gather(policy, RUN, audit, 1, COMMUNITY, candidate)
    assert got == {CREATOR_HOLDER} and time.monotonic() - started < 2.0
    kinds = [r["kind"] for r in audit_kinds(tmp_path)]
    assert kinds[-1] == "approval_granted" and "approval_expired" not in kinds
    assert kinds.count("approval_refused") <= 64  # refusals are audited, boundedly


def test_a_refused_approval_is_audited_with_its_reason(tmp_path: Path) -> None:
    """A forged, an oversized and an unparsable approval each get an ``approval_refused``
    record naming the file and why; an approval under another name still counts."""
    gate, policy, audit, candidate = gate_case(tmp_path, timeout_s=0.2)
    digest = arrays_digest(candidate)
    forged = valid(digest, "creator").model_copy(update={"signature": "B" * 86 + "=="})
    (gate.folder / "forged.json").write_text(forged.model_dump_json(), encoding="utf-8")
    (gate.folder / "big.json").write_bytes(b" " * (65 * 1024))
    (gate.folder / "bad.json").write_text("{not json", encoding="utf-8")
    renamed = valid(digest, "community").model_dump_json()
    (gate.folder / "copied-by-hand.json").write_text(renamed, encoding="utf-8")
    got = gate.gather(policy, RUN, audit, 1, COMMUNITY, candidate)
    assert got == {layer_principal("community")}
    refused = {
        r["fields"]["file"]: r["fields"]["reason"]
        for r in audit_kinds(tmp_path)
        if r["kind"] == "approval_refused"
    }
    assert set(refused) == {"forged.json", "big.json", "bad.json"}
    assert "signature" in refused["forged.json"] and "bytes" in refused["big.json"]
    assert all(
        r["fields"]["candidate"] == digest
        for r in audit_kinds(tmp_path)
        if r["kind"] == "approval_refused"
    )
