"""The C kernel of the fused pass gives the torch path's bits, or is not used at all."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerfed.layers import fused, fused_kernel

needs_kernel = pytest.mark.skipif(
    fused.kernel() is None, reason="the C kernel is not built or not usable on this CPU"
)


def _replies(n: int, size: int, seed: int, bad: int) -> list[np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    out = [
        (rng.standard_normal(size) * 10.0 ** rng.integers(-6, 4)).astype(np.float32)
        for _ in range(n)
    ]
    if bad and size:
        out[bad % n][int(rng.integers(size))] = [np.nan, np.inf, -np.inf][bad % 3]
    return out


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 9),
    st.integers(1, 3 * fused.CHUNK + 9),
    st.integers(0, 2**32 - 1),
    st.integers(0, 5),
    st.booleans(),
)
def test_kernel_gives_the_torch_bits(
    replies: int, size: int, seed: int, bad: int, threaded: bool
) -> None:
    """Sums and block norms from the kernel equal the torch path's bit for bit (nan, inf,
    tails, groups of four replies and their remainders, one thread or several)."""
    arrays = _replies(replies, size, seed, bad)
    weights = [float(w) for w in np.random.default_rng(seed).uniform(0.01, 500.0, replies)]
    saved = fused.THREADS, fused._PARALLEL_FROM
    try:
        fused.THREADS, fused._PARALLEL_FROM = (3, 0) if threaded else (1, 1 << 62)
        (acc, norms), *_ = fused.weighted_sums({"x": arrays}, weights, norms=True).values()
        single = fused.block_norms(arrays[0])
        held = fused._kernel[:]
        fused._kernel[:] = [None]
        try:
            (want, want_norms), *_ = fused.weighted_sums(
                {"x": arrays}, weights, norms=True
            ).values()
            want_single = fused.block_norms(arrays[0])
        finally:
            fused._kernel[:] = held
    finally:
        fused.THREADS, fused._PARALLEL_FROM = saved
    np.testing.assert_array_equal(acc, want)
    np.testing.assert_array_equal(norms, want_norms)
    np.testing.assert_array_equal(single, want_single)


@needs_kernel
def test_kernel_runs_for_float32_and_torch_for_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Float32 contiguous replies take the kernel; float64 and float16 ones the torch path."""
    calls: list[int] = []
    real = fused.kernel()
    assert real is not None

    class Counting(fused_kernel.Kernel):
        def run(self, *args: Any, **kwargs: Any) -> None:
            calls.append(1)
            super().run(*args, **kwargs)

    monkeypatch.setattr(fused, "_kernel", [Counting(real.fn, real.simd)])
    x32 = np.ones(10, np.float32)
    fused.weighted_sums({"a": [x32, x32]}, [1.0, 2.0], norms=True)
    assert calls == [1]
    for dtype in (np.float64, np.float16):
        x = np.ones(10, dtype)
        (acc, _), *_ = fused.weighted_sums({"a": [x, x]}, [1.0, 2.0]).values()
        np.testing.assert_array_equal(acc, np.full(10, 3.0))
    assert calls == [1]


def test_a_kernel_with_other_bits_is_not_used(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A kernel whose numbers differ from torch's in any bit is refused with a warning."""

    def wrong(*args: Any) -> None:
        return None  # leaves the sums unwritten and every norm 0

    monkeypatch.setattr(fused_kernel, "load", lambda: fused_kernel.Kernel(wrong, True))
    monkeypatch.setattr(fused, "_kernel", [])
    with caplog.at_level(logging.WARNING, logger="layerfed"):
        assert fused.kernel() is None
    assert "torch path runs" in caplog.text
    x = np.arange(5, dtype=np.float32)
    np.testing.assert_array_equal(fused.block_norms(x), [np.sqrt(30.0)])


def test_switched_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """LAYERFED_FUSED_KERNEL=0 leaves only the torch path."""
    monkeypatch.setenv(fused_kernel.ENV, "0")
    assert fused_kernel.load() is None


@needs_kernel
def test_kernel_refuses_operands_it_would_overrun() -> None:
    """Replies of unequal length, a short weight list or a small output raise ValueError."""
    k = fused.kernel()
    assert k is not None
    a, b = np.ones(10, np.float32), np.ones(9, np.float32)
    one = np.ones(1)
    for replies, weights, acc in (
        ([a, b], np.ones(2), np.empty(10)),
        ([a, a], one, np.empty(10)),
        ([a, a], np.ones(2), np.empty(9)),
    ):
        with pytest.raises(ValueError, match="fused kernel"):
            k.run(replies, weights, fused.CHUNK, (0, 1), acc, None)
    (acc, _), *_ = fused.weighted_sums({"x": [a, a]}, [1.0, 2.0]).values()
    np.testing.assert_array_equal(acc, np.full(10, 3.0))
