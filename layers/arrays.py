"""A slot's named arrays and their maths, written once for the server, the instance and DP.

:data:`Arrays` is the one type for a slot's (or an update's) named arrays:
array name (``layerfed.layers.slots`` naming) -> numpy array. Every function here
returns new arrays and never modifies its inputs; maths runs in float64 and the
result keeps each input's dtype.

- :func:`global_norm`: the L2 norm over all arrays together, from float64 block
  norms (:mod:`layerfed.layers.fused`) folded exactly; what validation, vetoes,
  clipping and the audit report.
- :func:`clip_to_norm`: scale down to a norm cap (non-finite arrays come back as
  they are, so validation still refuses them).
- :func:`scale`, :func:`add_gaussian`, :func:`noise_rng`: the Gaussian mechanism's parts.
- :func:`server_step`: ``server_lr * delta``, the only place a layer's server rate
  is applied (the server's pipeline and the instance's local commit both call it).
- :func:`apply_step`: ``current + step``, checked names, shapes and finiteness.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
from numpy.typing import NDArray

from layerfed.layers.errors import ArrayError
from layerfed.layers.fused import block_norms, fold_norms

__all__ = [
    "Arrays",
    "ArraysIn",
    "Clipped",
    "add_gaussian",
    "apply_step",
    "clip_to_norm",
    "copy_arrays",
    "global_norm",
    "noise_rng",
    "norm_from_squares",
    "scale",
    "server_step",
    "squares_total",
    "sum_squares",
]

Arrays: TypeAlias = dict[str, NDArray[Any]]
"""A slot's named arrays (array name -> numpy array); what every function here returns."""
ArraysIn: TypeAlias = Mapping[str, NDArray[Any]]
"""Named arrays as an input (any mapping; never modified)."""


@dataclass(frozen=True)
class Clipped:
    """The outcome of :func:`clip_to_norm`: the arrays, their norm before clipping, whether scaled."""

    arrays: Arrays
    norm: float
    clipped: bool


def copy_arrays(arrays: ArraysIn) -> Arrays:
    """Independent copies of ``arrays`` (same dtypes)."""
    return {k: np.array(a, copy=True) for k, a in arrays.items()}


def sum_squares(array: NDArray[Any]) -> float:
    """Sum of squares of ``array`` accumulated in float64 (nan/inf when not finite)."""
    return fold_norms([block_norms(array)])


def squares_total(arrays: ArraysIn) -> float:
    """Sum of squares over all ``arrays`` (names in sorted order), exactly rounded float64."""
    return fold_norms([block_norms(arrays[name]) for name in sorted(arrays)])


def norm_from_squares(arrays: ArraysIn, total: float) -> float:
    """The L2 norm of ``arrays`` given their :func:`squares_total` (a fused pass may supply it).

    Finite arrays whose squares overflow float64 are rescaled; non-finite ones give nan/inf.
    """
    if math.isinf(total) and all(bool(np.isfinite(a).all()) for a in arrays.values()):
        return _rescaled_norm(arrays)
    return math.sqrt(total) if math.isfinite(total) else total


def global_norm(arrays: ArraysIn) -> float:
    """L2 norm over all ``arrays`` together, in float64 (nan or inf when not finite)."""
    return norm_from_squares(arrays, squares_total(arrays))


def _rescaled_norm(arrays: ArraysIn) -> float:
    """The norm of finite arrays whose squares overflow float64."""
    peak = max(float(np.max(np.abs(a))) for a in arrays.values() if a.size)
    total = sum(sum_squares(np.asarray(a, dtype=np.float64) / peak) for a in arrays.values())
    return peak * math.sqrt(total)


def scale(arrays: ArraysIn, factor: float) -> Arrays:
    """New arrays equal to ``arrays * factor`` (float64 maths, dtypes kept)."""
    f = np.float64(factor)
    return {k: np.multiply(a, f, dtype=np.float64).astype(a.dtype) for k, a in arrays.items()}


def clip_to_norm(arrays: ArraysIn, cap: float | None) -> Clipped:
    """``arrays`` scaled by ``min(1, cap / norm)``; ``cap=None`` means no cap.

    Non-finite arrays come back unchanged (validation refuses them later;
    clipping must not hide them).
    """
    norm = global_norm(arrays)
    if cap is None or not math.isfinite(norm) or norm <= cap:
        return Clipped(copy_arrays(arrays), norm, False)
    return Clipped(scale(arrays, cap / norm), norm, True)


def noise_rng(seed: int | None, parts: Sequence[int] = ()) -> np.random.Generator:
    """A generator seeded by ``(seed, *parts)``, or by 128 fresh OS-random bits when ``seed`` is None.

    Deployments pass None (nobody can predict the noise); a seed makes it
    reproducible, which only the gym and the tests may want.
    """
    entropy = secrets.randbits(128) if seed is None else [int(seed), *map(int, parts)]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def add_gaussian(arrays: ArraysIn, std: float, rng: np.random.Generator) -> Arrays:
    """``arrays`` plus independent N(0, std^2) noise on every coordinate (names in sorted order)."""
    out: Arrays = {}
    for name in sorted(arrays):
        a = arrays[name]
        noise = rng.normal(0.0, std, size=a.shape) if std > 0 else np.zeros(a.shape)
        out[name] = np.add(a, noise, dtype=np.float64).astype(a.dtype)
    return out


def server_step(delta: ArraysIn, server_lr: float) -> Arrays:
    """``server_lr * delta`` in float64 maths, dtypes kept: the step a slot would move by.

    The only place a layer's server learning rate is applied, on the server and
    on the instance alike.
    """
    if not math.isfinite(server_lr) or server_lr < 0:
        raise ArrayError(f"server_lr: expected a finite number >= 0, got {server_lr!r}")
    return scale(delta, server_lr)


def apply_step(current: ArraysIn, step: ArraysIn) -> Arrays:
    """``current + step`` as new arrays in ``current``'s dtypes; inputs untouched.

    ``step`` may cover a subset of ``current``'s arrays; every name it carries
    must exist in ``current`` with the same shape, and both sides must be finite
    (:class:`ArrayError` otherwise, before any sum).
    """
    for name, delta in step.items():
        if name not in current:
            raise ArrayError(
                f"update: array {name!r}: expected one of the slot's arrays, got an unknown name"
            )
        if np.shape(delta) != np.shape(current[name]):
            raise ArrayError(
                f"update: array {name!r}: expected shape {np.shape(current[name])}, "
                f"got {np.shape(delta)}"
            )
        if not np.all(np.isfinite(delta)):
            raise ArrayError(f"update: array {name!r}: expected finite values, got NaN or inf")
        if not np.all(np.isfinite(current[name])):
            raise ArrayError(
                f"update: current array {name!r}: expected finite values, got NaN or inf"
            )
    out = copy_arrays(current)
    for name, delta in step.items():
        base = out[name]
        out[name] = (base + np.asarray(delta, base.dtype)).astype(base.dtype)
    return out
