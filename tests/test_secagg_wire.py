"""SecAgg+ encoding and masks: quantisation error bounds, masks that cancel, setup records."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.supercore.primitives.asymmetric import generate_key_pairs
from hypothesis import given, settings
from hypothesis import strategies as st

from layerfed.wire.protocol import MessageError
from layerfed.wire.secagg import (
    SecAggSetup,
    decode_sum,
    encode_update,
    mask_vector,
    pairwise_seed,
    weight_factor,
)

SHAPES = {"a": (3, 4), "b": (5,)}


def _setup(n: int, bits: int = 16, clip_range: float = 1.0) -> SecAggSetup:
    return SecAggSetup(1, n, n // 2 + 1, clip_range, bits, 32.0, 0.0)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 8),
    bits=st.integers(8, 20),
    seed=st.integers(0, 2**32 - 1),
    examples=st.lists(st.integers(1, 64), min_size=8, max_size=8),
)
def test_sum_of_encodings_decodes_to_the_weighted_mean(
    n: int, bits: int, seed: int, examples: list[int]
) -> None:
    """Decoding the sum of n encodings gives the weighted mean within n quantisation steps / weight."""
    rng = np.random.default_rng(seed)
    setup = _setup(n, bits)
    updates = [
        {k: rng.uniform(-0.3, 0.3, s).astype(np.float32) for k, s in SHAPES.items()}
        for _ in range(n)
    ]
    total = np.zeros(1 + 17, dtype=np.uint32)
    for update, count in zip(updates, examples, strict=False):
        total += encode_update(update, count, setup, rng)
    mean, weight = decode_sum(total, n, SHAPES, bits, 1.0)
    levels = 2**bits - 1
    ratios = [weight_factor(c, 32.0, bits) / levels for c in examples[:n]]
    assert weight == pytest.approx(sum(ratios))
    bound = n * (2.0 / levels) / sum(ratios) + 1e-6
    for k in SHAPES:
        exact = sum(r * u[k].astype(np.float64) for r, u in zip(ratios, updates, strict=False))
        assert np.max(np.abs(mean[k] - exact / sum(ratios))) <= bound


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 6), seed=st.integers(0, 2**32 - 1))
def test_pairwise_masks_cancel_and_private_masks_are_removable(n: int, seed: int) -> None:
    """Σ masked = Σ plain once each private mask is removed; no masked vector equals its plain one."""
    rng = np.random.default_rng(seed)
    keys = [generate_key_pairs() for _ in range(n)]
    plain = [rng.integers(0, 2**16, 50).astype(np.uint32) for _ in range(n)]
    own = [rng.bytes(32) for _ in range(n)]
    masked = []
    for i in range(n):
        pairs = [
            (j + 1, pairwise_seed(generate_shared_key(keys[i][0], keys[j][1])))
            for j in range(n)
            if j != i
        ]
        masked.append(mask_vector(plain[i], own[i], pairs, i + 1))
        assert not np.array_equal(masked[-1], plain[i])
    total = np.sum(masked, axis=0, dtype=np.uint32)
    zero = np.zeros(50, dtype=np.uint32)
    for i in range(n):
        total -= mask_vector(zero, own[i], [], i + 1)
    np.testing.assert_array_equal(total, np.sum(plain, axis=0, dtype=np.uint32))


def test_setup_record_round_trip_and_refusals() -> None:
    """A setup record reads back equal; ids, thresholds or bits that cannot hold are refused."""
    setup = SecAggSetup(2, 5, 3, 0.5, 16, 32.0, 2.0)
    assert SecAggSetup.from_record(setup.to_record()) == setup
    for bad in (
        SecAggSetup(6, 5, 3, 0.5, 16, 32.0, 0.0),  # id outside the cohort
        SecAggSetup(1, 6, 3, 0.5, 16, 32.0, 0.0),  # threshold not above half
        SecAggSetup(1, 70_000, 40_000, 0.5, 16, 32.0, 0.0),  # the sum would wrap
    ):
        with pytest.raises(MessageError):
            SecAggSetup.from_record(bad.to_record())
