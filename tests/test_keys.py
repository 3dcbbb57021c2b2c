"""Ed25519 key files, key ids and the ed25519: public-key strings."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from layerfed.errors import LayerfedError
from layerfed.governance.keys import (
    KeyFileError,
    TrustError,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    parse_public_key,
    public_key_string,
)
from layerfed.governance.schema import Principal

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_generate_writes_private_0600_and_public(tmp_path: Path) -> None:
    """A new key pair is a 0600 PKCS#8 private PEM and a public PEM with matching ids."""
    pair = generate_keypair("alice", tmp_path)
    assert pair.private_path == tmp_path / "alice.pem"
    assert stat.S_IMODE(pair.private_path.stat().st_mode) == 0o600
    assert pair.private_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    private = load_private_key(pair.private_path)
    public = load_public_key(pair.public_path)
    assert key_id(public) == key_id(private.public_key()) == pair.key_id
    assert public_key_string(public) == pair.public_key


def test_key_id_is_sha256_of_raw_public_bytes() -> None:
    """A key id is the hex SHA-256 of the 32 raw public key bytes."""
    public = Ed25519PrivateKey.generate().public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key_id(public) == hashlib.sha256(raw).hexdigest()


def test_passphrase_encrypts_private_key(tmp_path: Path) -> None:
    """An encrypted key loads with its passphrase and fails without it or with another."""
    pair = generate_keypair("bob", tmp_path, passphrase=b"s3cret")
    assert b"ENCRYPTED" in pair.private_path.read_bytes()
    assert key_id(load_private_key(pair.private_path, b"s3cret").public_key()) == pair.key_id
    with pytest.raises(KeyFileError, match="passphrase"):
        load_private_key(pair.private_path)
    with pytest.raises(KeyFileError):
        load_private_key(pair.private_path, b"wrong")


def test_existing_keys_are_never_overwritten(tmp_path: Path) -> None:
    """Generating a key whose files exist fails and leaves the old key in place."""
    pair = generate_keypair("carol", tmp_path)
    before = pair.private_path.read_bytes()
    with pytest.raises(KeyFileError, match="existing file"):
        generate_keypair("carol", tmp_path)
    assert pair.private_path.read_bytes() == before


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "x" * 65, "sp ace"])
def test_bad_key_names_are_refused(tmp_path: Path, name: str) -> None:
    """Key names that could escape the folder or are empty are refused."""
    with pytest.raises(KeyFileError, match="--name"):
        generate_keypair(name, tmp_path)


def test_public_key_string_round_trips_and_fits_schema() -> None:
    """The ed25519: string parses back to the same key and passes Principal's pattern."""
    public = Ed25519PrivateKey.generate().public_key()
    text = public_key_string(public)
    assert key_id(parse_public_key(text)) == key_id(public)
    Principal(name="p", layer="creator", public_key=text)


def test_example_key_matches_default_policy() -> None:
    """The demo creator key is the one the default policy names as creator_root."""
    private = load_private_key(EXAMPLES / "keys" / "creator-demo.pem")
    policy = yaml.safe_load((EXAMPLES / "policies" / "default.yaml").read_text())
    root = next(p for p in policy["principals"] if p["name"] == "creator_root")
    assert public_key_string(private.public_key()) == root["public_key"]


def test_public_key_file_may_hold_ed25519_string(tmp_path: Path) -> None:
    """A public key file may hold the policy's ed25519: form instead of PEM."""
    public = Ed25519PrivateKey.generate().public_key()
    path = tmp_path / "k.txt"
    path.write_text(public_key_string(public) + "\n")
    assert key_id(load_public_key(path)) == key_id(public)


def test_unreadable_key_files_raise_key_file_error(tmp_path: Path) -> None:
    """Missing, garbage and wrong-kind key files raise KeyFileError naming the file."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a key")
    for call in (
        lambda: load_private_key(tmp_path / "missing.pem"),
        lambda: load_private_key(garbage),
        lambda: load_public_key(garbage),
    ):
        with pytest.raises(KeyFileError) as info:
            call()
        assert str(tmp_path) in str(info.value)
    pair = generate_keypair("d", tmp_path)
    with pytest.raises(KeyFileError):
        load_private_key(pair.public_path)


@given(st.text(max_size=80))
def test_parse_public_key_raises_only_key_file_error(text: str) -> None:
    """Parsing any text either yields a key or raises KeyFileError, a TrustError."""
    try:
        parse_public_key(text)
    except KeyFileError as e:
        assert isinstance(e, TrustError)
        assert isinstance(e, LayerfedError)
