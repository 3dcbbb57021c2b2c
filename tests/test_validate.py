"""Reply validation: every refusal reason, the float64 norm, clipping and .npy decoding."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from flwr.app import Array
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numpy.typing import NDArray

from layerfed.errors import LayerfedError
from layerfed.federation.validate import (
    CHUNK,
    REASONS,
    ReplyInvalid,
    decode_npy,
    validate_reply,
    validate_reply_strict,
)
from layerfed.governance.patterns import matches_any
from layerfed.layers.arrays import global_norm, sum_squares

EXPECTED = {"h.0.lora_A": ((2, 3), np.float32), "h.0.lora_B": ((4, 2), np.float32)}


def _good() -> dict[str, NDArray[Any]]:
    return {
        "h.0.lora_A": np.arange(6, dtype=np.float32).reshape(2, 3) / 10,
        "h.0.lora_B": np.ones((4, 2), dtype=np.float32),
    }


def _with(**changes: Any) -> dict[str, Any]:
    arrays: dict[str, Any] = _good()
    for key, value in changes.items():
        name = key.replace("__", ".")
        if value is None:
            del arrays[name]
        else:
            arrays[name] = value
    return arrays


def test_good_reply_passes_with_its_norm() -> None:
    """A well-formed reply is accepted unchanged with its global float64 L2 norm."""
    arrays = _good()
    v = validate_reply(arrays, EXPECTED, norm_cap=100.0)
    want = np.sqrt(sum(float((a.astype(np.float64) ** 2).sum()) for a in arrays.values()))
    assert v.ok and v.reason is None and not v.clipped and v.norm == pytest.approx(want, rel=1e-12)
    assert v.arrays.keys() == arrays.keys() and v.arrays["h.0.lora_B"] is arrays["h.0.lora_B"]


@pytest.mark.parametrize(
    ("arrays", "kwargs", "reason", "array"),
    [
        (_with(h__0__lora_B=None), {}, "missing_array", "h.0.lora_B"),
        (_with(h__0__extra=np.zeros(1, np.float32)), {}, "unexpected_array", "h.0.extra"),
        (_with(h__0__lora_A=np.zeros((3, 2), np.float32)), {}, "wrong_shape", "h.0.lora_A"),
        (_with(h__0__lora_A=np.zeros((2, 3), np.float64)), {}, "wrong_dtype", "h.0.lora_A"),
        (_with(h__0__lora_A=[[0.0] * 3] * 2), {}, "wrong_dtype", "h.0.lora_A"),
        (
            _with(h__0__lora_A=np.array([[0, 1, np.nan], [0, 0, 0]], np.float32)),
            {},
            "not_finite",
            "h.0.lora_A",
        ),
        (
            _with(h__0__lora_B=np.full((4, 2), np.inf, np.float32)),
            {},
            "not_finite",
            "h.0.lora_B",
        ),
        (_good(), {"in_scope": lambda n: n.endswith("_A")}, "out_of_scope", "h.0.lora_B"),
        (_good(), {"redline": lambda n: n.endswith("_B")}, "red_line", "h.0.lora_B"),
        (_good(), {"norm_cap": 1.0}, "norm_exceeded", None),
        (_good(), {"max_bytes": 40}, "oversized", None),
    ],
)
def test_each_reason_is_reported(
    arrays: dict[str, Any], kwargs: dict[str, Any], reason: str, array: str | None
) -> None:
    """Each kind of bad reply is refused with its code, the array at fault and a detail."""
    v = validate_reply(arrays, EXPECTED, **kwargs)
    assert not v.ok and v.reason == reason and v.array == array and v.arrays == {}
    assert v.detail and reason in REASONS
    if array is not None:
        assert repr(array) in v.detail
    with pytest.raises(ReplyInvalid) as info:
        validate_reply_strict(arrays, EXPECTED, **kwargs)
    assert info.value.reason == reason and isinstance(info.value, LayerfedError)
    assert v.detail in str(info.value)


def test_details_name_expected_and_got() -> None:
    """Shape and dtype refusals say what was expected and what was got."""
    v = validate_reply(_with(h__0__lora_A=np.zeros((3, 2), np.float32)), EXPECTED)
    assert "expected shape (2, 3), got (3, 2)" in v.detail
    v = validate_reply(_with(h__0__lora_A=np.zeros((2, 3), np.float16)), EXPECTED)
    assert "expected float32, got float16" in v.detail


def test_cheapest_and_gravest_reasons_come_first() -> None:
    """Red line beats scope beats names beats size beats dtype; data is read last."""
    bad = _with(h__0__lora_A=np.full((9, 9), np.nan, np.float64), h__0__x=np.zeros(1, np.float32))
    order: list[tuple[dict[str, Any], str]] = [
        ({"redline": lambda n: n.endswith("x"), "in_scope": lambda n: False}, "red_line"),
        ({"in_scope": lambda n: not n.endswith("x")}, "out_of_scope"),
        ({}, "unexpected_array"),
    ]
    for kwargs, reason in order:
        assert validate_reply(bad, EXPECTED, max_bytes=8, **kwargs).reason == reason
    del bad["h.0.x"]
    assert validate_reply(bad, EXPECTED, max_bytes=8).reason == "oversized"
    assert validate_reply(bad, EXPECTED).reason == "wrong_dtype"


def test_clip_scales_to_the_cap_without_touching_the_input() -> None:
    """With clip, an over-norm reply is scaled to the cap; the caller's arrays are unchanged."""
    arrays = _good()
    before = {k: a.copy() for k, a in arrays.items()}
    v = validate_reply(arrays, EXPECTED, norm_cap=1.5, clip=True)
    assert v.ok and v.clipped and v.norm is not None and v.norm > 1.5
    assert global_norm(v.arrays) == pytest.approx(1.5, rel=1e-6)
    for k in arrays:
        np.testing.assert_array_equal(arrays[k], before[k])
        assert v.arrays[k].dtype == np.float32
        np.testing.assert_allclose(v.arrays[k], before[k] * (1.5 / v.norm), rtol=1e-6)


