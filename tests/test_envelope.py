"""Signed update envelopes: principals, slots, rounds, digests, delegation and decoding."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from layerfed.governance.envelope import (
    REASONS,
    InstanceCertificate,
    ReplayGuard,
    UpdateEnvelope,
    UpdateRejected,
    arrays_digest,
    certify_instance,
    check_update,
    envelope_from_bytes,
    envelope_from_dict,
    envelope_to_bytes,
    envelope_to_dict,
    sign_update,
    verify_update,
)
from layerfed.governance.keys import public_key_string
from layerfed.governance.schema import Policy

DEFAULT = Path(__file__).resolve().parent.parent / "examples" / "policies" / "default.yaml"
GOV, IND, GROUP, OTHER, INST = (Ed25519PrivateKey.generate() for _ in range(5))
ARRAYS = {"b": np.arange(12, dtype=np.float32).reshape(3, 4), "a": np.ones(5, np.float32)}


def _principal(name: str, layer: str, key: Ed25519PrivateKey, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "layer": layer,
        "public_key": public_key_string(key.public_key()),
        **extra,
    }


def make_policy() -> Policy:
    """The default policy with a government-eu key, an individual key and a delegating group."""
    data: dict[str, Any] = yaml.safe_load(DEFAULT.read_text())
    data["principals"] = [
        *data["principals"][:1],
        _principal("gov_eu", "government", GOV, slots=["eu"]),
        _principal("ind_7", "individual", IND, slots=["inst-7"]),
        _principal("fleet", "individual", GROUP, delegates_to_instances=True),
    ]
    return Policy.model_validate(data)


POLICY = make_policy()


def gov_envelope(**overrides: Any) -> UpdateEnvelope:
    """A government-eu envelope for run r1 round 3 over ARRAYS."""
    args: dict[str, Any] = {
        "run_id": "r1",
        "round": 3,
        "layer": "government",
        "slot_key": "eu",
        "instance_id": "inst-1",
        "num_examples": 32,
        "principal_name": "gov_eu",
        "private_key": GOV,
    }
    args.update(overrides)
    arrays = args.pop("arrays", ARRAYS)
    return sign_update(arrays, **args)


def reason(envelope: UpdateEnvelope, arrays: Any = None, **kwargs: Any) -> str | None:
    """The refusal code for ``envelope`` in run r1 round 3 (None when accepted)."""
    args: dict[str, Any] = {"run_id": "r1", "round": 3}
    args.update(kwargs)
    check = check_update(envelope, ARRAYS if arrays is None else arrays, POLICY, **args)
    assert check.ok == (check.reason is None)
    assert check.reason is None or check.reason in REASONS
    return check.reason


def test_valid_update_is_accepted() -> None:
    """A principal's envelope for its own layer, slot, run and round is accepted."""
    assert reason(gov_envelope()) is None
    verify_update(gov_envelope(), ARRAYS, POLICY, run_id="r1", round=3)


def test_wrong_key_is_refused() -> None:
    """Another key signing in the principal's name is refused."""
    assert reason(gov_envelope(private_key=OTHER)) == "unknown_principal"
    forged = gov_envelope(private_key=OTHER).model_copy(update={"keyid": gov_envelope().keyid})
    assert reason(forged) == "bad_signature"


def test_unknown_principal_is_refused() -> None:
    """A principal name the policy does not hold is refused."""
    assert reason(gov_envelope(principal_name="nobody")) == "unknown_principal"


def test_forged_layer_claim_is_refused() -> None:
    """A government key signing an update that claims the creator layer is refused."""
    assert reason(gov_envelope(layer="creator", slot_key="global")) == "forged_layer"


def test_wrong_slot_is_refused() -> None:
    """A key for jurisdiction eu may not speak for jurisdiction us."""
    assert reason(gov_envelope(slot_key="us")) == "wrong_slot"


