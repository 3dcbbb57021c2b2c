"""Who signs an instance's updates: its certified instance key, or a policy principal's key.

An :class:`UpdateSigner` holds the instance's private key and its certificates by
layer. With a certificate for the slot's layer it signs as the certificate's
issuer (the server checks the certificate); without certificates the key must be
a principal of that layer in the policy (:class:`InstanceError` otherwise).
"""

from __future__ import annotations

from collections.abc import Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from layerfed.clients.instance_errors import InstanceError
from layerfed.governance.envelope import InstanceCertificate, UpdateEnvelope, sign_update
from layerfed.governance.keys import public_key_string
from layerfed.governance.schema import Policy
from layerfed.layers.arrays import ArraysIn
from layerfed.layers.slots import SlotId

__all__ = ["UpdateSigner"]


class UpdateSigner:
    """Signs an instance's updates with its key, as a certified instance or a principal."""

    def __init__(
        self,
        policy: Policy,
        instance_id: str,
        key: Ed25519PrivateKey | None,
        certificates: Mapping[str, InstanceCertificate],
    ) -> None:
        self.policy = policy
        self.instance_id = instance_id
        self._key = key
        self._certificates = dict(certificates)

    def sign(
        self, arrays: ArraysIn, run_id: str, round: int, slot: SlotId, num_events: int
    ) -> UpdateEnvelope:
        """The signed envelope of ``arrays`` as this instance's update of ``slot``."""
        principal, signing_key = self._signer(slot)
        return sign_update(
            arrays,
            run_id=run_id,
            round=round,
            layer=slot.layer,
            slot_key=slot.key,
            instance_id=self.instance_id,
            num_examples=num_events,
            principal_name=principal,
            private_key=signing_key,
            certificate=self._certificates.get(slot.layer),
        )

    def _signer(self, slot: SlotId) -> tuple[str, Ed25519PrivateKey]:
        if self._key is None:
            raise InstanceError("key", "a private key to sign updates with", None)
        cert = self._certificates.get(slot.layer)
        if cert is not None:
            if cert.instance_id != self.instance_id:
                expected = f"a certificate for instance {self.instance_id!r}"
                raise InstanceError("certificate", expected, cert.instance_id)
            return cert.issuer, self._key
        if self._certificates:
            expected = f"a certificate for layer {slot.layer!r}"
            raise InstanceError("certificate", expected, sorted(self._certificates))
        mine = public_key_string(self._key.public_key())
        for principal in self.policy.principals:
            if principal.public_key == mine and principal.layer == slot.layer:
                return principal.name, self._key
        raise InstanceError("key", f"the key of a principal of layer {slot.layer!r}", mine[:20])
