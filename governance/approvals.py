"""Quorum approvals: signed "yes" votes on one held candidate, and the gate that waits for them.

A quorum veto (``{kind: quorum, min_signatures: N, timeout_s: T}``) holds a slot's
candidate until N principals of the veto's holder layer approve it. An
:class:`Approval` binds the run, round, slot and the candidate's digest
(:func:`~layerfed.governance.canonical.arrays_digest` of the aggregated step), so
it cannot be replayed for another candidate. Its signature is Ed25519 over
``b"layerfed/approval/v1\\n"`` + the canonical bytes of every other field.
Holders write them with ``layerfed approve`` into ``<run out>/approvals/``; the
server's :class:`ApprovalGate` audits the request, polls that folder until the
quorum is met or ``timeout_s`` passes, then audits the grant or the expiry.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from layerfed.governance.audit import AuditLog
from layerfed.governance.audit_events import AuditKind
from layerfed.governance.canonical import arrays_digest, canonical_bytes
from layerfed.governance.keys import KeyFileError, TrustError, key_id, parse_public_key
from layerfed.governance.schema import Policy, QuorumCondition, Veto

__all__ = [
    "APPROVAL_DOMAIN",
    "Approval",
    "ApprovalError",
    "ApprovalGate",
    "approvals_for",
    "sign_approval",
    "verify_approval",
    "write_approval",
]

log = logging.getLogger("layerfed")
APPROVAL_DOMAIN = b"layerfed/approval/v1\n"
_MAX_FILE = 64 * 1024
_MAX_FILES = 10_000


class ApprovalError(TrustError):
    """An approval that does not verify (names the file or principal, expected and got)."""


class Approval(BaseModel):
    """One holder's signed approval of one candidate."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_id: str = Field(min_length=1, max_length=200)
    round: int = Field(ge=1)
    slot: str = Field(min_length=3, max_length=200)
    candidate: str = Field(pattern=r"^[0-9a-f]{64}$")
    principal: str = Field(min_length=1, max_length=64)
    keyid: str = Field(pattern=r"^[0-9a-f]{64}$")
    signature: str = Field(pattern=r"^[A-Za-z0-9+/]{86}==$")

    def payload(self) -> bytes:
        """What the signature covers."""
        return APPROVAL_DOMAIN + canonical_bytes(self.model_dump(exclude={"signature"}))


def sign_approval(
    *,
    run_id: str,
    round: int,
    slot: str,
    candidate: str,
    principal: str,
    private_key: Ed25519PrivateKey,
) -> Approval:
    """``principal``'s approval of ``candidate`` for ``slot`` in round ``round`` of ``run_id``."""
    unsigned = Approval(
        run_id=run_id,
        round=round,
        slot=slot,
        candidate=candidate,
        principal=principal,
        keyid=key_id(private_key.public_key()),
        signature="A" * 86 + "==",
    )
    sig = private_key.sign(unsigned.payload())
    return unsigned.model_copy(update={"signature": base64.b64encode(sig).decode("ascii")})


def write_approval(approval: Approval, folder: Path) -> Path:
    """Write ``approval`` as ``<folder>/<slot>-r<round>-<principal>.json``; its path."""
    folder.mkdir(parents=True, exist_ok=True)
    slot = approval.slot.replace("/", "__")
    path = folder / f"{slot}-r{approval.round}-{approval.principal}-{approval.keyid[:12]}.json"
    path.write_text(approval.model_dump_json(indent=1) + "\n", encoding="utf-8")
    return path


def verify_approval(approval: Approval, policy: Policy) -> None:
    """Raise ApprovalError unless a policy principal's own key signed ``approval``."""
    principal = next((p for p in policy.principals if p.name == approval.principal), None)
    if principal is None:
        raise ApprovalError(
            f"approval principal: expected a policy principal, got {approval.principal!r}"
        )
    try:
        public = parse_public_key(principal.public_key, f"principals.{principal.name}.public_key")
    except KeyFileError as e:
        raise ApprovalError(str(e)) from e
    if key_id(public) != approval.keyid:
        raise ApprovalError(
            f"approval by {principal.name}: expected key {key_id(public)}, got {approval.keyid}"
        )
    try:
        public.verify(base64.b64decode(approval.signature, validate=True), approval.payload())
    except (InvalidSignature, binascii.Error, ValueError) as e:
        raise ApprovalError(
            f"approval by {principal.name}: expected a valid signature, got a bad one"
        ) from e


