"""Canonical bytes: what signatures and hashes are computed over.

:func:`arrays_digest` is the canonical digest of an update's named arrays.

Sorted-key, compact JSON in UTF-8. Integers are written as integers, floats by
Python's shortest round-trip ``repr`` (``-0.0`` as ``0.0``); NaN and infinities
are refused. A policy's canonical bytes come from its parsed, validated model, so
comments, key order, layout, defaults written out or left implicit, and YAML vs
TOML do not change them, while any change of meaning does.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from layerfed.governance.keys import TrustError
from layerfed.governance.schema import Policy

__all__ = ["CanonicalError", "arrays_digest", "canonical_bytes", "policy_bytes", "policy_hash"]


class CanonicalError(TrustError):
    """A value has no canonical form (NaN, infinity, a non-string key, an unknown type)."""

    def __init__(self, where: str, got: str) -> None:
        self.where = where
        super().__init__(
            f"{where}: expected JSON data (str, int, finite float, bool, None, list, dict "
            f"with str keys), got {got}"
        )


def canonical_bytes(obj: Any) -> bytes:
    """Sorted-key compact UTF-8 JSON of ``obj``, with deterministic floats."""
    normal = _normalise(obj, "$")
    text = json.dumps(
        normal, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8")


def policy_bytes(policy: Policy) -> bytes:
    """Canonical bytes of a parsed policy: what policy signatures cover."""
    return canonical_bytes(policy.model_dump(mode="json"))


def policy_hash(policy: Policy) -> str:
    """Hex SHA-256 of :func:`policy_bytes`: names one verified policy (audit, checkpoints, tasks)."""
    return hashlib.sha256(policy_bytes(policy)).hexdigest()


def arrays_digest(arrays: Mapping[str, np.ndarray[Any, Any]]) -> str:
    """Hex SHA-256 over sorted names, dtypes, shapes and raw C-order bytes of ``arrays``."""
    h = hashlib.sha256(b"layerfed/arrays/v1\n")
    h.update(len(arrays).to_bytes(8, "big"))
    for name in sorted(arrays):
        array = np.asarray(arrays[name])
        if array.dtype.hasobject:
            raise CanonicalError(f"arrays[{name!r}]", "an array of Python objects")
        header = canonical_bytes([name, array.dtype.str, list(array.shape)])
        h.update(len(header).to_bytes(8, "big"))
        h.update(header)
        h.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def _normalise(obj: Any, where: str) -> Any:
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise CanonicalError(where, repr(obj))
        return 0.0 if obj == 0.0 else obj
    if isinstance(obj, list | tuple):
        return [_normalise(item, f"{where}[{i}]") for i, item in enumerate(obj)]
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise CanonicalError(where, f"a key of type {type(key).__name__}")
            out[key] = _normalise(value, f"{where}.{key}")
        return out
    raise CanonicalError(where, type(obj).__name__)
