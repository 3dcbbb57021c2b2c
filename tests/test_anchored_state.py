"""Anchored state: a resumed run refuses a checkpoint, audit log or slot store it did not write.

A clean run is built once: ``run_server`` starts it (gym trust: per-run server key in
the out dir, policy pinned, round-0 checkpoint), then two rounds go through the
hostile-round harness's ``process_replies`` and the checkpoint the strategy writes
after each round. Each test copies that run, tampers with one file as a disk
attacker without the server key would, and resumes through ``run_server``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Context
from flwr.serverapp import Grid
from round_helpers import CREATOR, RUN, Harness

from layerfed.federation.run_config import RunSettings
from layerfed.federation.server_app import run_server
from layerfed.federation.server_state import ServerState, StateError
from layerfed.governance.audit import AuditLog, record_hash
from layerfed.governance.canonical import canonical_bytes
from layerfed.governance.keys import load_private_key
from layerfed.governance.signing import read_policy
from layerfed.simulation.server import gym_host
from layerfed.simulation.settings import DEFAULT_POLICY, DEFAULT_ROOT_KEY


def settings(out: Path, **kw: Any) -> RunSettings:
    """The gym's trust settings for the harness's run id; never past the last round."""
    base = {"policy": str(DEFAULT_POLICY), "root_key": str(DEFAULT_ROOT_KEY), "out": str(out)}
    return RunSettings(**{**base, "rounds": 2, "run_id": RUN, **kw})


def resume(out: Path) -> ServerState:
    """``run_server --resume`` (all rounds done: it stops after its checks and records)."""
    chosen = settings(out, resume=True)
    return run_server(cast(Grid, None), cast(Context, None), chosen, host=gym_host(chosen))


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of two harness rounds, each checkpointed and signed as the strategy does."""
    out = tmp_path_factory.mktemp("anchored") / "run"
    first = settings(out, rounds=0)
    run_server(cast(Grid, None), cast(Context, None), first, host=gym_host(first))
    key = load_private_key(out / "server-key.pem")
    for round_ in (1, 2):
        h = Harness(out, round_=round_)
        assert h.state.load()
        h.state.bind(h.audit, key, read_policy(DEFAULT_POLICY))
        for node in (1, 2):
            h.task(node, CREATOR)
        report = h.run([h.reply(n, h.arrays(CREATOR, seed=n + round_)) for n in (1, 2)])
        assert report.committed == [str(CREATOR)]
        h.state.checkpoint(round_, h.audit.head, report.metrics)
        h.audit.close()
    return out


@pytest.fixture
def run(clean: Path, tmp_path: Path) -> Path:
    """A fresh copy of the clean run."""
    return Path(shutil.copytree(clean, tmp_path / "run"))


def lines(path: Path) -> list[dict[str, Any]]:
    """The audit log's records."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_lines(path: Path, records: list[dict[str, Any]]) -> None:
    """Write records as the audit log does."""
    path.write_bytes(b"".join(canonical_bytes(r) + b"\n" for r in records))


def test_untouched_run_resumes(run: Path) -> None:
    """The clean run's checkpoint, audit log and slots verify; the resume is audited."""
    state = resume(run)
    assert state.round == 2
    records = lines(run / "audit.jsonl")
    assert [r["kind"] for r in records[-2:]] == ["policy_load", "resume"]


def _truncate(run: Path) -> None:
    audit = run / "audit.jsonl"
    write_lines(audit, lines(audit)[:-3])


def _rehash(run: Path) -> None:
    """Edit a commit record and recompute the whole chain after it."""
    audit = run / "audit.jsonl"
    records = lines(audit)
    prev = "0" * 64
    for record in records:
        if record["kind"] == "commit":
            record["fields"]["norm"] = 0.0
        record["prev"] = prev
        record["hash"] = prev = record_hash(record)
    write_lines(audit, records)


def _edit_slot(run: Path) -> None:
    """Flip a byte of the committed slot file and re-hash it in manifest.json."""
    slots = run / "state" / "slots"
    manifest = json.loads((slots / "manifest.json").read_text())
    entry = manifest["slots"][str(CREATOR)]["versions"][str(entry_version(manifest))]
    path = slots / entry["dir"] / "memories.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    entry["files"][path.name] = hashlib.sha256(bytes(data)).hexdigest()
    (slots / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))


def entry_version(manifest: dict[str, Any]) -> int:
    """The creator slot's current version."""
    return int(manifest["slots"][str(CREATOR)]["current"])


def _older_version(run: Path) -> None:
    """Point state.json at the slot's previous version (the checkpoint is not re-signed)."""
    path = run / "state" / "state.json"
    state = json.loads(path.read_text())
    state["committed"][str(CREATOR)]["version"] = 1
    path.write_text(json.dumps(state, indent=1, sort_keys=True))


def _resign_other_key(run: Path) -> None:
    """Point the checkpoint at the older version and re-sign it, with the attacker's own key."""
    state = ServerState(run, read_policy(DEFAULT_POLICY), RUN)
    assert state.load()
    with AuditLog(run / "audit.jsonl") as audit:
        state.bind(audit, Ed25519PrivateKey.generate(), read_policy(DEFAULT_POLICY))
        state.committed[str(CREATOR)]["version"] = 1
        state.seal()


@pytest.mark.parametrize(
    ("tamper", "file", "match"),
    [
        (_truncate, "audit.jsonl", "anchor"),
        (_rehash, "audit.jsonl", "anchor"),
        (_edit_slot, "manifest.json", "expected committed slot entries"),
        (_older_version, "state.json", "expected a valid server signature"),
        (_resign_other_key, "state.json", "expected a signature by server key"),
    ],
)
def test_resume_refuses_tampered_state(
    run: Path, tamper: Callable[[Path], None], file: str, match: str
) -> None:
    """Truncated or re-hashed audit logs, a slot file edited with its manifest re-hashed,
    and a checkpoint pointed at an older slot version (re-signed or not) are refused on
    resume, naming the file, before anything is appended to the audit log."""
    tamper(run)
    tampered = (run / "audit.jsonl").read_bytes()
    with pytest.raises(StateError, match=match) as caught:
        resume(run)
    assert file in str(caught.value)
    assert (run / "audit.jsonl").read_bytes() == tampered


def test_checkpoint_records_anchors(run: Path) -> None:
    """Each checkpoint records the audit head and length, the slot digest and a signature."""
    state = json.loads((run / "state" / "state.json").read_text())
    records = lines(run / "audit.jsonl")
    assert state["audit_records"] == len(records)
    assert state["audit_head"] == records[-1]["hash"]
    assert len(state["slots_digest"]) == 64 and len(state["signature"]["keyid"]) == 64
