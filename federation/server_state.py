"""The server's committed state: slot versions, lazy decay, metrics, signed checkpoints.

A slot's value at round ``r`` is its committed arrays (from round ``s``) times
each memory's decay over ``r - s`` rounds, or over the wall-clock seconds since
the commit for a half-life given as a duration (each commit records its time),
so slots nobody touches cost nothing per round. After each round
:meth:`ServerState.checkpoint` writes ``state.json`` (round, slot versions and
times, audit head, metrics) atomically; slot files are written
before it, so a crash at any point resumes from the last complete round.

Each checkpoint also pins the run: the run id (with its random nonce), the
verified policy's canonical hash and version (its bytes kept under
``state/policies/<hash>.json``), the audit log's head and length, and a digest of
the committed versions' manifest entries; bound to a server key it is signed
(Ed25519 over ``b"layerfed/checkpoint/v1\n"`` + the sorted compact JSON of every
other field). :meth:`ServerState.verify_anchors` checks all of that on resume.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import ValidationError

from layerfed.atomic import write_atomic
from layerfed.errors import LayerfedError
from layerfed.governance.approvals import ApprovalGate
from layerfed.governance.audit import AuditLog, verify_audit
from layerfed.governance.canonical import canonical_bytes, policy_bytes, policy_hash
from layerfed.governance.keys import key_id
from layerfed.governance.schema import Policy
from layerfed.layers.errors import SlotStoreError
from layerfed.layers.memory import decay_arrays, seconds_between
from layerfed.layers.slots import SlotId, SlotSpec
from layerfed.layers.store import MANIFEST, SlotStore

__all__ = [
    "STATE_FILE",
    "InstanceSlots",
    "ServerState",
    "StateError",
    "checkpoint_run_id",
    "read_pinned_policy",
]

log = logging.getLogger("layerfed")
STATE_FILE = "state.json"
METRICS_FILE = "metrics.json"
FORMAT = 2
CHECKPOINT_DOMAIN = b"layerfed/checkpoint/v1\n"
InstanceSlots = Callable[[int], Iterable[tuple[str, Mapping[str, np.ndarray[Any, Any]]]]]
"""``(tag, arrays)`` of instance-owned slots saved before round ``r + 1``, in a fixed order:
what a host that can see its instances' disks adds to the state digest (the server itself
never reads an instance's disk)."""


class StateError(LayerfedError):
    """The checkpoint cannot be read or does not belong to this run."""


