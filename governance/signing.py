"""Signed policies: detached signatures, thresholds, rotation, rollback and expiry.

A policy's signatures live beside it in ``<policy file>.sig.json``: a JSON list of
``{"keyid": hex, "sig": base64}``. Each signature is Ed25519 over
``b"layerfed/policy/v1\\n" + policy_bytes(policy)``, so layout and comments never
break it and any change of meaning does.

A policy is trusted when it meets, counting each key once:

* the threshold of the *previously trusted* policy's ``policy_signers`` (for the
  first policy: of the root keys the operator names, by default all of them), and
* the threshold of its *own* ``policy_signers`` (so rotation needs old and new keys);

and its version is higher than the trusted one's (or equal with identical bytes),
and it has not expired at ``now``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from layerfed.atomic import write_atomic
from layerfed.errors import LayerfedError
from layerfed.governance.canonical import policy_bytes
from layerfed.governance.errors import PolicyLoadError, PolicySemanticError
from layerfed.governance.keys import (
    KeyFileError,
    TrustError,
    key_id,
    load_public_key,
    parse_public_key,
)
from layerfed.governance.loader import check_policy_file
from layerfed.governance.schema import Policy

__all__ = [
    "DEMO_ROOT_KEY",
    "POLICY_DOMAIN",
    "SIGNATURE_SUFFIX",
    "PolicySignature",
    "PolicyTrustError",
    "PolicyTrustResult",
    "check_policy",
    "is_demo_root",
    "load_signatures",
    "read_policy",
    "sign_policy",
    "sign_policy_file",
    "signature_path",
    "signer_keys",
    "verify_policy",
    "verify_policy_file",
    "verify_trust_anchor",
]

log = logging.getLogger("layerfed")
POLICY_DOMAIN = b"layerfed/policy/v1\n"
SIGNATURE_SUFFIX = ".sig.json"
_MAX_SIG_FILE = 1024 * 1024
DEMO_ROOT_KEY = Path(__file__).resolve().parent.parent / "examples" / "keys" / "creator-demo.pub"
"""The gym's demo root key: its private half ships in examples/keys/, so only simulation trusts it."""


class PolicyTrustError(TrustError):
    """A policy is not trusted; ``.reason`` is a machine-readable code.

    Codes: ``malformed``, ``no_root``, ``under_threshold``, ``rollback``,
    ``same_version_other_content``, ``expired``, ``unreadable``.
    """

    def __init__(self, reason: str, detail: str, where: str = "policy") -> None:
        self.reason = reason
        self.detail = detail
        self.where = where
        super().__init__(f"{where}: {reason}: {detail}")