def test_individual_key_speaks_for_its_instance_only() -> None:
    """An individual key with slots [inst-7] signs inst-7 and nothing else."""
    own = gov_envelope(
        layer="individual", slot_key="inst-7", principal_name="ind_7", private_key=IND
    )
    assert reason(own) is None
    other = gov_envelope(
        layer="individual", slot_key="inst-8", principal_name="ind_7", private_key=IND
    )
    assert reason(other) == "wrong_slot"


def test_replayed_update_from_earlier_round_is_refused() -> None:
    """An envelope signed for round 2 is stale in round 3; round 4 and other runs too."""
    assert reason(gov_envelope(round=2)) == "stale_round"
    assert reason(gov_envelope(round=4)) == "wrong_round"
    assert reason(gov_envelope(), run_id="r0") == "wrong_run"


def test_replay_within_round_is_refused_by_guard() -> None:
    """A second accepted update for one slot and instance in a round is a replay."""
    guard = ReplayGuard()
    assert reason(gov_envelope(), replay_guard=guard) is None
    assert reason(gov_envelope(num_examples=1), replay_guard=guard) == "replay"
    assert reason(gov_envelope(instance_id="inst-2"), replay_guard=guard) is None


def test_rejected_update_is_not_remembered_by_guard() -> None:
    """An update refused for its digest does not block the genuine one."""
    guard = ReplayGuard()
    bad = {**ARRAYS, "a": np.zeros(5, np.float32)}
    assert reason(gov_envelope(), bad, replay_guard=guard) == "digest_mismatch"
    assert reason(gov_envelope(), replay_guard=guard) is None


def test_digest_mismatch_is_refused() -> None:
    """Arrays other than the signed ones are refused."""
    assert reason(gov_envelope(), {"b": ARRAYS["b"]}) == "digest_mismatch"


def test_one_tampered_byte_is_refused() -> None:
    """One flipped array byte is a digest mismatch; one changed claim breaks the signature."""
    tampered = {k: v.copy() for k, v in ARRAYS.items()}
    tampered["b"].reshape(-1).view(np.uint8)[7] ^= 1
    assert reason(gov_envelope(), tampered) == "digest_mismatch"
    raw = bytearray(envelope_to_bytes(gov_envelope()))
    at = raw.index(b'"num_examples":32') + len(b'"num_examples":3')
    raw[at] = ord("3")
    assert reason(envelope_from_bytes(bytes(raw))) == "bad_signature"


def test_digest_covers_names_dtypes_and_shapes() -> None:
    """Renaming, retyping or reshaping the same bytes changes the digest."""
    base = arrays_digest(ARRAYS)
    assert arrays_digest(dict(reversed(list(ARRAYS.items())))) == base
    assert arrays_digest({"c": ARRAYS["b"], "a": ARRAYS["a"]}) != base
    assert arrays_digest({**ARRAYS, "b": ARRAYS["b"].reshape(4, 3)}) != base
    assert arrays_digest({**ARRAYS, "b": ARRAYS["b"].view(np.int32)}) != base
    assert arrays_digest({**ARRAYS, "b": np.asfortranarray(ARRAYS["b"])}) == base


def delegated(instance_id: str = "inst-9", slot_key: str = "inst-9", **cert: Any) -> Any:
    """An envelope signed by INST, certified by 'fleet' for ``instance_id``."""
    args: dict[str, Any] = {
        "instance_id": "inst-9",
        "instance_public_key": INST.public_key(),
        "layer": "individual",
        "issuer": "fleet",
        "issuer_key": GROUP,
    }
    args.update(cert)
    certificate = certify_instance(**args)
    envelope = gov_envelope(
        layer="individual",
        slot_key=slot_key,
        instance_id=instance_id,
        principal_name="fleet",
        private_key=INST,
        certificate=certificate,
    )
    return envelope, certificate


def test_delegated_instance_key_signs_its_own_slot() -> None:
    """A certified instance key may sign its own instance slot, not another."""
    envelope, _ = delegated()
    assert reason(envelope) is None
    assert reason(delegated(slot_key="inst-1")[0]) == "wrong_slot"


