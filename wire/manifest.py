"""The server-signed manifest of the shared slots a ``train`` message carries.

With every task that sends slot arrays the server adds ConfigRecord ``lf.manifest``:
the run, round and instance, and for each sent slot its committed version and the
:func:`~layerfed.governance.canonical.arrays_digest` of the arrays sent, as canonical
JSON signed with the run's server key (Ed25519 over :data:`MANIFEST_DOMAIN` + the
payload bytes, the key that signs the server's checkpoints). A node that trusts that
key (its instance config's ``[sync] server_key``) verifies the signature, the run,
round and instance, and each slot's digest before it saves the slot
(:mod:`layerfed.clients.synced`). Anything else raises :class:`ManifestError`.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from flwr.app import ConfigRecord, RecordDict

from layerfed.governance.canonical import CanonicalError, arrays_digest, canonical_bytes
from layerfed.governance.keys import key_id
from layerfed.wire.protocol import MessageError

__all__ = [
    "MANIFEST",
    "MANIFEST_DOMAIN",
    "ManifestError",
    "SlotManifest",
    "SlotVersion",
    "sign_manifest",
    "verify_manifest",
]

MANIFEST = "lf.manifest"
"""Record name of the signed manifest in a ``train`` message."""
MANIFEST_DOMAIN = b"layerfed/slot-manifest/v1\n"
"""Prefix of the signed bytes (no other signature of the run can be replayed as one)."""


class ManifestError(MessageError):
    """Synced slots a node must refuse: no, a badly signed or a non-matching manifest."""


@dataclass(frozen=True)
class SlotVersion:
    """One sent slot: its committed version and the digest of the arrays sent."""

    version: int
    digest: str


@dataclass(frozen=True)
class SlotManifest:
    """What the server vouches for in one ``train`` message."""

    run_id: str
    round: int
    instance_id: str
    slots: Mapping[str, SlotVersion]
    keyid: str = ""
    """Key id of the server key that signed it (set when read from a message)."""

    def payload(self) -> bytes:
        """Canonical bytes of the manifest (what the signature covers, after the domain)."""
        return canonical_bytes(
            {
                "instance_id": self.instance_id,
                "round": self.round,
                "run_id": self.run_id,
                "slots": {
                    name: {"digest": s.digest, "version": s.version}
                    for name, s in self.slots.items()
                },
            }
        )

    def check_arrays(self, slot: str, version: int, arrays: Mapping[str, Any]) -> str:
        """The digest of ``arrays``; :class:`ManifestError` unless it and ``version`` match."""
        entry = self.slots.get(slot)
        if entry is None:
            raise ManifestError(
                f"{MANIFEST}: slot {slot}: expected the server to vouch for it, got no entry"
            )
        if entry.version != version:
            raise ManifestError(
                f"{MANIFEST}: slot {slot}: expected version {version} (the task's), "
                f"got {entry.version}"
            )
        got = arrays_digest(arrays)
        if got != entry.digest:
            raise ManifestError(
                f"{MANIFEST}: slot {slot} v{version}: expected arrays with digest "
                f"{entry.digest} (server-signed), got {got} (changed in transit or at rest)"
            )
        return got


def sign_manifest(manifest: SlotManifest, key: Ed25519PrivateKey) -> ConfigRecord:
    """The ``lf.manifest`` record: the payload, the signing key's id and the signature."""
    payload = manifest.payload()
    sig = key.sign(MANIFEST_DOMAIN + payload)
    return ConfigRecord(
        {
            "payload": payload.decode("utf-8"),
            "keyid": key_id(key.public_key()),
            "signature": base64.b64encode(sig).decode("ascii"),
        }
    )


def verify_manifest(
    content: RecordDict, server_key: Ed25519PublicKey, *, run_id: str, round_: int, instance_id: str
) -> SlotManifest:
    """The manifest of a ``train`` message, verified against ``server_key`` and the task.

    :class:`ManifestError` when it is missing, signed by another key, badly signed,
    malformed, or for another run, round or instance.
    """
    record = content.config_records.get(MANIFEST)
    want = key_id(server_key)
    if record is None:
        raise ManifestError(f"{MANIFEST}: expected slots signed by server key {want}, got none")
    keyid = str(record.get("keyid", ""))
    if keyid != want:
        raise ManifestError(
            f"{MANIFEST}.keyid: expected the trusted server key {want}, got {keyid or 'none'}"
        )
    payload = str(record.get("payload", "")).encode("utf-8")
    try:
        sig = base64.b64decode(str(record.get("signature", "")), validate=True)
        server_key.verify(sig, MANIFEST_DOMAIN + payload)
    except (InvalidSignature, binascii.Error, ValueError) as e:
        raise ManifestError(
            f"{MANIFEST}.signature: expected a valid signature by server key {want}, got a bad one"
        ) from e
    manifest = _parse(payload, keyid)
    task = (run_id, round_, instance_id)
    if (manifest.run_id, manifest.round, manifest.instance_id) != task:
        got = (manifest.run_id, manifest.round, manifest.instance_id)
        raise ManifestError(f"{MANIFEST}: expected (run, round, instance) {task}, got {got}")
    return manifest


def _parse(payload: bytes, keyid: str) -> SlotManifest:
    try:
        data = json.loads(payload)
        slots = {
            str(name): SlotVersion(int(entry["version"]), str(entry["digest"]))
            for name, entry in data["slots"].items()
        }
        manifest = SlotManifest(
            str(data["run_id"]), int(data["round"]), str(data["instance_id"]), slots, keyid
        )
        if manifest.payload() != payload:
            raise ValueError("payload is not in canonical form")
    except (ValueError, KeyError, TypeError, AttributeError, CanonicalError) as e:
        raise ManifestError(f"{MANIFEST}.payload: expected a slot manifest, got {e}") from e
    return manifest
