"""Which mechanisms acted in one round's trainings of an instance (counts for the reply).

:func:`round_mechanisms` turns the round's :class:`~layerfed.clients.local_train.TrainResult`
values (the task's slot and the instance-only slots trained beside it) into the per-layer
counters of :mod:`layerfed.wire.mechanisms`. :func:`removed_share` measures, for a slot
whose A is projected off the red-line probes' activations (``A = A₀ (I - P)``,
:mod:`layerfed.layers.protect`), the share of the update's effective change the
projection removed: ``||ΔB A₀ P||_F / ||ΔB A₀||_F`` over every memory and module. The two
parts of ``ΔB A₀`` are orthogonal, so the share is in [0, 1]; it is computed exactly from
``rank x rank`` Gram matrices (``||ΔB X||_F² = Σ (ΔBᵀΔB) ∘ (X Xᵀ)``), never the full matrix.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable

import numpy as np

from layerfed.clients.local_train import TrainResult
from layerfed.layers.arrays import Arrays
from layerfed.layers.slots import SlotId, SlotSpec
from layerfed.wire.mechanisms import COUNTERS

__all__ = ["removed_share", "round_mechanisms"]


def removed_share(spec: SlotSpec, delta: Arrays) -> float:
    """``||ΔB A₀ P||_F / ||ΔB A₀||_F`` of ``delta`` on ``spec``'s slot (0 when unprotected)."""
    if spec.protection is None:
        return 0.0
    projected = spec.a_matrices()
    drawn = dataclasses.replace(spec, basis_digest=None, protection=None).a_matrices()
    removed = total = 0.0
    for module, a0 in drawn.items():
        a0_64 = np.asarray(a0, np.float64)
        gone = a0_64 - np.asarray(projected[module], np.float64)
        for memory in spec.memories:
            b = delta.get(spec.array_name(memory, module))
            if b is None:
                continue
            gram = np.asarray(b, np.float64).T @ np.asarray(b, np.float64)
            removed += float(np.sum(gram * (gone @ gone.T)))
            total += float(np.sum(gram * (a0_64 @ a0_64.T)))
    if total <= 0.0:
        return 0.0
    return math.sqrt(max(0.0, removed) / total)


def round_mechanisms(
    results: Iterable[TrainResult], spec: Callable[[SlotId], SlotSpec]
) -> dict[str, dict[str, float]]:
    """Per layer: the counters of :data:`layerfed.wire.mechanisms.COUNTERS`, summed over
    ``results`` (``spec``: the slot's spec, as the instance's stack draws it)."""
    out: dict[str, dict[str, float]] = {}
    for result in results:
        slot_spec = spec(result.slot)
        protected = slot_spec.protection is not None
        counts = out.setdefault(result.slot.layer, dict.fromkeys(COUNTERS, 0.0))
        counts["trainings"] += 1.0
        counts["superego_steps"] += float(result.superego_steps)
        counts["superego_interventions"] += float(result.superego_interventions)
        counts["clipped_local"] += float(result.clipped)
        counts["protected"] += float(protected)
        if protected:
            counts["protection_removed"] += removed_share(slot_spec, result.delta)
    return out
