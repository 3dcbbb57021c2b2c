"""Signed policies: thresholds, rotation, rollback, expiry and canonical bytes."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from layerfed.governance.canonical import CanonicalError, canonical_bytes, policy_bytes
from layerfed.governance.keys import public_key_string
from layerfed.governance.schema import Policy
from layerfed.governance.signing import (
    PolicySignature,
    PolicyTrustError,
    check_policy,
    load_signatures,
    sign_policy,
    sign_policy_file,
    signature_path,
    verify_policy,
    verify_policy_file,
)

DEFAULT = Path(__file__).resolve().parent.parent / "examples" / "policies" / "default.yaml"
NOW = datetime(2027, 1, 1, tzinfo=UTC)
KEYS = [Ed25519PrivateKey.generate() for _ in range(4)]


def policy_data(signers: list[int], threshold: int, version: int = 1) -> dict[str, Any]:
    """The default policy with creator principals c<i> for keys ``signers``."""
    data: dict[str, Any] = yaml.safe_load(DEFAULT.read_text())
    data["version"] = version
    data["principals"] = [
        {"name": f"c{i}", "layer": "creator", "public_key": public_key_string(KEYS[i].public_key())}
        for i in signers
    ]
    data["policy_signers"] = {"principals": [f"c{i}" for i in signers], "threshold": threshold}
    return data


def make(signers: list[int], threshold: int, version: int = 1, **changes: Any) -> Policy:
    """A policy built from :func:`policy_data` with top-level ``changes``."""
    return Policy.model_validate({**policy_data(signers, threshold, version), **changes})


def sigs(policy: Policy, *key_indices: int) -> list[PolicySignature]:
    """Signatures over ``policy`` by the given keys."""
    return [sign_policy(policy, KEYS[i]) for i in key_indices]


def reason(policy: Policy, signatures: list[PolicySignature], **kwargs: Any) -> str | None:
    """The refusal code of check_policy (None when trusted)."""
    args: dict[str, Any] = {"trusted": None, "root_keys": None, "threshold": None, "now": NOW}
    args.update(kwargs)
    result = check_policy(policy, signatures, **args)
    assert result.ok == (result.reason is None)
    return result.reason


def test_first_policy_trusted_by_named_root_key() -> None:
    """A first policy signed by the operator's root key (and its own signers) is trusted."""
    policy = make([0], 1)
    result = check_policy(policy, sigs(policy, 0), None, [KEYS[0].public_key()], None, NOW)
    assert result.ok and len(result.signed_by) == 1


def test_wrong_key_is_refused() -> None:
    """A signature by a key outside the signer set does not count."""
    policy = make([0], 1)
    assert reason(policy, sigs(policy, 1), root_keys=[KEYS[0].public_key()]) == "under_threshold"


def test_under_threshold_is_refused() -> None:
    """Two of three signers required: one signature is not enough, two are."""
    policy = make([0, 1, 2], 2)
    trusted = make([0, 1, 2], 2, version=1)
    new = make([0, 1, 2], 2, version=2)
    assert reason(new, sigs(new, 0), trusted=trusted) == "under_threshold"
    assert reason(new, sigs(new, 0, 2), trusted=trusted) is None
    assert reason(policy, sigs(policy, 0, 1), root_keys=[KEYS[0].public_key()]) is None


def test_duplicate_signatures_count_once() -> None:
    """The same key's signature repeated does not meet a threshold of two."""
    trusted = make([0, 1], 2)
    new = make([0, 1], 2, version=2)
    assert reason(new, sigs(new, 0, 0, 0), trusted=trusted) == "under_threshold"


def test_expired_policy_is_refused_with_injected_clock() -> None:
    """A policy is valid before its expiry and refused at or after it."""
    policy = make([0], 1, expires="2027-06-01T00:00:00Z")
    roots = [KEYS[0].public_key()]
    assert reason(policy, sigs(policy, 0), root_keys=roots) is None
    late = datetime(2027, 6, 1, tzinfo=UTC)
    assert reason(policy, sigs(policy, 0), root_keys=roots, now=late) == "expired"


def test_rollback_is_refused() -> None:
    """A lower version than the trusted one is refused even when well signed."""
    trusted = make([0], 1, version=5)
    old = make([0], 1, version=4)
    assert reason(old, sigs(old, 0), trusted=trusted) == "rollback"


def test_same_version_other_content_is_refused() -> None:
    """Equal version with different meaning is refused; identical content is accepted."""
    trusted = make([0], 1, version=3)
    other = make([0], 1, version=3, name="other")
    assert reason(other, sigs(other, 0), trusted=trusted) == "same_version_other_content"
    assert reason(trusted, sigs(trusted, 0), trusted=trusted) is None


def test_key_rotation_needs_old_and_new_thresholds() -> None:
    """Replacing signer c0 by c1 needs c0 (old threshold) and c1 (new threshold)."""
    trusted = make([0], 1, version=1)
    rotated = make([1], 1, version=2)
    assert reason(rotated, sigs(rotated, 0), trusted=trusted) == "under_threshold"
    assert reason(rotated, sigs(rotated, 1), trusted=trusted) == "under_threshold"
    assert reason(rotated, sigs(rotated, 0, 1), trusted=trusted) is None
    after = make([1], 1, version=3)
    assert reason(after, sigs(after, 1), trusted=rotated) is None


def test_no_root_and_no_trusted_is_refused() -> None:
    """Without a trusted policy or root keys nothing can be trusted."""
    policy = make([0], 1)
    assert reason(policy, sigs(policy, 0)) == "no_root"


