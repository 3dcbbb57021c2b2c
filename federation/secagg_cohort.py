"""One secure slot's cohort on the server: members, what each SecAgg+ stage left, the unmasked sum.

:class:`Cohort` holds a round's members of one secure slot (ids 1..n by instance
id), their signed public keys, the signed share ciphertexts each sent, masked
vectors, revealed shares, who was blamed and which pairwise masks a complainer left
out. :func:`unmask_sum` removes the masks (survivors' own masks from their seeds,
dropped members' pairwise masks from their rebuilt mask keys), checks the weights
and the range, and decodes the weighted mean.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np

from layerfed.governance.envelope import UpdateEnvelope
from layerfed.governance.schema import LayerPolicy, SecureAggregation
from layerfed.layers.slots import SlotId
from layerfed.wire.protocol import Task
from layerfed.wire.secagg import (
    MODULUS_BITS,
    SecAggSetup,
    decode_sum,
    mask_vector,
    sum_out_of_range,
    weight_factor,
)
from layerfed.wire.secagg_crypto import agree_seed, public_of
from layerfed.wire.secagg_shamir import combine_secret

__all__ = ["Cohort", "RefusedSumError", "unmask_sum"]


class RefusedSumError(ValueError):
    """The unmasked sum is not one honest members could have sent (the reason says why)."""


class Cohort:
    """One secure slot's members this round and what each stage left of them."""

    def __init__(self, slot: SlotId, layer: LayerPolicy, members: list[tuple[int, Task]]) -> None:
        self.slot, self.layer = slot, layer
        privacy = layer.privacy
        assert privacy is not None
        self.params = privacy.secagg or SecureAggregation()
        self.clip_norm = privacy.clip_norm or 0.0
        self.tasks = {i + 1: task for i, (_, task) in enumerate(members)}
        self.nodes = {i + 1: node for i, (node, _) in enumerate(members)}
        self.n = len(members)
        self.t = max(2, math.ceil(self.params.threshold * self.n))
        self.keys: dict[int, tuple[bytes, bytes]] = {}
        self.shared: set[int] = set()
        self.routed: dict[int, list[tuple[int, bytes]]] = defaultdict(list)
        self.sent: dict[int, dict[int, bytes]] = {}
        """Each member's signed share ciphertexts by receiver (the evidence complaints rest on)."""
        self.epks: dict[int, bytes] = {}
        """Each member's signed ephemeral key, under which it sealed its shares."""
        self.blamed: dict[int, str] = {}
        """Members dropped for a corrupt share or a false complaint (reason)."""
        self.unpaired: set[tuple[int, int]] = set()
        """(member, sender): the member left the pairwise mask with that sender out."""
        self.masked: dict[int, tuple[np.ndarray[Any, Any], UpdateEnvelope]] = {}
        self.shares: dict[tuple[str, int], list[tuple[int, bytes]]] = defaultdict(list)
        """("seed" | "key", owner) -> (holder id = the share's x-coordinate, share) revealed."""
        self.unreachable: list[int] = []
        self.reason = ""
        if self.n * (2**self.params.quantization_bits - 1) >= 2**MODULUS_BITS:
            self.fail(
                f"modulus_headroom: {self.n} members x 2^{self.params.quantization_bits} levels"
                f" would wrap mod 2^{MODULUS_BITS}"
            )

    def setup(self, i: int) -> SecAggSetup:
        """Member ``i``'s setup record."""
        local = self.layer.local
        return SecAggSetup(
            id=i,
            cohort=self.n,
            threshold=self.t,
            clip_range=self.params.clip_range,
            bits=self.params.quantization_bits,
            weight_cap=float(local.steps * local.batch_size),
            clip_norm=self.clip_norm,
        )

    def fail(self, reason: str) -> None:
        """Skip this slot's round for ``reason`` (the first reason stands)."""
        if not self.reason:
            self.reason = reason


def _secret(cohort: Cohort, kind: str, owner: int) -> bytes:
    """Rebuild ``owner``'s seed or mask key from the first t shares revealed (a key is checked)."""
    shares = cohort.shares.get((kind, owner), [])
    if len(shares) < cohort.t:
        raise ValueError(f"expected {cohort.t} shares of {kind} {owner}, got {len(shares)}")
    secret = combine_secret(shares[: cohort.t])
    if kind == "key" and public_of(secret) != cohort.keys[owner][0]:
        raise ValueError(f"the mask key of member {owner} rebuilds to a key other than its pk1")
    return secret


def unmask_sum(
    cohort: Cohort, shapes: dict[str, tuple[int, ...]]
) -> tuple[dict[str, np.ndarray[Any, Any]], float]:
    """The weighted mean and weight of the survivors' masked vectors (see the module docstring).

    ValueError when a secret cannot be rebuilt or the weights disagree with the
    signed claims; :class:`RefusedSumError` when the sum is out of range.
    """
    vectors = [v for v, _ in cohort.masked.values()]
    total = np.zeros_like(vectors[0])
    for vector in vectors:
        total += vector
    zero = np.zeros_like(total)
    for a in cohort.masked:
        total -= mask_vector(zero, _secret(cohort, "seed", a), [], a)
    for d in sorted(cohort.shared - set(cohort.masked)):
        paired = [a for a in cohort.masked if (a, d) not in cohort.unpaired]
        if not paired:
            continue
        key = _secret(cohort, "key", d)
        for a in paired:
            seed = agree_seed(key, cohort.keys[a][0])
            total -= mask_vector(zero, b"", [(d, seed)], a)
    params = cohort.params
    cap = float(cohort.layer.local.steps * cohort.layer.local.batch_size)
    factors = [
        weight_factor(env.num_examples, cap, params.quantization_bits)
        for _, env in cohort.masked.values()
    ]
    claimed = sum(factors)
    if int(total[0]) != claimed:
        raise ValueError(f"weight_mismatch: expected weight factors {claimed}, got {int(total[0])}")
    if claimed == 0:
        raise ValueError("no_weight: every survivor trained on nothing")
    outside = sum_out_of_range(total, factors, params.quantization_bits, params.clip_range)
    if outside:
        raise RefusedSumError(outside)
    return decode_sum(total, len(vectors), shapes, params.quantization_bits, params.clip_range)
