"""Shamir sharing of SecAgg+'s 32-byte secrets, compact: 32-byte shares, the x-coordinate implied.

A member shares its mask seed and its mask key (each 32 bytes) t of n over
GF(2^128), as two 16-byte halves (pycryptodome's :class:`Shamir`, the field
Flower's SecAgg+ uses). Member ``j``'s share is the polynomials' values at
``x = j``: 32 bytes, with no index, padding or length inside (Flower's
``create_shares`` pads a 32-byte secret to 48 bytes and prefixes a 4-byte index:
52 bytes). The server knows ``x`` from who hands the share back.

Rebuilding many secrets from the same holders (every survivor's seed from the
same t members) reuses the Lagrange coefficients at 0 of those x-coordinates
(:func:`lagrange_at_zero`, cached), so a secret costs 2·t field multiplications
instead of t inversions.

The share plaintext a member seals for a peer is ``seed_share || key_share``
(64 bytes); who sent it to whom is bound by the encryption's associated data
(:func:`layerfed.wire.secagg_crypto.share_context`), not repeated inside.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from Crypto.Protocol.SecretSharing import Shamir, _Element

__all__ = [
    "PLAINTEXT_BYTES",
    "SECRET_BYTES",
    "SHARE_BYTES",
    "combine_secret",
    "lagrange_at_zero",
    "share_plaintext",
    "split_plaintext",
    "split_secret",
]

SECRET_BYTES = 32
SHARE_BYTES = 32
PLAINTEXT_BYTES = 2 * SHARE_BYTES
_HALF = 16


def split_secret(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """``count`` shares of a 32-byte ``secret``, any ``threshold`` of which rebuild it.

    Share ``i`` (0-based) belongs to x-coordinate ``i + 1``.
    """
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secret: expected {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= count:
        raise ValueError(f"threshold: expected 1..{count}, got {threshold}")
    halves = [
        Shamir.split(threshold, count, secret[at : at + _HALF], False)
        for at in range(0, SECRET_BYTES, _HALF)
    ]
    return [b"".join(half[i][1] for half in halves) for i in range(count)]


def _mul(a: Any, b: Any) -> Any:
    return a * b


@lru_cache(maxsize=64)
def lagrange_at_zero(xs: tuple[int, ...]) -> tuple[Any, ...]:
    """The Lagrange coefficients at 0 for the distinct x-coordinates ``xs`` (GF(2^128))."""
    if len(set(xs)) != len(xs) or any(x < 1 for x in xs):
        raise ValueError(f"share x-coordinates: expected distinct positive ids, got {list(xs)}")
    out = []
    for j, x_j in enumerate(xs):
        num, den = _Element(1), _Element(1)
        for m, x_m in enumerate(xs):
            if m != j:
                num = _mul(num, _Element(x_m))
                den = _mul(den, _Element(x_j) + _Element(x_m))
        out.append(_mul(num, den.inverse()))
    return tuple(out)


def combine_secret(shares: list[tuple[int, bytes]]) -> bytes:
    """The secret from ``(x, share)`` pairs (exactly the threshold many; ValueError if malformed).

    Wrong shares rebuild a wrong secret, not an error: callers check what they
    rebuild (a mask key against its signed public key; a seed by the weight and
    range checks of the sum).
    """
    if not shares or any(len(s) != SHARE_BYTES for _, s in shares):
        raise ValueError(f"shares: expected {SHARE_BYTES}-byte shares, got {len(shares)} shares")
    coeffs = lagrange_at_zero(tuple(x for x, _ in shares))
    out = b""
    for at in range(0, SHARE_BYTES, _HALF):
        total = _Element(0)
        for coeff, (_, share) in zip(coeffs, shares, strict=True):
            total = total + _mul(_Element(share[at : at + _HALF]), coeff)
        out += total.encode()
    return out


def share_plaintext(seed_share: bytes, key_share: bytes) -> bytes:
    """What a member seals for one peer: its seed share, then its mask-key share."""
    return seed_share + key_share


def split_plaintext(plain: bytes) -> tuple[bytes, bytes]:
    """``(seed_share, key_share)`` of :func:`share_plaintext`; ValueError when malformed."""
    if len(plain) != PLAINTEXT_BYTES:
        raise ValueError(f"share plaintext: expected {PLAINTEXT_BYTES} bytes, got {len(plain)}")
    return plain[:SHARE_BYTES], plain[SHARE_BYTES:]