def test_root_threshold_defaults_to_all_named_keys() -> None:
    """With several root keys and no threshold, every root key must sign."""
    policy = make([0, 1], 1)
    roots = [KEYS[0].public_key(), KEYS[1].public_key()]
    assert reason(policy, sigs(policy, 0), root_keys=roots) == "under_threshold"
    assert reason(policy, sigs(policy, 0), root_keys=roots, threshold=1) is None


def test_policy_without_signers_is_refused() -> None:
    """A policy naming no policy_signers cannot be verified."""
    data = policy_data([0], 1)
    del data["policy_signers"]
    policy = Policy.model_validate(data)
    assert reason(policy, sigs(policy, 0), root_keys=[KEYS[0].public_key()]) == "malformed"


def test_verify_policy_raises_typed_error_with_reason() -> None:
    """verify_policy raises PolicyTrustError carrying the refusal code."""
    policy = make([0], 1)
    with pytest.raises(PolicyTrustError) as info:
        verify_policy(policy, [], None, [KEYS[0].public_key()], None, NOW)
    assert info.value.reason == "under_threshold"


def write_policy(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as YAML with a comment on top."""
    path.write_text("# a comment\n" + yaml.safe_dump(data, sort_keys=False))
    return path


def test_reformatting_keeps_signature_and_meaning_change_breaks_it(tmp_path: Path) -> None:
    """Comments, key order and flow style keep a signature; a changed number breaks it."""
    data = policy_data([0], 1)
    path = write_policy(tmp_path / "p.yaml", data)
    sign_policy_file(path, KEYS[0])
    roots = [KEYS[0].public_key()]
    assert verify_policy_file(path, root_keys=roots, now=NOW).version == 1
    reordered = dict(reversed(list(data.items())))
    path.write_text("# other layout\n" + yaml.safe_dump(reordered, default_flow_style=True))
    assert verify_policy_file(path, root_keys=roots, now=NOW).version == 1
    changed = copy.deepcopy(data)
    changed["layers"][1]["server_lr"] = 0.51
    write_policy(path, changed)
    with pytest.raises(PolicyTrustError) as info:
        verify_policy_file(path, root_keys=roots, now=NOW)
    assert info.value.reason == "under_threshold" and str(path) in str(info.value)


def test_one_tampered_signature_byte_is_refused(tmp_path: Path) -> None:
    """Changing one character of a stored signature makes it count for nothing."""
    path = write_policy(tmp_path / "p.yaml", policy_data([0], 1))
    sig_file = sign_policy_file(path, KEYS[0])
    entries = json.loads(sig_file.read_text())
    sig = entries[0]["sig"]
    entries[0]["sig"] = ("B" if sig[10] != "B" else "C").join([sig[:10], sig[11:]])
    sig_file.write_text(json.dumps(entries))
    with pytest.raises(PolicyTrustError, match="under_threshold"):
        verify_policy_file(path, root_keys=[KEYS[0].public_key()], now=NOW)


def test_sign_file_adds_and_replaces_own_signature(tmp_path: Path) -> None:
    """Signing twice with one key keeps one entry; a second key adds its own."""
    path = write_policy(tmp_path / "p.yaml", policy_data([0, 1], 2))
    sign_policy_file(path, KEYS[0])
    sign_policy_file(path, KEYS[0])
    assert len(load_signatures(signature_path(path))) == 1
    sign_policy_file(path, KEYS[1])
    assert signature_path(path) == tmp_path / "p.yaml.sig.json"
    assert len(load_signatures(signature_path(path))) == 2
    roots = [KEYS[0].public_key(), KEYS[1].public_key()]
    assert verify_policy_file(path, root_keys=roots, now=NOW).name == "default"


@pytest.mark.parametrize("content", ["{}", "[{}]", "not json", '[{"keyid": "00", "sig": "x"}]'])
def test_malformed_signature_file_is_refused(tmp_path: Path, content: str) -> None:
    """A signature file that is not a list of {keyid, sig} raises PolicyTrustError."""
    path = tmp_path / "s.sig.json"
    path.write_text(content)
    with pytest.raises(PolicyTrustError) as info:
        load_signatures(path)
    assert info.value.reason == "malformed"


def test_policy_bytes_ignore_defaults_written_out() -> None:
    """Writing a default explicitly does not change a policy's canonical bytes."""
    data = policy_data([0], 1)
    explicit = copy.deepcopy(data)
    explicit["superego"]["enabled"] = True
    explicit["layers"][0]["min_clients"] = 1
    one, two = Policy.model_validate(data), Policy.model_validate(explicit)
    assert policy_bytes(one) == policy_bytes(two)
    assert policy_bytes(one) != policy_bytes(make([0], 1, version=2))


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(st.text(), JSON, max_size=6), st.randoms())
def test_canonical_bytes_ignore_key_order_and_round_trip(data: dict[str, Any], rnd: Any) -> None:
    """Canonical bytes are independent of key order and stable through a JSON round trip."""
    items = list(data.items())
    rnd.shuffle(items)
    assert canonical_bytes(dict(items)) == canonical_bytes(data)
    assert canonical_bytes(json.loads(canonical_bytes(data))) == canonical_bytes(data)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), {1: 2}, object(), b"x"])
def test_canonical_bytes_refuse_non_json(bad: Any) -> None:
    """NaN, infinities, non-string keys and unknown types have no canonical form."""
    with pytest.raises(CanonicalError):
        canonical_bytes({"v": bad})


def test_expiry_boundary_uses_utc() -> None:
    """Expiry compares instants: 01:30+02:00 on the expiry day is still before 00:00Z."""
    policy = make([0], 1, expires="2027-06-01T00:00:00Z")
    local = datetime(2027, 5, 31, 23, 30, tzinfo=UTC).astimezone(timezone(timedelta(hours=2)))
    assert local.day == 1
    assert reason(policy, sigs(policy, 0), root_keys=[KEYS[0].public_key()], now=local) is None
