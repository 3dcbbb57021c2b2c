"""The signed records of an update: :class:`UpdateEnvelope` and :class:`InstanceCertificate`.

Both are frozen, strict pydantic models; each signature covers a domain prefix plus the
canonical bytes of every other field (:meth:`UpdateEnvelope.payload`).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from layerfed.governance.canonical import canonical_bytes

__all__ = ["CERTIFICATE_DOMAIN", "UPDATE_DOMAIN", "InstanceCertificate", "UpdateEnvelope"]

UPDATE_DOMAIN = b"layerfed/update/v1\n"
CERTIFICATE_DOMAIN = b"layerfed/instance-certificate/v1\n"

_Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
_Sig = Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]{86}==$")]
_Id = Annotated[str, Field(min_length=1, max_length=256)]


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
