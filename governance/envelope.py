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
import binascii
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, NotRequired, TypedDict, Unpack

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from layerfed.errors import LayerfedError
from layerfed.governance.canonical import CanonicalError, arrays_digest, canonical_bytes
from layerfed.governance.keys import (
    KeyFileError,
    TrustError,
    key_id,
    parse_public_key,
    public_key_string,
)
from layerfed.governance.schema import Policy, Principal

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
UPDATE_DOMAIN = b"layerfed/update/v1\n"
CERTIFICATE_DOMAIN = b"layerfed/instance-certificate/v1\n"
MAX_ENVELOPE_BYTES = 16 * 1024
_REASON_CODES = (
    "bad_certificate bad_signature digest_mismatch forged_layer malformed replay stale_round"
    " unknown_principal wrong_round wrong_run wrong_slot"
)
REASONS = frozenset(_REASON_CODES.split())
"""Every ``UpdateRejected.reason`` code."""

_Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
_Sig = Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]{86}==$")]
_Id = Annotated[str, Field(min_length=1, max_length=256)]


class UpdateRejected(TrustError):  # noqa: N818 - the name other modules code against
    """An update failed verification; ``.reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"update rejected: {reason}: {detail}")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class InstanceCertificate(_Frozen):
    """A delegating principal's statement: this key speaks for this instance of this layer."""

    instance_id: _Id
    public_key: str = Field(pattern=r"^ed25519:[A-Za-z0-9+/]{43}=$")
    layer: _Id
    issuer: _Id
    signature: _Sig

    def payload(self) -> bytes:
        """The bytes the issuer signs."""
        return CERTIFICATE_DOMAIN + canonical_bytes(self.model_dump(exclude={"signature"}))


class UpdateEnvelope(_Frozen):
    """The signed claims about one update; the arrays travel separately."""

    run_id: _Id
    round: int = Field(ge=0)
    layer: _Id
    slot_key: _Id
    instance_id: _Id
    digest: _Hex64
    num_examples: int = Field(ge=0)
    principal: _Id
    keyid: _Hex64
    signature: _Sig
    certificate: InstanceCertificate | None = None

    def payload(self) -> bytes:
        """The bytes the signer signs."""
        return UPDATE_DOMAIN + canonical_bytes(self.model_dump(exclude={"signature"}))

    @property
    def ack_id(self) -> str:
        """Names this one update (run, round, slot, instance, digest): what the server acknowledges.

        The digest alone covers only the arrays, which may be empty (instance-only
        layers) or equal between updates; the acknowledgement must name one update.
        """
        return "/".join(
            (self.run_id, str(self.round), self.layer, self.slot_key, self.instance_id, self.digest)
        )


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
    _check_run_and_round(envelope, run_id, round)
    principal = _principal(policy, envelope.principal)
    certificate = envelope.certificate or (delegations or {}).get(envelope.instance_id)
    signer, delegated = _signer_key(envelope, principal, certificate)
    _verify_sig(signer, envelope.signature, envelope.payload(), "bad_signature", "envelope")
    _check_authority(envelope, principal, policy, signer_is_instance=delegated)
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


def _check_run_and_round(envelope: UpdateEnvelope, run_id: str, current: int) -> None:
    if envelope.run_id != run_id:
        raise UpdateRejected("wrong_run", f"expected run {run_id!r}, got {envelope.run_id!r}")
    if envelope.round < current:
        detail = f"expected round {current}, got earlier round {envelope.round}"
        raise UpdateRejected("stale_round", detail)
    if envelope.round > current:
        detail = f"expected round {current}, got later round {envelope.round}"
        raise UpdateRejected("wrong_round", detail)


def _principal(policy: Policy, name: str) -> Principal:
    for principal in policy.principals:
        if principal.name == name:
            return principal
    raise UpdateRejected("unknown_principal", f"expected a principal of the policy, got {name!r}")


def _key_of(principal: Principal) -> Ed25519PublicKey:
    try:
        return parse_public_key(principal.public_key, f"principals.{principal.name}.public_key")
    except KeyFileError as e:
        raise UpdateRejected("unknown_principal", str(e)) from e


def _signer_key(
    envelope: UpdateEnvelope, principal: Principal, certificate: InstanceCertificate | None
) -> tuple[Ed25519PublicKey, bool]:
    """The key that must have signed, and whether it is a certified instance key."""
    own = _key_of(principal)
    if envelope.keyid == key_id(own):
        return own, False
    if certificate is None:
        detail = (
            f"expected the key of {principal.name!r} or a certificate, "
            f"got key {envelope.keyid[:16]}..."
        )
        raise UpdateRejected("unknown_principal", detail)
    _check_certificate(certificate, envelope, principal, own)
    try:
        instance_key = parse_public_key(certificate.public_key, "certificate.public_key")
    except KeyFileError as e:
        raise UpdateRejected("bad_certificate", str(e)) from e
    if key_id(instance_key) != envelope.keyid:
        raise UpdateRejected("bad_certificate", "expected the certified key to sign, got another")
    return instance_key, True


def _check_certificate(
    cert: InstanceCertificate,
    envelope: UpdateEnvelope,
    principal: Principal,
    issuer_key: Ed25519PublicKey,
) -> None:
    if not principal.delegates_to_instances:
        detail = f"expected a principal with delegates_to_instances, got {principal.name!r}"
        raise UpdateRejected("bad_certificate", detail)
    wanted = (principal.name, envelope.instance_id, envelope.layer)
    got = (cert.issuer, cert.instance_id, cert.layer)
    if wanted != got:
        raise UpdateRejected(
            "bad_certificate", f"expected issuer/instance/layer {wanted}, got {got}"
        )
    _verify_sig(issuer_key, cert.signature, cert.payload(), "bad_certificate", "certificate")


def _check_authority(
    envelope: UpdateEnvelope, principal: Principal, policy: Policy, *, signer_is_instance: bool
) -> None:
    if principal.layer != envelope.layer:
        detail = (
            f"expected layer {principal.layer!r} for {principal.name!r}, got {envelope.layer!r}"
        )
        raise UpdateRejected("forged_layer", detail)
    per_instance = any(
        layer.name == envelope.layer and layer.slot_key == "instance" for layer in policy.layers
    )
    if signer_is_instance and per_instance:
        if envelope.slot_key != envelope.instance_id:
            detail = (
                f"expected an instance key to sign only slot {envelope.instance_id!r}, "
                f"got {envelope.slot_key!r}"
            )
            raise UpdateRejected("wrong_slot", detail)
    elif "*" not in principal.slots and envelope.slot_key not in principal.slots:
        detail = (
            f"expected a slot in {principal.slots} for {principal.name!r}, "
            f"got {envelope.slot_key!r}"
        )
        raise UpdateRejected("wrong_slot", detail)


def _verify_sig(
    public: Ed25519PublicKey, signature: str, payload: bytes, reason: str, what: str
) -> None:
    try:
        public.verify(base64.b64decode(signature, validate=True), payload)
    except (InvalidSignature, binascii.Error, ValueError) as e:
        raise UpdateRejected(
            reason, f"expected a valid {what} signature, got an invalid one"
        ) from e


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
