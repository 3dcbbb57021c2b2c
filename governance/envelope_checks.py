"""The checks an update envelope must pass, each raising :class:`UpdateRejected`.

:func:`layerfed.governance.envelope.verify_update` runs them in order: run and round,
the principal, the signing key (its own or a certified instance key), the signature,
and the signer's authority over the layer and slot.
"""

from __future__ import annotations

import base64
import binascii

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from layerfed.governance.envelope_models import InstanceCertificate, UpdateEnvelope
from layerfed.governance.keys import KeyFileError, TrustError, key_id, parse_public_key
from layerfed.governance.schema import Policy, Principal

__all__ = [
    "REASONS",
    "UpdateRejected",
    "check_authority",
    "check_certificate",
    "check_run_and_round",
    "find_principal",
    "principal_key",
    "signer_key",
    "verify_signature",
]

_REASON_CODES = (
    "bad_certificate bad_signature digest_mismatch forged_layer malformed replay stale_round"
    " unknown_principal wrong_round wrong_run wrong_slot"
)
REASONS = frozenset(_REASON_CODES.split())
"""Every ``UpdateRejected.reason`` code."""


class UpdateRejected(TrustError):  # noqa: N818 - the name other modules code against
    """An update failed verification; ``.reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"update rejected: {reason}: {detail}")


def check_run_and_round(envelope: UpdateEnvelope, run_id: str, current: int) -> None:
    if envelope.run_id != run_id:
        raise UpdateRejected("wrong_run", f"expected run {run_id!r}, got {envelope.run_id!r}")
    if envelope.round < current:
        detail = f"expected round {current}, got earlier round {envelope.round}"
        raise UpdateRejected("stale_round", detail)
    if envelope.round > current:
        detail = f"expected round {current}, got later round {envelope.round}"
        raise UpdateRejected("wrong_round", detail)


def find_principal(policy: Policy, name: str) -> Principal:
    for principal in policy.principals:
        if principal.name == name:
            return principal
    raise UpdateRejected("unknown_principal", f"expected a principal of the policy, got {name!r}")


def principal_key(principal: Principal) -> Ed25519PublicKey:
    try:
        return parse_public_key(principal.public_key, f"principals.{principal.name}.public_key")
    except KeyFileError as e:
        raise UpdateRejected("unknown_principal", str(e)) from e


def signer_key(
    envelope: UpdateEnvelope, principal: Principal, certificate: InstanceCertificate | None
) -> tuple[Ed25519PublicKey, bool]:
    """The key that must have signed, and whether it is a certified instance key."""
    own = principal_key(principal)
    if envelope.keyid == key_id(own):
        return own, False
    if certificate is None:
        detail = (
            f"expected the key of {principal.name!r} or a certificate, "
            f"got key {envelope.keyid[:16]}..."
        )
        raise UpdateRejected("unknown_principal", detail)
    check_certificate(certificate, envelope, principal, own)
    try:
        instance_key = parse_public_key(certificate.public_key, "certificate.public_key")
    except KeyFileError as e:
        raise UpdateRejected("bad_certificate", str(e)) from e
    if key_id(instance_key) != envelope.keyid:
        raise UpdateRejected("bad_certificate", "expected the certified key to sign, got another")
    return instance_key, True


def check_certificate(
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
    verify_signature(issuer_key, cert.signature, cert.payload(), "bad_certificate", "certificate")


def check_authority(
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


def verify_signature(
    public: Ed25519PublicKey, signature: str, payload: bytes, reason: str, what: str
) -> None:
    try:
        public.verify(base64.b64decode(signature, validate=True), payload)
    except (InvalidSignature, binascii.Error, ValueError) as e:
        raise UpdateRejected(
            reason, f"expected a valid {what} signature, got an invalid one"
        ) from e
