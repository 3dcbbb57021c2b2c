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

The folder is untrusted input. Each look first opens the files named for this
candidate (:func:`approval_name`: slot, round, the digest's first 16 hex digits,
principal and key id, one per policy principal), so no number of other files can
hide an approval ``layerfed approve`` wrote; then at most ``_MAX_SCAN`` files under
other names (those holding the digest prefix first; names of the canonical shape for
another candidate are skipped unread). Only regular files are read: ``lstat`` first,
then ``open(O_NONBLOCK | O_NOFOLLOW)`` and ``fstat`` (a FIFO, device, directory or
symlink is refused unread, never blocks), at most ``_MAX_FILE`` bytes. Every file
refused (not a regular file, too big, not an approval, a bad signature or key) is
returned with its reason, and the gate audits it (``approval_refused``).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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
    "ApprovalScan",
    "Refusal",
    "approval_name",
    "approvals_for",
    "scan_approvals",
    "sign_approval",
    "verify_approval",
    "write_approval",
]

log = logging.getLogger("layerfed")
APPROVAL_DOMAIN = b"layerfed/approval/v1\n"
_MAX_FILE = 64 * 1024
_MAX_SCAN = 256
"""Files under other names than a principal's own opened per look."""
_MAX_LISTED = 100_000
"""Folder entries listed per look (the rest are not considered)."""
_MAX_AUDITED = 64
"""Refusals audited one by one per held candidate; the rest are counted."""
_PREFIX = 16
_CANONICAL = re.compile(r"^.+-r[0-9]+-([0-9a-f]{16})-.+-[0-9a-f]{12}\.json$")
_NOT_REGULAR = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFLNK: "a symlink",
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


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


def approval_name(approval: Approval) -> str:
    """``<slot>-r<round>-<digest[:16]>-<principal>-<keyid[:12]>.json``: where it is looked up."""
    slot = approval.slot.replace("/", "__")
    head = f"{slot}-r{approval.round}-{approval.candidate[:_PREFIX]}"
    return f"{head}-{approval.principal}-{approval.keyid[:12]}.json"


