"""SecAgg+ keys and share encryption: X25519 agreement, AES-GCM shares, what members sign.

Every member makes two X25519 key pairs per round: ``k1`` agrees pairwise mask
seeds, ``k2`` receives Shamir shares. Public keys travel raw (32 bytes) and are
signed by the member's node identity (its instance key, certified for the layer,
or a principal key: the same signer as its updates) inside an update envelope over
:func:`keys_arrays`; the server verifies that envelope before it routes the keys.

A member seals its shares for all its peers with one fresh ephemeral X25519 key
per round (ECIES: X25519 with each receiver's ``pk2``, HKDF-SHA256 over the pair's
context, AES-256-GCM whose associated data names run, round, slot, ``src`` and
``dst``): one 32-byte ``epk``, then ``ciphertext+tag`` per receiver (80 bytes for
a 64-byte share plaintext). Each (ephemeral key, receiver key, context) derives its
own AES key, used once. Only ``dst``'s ``sk2`` opens its ciphertext, so a receiver
that shows its ``sk2`` (checked against its signed ``pk2``) lets the server test one
ciphertext without exposing any share the receiver *sent* (those were sealed under
the receiver's own ephemeral key). The sender signs ``epk`` and all its ciphertexts
in one envelope over :func:`shares_arrays`, which is the evidence a complaint about
it rests on.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from layerfed.wire.protocol import MessageError

__all__ = [
    "EPK",
    "KEYS",
    "KEY_BYTES",
    "SHARE_PREFIX",
    "ShareError",
    "agree_seed",
    "keys_arrays",
    "new_key_pair",
    "open_share",
    "public_of",
    "seal_shares",
    "share_context",
    "shares_arrays",
]

KEYS = "secagg/keys"
"""Name of the one array of a key-binding envelope: ``pk1 || pk2`` as uint8."""
SHARE_PREFIX = "secagg/share/"
"""Prefix of the arrays of a share envelope: one uint8 ciphertext per receiver id."""
EPK = "secagg/epk"
"""Array of a share envelope: the sender's ephemeral public key for this round's shares."""
KEY_BYTES = 32
_NONCE = b"\x00" * 12  # every sealing key is used once (fresh ephemeral key, one context each)
_MASK_INFO = b"layerfed/secagg/mask/v1"
_SHARE_INFO = b"layerfed/secagg/share/v1"


class ShareError(MessageError):
    """A share ciphertext that does not open (wrong key, tampered, malformed)."""


def new_key_pair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw bytes (private, public)."""
    private = X25519PrivateKey.generate()
    raw = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return raw, _public_bytes(private.public_key())


def _public_bytes(key: X25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _private(raw: bytes, what: str) -> X25519PrivateKey:
    if not isinstance(raw, bytes) or len(raw) != KEY_BYTES:
        got = len(raw) if isinstance(raw, bytes) else type(raw).__name__
        raise MessageError(f"{what}: expected a raw {KEY_BYTES}-byte X25519 key, got {got}")
    return X25519PrivateKey.from_private_bytes(raw)


def _public(raw: bytes, what: str) -> X25519PublicKey:
    if not isinstance(raw, bytes) or len(raw) != KEY_BYTES:
        got = len(raw) if isinstance(raw, bytes) else type(raw).__name__
        raise MessageError(f"{what}: expected a raw {KEY_BYTES}-byte X25519 key, got {got}")
    return X25519PublicKey.from_public_bytes(raw)


def public_of(private: bytes) -> bytes:
    """The raw public key of a raw X25519 private key."""
    return _public_bytes(_private(private, "secagg private key").public_key())


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def agree_seed(private: bytes, public: bytes) -> bytes:
    """The 32-byte pairwise mask seed both ends of a pair derive (X25519 + HKDF-SHA256)."""
    shared = _private(private, "secagg sk1").exchange(_public(public, "secagg pk1"))
    return _hkdf(shared, _MASK_INFO)


def share_context(run_id: str, round_: int, slot: str, src: int, dst: int) -> bytes:
    """The associated data of the share ``src`` sends ``dst`` in one slot's round."""
    return "\n".join((run_id, str(round_), slot, str(src), str(dst))).encode()


def seal_shares(
    pk2s: list[bytes], plaintexts: list[bytes], contexts: list[bytes]
) -> tuple[bytes, list[bytes]]:
    """One fresh ephemeral public key and, per receiver, ``AES-GCM(plaintext)`` only it opens."""
    ephemeral = X25519PrivateKey.generate()
    texts = []
    for pk2, plaintext, context in zip(pk2s, plaintexts, contexts, strict=True):
        key = _hkdf(ephemeral.exchange(_public(pk2, "secagg pk2")), _SHARE_INFO + context)
        texts.append(AESGCM(key).encrypt(_NONCE, plaintext, context))
    return _public_bytes(ephemeral.public_key()), texts


def open_share(sk2: bytes, epk: bytes, ciphertext: bytes, context: bytes) -> bytes:
    """The plaintext :func:`seal_shares` sealed under ``epk``; ShareError when it does not open."""
    if not isinstance(ciphertext, bytes) or len(ciphertext) < 16:
        got = len(ciphertext) if isinstance(ciphertext, bytes) else type(ciphertext).__name__
        raise ShareError(f"secagg share: expected a sealed share, got {got}")
    if not isinstance(epk, bytes) or len(epk) != KEY_BYTES:
        raise ShareError(f"secagg share: expected a {KEY_BYTES}-byte ephemeral key")
    private = _private(sk2, "secagg sk2")
    try:
        ephemeral = X25519PublicKey.from_public_bytes(epk)
        key = _hkdf(private.exchange(ephemeral), _SHARE_INFO + context)
        return AESGCM(key).decrypt(_NONCE, ciphertext, context)
    except (InvalidTag, ValueError) as e:
        raise ShareError(f"secagg share: expected a ciphertext that opens, got {e!r}") from e


def keys_arrays(pk1: bytes, pk2: bytes) -> dict[str, np.ndarray[Any, Any]]:
    """The arrays a key-binding envelope signs: ``{KEYS: pk1 || pk2}``."""
    return {KEYS: np.frombuffer(pk1 + pk2, dtype=np.uint8).copy()}


def shares_arrays(
    epk: bytes, dsts: list[int], texts: list[bytes]
) -> dict[str, np.ndarray[Any, Any]]:
    """The arrays a share envelope signs: the ephemeral key, one uint8 ciphertext per receiver id."""
    arrays = {EPK: np.frombuffer(epk, dtype=np.uint8).copy()}
    for dst, text in zip(dsts, texts, strict=True):
        arrays[f"{SHARE_PREFIX}{dst}"] = np.frombuffer(text, dtype=np.uint8).copy()
    return arrays
