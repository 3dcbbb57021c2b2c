"""SecAgg+ on layerfed's Message API: records, stage names, encoding, masks (both sides).

Flower's SecAgg+ runs only on its legacy API; this module keeps its protocol
(the same four stages, double masking, t-of-n sharing of each member's mask seed
and mask key over GF(2^128)). Its helpers are replaced, on purpose: masks come
from ChaCha20 keyed with the full 256-bit seed (Flower's ``pseudo_rand_gen``
folds a seed to 32 bits, so a mask could be brute-forced); stochastic rounding
takes an explicit generator (Flower's ``quantize`` draws from numpy's global
state); keys, share sealing and signing are in :mod:`layerfed.wire.secagg_crypto`
and compact Shamir shares in :mod:`layerfed.wire.secagg_shamir`.

Stages (docs/privacy.md): ``setup`` rides on the round's ``train`` message (the
client trains, quantises, keeps the vector and the task, and answers two public
keys); then ``share_keys``, ``collect`` (the signed, masked vector) and ``unmask``
are ``train.secagg`` messages that name the round by :func:`round_key` instead of
repeating the task.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.app import ConfigRecord

from layerfed.wire.protocol import MessageError, Task

__all__ = [
    "MASKED",
    "MODULUS_BITS",
    "SECAGG",
    "SECAGG_MESSAGE",
    "STAGES",
    "SecAggSetup",
    "decode_sum",
    "encode_update",
    "mask_vector",
    "pairwise_seed",
    "round_key",
    "sum_bounds",
    "sum_out_of_range",
    "weight_factor",
]

SECAGG = "lf.secagg"
"""ConfigRecord of every secure-aggregation message: ``stage`` plus that stage's fields."""
SECAGG_MESSAGE = "train.secagg"
"""Message type of the stages after ``setup`` (a ClientApp ``@app.train("secagg")`` handler)."""
MASKED = "secagg/masked"
"""Name of the one array of a masked update (uint32, weight factor first, then every coordinate)."""
STAGES = ("setup", "share_keys", "collect", "unmask")
MODULUS_BITS = 32
"""Sums are kept modulo 2^32 (numpy uint32 arithmetic wraps there)."""


