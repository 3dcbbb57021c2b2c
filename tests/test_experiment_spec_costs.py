"""Experiment files: cost predictions in six experiments, per-kind false refusals, scope_only arms."""

from __future__ import annotations

import math
from pathlib import Path

from layerfed.governance.loader import load_policy
from layerfed.governance.schema import Policy
from layerfed.simulation.experiment_spec import EXPERIMENTS_DIR as DIR
from layerfed.simulation.experiment_spec import POLICIES, list_experiments, load_experiment
from layerfed.simulation.experiments import plan_experiment
from layerfed.simulation.summaries import NEAR_KINDS, RATES, SUMMARIES
from layerfed.simulation.verdicts import NON_INFERIORITY
from layerfed.simulation.world import NEAR_KINDS as WORLD_KINDS

COSTED = ("veto", "turkey", "n50", "own_turkey", "early_late", "extinction")


def test_six_experiments_predict_their_costs_with_a_margin() -> None:
    """Each costed experiment has a no_higher false-refusal and a no_lower capability verdict."""
    specs = {s.name: s for s in list_experiments(check=False)}
    for name in COSTED:
        costs = [v for v in specs[name].verdicts if v.expect in NON_INFERIORITY]
        assert all(v.margin is not None and 0 < v.margin <= 0.1 for v in costs), name
        assert any(
            v.expect == "no_higher" and v.metric.startswith("false_refusal") for v in costs
        ), name
        assert any(v.expect == "no_lower" and v.metric == "capability" for v in costs), name
    for name in ("early_late", "extinction"):
        kinds = {v.metric for v in specs[name].verdicts if v.expect == "no_higher"}
        assert kinds == {f"false_refusal_{k}" for k in NEAR_KINDS}, name
    assert specs["contrast"].verdicts[0].metric == "error"
    assert specs["contrast"].metrics[0] == "error"


def test_per_kind_false_refusal_reads_the_final_rows_kind() -> None:
    """false_refusal_<kind> is the last row's rate for that near-miss kind (NaN if unscored)."""
    assert NEAR_KINDS == WORLD_KINDS
    rows = [
        {"round": 1, "false_refusal_kinds": {"harm_idiom": 0.5}},
        {"round": 2, "false_refusal_kinds": {"harm_idiom": 0.25, "kind_person": 0.0}},
    ]
    assert SUMMARIES["false_refusal_harm_idiom"](rows, None) == 0.25
    assert SUMMARIES["false_refusal_kind_person"](rows, None) == 0.0
    assert math.isnan(SUMMARIES["false_refusal_acquire_topic"](rows, None))
    assert {f"false_refusal_{k}" for k in NEAR_KINDS} <= RATES


def _layers(policy: Policy) -> list[tuple[object, ...]]:
    return [
        (layer.name, layer.scope, layer.server_lr, layer.local, layer.memories)
        for layer in policy.layers
    ]


def test_scope_only_arms_keep_default_layers_and_drop_every_mechanism(tmp_path: Path) -> None:
    """turkey's and n50's scope_only: default layers, scopes, ranks and rates; no governance."""
    default = load_policy(POLICIES["default"])
    for name in ("turkey", "n50"):
        spec = load_experiment(DIR / f"{name}.yaml")
        plans = {p.arm: p for p in plan_experiment(spec, 1, tmp_path / name)}
        policy = load_policy(plans["scope_only"].settings.policy)
        assert _layers(policy) == _layers(default), name
        assert not policy.vetoes and not policy.red_lines.probes and not policy.superego.enabled
        for layer in policy.layers:
            assert layer.norm_cap is None and layer.min_clients == 1, (name, layer.name)
            assert layer.aggregator.kind == "fedavg", (name, layer.name)
        ablation = [v for v in spec.verdicts if v.arm == "default" and v.baseline == "scope_only"]
        assert len(ablation) == 1 and isinstance(ablation[0].mechanism, tuple), name
        assert {"vetoes", "norm_clipped", "superego_interventions"} <= set(ablation[0].mechanism)
        assert any(v.arm == "scope_only" and v.baseline == "ungoverned" for v in spec.verdicts)