def write_approval(approval: Approval, folder: Path) -> Path:
    """Write ``approval`` as ``<folder>/``:func:`approval_name`; its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / approval_name(approval)
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


@dataclass(frozen=True)
class Refusal:
    """A file in the approvals folder that counts for nothing, and why."""

    file: str
    reason: str


@dataclass
class ApprovalScan:
    """One look at the folder: the verified principals and the files refused."""

    principals: set[str] = field(default_factory=set)
    refused: list[Refusal] = field(default_factory=list)


def _read_regular(path: Path) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``_MAX_FILE`` bytes.

    Raises FileNotFoundError when absent and ValueError (the reason) otherwise; never
    blocks (no FIFO or device is opened for reading) and never follows a symlink.
    """
    mode = os.lstat(path).st_mode
    if not stat.S_ISREG(mode):
        raise ValueError(f"not a regular file ({_NOT_REGULAR.get(stat.S_IFMT(mode), 'other')})")
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise ValueError(f"not readable ({e.strerror})") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file (replaced while opened)")
        chunks: list[bytes] = []
        size = 0
        while size <= _MAX_FILE:
            chunk = os.read(fd, _MAX_FILE + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > _MAX_FILE:
        raise ValueError(f"expected at most {_MAX_FILE} bytes, got more")
    return b"".join(chunks)


def _own_names(policy: Policy, run: tuple[str, int, str, str]) -> list[str]:
    """The file name each policy principal's approval of this candidate would have."""
    names: list[str] = []
    for p in policy.principals:
        try:
            keyid = key_id(parse_public_key(p.public_key, f"principals.{p.name}.public_key"))
        except KeyFileError:
            continue
        fields = dict(zip(("run_id", "round", "slot", "candidate"), run, strict=True))
        stub = Approval(**fields, principal=p.name, keyid=keyid, signature="A" * 86 + "==")
        names.append(approval_name(stub))
    return sorted(set(names))


def _other_names(folder: Path, own: list[str], candidate: str) -> list[str]:
    """Up to ``_MAX_SCAN`` other ``*.json`` names, those holding the digest prefix first."""
    skip = set(own)
    mine: list[str] = []
    rest: list[str] = []
    with os.scandir(folder) as entries:
        for n, entry in enumerate(entries):
            if n >= _MAX_LISTED:
                log.warning("%s: over %s entries, the rest not read", folder, _MAX_LISTED)
                break
            name = entry.name
            if not name.endswith(".json") or name in skip:
                continue
            shape = _CANONICAL.match(name)
            if shape is not None and shape.group(1) != candidate[:_PREFIX]:
                continue  # layerfed approve's name for another candidate
            (mine if candidate[:_PREFIX] in name else rest).append(name)
    return (sorted(mine) + sorted(rest))[:_MAX_SCAN]


def scan_approvals(
    folder: Path, policy: Policy, *, run_id: str, round: int, slot: str, candidate: str
) -> ApprovalScan:
    """Verified approvals of exactly this candidate in ``folder``, and the files refused.

    Bounded work (see the module docs): the principals' own file names, then at most
    ``_MAX_SCAN`` others. Approvals of another candidate, round, run or slot are
    skipped, not refused.
    """
    scan = ApprovalScan()
    if not folder.is_dir():
        return scan
    binding = (run_id, round, slot, candidate)
    own = _own_names(policy, binding)
    for name in [*own, *_other_names(folder, own, candidate)]:
        path = folder / name
        try:
            raw = _read_regular(path)
            approval = Approval.model_validate(json.loads(raw.decode("utf-8")))
            if (approval.run_id, approval.round, approval.slot, approval.candidate) != binding:
                continue
            verify_approval(approval, policy)
        except FileNotFoundError:
            continue
        except (OSError, ValueError, ValidationError, ApprovalError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            log.warning("%s: expected a layerfed approval, got %s", path, reason)
            scan.refused.append(Refusal(name, reason))
            continue
        scan.principals.add(approval.principal)
    return scan


def approvals_for(
    folder: Path, policy: Policy, *, run_id: str, round: int, slot: str, candidate: str
) -> set[str]:
    """Principals whose verified approval of exactly this candidate lies in ``folder``.

    Files that are refused count for nothing (logged; see :func:`scan_approvals`).
    """
    return scan_approvals(
        folder, policy, run_id=run_id, round=round, slot=slot, candidate=candidate
    ).principals


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
        each file refused (``approval_refused``, the first ``_MAX_AUDITED``; the final
        record counts the rest as ``refused_unaudited``), polls until every quorum is met (``approval_granted``) or the longest
        ``timeout_s`` passes (``approval_expired``: the vetoes then hold the candidate).
        """
        name = str(slot)
        vetoes = _quorum_vetoes(policy, name.partition("/")[0])
        if not vetoes:
            return set()
        digest = arrays_digest(candidate)
        refused: set[Refusal] = set()
        unaudited = 0

        def look() -> set[str]:
            nonlocal unaudited
            scan = scan_approvals(
                self.folder, policy, run_id=run_id, round=round_, slot=name, candidate=digest
            )
            for refusal in scan.refused:
                if refusal in refused:
                    continue
                refused.add(refusal)
                if len(refused) > _MAX_AUDITED:
                    unaudited += 1
                    continue
                audit.append(
                    AuditKind.APPROVAL_REFUSED,
                    round=round_,
                    slot=name,
                    candidate=digest,
                    file=refusal.file,
                    reason=refusal.reason,
                )
            return scan.principals

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
        more = {"refused_unaudited": unaudited} if unaudited else {}
        audit.append(
            kind,
            round=round_,
            slot=name,
            candidate=digest,
            principals=sorted(got),
            missing=missing,
            **more,
        )
        return got
