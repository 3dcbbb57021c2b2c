"""Checks on the arrays of one reply before they may reach an aggregator.

:func:`validate_reply` never raises: it returns a :class:`Validation` whose
``reason`` is a machine code and whose ``detail`` names the array, what was
expected and what was got. :func:`validate_reply_strict` raises
:class:`ReplyInvalid` with the same code instead. Checks run cheapest first:
red line, scope, unexpected and missing names, total size, dtype, shape, then
one pass over the data for finiteness and the global L2 norm: float64 block
norms read straight from the data (:mod:`layerfed.layers.fused`), folded
exactly. A sum of squares is finite exactly when every value is finite (float32
squares cannot overflow float64), so the norm pass is also the finiteness check.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
from numpy.typing import DTypeLike, NDArray

from layerfed.errors import LayerfedError
from layerfed.governance.patterns import in_scope, matches_any
from layerfed.governance.schema import LayerPolicy, Policy
from layerfed.layers.arrays import ArraysIn, norm_from_squares, scale, squares_total
from layerfed.layers.fused import CHUNK
from layerfed.layers.slots import parse_array_name
from layerfed.wire.protocol import MessageError, npy_view

__all__ = [
    "CHUNK",
    "REASONS",
    "ExpectedArrays",
    "Reason",
    "ReplyChecks",
    "ReplyInvalid",
    "Validation",
    "array_scope",
    "decode_npy",
    "refused",
    "validate_reply",
    "validate_reply_strict",
]

Reason = Literal[
    "bad_weight",
    "malformed_array",
    "missing_array",
    "norm_exceeded",
    "not_finite",
    "out_of_scope",
    "oversized",
    "red_line",
    "unexpected_array",
    "wrong_dtype",
    "wrong_shape",
]
REASONS: tuple[Reason, ...] = get_args(Reason)
"""Every machine code a refusal may carry."""

ExpectedArrays = Mapping[str, tuple[tuple[int, ...], DTypeLike]]
"""Array name -> (shape, dtype) that a reply for a slot must carry exactly."""


class ReplyInvalid(LayerfedError):  # noqa: N818 (name fixed by the federation contract)
    """A reply's arrays were refused; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: Reason, detail: str, array: str | None = None) -> None:
        self.reason: Reason = reason
        self.detail = detail
        self.array = array
        super().__init__(f"reply refused ({reason}): {detail}")


@dataclass(frozen=True)
class Validation:
    """The outcome of validating one reply; ``arrays`` is empty when refused."""

    ok: bool
    reason: Reason | None = None
    detail: str = ""
    arrays: dict[str, NDArray[Any]] = field(default_factory=dict)
    norm: float | None = None
    clipped: bool = False
    array: str | None = None

    def raise_if_refused(self) -> Validation:
        """Return ``self`` when ok, else raise :class:`ReplyInvalid`."""
        if not self.ok:
            assert self.reason is not None
            raise ReplyInvalid(self.reason, self.detail, self.array)
        return self


def refused(reason: Reason, detail: str, array: str | None = None) -> Validation:
    """A refusal with its code, human detail and the array at fault."""
    return Validation(ok=False, reason=reason, detail=detail, array=array)


