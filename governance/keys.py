"""Ed25519 keys: generate, store, load, identify; and the trust error family's root.

A key id is the hex SHA-256 of the 32 raw public-key bytes. Policies name public
keys as ``"ed25519:" + base64(raw)`` (see :class:`~layerfed.governance.schema.Principal`).
Private keys are PKCS#8 PEM files of mode 0600, optionally passphrase-encrypted;
public keys are SubjectPublicKeyInfo PEM files.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from layerfed.errors import LayerfedError

__all__ = [
    "KeyFileError",
    "KeyPair",
    "TrustError",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "parse_public_key",
    "public_key_string",
]

_PREFIX = "ed25519:"
_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_MAX_KEY_FILE = 64 * 1024


class TrustError(LayerfedError):
    """Base of every error about keys, signatures, envelopes and the audit log."""


class KeyFileError(TrustError):
    """A key file or key string could not be read, parsed or written."""

    def __init__(self, where: str, expected: str, got: str) -> None:
        self.where = where
        self.expected = expected
        self.got = got
        super().__init__(f"{where}: expected {expected}, got {got}")


@dataclass(frozen=True)
class KeyPair:
    """Where :func:`generate_keypair` wrote a key pair, and its identity."""

    name: str
    private_path: Path
    public_path: Path
    key_id: str
    public_key: str


def key_id(public_key: Ed25519PublicKey) -> str:
    """Hex SHA-256 of the raw public key bytes."""
    return hashlib.sha256(_raw(public_key)).hexdigest()


def public_key_string(public_key: Ed25519PublicKey) -> str:
    """The ``"ed25519:<base64 raw>"`` form used in policies."""
    return _PREFIX + base64.b64encode(_raw(public_key)).decode("ascii")


def parse_public_key(text: str, where: str = "public key") -> Ed25519PublicKey:
    """Parse ``"ed25519:<base64 raw>"``; KeyFileError naming ``where`` otherwise."""
    expected = "'ed25519:' followed by base64 of 32 bytes"
    if not isinstance(text, str) or not text.startswith(_PREFIX):
        _fail(where, expected, _show(text))
    try:
        raw = base64.b64decode(text[len(_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        _fail(where, expected, _show(text))
    if len(raw) != 32:
        _fail(where, expected, f"{len(raw)} bytes")
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as e:
        raise KeyFileError(where, expected, "bytes that are not an Ed25519 key") from e


def generate_keypair(name: str, out_dir: Path, passphrase: bytes | None = None) -> KeyPair:
    """Write ``NAME.pem`` (private, 0600) and ``NAME.pub.pem`` into ``out_dir``.

    Existing files are never overwritten. ``passphrase`` encrypts the private key.
    """
    if not _KEY_NAME.fullmatch(name):
        _fail("--name", "letters, digits, '_', '.', '-' (max 64), not starting with '.'", name)
    if passphrase is not None and not passphrase:
        _fail("passphrase", "a non-empty passphrase or none", "an empty one")
    out_dir.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out_dir / f"{name}.pem", out_dir / f"{name}.pub.pem"
    for path in (private_path, public_path):
        if path.exists():
            _fail(str(path), "a path with no file (keys are never overwritten)", "an existing file")
    key = Ed25519PrivateKey.generate()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(private_path, private_pem, 0o600)
    _write_new(public_path, public_pem, 0o644)
    public = key.public_key()
    return KeyPair(name, private_path, public_path, key_id(public), public_key_string(public))


def load_private_key(path: Path, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """Load an Ed25519 PKCS#8 PEM private key; KeyFileError on any problem."""
    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as e:
        got = "an encrypted key and no passphrase" if passphrase is None else "an unencrypted key"
        raise KeyFileError(str(path), "a passphrase matching the key file", got) from e
    except (ValueError, UnsupportedAlgorithm) as e:
        got = "a wrong passphrase or unreadable PEM" if passphrase else "unreadable PEM"
        raise KeyFileError(str(path), "an Ed25519 private key in PEM", got) from e
    if not isinstance(key, Ed25519PrivateKey):
        _fail(str(path), "an Ed25519 private key", type(key).__name__)
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load a public key from a PEM file or a file holding ``ed25519:<base64>``."""
    data = _read(path)
    text = data.decode("utf-8", errors="replace").strip()
    if text.startswith(_PREFIX):
        return parse_public_key(text, where=str(path))
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise KeyFileError(
            str(path), "an Ed25519 public key (PEM or ed25519:)", "unreadable"
        ) from e
    if not isinstance(key, Ed25519PublicKey):
        _fail(str(path), "an Ed25519 public key", type(key).__name__)
    return key


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _read(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_KEY_FILE + 1)
    except OSError as e:
        raise KeyFileError(str(path), "a readable key file", e.strerror or type(e).__name__) from e
    if len(data) > _MAX_KEY_FILE:
        _fail(str(path), f"a key file under {_MAX_KEY_FILE} bytes", "a larger file")
    return data


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as e:
        raise KeyFileError(str(path), "a writable new file", e.strerror or type(e).__name__) from e
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, mode)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(where: str, expected: str, got: str) -> NoReturn:
    raise KeyFileError(where, expected, got)