def test_glob_predicates_from_patterns_work_as_scope() -> None:
    """Scope and red-line predicates built from policy globs gate array names."""
    arrays = _good()
    scope = ["h.*.lora_*"]
    v = validate_reply(arrays, EXPECTED, in_scope=lambda n: matches_any(n, scope))
    assert v.ok
    v = validate_reply(arrays, EXPECTED, redline=lambda n: matches_any(n, ["**.lora_B"]))
    assert v.reason == "red_line"


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        st.sampled_from([np.float32, np.float64, np.float16]),
        st.integers(0, 3 * CHUNK),
        elements=st.floats(-1e4, 1e4, allow_nan=False, width=16),
    )
)
def test_sum_squares_is_float64_exact(array: NDArray[Any]) -> None:
    """sum_squares equals the float64 sum of squares, whatever the dtype and length."""
    want = float(np.sum(array.astype(np.float64) ** 2))
    assert sum_squares(array) == pytest.approx(want, rel=1e-12, abs=1e-300)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        np.float32, st.integers(1, 200), elements=st.floats(-(2.0**100), 2.0**100, width=32)
    ),
    st.floats(1e-3, 1e3),
)
def test_clipped_norm_never_exceeds_cap_beyond_rounding(array: NDArray[Any], cap: float) -> None:
    """After validation with clip the norm is at most the cap (within float32 rounding)."""
    v = validate_reply({"x": array}, {"x": (array.shape, np.float32)}, norm_cap=cap, clip=True)
    assert v.ok and global_norm(v.arrays) <= cap * (1 + 1e-6)
    assert v.clipped == (v.norm is not None and v.norm > cap)


def test_float64_overflow_is_not_mistaken_for_nan() -> None:
    """Finite float64 values whose squares overflow get a finite-scaled (infinite-safe) norm."""
    big = np.full(4, 1e200)
    v = validate_reply({"x": big}, {"x": ((4,), np.float64)}, norm_cap=1.0, clip=True)
    assert v.ok and v.clipped and v.norm == pytest.approx(2e200, rel=1e-12)
    np.testing.assert_allclose(v.arrays["x"], np.full(4, 0.5), rtol=1e-12)


def _npy(array: NDArray[Any]) -> bytes:
    return bytes(Array(array).data)


def test_decode_npy_is_zero_copy_and_exact() -> None:
    """decode_npy reads Flower's Array bytes without copying and equals Array.numpy()."""
    for array in (np.arange(12, dtype=np.float32).reshape(3, 4), np.zeros(0, np.float64)):
        data = _npy(array)
        got = decode_npy(data)
        np.testing.assert_array_equal(got, Array(array).numpy())
        assert got.dtype == array.dtype and not got.flags.writeable
    fortran = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    buf = io.BytesIO()
    np.save(buf, fortran)
    np.testing.assert_array_equal(decode_npy(buf.getvalue()), fortran)


@pytest.mark.parametrize(
    "data",
    [
        b"not an npy file at all",
        _npy(np.zeros(4, np.float32))[:-4],
        _npy(np.zeros(4, np.float32)) + b"\0",
    ],
)
def test_decode_npy_refuses_malformed_bytes(data: bytes) -> None:
    """Bad magic or a length that disagrees with the header is refused as malformed_array."""
    with pytest.raises(ReplyInvalid) as info:
        decode_npy(data, name="w")
    assert info.value.reason == "malformed_array" and info.value.array == "w"


def test_decode_npy_refuses_pickled_objects() -> None:
    """An object-dtype .npy (pickled payload) is refused, never unpickled."""
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ReplyInvalid, match="numeric dtype"):
        decode_npy(buf.getvalue())
