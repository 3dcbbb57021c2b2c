"""Consistency between a policy and a scenario: layers one names and the other never mentions.

A policy layer no simulated instance feeds never trains (its slots stay at zero); a
scenario layer the policy does not define has nowhere to go. Both are easy to miss in
a run's numbers, so :func:`layer_mismatches` spells them out for the console and the
reports.
"""

from __future__ import annotations

from layerfed.governance.schema import Policy
from layerfed.simulation.scenario import Scenario

__all__ = ["fed_layers", "layer_mismatches"]


def fed_layers(scenario: Scenario) -> set[str]:
    """Every layer some instance or population of ``scenario`` gives feedback to."""
    fed: set[str] = {name for spec in scenario.instances for name in spec.layers}
    return fed | {name for pop in scenario.populations for name in pop.layers}


def layer_mismatches(policy: Policy, scenario: Scenario) -> list[str]:
    """One sentence per layer that the policy or the scenario names and the other never does."""
    defined = [layer.name for layer in policy.layers]
    fed = fed_layers(scenario)
    notes = [
        f"policy {policy.name!r} layer {name!r} never trains: no instance of scenario "
        f"{scenario.name!r} gives it feedback"
        for name in defined
        if name not in fed
    ]
    notes += [
        f"scenario {scenario.name!r} feeds layer {name!r}, which policy {policy.name!r} does "
        f"not define (its layers: {', '.join(defined)}): that feedback is never trained"
        for name in sorted(fed - set(defined))
    ]
    return notes