class ServerState:
    """Committed slots (by version and round), the last complete round, and metrics."""

    def __init__(
        self,
        out_dir: Path,
        policy: Policy,
        run_id: str,
        *,
        clock: Callable[[], float] = time.time,
        instance_slots: InstanceSlots | None = None,
    ) -> None:
        self.out_dir = out_dir
        self.clock = clock
        self.instance_slots = instance_slots
        """Instance-owned slots the host sees (added to :meth:`digest`); None: none."""
        self.root = out_dir / "state"
        self.policy = policy
        self.run_id = run_id
        self.store = SlotStore(self.root / "slots")
        self.committed: dict[str, dict[str, float]] = {}  # version, round, time
        self.round = 0
        self.metrics: list[dict[str, Any]] = []
        self.audit_head = ""
        self.audit_records = 0
        self.policy_hash = ""
        self.policy_version = 0
        self.approvals = ApprovalGate(out_dir / "approvals")
        """Where quorum-veto holders' approvals are read from (``<out>/approvals/``)."""
        self._audit: AuditLog | None = None
        self._key: Ed25519PrivateKey | None = None
        self._saved: dict[str, Any] = {}

    def version(self, slot: SlotId) -> int:
        """Committed version of ``slot`` (0: never committed, all zeros)."""
        return int(self.committed.get(str(slot), {}).get("version", 0))

    def current(self, slot: SlotId, spec: SlotSpec, round_: int) -> dict[str, np.ndarray[Any, Any]]:
        """The slot's arrays as they stand at ``round_`` and now (decay applied lazily).

        Round half-lives decay over the rounds since the commit, duration half-lives
        over the clock's seconds since it (none for a commit recorded without a time).
        """
        entry = self.committed.get(str(slot))
        if entry is None:
            return {n: np.zeros(s, dtype=np.float32) for n, s in spec.shapes().items()}
        arrays = self.store.load(slot, int(entry["version"]))
        layer = self.policy.layer(slot.layer)
        elapsed = max(0, round_ - int(entry["round"]))
        timed = any(m.half_life_seconds is not None for m in layer.memories)
        seconds = seconds_between(entry.get("time"), self.clock()) if timed else 0.0
        if elapsed == 0 and seconds == 0:
            return dict(arrays)
        return decay_arrays(arrays, layer, rounds=elapsed, seconds=seconds)

    def commit(
        self, slot: SlotId, arrays: dict[str, np.ndarray[Any, Any]], spec: SlotSpec, round_: int
    ) -> int:
        """Write a new version of ``slot`` as of ``round_`` and the clock's time now.

        It counts once checkpointed.
        """
        now = self.clock()
        info = {"round": round_, "run_id": self.run_id, "time": now}
        version = self.store.save(slot, arrays, spec, info)
        self.committed[str(slot)] = {"version": version, "round": round_, "time": now}
        return version

    def bind(self, audit: AuditLog, key: Ed25519PrivateKey, policy: Policy) -> None:
        """Anchor every later checkpoint: this audit log, signed by ``key``, pinning ``policy``."""
        self._audit, self._key = audit, key
        self.policy_hash, self.policy_version = policy_hash(policy), policy.version
        folder = self.root / "policies"
        folder.mkdir(parents=True, exist_ok=True)
        pinned = folder / f"{self.policy_hash}.json"
        if not pinned.exists():
            write_atomic(pinned, policy_bytes(policy))

    def checkpoint(self, round_: int, audit_head: str, round_metrics: dict[str, Any]) -> None:
        """Make ``round_`` the last complete round: metrics and state, atomically."""
        self.round = round_
        self.metrics = [m for m in self.metrics if m["round"] < round_] + [round_metrics]
        metrics = {"run_id": self.run_id, "rounds": self.metrics}
        write_atomic(self.out_dir / METRICS_FILE, _dumps(metrics))
        self.seal(audit_head)

    def seal(self, audit_head: str = "") -> None:
        """Write ``state.json`` for the current round (signed when bound)."""
        if self._audit is not None:
            audit_head, self.audit_records = self._audit.head, self._audit.records
        self.audit_head = audit_head
        state: dict[str, Any] = {
            "format": FORMAT,
            "run_id": self.run_id,
            "round": self.round,
            "committed": self.committed,
            "audit_head": audit_head,
            "audit_records": self.audit_records,
            "policy": {"hash": self.policy_hash, "version": self.policy_version},
            "slots_digest": self.slots_digest(),
            "metrics": self.metrics,
        }
        if self._key is not None:
            sig = self._key.sign(_payload(state))
            state["signature"] = {
                "keyid": key_id(self._key.public_key()),
                "sig": base64.b64encode(sig).decode("ascii"),
            }
        write_atomic(self.root / STATE_FILE, _dumps(state))
        self._saved = state
        log.info("checkpointed round %s", self.round)

    def load(self) -> bool:
        """Restore the last checkpoint of this run; False when there is none.

        This reads; :meth:`verify_anchors` decides whether it may be trusted.
        """
        path = self.root / STATE_FILE
        if not path.exists():
            return False
        try:
            state = json.loads(path.read_bytes())
            if state["run_id"] != self.run_id or state["format"] != FORMAT:
                raise StateError(
                    f"{path}: expected a checkpoint of run {self.run_id!r} (format {FORMAT}), "
                    f"got run {state['run_id']!r} (format {state['format']!r})"
                )
            self.round = int(state["round"])
            self.committed = {str(k): dict(v) for k, v in state["committed"].items()}
            self.metrics = list(state["metrics"])
            self.audit_head = str(state["audit_head"])
            self.audit_records = int(state["audit_records"])
            self.policy_hash = str(state["policy"]["hash"])
            self.policy_version = int(state["policy"]["version"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise StateError(f"{path}: expected a layerfed checkpoint, got {e}") from e
        self._saved = state
        return True

    def verify_anchors(self, server_key: Ed25519PublicKey, audit_path: Path) -> None:
        """Raise StateError (naming the file) unless the loaded checkpoint is the server's own.

        Checks its signature by ``server_key``, that the audit log holds the anchored
        head as record number ``audit_records`` (not cut short, not rewritten, not
        re-hashed), and that the committed slot versions' manifest entries and files
        are the ones checkpointed.
        """
        path = self.root / STATE_FILE
        _check_signature(path, self._saved, server_key)
        _check_audit(audit_path, self.audit_head, self.audit_records)
        want = str(self._saved.get("slots_digest"))
        got = self.slots_digest()
        if got != want:
            raise StateError(
                f"{self.store.root / MANIFEST}: expected committed slot entries with digest {want} "
                f"(checkpoint of round {self.round}), got {got}: slot files or manifest rewritten"
            )
        for name, entry in sorted(self.committed.items()):
            try:
                self.store.verify(SlotId.parse(name), int(entry["version"]))
            except SlotStoreError as e:
                raise StateError(str(e)) from e

    def slots_digest(self) -> str:
        """SHA-256 over the manifest entries (file digests) of every committed version."""
        entries: dict[str, Any] = {}
        for name, entry in sorted(self.committed.items()):
            try:
                files = self.store.record(SlotId.parse(name), int(entry["version"]))["files"]
            except LayerfedError:
                files = None  # not in the manifest: verify_anchors names the slot
            entries[name] = {"version": int(entry["version"]), "files": files}
        return hashlib.sha256(canonical_bytes(entries)).hexdigest()

    def digest(self) -> str:
        """A digest of every committed slot, after the instance-owned slots the host sees.

        Two runs with the same seed reach the same digest, resumed or not.
        """
        h = hashlib.sha256()
        for tag, arrays in self.instance_slots(self.round) if self.instance_slots else ():
            h.update(tag.encode())
            for key in sorted(arrays):
                h.update(key.encode())
                h.update(np.ascontiguousarray(arrays[key]).tobytes())
        for name in sorted(self.committed):
            slot = SlotId.parse(name)
            arrays = self.store.load(slot, int(self.committed[name]["version"]))
            for key in sorted(arrays):
                h.update(key.encode())
                h.update(np.ascontiguousarray(arrays[key]).tobytes())
        return h.hexdigest()


def _dumps(data: Any) -> bytes:
    return json.dumps(data, indent=1, sort_keys=True).encode("utf-8")


def _payload(state: dict[str, Any]) -> bytes:
    body = {k: v for k, v in state.items() if k != "signature"}
    return CHECKPOINT_DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _check_signature(path: Path, state: dict[str, Any], server_key: Ed25519PublicKey) -> None:
    signature = state.get("signature")
    want = key_id(server_key)
    if not isinstance(signature, dict):
        raise StateError(f"{path}: expected a checkpoint signed by server key {want}, got none")
    if signature.get("keyid") != want:
        raise StateError(
            f"{path}: expected a signature by server key {want}, got one by {signature.get('keyid')}"
        )
    try:
        server_key.verify(
            base64.b64decode(str(signature.get("sig")), validate=True), _payload(state)
        )
    except (InvalidSignature, binascii.Error, ValueError) as e:
        raise StateError(
            f"{path}: expected a valid server signature, got a bad one (edited after it was signed)"
        ) from e


def _check_audit(path: Path, head: str, records: int) -> None:
    """The log holds ``head`` as its ``records``-th record; only a torn tail may follow a crash."""
    report = verify_audit(path, anchor=head)
    if not report.ok and not report.torn_tail:
        raise StateError(f"{path}:{report.first_broken_line}: {report.reason}")
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
        at = json.loads(lines[records - 1])["hash"] if records >= 1 else None
    except (OSError, ValueError, IndexError, KeyError, TypeError) as e:
        raise StateError(f"{path}:{records}: expected the anchored record, got {e}") from e
    if at != head:
        raise StateError(
            f"{path}:{records}: expected the checkpoint's anchor {head} as record {records}, "
            f"got {at}: the log was cut short or rewritten"
        )


def checkpoint_run_id(out_dir: Path) -> str:
    """The run id a checkpoint in ``out_dir`` records ("" when there is none to read).

    Resuming keeps it; the signed checkpoint is verified before the run trusts it.
    """
    try:
        return str(json.loads((out_dir / "state" / STATE_FILE).read_bytes())["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def read_pinned_policy(out_dir: Path) -> Policy | None:
    """The verified policy the checkpoint in ``out_dir`` pins (None: no checkpoint).

    Its bytes must hash to the pinned hash; the checkpoint's own signature is
    checked by :meth:`ServerState.verify_anchors`.
    """
    path = out_dir / "state" / STATE_FILE
    if not path.exists():
        return None
    try:
        pinned = str(json.loads(path.read_bytes())["policy"]["hash"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StateError(f"{path}: expected a checkpoint pinning a policy hash, got {e}") from e
    file = out_dir / "state" / "policies" / f"{pinned}.json"
    try:
        policy = Policy.model_validate_json(file.read_bytes())
    except (OSError, ValidationError, ValueError) as e:
        raise StateError(f"{file}: expected the pinned policy, got {e}") from e
    if policy_hash(policy) != pinned:
        raise StateError(f"{file}: expected a policy with hash {pinned}, got {policy_hash(policy)}")
    return policy
