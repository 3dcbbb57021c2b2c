"""Layers a policy defines but no simulated instance feeds, or a scenario feeds but no policy defines."""

from __future__ import annotations

from pathlib import Path

from layerfed.governance.loader import load_policy
from layerfed.simulation.checks import layer_mismatches
from layerfed.simulation.scenario import Scenario

ROOT = Path(__file__).resolve().parent.parent


def test_unfed_and_undefined_layers_are_named() -> None:
    """A policy layer nobody feeds and a scenario layer the policy lacks are both reported."""
    policy = load_policy(ROOT / "examples" / "policies" / "default.yaml")
    scenario = Scenario.model_validate(
        {
            "name": "s",
            "instances": [
                {"id": "a", "layers": ["creator", "individual"]},
                {"id": "b", "layers": ["custom"]},
            ],
        }
    )
    notes = layer_mismatches(policy, scenario)
    assert any("'government' never trains" in n for n in notes)
    assert any("feeds layer 'custom'" in n and "does not define" in n for n in notes)
    assert not any("'creator'" in n or "'individual'" in n for n in notes)


def test_matching_policy_and_scenario_have_no_notes() -> None:
    """When every policy layer is fed and every fed layer exists, nothing is reported."""
    policy = load_policy(ROOT / "examples" / "policies" / "default.yaml")
    layers = [layer.name for layer in policy.layers]
    scenario = Scenario.model_validate({"name": "s", "instances": [{"id": "a", "layers": layers}]})
    assert layer_mismatches(policy, scenario) == []
