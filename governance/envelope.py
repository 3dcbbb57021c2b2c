"""Signed update envelopes: who sent which arrays, for which run, round, layer and slot.

An :class:`UpdateEnvelope` travels beside a reply's arrays. Its signature covers
``b"layerfed/update/v1\\n" + canonical_bytes(every field but the signature)``.
A principal signs directly with its own key, or, when it ``delegates_to_instances``,
certifies an instance key (:class:`InstanceCertificate`) that then signs for its
own instance slot only. :func:`verify_update` raises :class:`UpdateRejected` with a
machine-readable ``.reason``; :func:`check_update` returns an :class:`UpdateCheck`.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NotRequired, TypedDict, Unpack

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import ValidationError

from layerfed.errors import LayerfedError
from layerfed.governance.canonical import CanonicalError, arrays_digest, canonical_bytes
from layerfed.governance.envelope_checks import (
    REASONS,
    UpdateRejected,
    check_authority,
    check_run_and_round,
    find_principal,
    signer_key,
    verify_signature,
)
from layerfed.governance.envelope_models import (
    CERTIFICATE_DOMAIN,
    UPDATE_DOMAIN,
    InstanceCertificate,
    UpdateEnvelope,
)
from layerfed.governance.keys import (
    key_id,
    public_key_string,
)
from layerfed.governance.schema import Policy

__all__ = [
    "CERTIFICATE_DOMAIN",
    "REASONS",
    "UPDATE_DOMAIN",
    "InstanceCertificate",
    "ReplayGuard",
    "UpdateCheck",
    "UpdateEnvelope",
    "UpdateExpectation",
    "UpdateRejected",
    "arrays_digest",
    "certify_instance",
    "check_update",
    "envelope_from_bytes",
    "envelope_from_dict",
    "envelope_to_bytes",
    "envelope_to_dict",
    "sign_update",
    "verify_update",
]

log = logging.getLogger("layerfed")
MAX_ENVELOPE_BYTES = 16 * 1024


@dataclass(frozen=True)
class UpdateCheck:
    """Outcome of :func:`check_update`; never raised."""

    ok: bool
    reason: str | None = None
    detail: str = ""


@dataclass
class ReplayGuard:
    """Remembers accepted (run, round, layer, slot, instance) keys; a second one is a replay."""

    seen: set[tuple[str, int, str, str, str]] = field(default_factory=set)

    def check(self, envelope: UpdateEnvelope) -> None:
        """Raise UpdateRejected("replay") if this key was already accepted."""
        if _replay_key(envelope) in self.seen:
            detail = (
                "expected one update per slot and instance per round, "
                f"got a second from {envelope.instance_id!r}"
            )
            raise UpdateRejected("replay", detail)

    def record(self, envelope: UpdateEnvelope) -> None:
        """Remember an accepted envelope."""
        self.seen.add(_replay_key(envelope))


def certify_instance(
    instance_id: str,
    instance_public_key: Ed25519PublicKey,
    layer: str,
    issuer: str,
    issuer_key: Ed25519PrivateKey,
) -> InstanceCertificate:
    """Have a delegating principal certify an instance key for one instance of one layer."""
    fields: dict[str, Any] = {
        "instance_id": instance_id,
        "public_key": public_key_string(instance_public_key),
        "layer": layer,
        "issuer": issuer,
    }
    sig = issuer_key.sign(CERTIFICATE_DOMAIN + canonical_bytes(fields))
    return InstanceCertificate(**fields, signature=base64.b64encode(sig).decode("ascii"))


def sign_update(
    arrays: Mapping[str, np.ndarray[Any, Any]],
    *,
    run_id: str,
    round: int,
    layer: str,
    slot_key: str,
    instance_id: str,
    num_examples: int,
    principal_name: str,
    private_key: Ed25519PrivateKey,
    certificate: InstanceCertificate | None = None,
) -> UpdateEnvelope:
    """Digest ``arrays`` and sign the envelope with ``private_key``."""
    fields: dict[str, Any] = {
        "run_id": run_id,
        "round": round,
        "layer": layer,
        "slot_key": slot_key,
        "instance_id": instance_id,
        "digest": arrays_digest(arrays),
        "num_examples": num_examples,
        "principal": principal_name,
        "keyid": key_id(private_key.public_key()),
        "certificate": None if certificate is None else certificate.model_dump(),
    }
    sig = private_key.sign(UPDATE_DOMAIN + canonical_bytes(fields))
    return UpdateEnvelope.model_validate({**fields, "signature": _b64(sig)})


def verify_update(
    envelope: UpdateEnvelope,
    arrays: Mapping[str, np.ndarray[Any, Any]],
    policy: Policy,
    *,
    run_id: str,
    round: int,
    delegations: Mapping[str, InstanceCertificate] | None = None,
    replay_guard: ReplayGuard | None = None,
) -> None:
    """Raise UpdateRejected unless ``envelope`` and ``arrays`` may enter this round.

    ``delegations`` maps instance ids to certificates known out of band, used when
    the envelope carries none. ``replay_guard`` refuses a second accepted update
    for the same slot and instance in a round, and records this one when accepted.
    """
    check_run_and_round(envelope, run_id, round)
    principal = find_principal(policy, envelope.principal)
    certificate = envelope.certificate or (delegations or {}).get(envelope.instance_id)
    signer, delegated = signer_key(envelope, principal, certificate)
    verify_signature(signer, envelope.signature, envelope.payload(), "bad_signature", "envelope")
    check_authority(envelope, principal, policy, signer_is_instance=delegated)
    try:
        got = arrays_digest(arrays)
    except CanonicalError as e:
        raise UpdateRejected("malformed", str(e)) from e
    if got != envelope.digest:
        detail = f"expected arrays with digest {envelope.digest[:16]}..., got {got[:16]}..."
        raise UpdateRejected("digest_mismatch", detail)
    if replay_guard is not None:
        replay_guard.check(envelope)
        replay_guard.record(envelope)


class UpdateExpectation(TypedDict):
    """What an update must match (run, round, delegations, replay guard): the keyword
    arguments of :func:`verify_update`, for :func:`check_update`."""

    run_id: str
    round: int
    delegations: NotRequired[Mapping[str, InstanceCertificate] | None]
    replay_guard: NotRequired[ReplayGuard | None]


def check_update(
    envelope: UpdateEnvelope,
    arrays: Mapping[str, np.ndarray[Any, Any]],
    policy: Policy,
    **context: Unpack[UpdateExpectation],
) -> UpdateCheck:
    """:func:`verify_update` as a result object that never raises."""
    try:
        verify_update(envelope, arrays, policy, **context)
    except UpdateRejected as e:
        log.info("update from %s refused: %s", envelope.instance_id, e.reason)
        return UpdateCheck(False, e.reason, e.detail)
    except LayerfedError as e:
        return UpdateCheck(False, "malformed", str(e))
    return UpdateCheck(True)


def envelope_to_bytes(envelope: UpdateEnvelope) -> bytes:
    """Canonical JSON bytes of the whole envelope, for a Flower ConfigRecord."""
    return canonical_bytes(envelope.model_dump())


def envelope_from_bytes(data: bytes) -> UpdateEnvelope:
    """Decode untrusted bytes; UpdateRejected("malformed") on anything wrong."""
    if not isinstance(data, bytes | bytearray):
        raise UpdateRejected("malformed", f"expected bytes, got {type(data).__name__}")
    if len(data) > MAX_ENVELOPE_BYTES:
        raise UpdateRejected(
            "malformed", f"expected at most {MAX_ENVELOPE_BYTES} bytes, got {len(data)}"
        )
    try:
        obj = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UpdateRejected("malformed", f"expected UTF-8 JSON, got {type(e).__name__}") from e
    return _validate(obj)


def envelope_to_dict(envelope: UpdateEnvelope, prefix: str = "envelope.") -> dict[str, str | int]:
    """Flat ``str -> str | int`` items (certificate fields as ``certificate.*``)."""
    flat: dict[str, str | int] = {}
    for name, value in envelope.model_dump(exclude={"certificate"}).items():
        flat[prefix + name] = value
    if envelope.certificate is not None:
        for name, value in envelope.certificate.model_dump().items():
            flat[f"{prefix}certificate.{name}"] = value
    return flat


def envelope_from_dict(items: Mapping[str, Any], prefix: str = "envelope.") -> UpdateEnvelope:
    """Rebuild an envelope from :func:`envelope_to_dict` items; other keys are ignored."""
    obj: dict[str, Any] = {}
    cert: dict[str, Any] = {}
    for key, value in items.items():
        if not isinstance(key, str) or not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name.startswith("certificate."):
            cert[name[len("certificate.") :]] = value
        else:
            obj[name] = value
    if cert:
        obj["certificate"] = cert
    return _validate(obj)


def _validate(obj: Any) -> UpdateEnvelope:
    try:
        return UpdateEnvelope.model_validate(obj)
    except ValidationError as e:
        errors = e.errors()
        where = ".".join(str(p) for p in errors[0]["loc"]) if errors else "envelope"
        msg = errors[0]["msg"] if errors else "invalid"
        raise UpdateRejected("malformed", f"envelope.{where}: {msg}") from e


def _replay_key(envelope: UpdateEnvelope) -> tuple[str, int, str, str, str]:
    e = envelope
    return (e.run_id, e.round, e.layer, e.slot_key, e.instance_id)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