@dataclass(frozen=True)
class SecAggSetup:
    """The server's setup for one client of one slot's cohort."""

    id: int
    """This client's secure-aggregation id, 1..cohort (its Shamir x-coordinate)."""
    cohort: int
    threshold: int
    """Shares needed to rebuild a secret (> cohort / 2)."""
    clip_range: float
    bits: int
    weight_cap: float
    """The layer's local budget: a client's weight is min(examples, cap) / cap."""
    clip_norm: float
    """L2 norm the client clips its update to before encoding (0: none)."""

    def to_record(self) -> ConfigRecord:
        """As the ``setup`` stage record."""
        return ConfigRecord(
            {
                "stage": "setup",
                "id": self.id,
                "cohort": self.cohort,
                "threshold": self.threshold,
                "clip_range": float(self.clip_range),
                "bits": self.bits,
                "weight_cap": float(self.weight_cap),
                "clip_norm": float(self.clip_norm),
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> SecAggSetup:
        """Read a ``setup`` record; MessageError when malformed or out of range."""
        try:
            setup = cls(
                id=int(record["id"]),  # type: ignore[arg-type]
                cohort=int(record["cohort"]),  # type: ignore[arg-type]
                threshold=int(record["threshold"]),  # type: ignore[arg-type]
                clip_range=float(record["clip_range"]),  # type: ignore[arg-type]
                bits=int(record["bits"]),  # type: ignore[arg-type]
                weight_cap=float(record["weight_cap"]),  # type: ignore[arg-type]
                clip_norm=float(record["clip_norm"]),  # type: ignore[arg-type]
            )
        except (KeyError, TypeError, ValueError) as e:
            raise MessageError(f"{SECAGG}: expected a setup record, got {e}") from e
        ok = (
            1 <= setup.id <= setup.cohort
            and setup.cohort // 2 < setup.threshold <= setup.cohort
            and 4 <= setup.bits <= 24
            and setup.cohort * (2**setup.bits - 1) < 2**MODULUS_BITS
            and setup.clip_range > 0
            and setup.weight_cap > 0
            and setup.clip_norm >= 0
        )
        if not ok:
            raise MessageError(f"{SECAGG}: expected a consistent setup, got {setup}")
        return setup


def round_key(task: Task) -> str:
    """Names one member's secure round: ``run|round|slot|instance`` (on every stage message)."""
    return f"{task.run_id}|{task.round}|{task.slot}|{task.instance_id}"


def _levels(bits: int) -> int:
    return int(2**bits - 1)


def weight_factor(num_examples: float, weight_cap: float, bits: int) -> int:
    """The quantised weight a client sends: ``round(min(n, cap) / cap * (2^bits - 1))``."""
    ratio = min(max(float(num_examples), 0.0), weight_cap) / weight_cap
    return round(ratio * _levels(bits))


def encode_update(
    arrays: dict[str, np.ndarray[Any, Any]],
    num_examples: float,
    setup: SecAggSetup,
    rng: np.random.Generator,
) -> np.ndarray[Any, Any]:
    """``[q_w, q_1..q_d]`` as uint32: the weight factor, then the clipped, weighted, quantised update.

    Coordinates (names sorted) are clipped to ``+-clip_range``, scaled by the
    quantised weight ``w = q_w / T`` (so each lies within ``+-w * clip_range``,
    what the server checks the sum against: :func:`sum_bounds`) and
    stochastically rounded onto ``0..T`` (``T = 2^bits - 1``): unbiased, error
    below one step ``2 clip_range / T``.
    """
    levels = _levels(setup.bits)
    q_w = weight_factor(num_examples, setup.weight_cap, setup.bits)
    flat = np.concatenate(
        [np.asarray(arrays[n], dtype=np.float64).reshape(-1) for n in sorted(arrays)]
        or [np.zeros(0)]
    )
    c = setup.clip_range
    scaled = (np.clip(flat, -c, c) * (q_w / levels) + c) * (levels / (2 * c))
    low = np.floor(scaled)
    up = rng.random(scaled.shape) < (scaled - low)
    q = np.clip(low + up, 0, levels).astype(np.uint32)
    return np.concatenate([np.array([q_w], dtype=np.uint32), q])


def sum_bounds(weight_factors: list[int], bits: int) -> tuple[int, int]:
    """The least and most each coordinate of an honest sum of encodings can be (mod-free integers).

    A member of quantised weight ``q_w`` encodes a coordinate ``v`` within
    ``+-(q_w / T) * clip_range`` onto ``(v + clip_range) * T / (2 clip_range)``,
    i.e. within ``(T - q_w) / 2 .. (T + q_w) / 2``; stochastic rounding (and
    float error) moves it by at most one level more. Summed over the members.
    Raises ValueError when the largest sum would not fit below ``2^32`` (no
    modulus headroom: a wrapped sum could not be told from an honest one).
    """
    levels = _levels(bits)
    low = sum(max(0, math.floor((levels - q) / 2) - 1) for q in weight_factors)
    high = sum(min(levels, math.ceil((levels + q) / 2) + 1) for q in weight_factors)
    if len(weight_factors) * levels >= 2**MODULUS_BITS:
        raise ValueError(
            f"modulus_headroom: {len(weight_factors)} members x {levels} levels"
            f" must stay below 2^{MODULUS_BITS}"
        )
    return low, high


def sum_out_of_range(
    total: np.ndarray[Any, Any], weight_factors: list[int], bits: int, clip_range: float
) -> str:
    """Why the unmasked ``total`` is not a sum of honest encodings, or "" when every coordinate is.

    Each coordinate must lie within :func:`sum_bounds`: the decoded weighted sum
    within ``sum(w_i) * clip_range`` (plus one quantisation step per member).
    A member that adds an offset inside its masked vector lands outside and is
    caught here; a lie inside its own range cannot be told apart (docs/privacy.md).
    """
    low, high = sum_bounds(weight_factors, bits)
    coords = total[1:].astype(np.int64)
    bad = np.flatnonzero((coords < low) | (coords > high))
    if bad.size == 0:
        return ""
    k = int(bad[0])
    step = 2 * clip_range / _levels(bits)
    centre = len(weight_factors) * clip_range
    got = float(coords[k]) * step - centre
    bound = sum(weight_factors) / _levels(bits) * clip_range
    return (
        f"out_of_range: {bad.size} coordinates outside the sum of weight x clip_range;"
        f" coordinate {k} decodes to {got:.6g}, expected within +-{bound:.6g}"
        f" (levels {low}..{high}, got {int(coords[k])})"
    )


def decode_sum(
    total: np.ndarray[Any, Any],
    contributors: int,
    shapes: dict[str, tuple[int, ...]],
    setup_bits: int,
    clip_range: float,
) -> tuple[dict[str, np.ndarray[Any, Any]], float]:
    """The weighted mean (float32 arrays) and the weight sum from an unmasked sum of encodings."""
    levels = _levels(setup_bits)
    weight = float(total[0]) / levels
    step = 2 * clip_range / levels
    summed = total[1:].astype(np.float64) * step - contributors * clip_range
    mean = summed / weight if weight > 0 else summed * 0.0
    out: dict[str, np.ndarray[Any, Any]] = {}
    at = 0
    for name in sorted(shapes):
        size = math.prod(shapes[name])
        out[name] = mean[at : at + size].reshape(shapes[name]).astype(np.float32)
        at += size
    return out, weight


def _stream(seed: bytes, length: int) -> np.ndarray[Any, Any]:
    """``length`` uint32 words of ChaCha20 keystream under the 32-byte ``seed`` (nonce 0)."""
    if len(seed) != 32:
        raise MessageError(f"mask seed: expected 32 bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor()
    data = encryptor.update(b"\x00" * (4 * length))
    return np.frombuffer(data, dtype="<u4").astype(np.uint32)


def pairwise_seed(fernet_key: bytes) -> bytes:
    """The 32 raw bytes of a Flower ``generate_shared_key`` result (urlsafe base64)."""
    return base64.urlsafe_b64decode(fernet_key)


def mask_vector(
    vector: np.ndarray[Any, Any], own_seed: bytes, pairs: list[tuple[int, bytes]], my_id: int
) -> np.ndarray[Any, Any]:
    """``vector`` + PRG(own seed) + sum over pairs (+PRG if my id is larger, -PRG if smaller), mod 2^32.

    The server removes the same masks with :func:`mask_vector` of a zero vector
    (private masks of survivors, pairwise masks with dropped clients).
    """
    out = vector.astype(np.uint32, copy=True)
    if own_seed:
        out += _stream(own_seed, len(out))
    for other, seed in pairs:
        if other > my_id:
            out -= _stream(seed, len(out))
        else:
            out += _stream(seed, len(out))
    return out
