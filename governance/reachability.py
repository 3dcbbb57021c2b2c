"""Whether a policy's slots can commit under a population and its sampling.

A slot commits only when ``min_clients`` of its instances reply in one round.
How many can reply is bounded by how many instances the round tasks for the
layer (``sample_per_layer``, default all that feed it) and by how many instances
the slot has (one for an individual slot, a jurisdiction's or a group's members).
And a layer without sampling tasks every instance that feeds it in every round:
beyond :data:`UNSAMPLED_TASK_BOUND` instances that is refused until a sample
size is named (naming the full count explicitly opts in).

The numbers come from the caller (``policy check --scenario`` reads a scenario;
no torch and no simulation import here).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from layerfed.governance.issues import Issue

if TYPE_CHECKING:
    from layerfed.governance.schema import Policy

__all__ = ["UNSAMPLED_TASK_BOUND", "LayerReach", "reachability_issues"]

UNSAMPLED_TASK_BOUND = 10_000
"""Most instances one layer may task per round without an explicit ``sample_per_layer``."""


@dataclass(frozen=True)
class LayerReach:
    """One layer's population: who feeds it, how many a round tasks, its largest slot."""

    eligible: int
    """Instances that give feedback to the layer."""
    sample: int | None
    """``sample_per_layer`` for the layer; None: every eligible instance, every round."""
    largest_slot: int
    """Eligible instances of the layer's most populous slot."""

    @property
    def tasked(self) -> int:
        """Instances one round tasks for the layer."""
        return self.eligible if self.sample is None else max(0, min(self.sample, self.eligible))

    @property
    def reachable(self) -> int:
        """Most replies one slot of the layer can get in one round."""
        return min(self.tasked, self.largest_slot)


def reachability_issues(
    policy: Policy, reach: Mapping[str, LayerReach], *, source: str = "scenario"
) -> Iterator[Issue]:
    """Errors for ``min_clients`` no slot can reach and for unsampled, oversized layers."""
    for i, layer in enumerate(policy.layers):
        got = reach.get(layer.name)
        if got is None or got.eligible == 0:
            continue
        if layer.min_clients > got.reachable:
            sampled = (
                f"samples {got.tasked} of {got.eligible} instance(s) per round"
                if got.sample is not None
                else f"tasks all {got.eligible} instance(s) every round"
            )
            msg = (
                f"expected min_clients <= {got.reachable} (layer '{layer.name}' {sampled} in "
                f"{source}; its largest slot has {got.largest_slot}), got {layer.min_clients}: "
                "no slot of this layer can ever commit"
            )
            yield Issue(("layers", i, "min_clients"), msg)
        if got.sample is None and got.eligible > UNSAMPLED_TASK_BOUND:
            msg = (
                f"expected sample_per_layer.{layer.name} in {source} for a layer fed by more "
                f"than {UNSAMPLED_TASK_BOUND:,} instances, got none: every round tasks all "
                f"{got.eligible:,} of them (name a sample size, or the full count to opt in)"
            )
            yield Issue(("layers", i, "name"), msg)