def approvals_for(
    folder: Path, policy: Policy, *, run_id: str, round: int, slot: str, candidate: str
) -> set[str]:
    """Principals whose verified approval of exactly this candidate lies in ``folder``.

    Files that do not parse, verify or match the binding count for nothing (logged).
    """
    if not folder.is_dir():
        return set()
    approved: set[str] = set()
    for path in sorted(folder.glob("*.json"))[:_MAX_FILES]:
        try:
            with open(path, "rb") as f:
                raw = f.read(_MAX_FILE + 1)
            if len(raw) > _MAX_FILE:
                raise ValueError(f"a file over {_MAX_FILE} bytes")
            approval = Approval.model_validate(json.loads(raw.decode("utf-8")))
        except (OSError, ValueError, ValidationError) as e:
            log.warning("%s: expected a layerfed approval, got %s", path, str(e).splitlines()[0])
            continue
        binding = (approval.run_id, approval.round, approval.slot, approval.candidate)
        if binding != (run_id, round, slot, candidate):
            continue
        try:
            verify_approval(approval, policy)
        except ApprovalError as e:
            log.warning("%s: %s", path, e)
            continue
        approved.add(approval.principal)
    return approved


def _quorum_vetoes(policy: Policy, layer: str) -> list[tuple[Veto, QuorumCondition]]:
    return [
        (v, v.condition)
        for v in policy.vetoes
        if layer in v.applies_to and isinstance(v.condition, QuorumCondition)
    ]


def _missing(
    policy: Policy, vetoes: list[tuple[Veto, QuorumCondition]], got: set[str]
) -> dict[str, int]:
    """Approvals each unmet quorum veto still lacks."""
    out: dict[str, int] = {}
    for veto, cond in vetoes:
        holders = {p.name for p in policy.principals if p.layer == veto.holder}
        lacking = cond.min_signatures - len(holders & got)
        if lacking > 0:
            out[veto.name] = lacking
    return out


@dataclass
class ApprovalGate:
    """Waits, per held candidate, for quorum approvals in ``folder`` (see module docs)."""

    folder: Path
    poll_s: float = 0.5
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep

    def gather(
        self,
        policy: Policy,
        run_id: str,
        audit: AuditLog,
        round_: int,
        slot: object,
        candidate: Mapping[str, np.ndarray[Any, Any]],
    ) -> set[str]:
        """The approving principals of ``candidate``; waits while a quorum veto lacks them.

        Returns at once when no quorum veto applies to the slot's layer. Otherwise
        audits ``approval_requested`` (with the candidate digest holders must sign),
        polls until every quorum is met (``approval_granted``) or the longest
        ``timeout_s`` passes (``approval_expired``: the vetoes then hold the candidate).
        """
        name = str(slot)
        vetoes = _quorum_vetoes(policy, name.partition("/")[0])
        if not vetoes:
            return set()
        digest = arrays_digest(candidate)

        def look() -> set[str]:
            return approvals_for(
                self.folder, policy, run_id=run_id, round=round_, slot=name, candidate=digest
            )

        got = look()
        timeout = max(cond.timeout_s for _, cond in vetoes)
        if _missing(policy, vetoes, got):
            audit.append(
                AuditKind.APPROVAL_REQUESTED,
                round=round_,
                slot=name,
                candidate=digest,
                missing=_missing(policy, vetoes, got),
                timeout_s=timeout,
                folder=str(self.folder),
            )
            log.warning(
                "slot %s held for approval: layerfed approve --out %s --run-id %s --round %s "
                "--slot %s --candidate %s --principal NAME --key KEY.pem (waiting %ss)",
                name,
                self.folder.parent,
                run_id,
                round_,
                name,
                digest,
                timeout,
            )
            deadline = self.clock() + timeout
            while _missing(policy, vetoes, got) and self.clock() < deadline:
                self.sleep(min(self.poll_s, max(0.0, deadline - self.clock())))
                got = look()
        missing = _missing(policy, vetoes, got)
        kind = AuditKind.APPROVAL_EXPIRED if missing else AuditKind.APPROVAL_GRANTED
        audit.append(
            kind, round=round_, slot=name, candidate=digest, principals=sorted(got), missing=missing
        )
        return got