class PolicySignature(BaseModel):
    """One detached signature: the signing key's id and the base64 signature."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    keyid: str = Field(pattern=r"^[0-9a-f]{64}$")
    sig: str = Field(pattern=r"^[A-Za-z0-9+/]{86}==$")


@dataclass(frozen=True)
class PolicyTrustResult:
    """Outcome of :func:`check_policy`; never raised."""

    ok: bool
    reason: str | None = None
    detail: str = ""
    signed_by: tuple[str, ...] = ()


def signature_path(policy_path: Path) -> Path:
    """Where the detached signatures of ``policy_path`` live."""
    return policy_path.with_name(policy_path.name + SIGNATURE_SUFFIX)


def read_policy(path: Path) -> Policy:
    """Load a YAML or TOML policy through the governance loader, tolerating expiry.

    Expiry is judged by :func:`verify_policy` (reason ``expired``) at its own ``now``;
    every other load or semantic error raises the loader's ``PolicyError``.
    """
    result = check_policy_file(path)
    errors = [d for d in result.diagnostics if d.severity == "error" and d.path != "expires"]
    if result.policy is None:
        raise PolicyLoadError(errors)
    if errors:
        raise PolicySemanticError(errors)
    return result.policy


def signer_keys(policy: Policy, where: str = "policy") -> tuple[dict[str, Ed25519PublicKey], int]:
    """The key ids and keys of ``policy.policy_signers``, and its threshold."""
    signers = policy.policy_signers
    if signers is None:
        raise PolicyTrustError(
            "malformed", "expected 'policy_signers' naming who signs policies, got none", where
        )
    by_name = {p.name: p for p in policy.principals}
    keys: dict[str, Ed25519PublicKey] = {}
    for name in signers.principals:
        principal = by_name.get(name)
        if principal is None:
            raise PolicyTrustError(
                "malformed", f"policy_signers.principals: expected a principal, got {name!r}", where
            )
        try:
            public = parse_public_key(principal.public_key, f"principals.{name}.public_key")
        except KeyFileError as e:
            raise PolicyTrustError("malformed", str(e), where) from e
        keys[key_id(public)] = public
    return keys, signers.threshold


def sign_policy(policy: Policy, private_key: Ed25519PrivateKey) -> PolicySignature:
    """A detached signature over the canonical bytes of ``policy``."""
    sig = private_key.sign(POLICY_DOMAIN + policy_bytes(policy))
    return PolicySignature(
        keyid=key_id(private_key.public_key()), sig=base64.b64encode(sig).decode("ascii")
    )


def sign_policy_file(policy_path: Path, private_key: Ed25519PrivateKey) -> Path:
    """Add (or replace) this key's signature in the policy's ``.sig.json``; its path."""
    policy = read_policy(policy_path)
    new = sign_policy(policy, private_key)
    path = signature_path(policy_path)
    old = load_signatures(path) if path.exists() else []
    kept = [s for s in old if s.keyid != new.keyid] + [new]
    data = [s.model_dump() for s in sorted(kept, key=lambda s: s.keyid)]
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"), mode=0o600)
    return path


def load_signatures(path: Path) -> list[PolicySignature]:
    """Read a ``.sig.json`` file; PolicyTrustError when it is missing or malformed."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_SIG_FILE + 1)
    except OSError as e:
        detail = f"expected a readable signature file, got {e.strerror or type(e).__name__}"
        raise PolicyTrustError("unreadable", detail, str(path)) from e
    try:
        if len(raw) > _MAX_SIG_FILE:
            raise ValueError(f"a file over {_MAX_SIG_FILE} bytes")
        data = json.loads(raw.decode("utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"a JSON {type(data).__name__}")
        return [PolicySignature.model_validate(item) for item in data]
    except (ValueError, ValidationError) as e:
        detail = f"expected a JSON list of {{keyid, sig}}, got {_first_line(e)}"
        raise PolicyTrustError("malformed", detail, str(path)) from e


def verify_policy(
    policy: Policy,
    signatures: Sequence[PolicySignature],
    trusted: Policy | None,
    root_keys: Sequence[Ed25519PublicKey] | None,
    threshold: int | None,
    now: datetime,
) -> None:
    """Raise PolicyTrustError unless ``policy`` may replace ``trusted`` at ``now``."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    payload = POLICY_DOMAIN + policy_bytes(policy)
    for role, keys, needed in _roles(policy, trusted, root_keys, threshold):
        good = _valid_signers(payload, signatures, keys)
        if len(good) < needed:
            detail = f"{role}: expected {needed} valid signature(s), got {len(good)}"
            raise PolicyTrustError("under_threshold", detail)
    if trusted is not None:
        _check_version(policy, trusted)
    if policy.expires <= now.astimezone(UTC):
        detail = f"expected expiry after {now.astimezone(UTC).isoformat()}, got {policy.expires}"
        raise PolicyTrustError("expired", detail)


def check_policy(
    policy: Policy,
    signatures: Sequence[PolicySignature],
    trusted: Policy | None,
    root_keys: Sequence[Ed25519PublicKey] | None,
    threshold: int | None,
    now: datetime,
) -> PolicyTrustResult:
    """:func:`verify_policy` as a result object that never raises."""
    try:
        verify_policy(policy, signatures, trusted, root_keys, threshold, now)
    except PolicyTrustError as e:
        return PolicyTrustResult(False, e.reason, e.detail)
    except LayerfedError as e:
        return PolicyTrustResult(False, "malformed", str(e))
    keys, _ = signer_keys(policy)
    payload = POLICY_DOMAIN + policy_bytes(policy)
    return PolicyTrustResult(
        True, signed_by=tuple(sorted(_valid_signers(payload, signatures, keys)))
    )


def verify_policy_file(
    path: Path,
    *,
    trusted: Policy | None = None,
    root_keys: Sequence[Ed25519PublicKey] | None = None,
    threshold: int | None = None,
    now: datetime | None = None,
) -> Policy:
    """Load ``path`` and its ``.sig.json``, verify them, and return the trusted policy."""
    policy = read_policy(path)
    signatures = load_signatures(signature_path(path))
    when = now if now is not None else datetime.now(UTC)
    try:
        verify_policy(policy, signatures, trusted, root_keys, threshold, when)
    except PolicyTrustError as e:
        raise PolicyTrustError(e.reason, e.detail, str(path)) from e
    log.info("trusted policy %s version %s from %s", policy.name, policy.version, path)
    return policy


def is_demo_root(keys: Sequence[Ed25519PublicKey]) -> bool:
    """Whether any of ``keys`` is the demo root (compared by key id, wherever the file lies)."""
    if not keys or not DEMO_ROOT_KEY.exists():
        return False
    demo = key_id(load_public_key(DEMO_ROOT_KEY))
    return any(key_id(k) == demo for k in keys)


def verify_trust_anchor(
    path: Path,
    *,
    trusted: Policy | None = None,
    root_keys: Sequence[Ed25519PublicKey] | None = None,
    threshold: int | None = None,
) -> Policy:
    """A "previous" policy given as ``--trusted``, verified before anything trusts it.

    It must verify against ``trusted`` (the chain pinned so far) or the ``root_keys``
    exactly as a new policy would (thresholds, versions); only its expiry is
    tolerated, since an anchor is often the policy its successor replaced.
    Raises PolicyTrustError (``no_root`` when neither is given).
    """
    if trusted is None and not root_keys:
        raise PolicyTrustError(
            "no_root",
            "expected the trusted policy itself to verify against a pinned policy or root keys, "
            "got neither",
            str(path),
        )
    policy = read_policy(path)
    signatures = load_signatures(signature_path(path))
    try:
        verify_policy(
            policy, signatures, trusted, root_keys, threshold, datetime.min.replace(tzinfo=UTC)
        )
    except PolicyTrustError as e:
        raise PolicyTrustError(e.reason, e.detail, str(path)) from e
    return policy


def _roles(
    policy: Policy,
    trusted: Policy | None,
    root_keys: Sequence[Ed25519PublicKey] | None,
    threshold: int | None,
) -> list[tuple[str, Mapping[str, Ed25519PublicKey], int]]:
    roles: list[tuple[str, Mapping[str, Ed25519PublicKey], int]] = []
    if trusted is not None:
        keys, needed = signer_keys(trusted, "trusted policy")
        roles.append((f"signers of trusted version {trusted.version}", keys, needed))
    if root_keys:
        roots = {key_id(k): k for k in root_keys}
        needed = len(roots) if threshold is None else threshold
        if needed < 1:
            raise PolicyTrustError("malformed", f"threshold: expected >= 1, got {needed}")
        roles.append(("root keys", roots, needed))
    if not roles:
        raise PolicyTrustError(
            "no_root", "expected a trusted previous policy or root keys, got neither"
        )
    keys, needed = signer_keys(policy)
    roles.append((f"own signers of version {policy.version}", keys, needed))
    return roles


def _valid_signers(
    payload: bytes, signatures: Sequence[PolicySignature], keys: Mapping[str, Ed25519PublicKey]
) -> set[str]:
    good: set[str] = set()
    for signature in signatures:
        public = keys.get(signature.keyid)
        if public is None or signature.keyid in good:
            continue
        try:
            public.verify(base64.b64decode(signature.sig, validate=True), payload)
        except (InvalidSignature, binascii.Error, ValueError):
            continue
        good.add(signature.keyid)
    return good


def _check_version(policy: Policy, trusted: Policy) -> None:
    if policy.version < trusted.version:
        detail = f"expected version >= {trusted.version}, got {policy.version}"
        raise PolicyTrustError("rollback", detail)
    if policy.version == trusted.version and policy_bytes(policy) != policy_bytes(trusted):
        detail = (
            f"expected version {trusted.version} to be identical to the trusted one "
            "or a higher version, got other content"
        )
        raise PolicyTrustError("same_version_other_content", detail)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