@dataclass(frozen=True)
class ReplyChecks:
    """Everything a reply for one slot is checked against (see :func:`validate_reply`)."""

    expected: ExpectedArrays
    in_scope: Callable[[str], bool] | None = None
    redline: Callable[[str], bool] | None = None
    norm_cap: float | None = None
    clip: bool = False
    max_bytes: int | None = None

    def validate(self, arrays: ArraysIn) -> Validation:
        """Validate ``arrays``; never raises on bad input."""
        refusal = self.structure(arrays)
        if refusal is not None:
            return refusal
        total = squares_total(arrays)
        return self.judge(arrays, total)

    def structure(self, arrays: ArraysIn) -> Validation | None:
        """The first refusal found without reading the data, or None."""
        for check in (self._names, self._size, self._types):
            refusal = check(arrays)
            if refusal is not None:
                return refusal
        return None

    def judge(self, arrays: ArraysIn, total: float) -> Validation:
        """Finish validation of structurally sound ``arrays`` given their sum of squares."""
        if not math.isfinite(total):
            bad = _first_non_finite(arrays)
            if bad is not None:
                return refused("not_finite", f"array {bad!r}: expected all values finite", bad)
        norm = norm_from_squares(arrays, total)
        kept = dict(arrays)
        cap = self.norm_cap
        if cap is None or norm <= cap:
            return Validation(ok=True, arrays=kept, norm=norm)
        if not self.clip:
            detail = f"update norm: expected at most {cap:g}, got {norm:g}"
            return Validation(ok=False, reason="norm_exceeded", detail=detail, norm=norm)
        detail = f"update norm {norm:g} clipped to {cap:g}"
        return Validation(
            ok=True, detail=detail, arrays=scale(kept, cap / norm), norm=norm, clipped=True
        )

    def _names(self, arrays: ArraysIn) -> Validation | None:
        names = sorted(arrays)
        for name in names:
            if self.redline is not None and self.redline(name):
                return refused("red_line", f"array {name!r} touches a red-line parameter", name)
        for name in names:
            if self.in_scope is not None and not self.in_scope(name):
                return refused("out_of_scope", f"array {name!r} is outside the layer's scope", name)
        for name in names:
            if name not in self.expected:
                detail = f"array {name!r}: expected one of {sorted(self.expected)}, got extra"
                return refused("unexpected_array", detail, name)
        for name in sorted(self.expected):
            if name not in arrays:
                return refused("missing_array", f"array {name!r}: expected, got nothing", name)
        return None

    def _size(self, arrays: ArraysIn) -> Validation | None:
        if self.max_bytes is None:
            return None
        size = sum(int(a.nbytes) for a in arrays.values() if isinstance(a, np.ndarray))
        if size > self.max_bytes:
            detail = f"reply size: expected at most {self.max_bytes} bytes, got {size}"
            return refused("oversized", detail)
        return None

    def _types(self, arrays: ArraysIn) -> Validation | None:
        for name in sorted(self.expected):
            shape, dtype = self.expected[name]
            a = arrays[name]
            want = np.dtype(dtype)
            if not isinstance(a, np.ndarray):
                detail = f"array {name!r}: expected a numpy array of {want}, got {type(a).__name__}"
                return refused("wrong_dtype", detail, name)
            if a.dtype != want:
                return refused(
                    "wrong_dtype", f"array {name!r}: expected {want}, got {a.dtype}", name
                )
            if tuple(a.shape) != tuple(shape):
                detail = f"array {name!r}: expected shape {tuple(shape)}, got {tuple(a.shape)}"
                return refused("wrong_shape", detail, name)
        return None


def array_scope(
    layer: LayerPolicy, policy: Policy
) -> tuple[Callable[[str], bool], Callable[[str], bool]]:
    """Predicates over array names: inside ``layer``'s scope; on a red-line parameter."""

    def scoped(name: str) -> bool:
        try:
            parameter = parse_array_name(name).parameter
        except LayerfedError:
            return False
        return in_scope(parameter, layer.scope.include, layer.scope.exclude)

    def red(name: str) -> bool:
        try:
            parameter = parse_array_name(name).parameter
        except LayerfedError:
            return False
        return matches_any(parameter, policy.red_lines.parameters)

    return scoped, red


def _first_non_finite(arrays: ArraysIn) -> str | None:
    for name in sorted(arrays):
        if not bool(np.isfinite(arrays[name]).all()):
            return name
    return None


def validate_reply(
    arrays: ArraysIn,
    expected: ExpectedArrays,
    *,
    in_scope: Callable[[str], bool] | None = None,
    redline: Callable[[str], bool] | None = None,
    norm_cap: float | None = None,
    clip: bool = False,
    max_bytes: int | None = None,
) -> Validation:
    """Validate one reply's arrays against the slot's expectations; never raises.

    ``in_scope`` and ``redline`` are predicates over array names; ``norm_cap``
    bounds the global L2 norm, which is scaled down to the cap when ``clip``.
    The caller's arrays are never modified.
    """
    checks = ReplyChecks(expected, in_scope, redline, norm_cap, clip, max_bytes)
    return checks.validate(arrays)


def validate_reply_strict(
    arrays: ArraysIn,
    expected: ExpectedArrays,
    *,
    in_scope: Callable[[str], bool] | None = None,
    redline: Callable[[str], bool] | None = None,
    norm_cap: float | None = None,
    clip: bool = False,
    max_bytes: int | None = None,
) -> Validation:
    """Like :func:`validate_reply` but raise :class:`ReplyInvalid` on refusal."""
    checks = ReplyChecks(expected, in_scope, redline, norm_cap, clip, max_bytes)
    return checks.validate(arrays).raise_if_refused()


def decode_npy(data: bytes | bytearray | memoryview, *, name: str = "array") -> NDArray[Any]:
    """A read-only view of the ``.npy`` bytes ``data`` (Flower's numpy Array), without copying.

    The decoder the round uses (:func:`layerfed.wire.protocol.npy_view`); refuses
    pickled objects and lengths that disagree with the header with
    :class:`ReplyInvalid` (``malformed_array``).
    """
    try:
        return npy_view(data, name=name)
    except MessageError as e:
        raise ReplyInvalid("malformed_array", str(e), name) from e
