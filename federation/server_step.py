"""The server step of a slot, in one place: the layer's rate times the aggregate, then commit.

FedOpt-style: the aggregated client delta is scaled by the layer's ``server_lr``
into the *step* the vetoes judge (what the slot would move by), and a step the
vetoes let through (possibly clipped) is added to the committed arrays.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from layerfed.governance.schema import LayerPolicy
from layerfed.layers.memory import apply_update

__all__ = ["commit_step", "server_step"]

Arrays = dict[str, np.ndarray[Any, Any]]


def server_step(aggregate: Mapping[str, np.ndarray[Any, Any]], layer: LayerPolicy) -> Arrays:
    """``server_lr * aggregate`` in float64 maths, dtypes kept: the step the vetoes judge."""
    rate = np.float64(layer.server_lr)
    return {k: np.multiply(a, rate, dtype=np.float64).astype(a.dtype) for k, a in aggregate.items()}


def commit_step(current: Mapping[str, np.ndarray[Any, Any]], step: Mapping[str, Any]) -> Arrays:
    """The slot after taking ``step`` (checked names, shapes and finiteness; inputs untouched)."""
    return apply_update(current, step, 1.0)