def test_delegation_certificate_may_come_from_registry() -> None:
    """A certificate known out of band stands in for one carried in the envelope."""
    _, certificate = delegated()
    bare = sign_update(
        ARRAYS,
        run_id="r1",
        round=3,
        layer="individual",
        slot_key="inst-9",
        instance_id="inst-9",
        num_examples=1,
        principal_name="fleet",
        private_key=INST,
    )
    assert reason(bare) == "unknown_principal"
    assert reason(bare, delegations={"inst-9": certificate}) is None


def test_bad_certificates_are_refused() -> None:
    """Certificates for another instance, by a non-delegating principal or tampered fail."""
    other_instance, _ = delegated(instance_id="inst-10", slot_key="inst-10")
    assert reason(other_instance) == "bad_certificate"
    not_delegating = gov_envelope(
        layer="individual",
        slot_key="inst-9",
        instance_id="inst-9",
        principal_name="ind_7",
        private_key=INST,
        certificate=certify_instance("inst-9", INST.public_key(), "individual", "ind_7", IND),
    )
    assert reason(not_delegating) == "bad_certificate"
    forged = certify_instance("inst-9", INST.public_key(), "individual", "fleet", OTHER)
    envelope = gov_envelope(
        layer="individual",
        slot_key="inst-9",
        instance_id="inst-9",
        principal_name="fleet",
        private_key=INST,
        certificate=forged,
    )
    assert reason(envelope) == "bad_certificate"


def test_envelope_round_trips_through_bytes_and_flat_dict() -> None:
    """Bytes and flat str->scalar items rebuild the same envelope, certificate included."""
    for envelope in (gov_envelope(), delegated()[0]):
        assert envelope_from_bytes(envelope_to_bytes(envelope)) == envelope
        flat = envelope_to_dict(envelope)
        assert all(isinstance(v, str | int) for v in flat.values())
        assert envelope_from_dict({**flat, "unrelated": 1.5}) == envelope
    assert isinstance(delegated()[0].certificate, InstanceCertificate)


def test_verify_update_raises_typed_reason() -> None:
    """verify_update raises UpdateRejected with a machine-readable reason."""
    with pytest.raises(UpdateRejected) as info:
        verify_update(gov_envelope(round=1), ARRAYS, POLICY, run_id="r1", round=3)
    assert info.value.reason == "stale_round"


def test_object_arrays_are_malformed_not_a_crash() -> None:
    """Arrays of Python objects are refused as malformed by check_update."""
    assert reason(gov_envelope(), {"a": np.array([object()])}) == "malformed"


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_decoder_on_random_bytes_raises_only_typed_family(data: bytes) -> None:
    """Decoding arbitrary bytes yields an envelope or raises UpdateRejected("malformed")."""
    try:
        envelope_from_bytes(data)
    except UpdateRejected as e:
        assert e.reason == "malformed"


SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=70)
JSONISH = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


@settings(max_examples=200)
@given(st.dictionaries(st.sampled_from([*UpdateEnvelope.model_fields, "x"]), JSONISH))
def test_decoder_on_hostile_objects_raises_only_typed_family(obj: dict[str, Any]) -> None:
    """Envelope-shaped JSON with hostile values decodes or raises UpdateRejected."""
    flat = {f"envelope.{k}": v for k, v in obj.items()}
    for decode, data in (
        (envelope_from_bytes, json.dumps(obj).encode()),
        (envelope_from_dict, flat),
    ):
        try:
            decode(data)  # type: ignore[arg-type]
        except UpdateRejected as e:
            assert e.reason == "malformed"


@given(
    hnp.arrays(hnp.scalar_dtypes(), hnp.array_shapes(min_dims=0, max_dims=3, max_side=4)).filter(
        lambda a: a.size > 0
    )
)
def test_digest_changes_with_any_byte(array: np.ndarray[Any, Any]) -> None:
    """Flipping any single byte of any array changes the digest."""
    base = arrays_digest({"x": array})
    changed = np.ascontiguousarray(array).copy()
    flat = changed.reshape(-1).view(np.uint8)
    flat[len(flat) // 2] ^= 0xFF
    assert arrays_digest({"x": changed}) != base
