"""The fused validate+sum pass and the zero-copy decode the round runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from layerfed.federation.aggregate import Reply, validate_and_aggregate
from layerfed.federation.validate import ReplyChecks
from layerfed.governance.schema import Aggregator
from layerfed.layers import fused
from layerfed.wire.protocol import MessageError, arrays_from_record


def _arrays(n: int, size: int, seed: int) -> list[NDArray[np.float32]]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(size, dtype=np.float32) for _ in range(n)]


@settings(max_examples=20, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(0, 3 * fused.CHUNK + 7),
    st.integers(1, 4),
    st.integers(0, 2**32 - 1),
)
def test_threads_change_no_bit(replies: int, size: int, threads: int, seed: int) -> None:
    """Sums and block norms are the same bits whatever the thread count, and exact in float64."""
    arrays = _arrays(replies, size, seed)
    weights = [float(w) for w in np.random.default_rng(seed).integers(1, 100, replies)]
    saved = fused.THREADS, fused._PARALLEL_FROM
    try:
        fused.THREADS, fused._PARALLEL_FROM = 1, 1 << 62
        (one, one_norms), *_ = fused.weighted_sums({"x": arrays}, weights, norms=True).values()
        fused.THREADS, fused._PARALLEL_FROM = threads, 0
        (many, many_norms), *_ = fused.weighted_sums({"x": arrays}, weights, norms=True).values()
    finally:
        fused.THREADS, fused._PARALLEL_FROM = saved
    np.testing.assert_array_equal(one, many)
    np.testing.assert_array_equal(one_norms, many_norms)
    want = sum(w * a.astype(np.float64) for w, a in zip(weights, arrays, strict=True))
    np.testing.assert_allclose(one, want, rtol=1e-12, atol=1e-12)
    assert one_norms is not None
    for row, a in zip(one_norms, arrays, strict=True):
        exact = math.fsum(float(v) ** 2 for v in a.astype(np.float64))
        assert fused.fold_norms([row]) == pytest.approx(exact, rel=1e-12, abs=1e-300)


def test_non_finite_block_poisons_its_reply_only() -> None:
    """A nan or inf in one reply makes only that reply's folded sum of squares non-finite."""
    arrays = _arrays(3, fused.CHUNK + 3, 1)
    arrays[1][fused.CHUNK + 1] = np.inf
    arrays[2][0] = np.nan
    (_, norms), *_ = fused.weighted_sums({"x": arrays}, [1.0, 1.0, 1.0], norms=True).values()
    assert norms is not None
    totals = [fused.fold_norms([row]) for row in norms]
    assert math.isfinite(totals[0]) and math.isinf(totals[1]) and math.isnan(totals[2])


def test_threaded_slot_equals_validate_then_aggregate(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the thread pool, a slot with a nan and a clipped reply equals validate + fedavg."""
    monkeypatch.setattr(fused, "THREADS", 2)
    monkeypatch.setattr(fused, "_PARALLEL_FROM", 0)
    size = 2 * fused.CHUNK + 11
    checks = ReplyChecks(expected={"a": ((size,), np.float32)}, norm_cap=300.0, clip=True)
    replies = [Reply({"a": a}, float(i + 1), f"c{i}") for i, a in enumerate(_arrays(5, size, 3))]
    for case in ("clean", "faulty"):
        if case == "faulty":
            bad = replies[1].arrays["a"].copy()
            bad[7] = np.nan
            replies[1] = Reply({"a": bad}, 2.0, "c1")
            replies[3] = Reply({"a": replies[3].arrays["a"] * 10}, 4.0, "c3")
        outcome = validate_and_aggregate(replies, Aggregator(kind="fedavg"), checks)
        verdicts = {r.client_id: checks.validate(r.arrays) for r in replies}
        kept = [r for r in replies if verdicts[r.client_id].ok]
        total = math.fsum(r.weight for r in kept)
        want = sum(r.weight * verdicts[r.client_id].arrays["a"].astype(np.float64) for r in kept)
        assert outcome.result is not None
        assert outcome.refused == (() if case == "clean" else ("c1",))
        assert {k: v.norm for k, v in outcome.validations.items()} == {
            k: v.norm for k, v in verdicts.items()
        }
        np.testing.assert_allclose(outcome.result.arrays["a"], want / total, rtol=1e-6, atol=1e-7)


def test_arrays_from_record_is_a_zero_copy_view() -> None:
    """The round's decoder gives Array.numpy()'s numbers as read-only views of the bytes."""
    source = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.zeros(0, np.float64)}
    record = ArrayRecord({k: Array(v) for k, v in source.items()})
    got = arrays_from_record(record, where="lf.update")
    for name, array in got.items():
        np.testing.assert_array_equal(array, record[name].numpy())
        assert array.dtype == source[name].dtype and not array.flags.writeable
        assert array.size == 0 or np.shares_memory(
            array, np.frombuffer(record[name].data, np.uint8)
        )


@pytest.mark.parametrize(
    "array",
    [
        Array(dtype="float32", shape=(4,), stype="torch.raw", data=b"\0" * 16),
        Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=b"\x93NUMPY\x01\0"),
        Array(
            dtype="float32",
            shape=(4,),
            stype="numpy.ndarray",
            data=Array(np.ones(4, np.float32)).data[:-4],
        ),
    ],
)
def test_arrays_from_record_refuses_what_it_cannot_view(array: Array) -> None:
    """Another serialisation, a cut header or cut data raise MessageError naming where."""
    with pytest.raises(MessageError, match=r"lf\.update"):
        arrays_from_record(ArrayRecord({"w": array}), where="lf.update")
