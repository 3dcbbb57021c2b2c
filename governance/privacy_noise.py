"""The Gaussian mechanism's two steps on named arrays: clip to an L2 norm, add noise.

Shared by central DP (the server, :mod:`layerfed.federation.privacy`) and local DP
(the instance, :mod:`layerfed.clients.local_dp`). Maths in float64, dtypes kept,
inputs never modified. ``noise_rng(None)`` draws its seed from the operating
system (what deployments use: nobody can predict the noise); a seed makes it
reproducible, which only the gym and the tests may want.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["add_gaussian", "clip_to_norm", "l2_norm", "noise_rng"]

Arrays = dict[str, np.ndarray[Any, Any]]


def noise_rng(seed: int | None, parts: Sequence[int] = ()) -> np.random.Generator:
    """A generator seeded by ``(seed, *parts)``, or by 128 fresh OS-random bits when ``seed`` is None."""
    entropy = secrets.randbits(128) if seed is None else [int(seed), *map(int, parts)]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def l2_norm(arrays: Mapping[str, np.ndarray[Any, Any]]) -> float:
    """The global L2 norm over all arrays together (float64; inf or nan when not finite)."""
    total = sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays.values())
    return math.sqrt(total) if math.isfinite(total) else total


def clip_to_norm(arrays: Mapping[str, np.ndarray[Any, Any]], clip_norm: float) -> Arrays:
    """``arrays`` scaled by ``min(1, clip_norm / norm)``; non-finite arrays come back unchanged.

    (Validation refuses non-finite updates later; clipping must not hide them.)
    """
    norm = l2_norm(arrays)
    if not math.isfinite(norm) or norm <= clip_norm:
        return {k: np.array(a, copy=True) for k, a in arrays.items()}
    scale = clip_norm / norm
    return {k: np.multiply(a, scale, dtype=np.float64).astype(a.dtype) for k, a in arrays.items()}


def add_gaussian(
    arrays: Mapping[str, np.ndarray[Any, Any]], std: float, rng: np.random.Generator
) -> Arrays:
    """``arrays`` plus independent N(0, std^2) noise on every coordinate (names in sorted order)."""
    out: Arrays = {}
    for name in sorted(arrays):
        a = arrays[name]
        noise = rng.normal(0.0, std, size=a.shape) if std > 0 else np.zeros(a.shape)
        out[name] = np.add(a, noise, dtype=np.float64).astype(a.dtype)
    return out
