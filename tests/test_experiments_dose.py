"""Dose-response experiments (issue #25 item 3): arms differ only as their files document."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from layerfed.governance.loader import load_policy
from layerfed.simulation.experiment_spec import EXPERIMENTS_DIR as DIR
from layerfed.simulation.experiment_spec import (
    POLICIES,
    ExperimentSpec,
    arm_scenario_data,
    deep_merge,
    load_experiment,
)
from layerfed.simulation.experiments import plan_experiment

ATTACKERS = {"turkey": (("turkey-0",), "burst"), "n50": (("drip-0", "drip-1"), "examples")}
FILES = {
    "turkey_dose": "turkey",
    "turkey_dose_curve": "turkey",
    "n50_dose_curve": "n50",
}
MATCHED_PATHS = {
    "layers.shared.server_lr",
    "layers.shared.local.lr",
    "layers.shared.scope.include",
    "layers.shared.scope.lora_rank",
    "layers.shared.scope.lora_alpha",
}
"""What the matched arm changes in the ungoverned arm's policy: scope, LoRA rank and rates."""


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves by dotted path; lists of named dicts by their name or id, other lists whole."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    if isinstance(data, list) and data and all(isinstance(x, dict) for x in data):
        keys = [x.get("name", x.get("id", x.get("id_prefix"))) for x in data]
        if None not in keys and len(set(keys)) == len(keys):
            return _flat(dict(zip(keys, data, strict=True)), prefix)
    return {prefix.rstrip("."): data}


def _diff(a: Any, b: Any) -> set[str]:
    fa, fb = _flat(a), _flat(b)
    return {k for k in fa.keys() | fb.keys() if fa.get(k, "<absent>") != fb.get(k, "<absent>")}


def _policy(spec: ExperimentSpec, arm: str) -> dict[str, Any]:
    """The arm's policy as data: its base policy file with the arm's patch merged in."""
    a = next(x for x in spec.arms if x.name == arm)
    data = yaml.safe_load(POLICIES[a.policy].read_text(encoding="utf-8"))
    merged: dict[str, Any] = deep_merge(data, a.policy_patch)
    return merged


def _scenario(spec: ExperimentSpec, arm: str) -> dict[str, Any]:
    a = next(x for x in spec.arms if x.name == arm)
    data = arm_scenario_data(spec, a, 0)
    data.pop("name")
    return data


def _doses(spec: ExperimentSpec) -> list[str]:
    return sorted({a.name.split("_", 1)[0] for a in spec.arms}, key=lambda d: int(d[1:]))


@pytest.fixture(scope="module", params=sorted(FILES))
def spec(request: pytest.FixtureRequest) -> ExperimentSpec:
    return load_experiment(DIR / f"{request.param}.yaml")


def test_dose_files_load_and_the_curves_stay_out_of_all(spec: ExperimentSpec) -> None:
    """Each dose file validates; each dose has default, scope_only and matched arms."""
    for dose in _doses(spec):
        names = {a.name for a in spec.arms if a.name.startswith(f"{dose}_")}
        assert names == {f"{dose}_{k}" for k in ("default", "scope_only", "matched")}, dose
    assert spec.in_all is not spec.name.endswith("_curve")
    assert spec.factor and spec.held_equal


def test_arms_at_one_dose_share_the_scenario_and_doses_differ_only_in_the_attack(
    spec: ExperimentSpec,
) -> None:
    """Same dose: one scenario (matched: the same, shared); across doses only the attack size."""
    ids, field = ATTACKERS[FILES[spec.name]]
    doses = _doses(spec)
    for dose in doses:
        default = _scenario(spec, f"{dose}_default")
        assert _scenario(spec, f"{dose}_scope_only") == default
        shared = _scenario(spec, f"{dose}_matched")
        assert _diff(default, shared) <= {
            *(f"instances.{i}.layers" for i in default_ids(default)),
            *(f"populations.{p['id_prefix']}.layers" for p in default["populations"]),
            "sample_per_layer",
        }
        assert {i["user"][field] for i in default["instances"] if i["id"] in ids} == {int(dose[1:])}
    first = _scenario(spec, f"{doses[0]}_default")
    for dose in doses[1:]:
        diff = _diff(first, _scenario(spec, f"{dose}_default"))
        assert diff == {f"instances.{i}.user.{field}" for i in ids}, dose


def default_ids(scenario: dict[str, Any]) -> list[str]:
    """The ids of a scenario's listed instances."""
    return [i["id"] for i in scenario["instances"]]


def test_policies_differ_from_the_shipped_arms_only_as_documented(spec: ExperimentSpec) -> None:
    """default is the default policy, scope_only the turkey/n50 ablation, matched ungoverned
    with only scope, LoRA rank and rates changed."""
    shipped = load_experiment(DIR / f"{FILES[spec.name]}.yaml", check=False)
    for dose in _doses(spec):
        assert _policy(spec, f"{dose}_default") == _policy(shipped, "default")
        assert _policy(spec, f"{dose}_scope_only") == _policy(shipped, "scope_only")
        diff = _diff(_policy(shipped, "ungoverned"), _policy(spec, f"{dose}_matched"))
        assert diff == MATCHED_PATHS, dose


def test_matched_arm_has_the_attacked_layers_scope_rank_and_rates(
    spec: ExperimentSpec, tmp_path: Path
) -> None:
    """The matched adapter equals the community layer (the attack's) in scope, rank and rates."""
    plans = {p.arm: p for p in plan_experiment(spec, 1, tmp_path)}
    for dose in _doses(spec):
        community = load_policy(plans[f"{dose}_default"].settings.policy).layer("community")
        (shared,) = load_policy(plans[f"{dose}_matched"].settings.policy).layers
        assert shared.scope == community.scope
        assert (shared.scope.lora_rank, shared.scope.lora_alpha) == (4, 8.0)
        assert shared.server_lr == community.server_lr
        assert (shared.local.lr, shared.local.steps) == (community.local.lr, community.local.steps)
        assert shared.memories == community.memories
        # documented as not matched: the ungoverned batch of 32 (community: 8)
        assert (shared.local.batch_size, community.local.batch_size) == (32, 8)


def test_the_decisive_dose_in_all_is_the_curves_own_arms() -> None:
    """turkey_dose runs exactly the curve's arms at 2,000: same scenarios and policies."""
    decisive = load_experiment(DIR / "turkey_dose.yaml", check=False)
    curve = load_experiment(DIR / "turkey_dose_curve.yaml", check=False)
    assert decisive.in_all and not curve.in_all
    assert {a.name for a in decisive.arms} < {a.name for a in curve.arms}
    for arm in decisive.arms:
        assert _scenario(decisive, arm.name) == _scenario(curve, arm.name), arm.name
        assert _policy(decisive, arm.name) == _policy(curve, arm.name), arm.name
        assert arm.shared_layer == next(a for a in curve.arms if a.name == arm.name).shared_layer
