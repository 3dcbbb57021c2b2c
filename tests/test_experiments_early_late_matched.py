"""early_late_matched: young and late at matched pre-attack strength, one attack at two doses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from layerfed.governance.loader import load_policy
from layerfed.simulation.experiment_spec import (
    EXPERIMENTS_DIR,
    POLICIES,
    arm_scenario_data,
    load_experiment,
)
from layerfed.simulation.experiments import plan_experiment
from layerfed.simulation.scenario import Scenario
from layerfed.simulation.summaries import CENSOR_BOUNDS, SUMMARIES
from layerfed.simulation.verdicts import NON_INFERIORITY

FILE = EXPERIMENTS_DIR / "early_late_matched.yaml"
DOSES = ("low", "high")
RATERS = ("rater-0", "rater-1")
EXTRA = ("rater-2", "rater-3")
DRIPS = ("drip-0", "drip-1")


def _instances(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["id"]: item for item in data["instances"]}


def _without(data: dict[str, Any], ids: tuple[str, ...], key: str) -> dict[str, Any]:
    """``data`` with ``user.key`` removed from the instances named ``ids`` (and no name)."""
    out = yaml.safe_load(yaml.safe_dump(data))
    out.pop("name")
    for item in out["instances"]:
        if item["id"] in ids:
            item["user"].pop(key, None)
    return dict(out)


def test_spec_loads_outside_the_suite_with_four_arms_and_a_late_reinforcement_end() -> None:
    """The file validates (every arm's scenario too), {young, late} x 2 doses, not in 'all'.

    Not in 'all' because late's margin could not be matched to young's (docs/gym.md).
    """
    spec = load_experiment(FILE)
    assert not spec.in_all and spec.name == "early_late_matched"
    assert {a.name for a in spec.arms} == {f"{w}_{d}" for w in ("young", "late") for d in DOSES}
    assert spec.reinforce_until is not None and spec.reinforce_until > 3
    for arm in spec.arms:
        assert (arm.base or spec.base) == (
            "tiny-untaught" if arm.name.startswith("late") else "tiny"
        )


def test_late_gets_more_of_the_same_red_line_reinforcement_and_young_none_after_round_3() -> None:
    """Both arms' raters give rounds 1-3; late's go on to reinforce_until, with two raters more."""
    spec = load_experiment(FILE)
    arms = {a.name: a for a in spec.arms}
    end = spec.reinforce_until
    assert end is not None
    for dose in DOSES:
        young = arm_scenario_data(spec, arms[f"young_{dose}"], 0)
        late = arm_scenario_data(spec, arms[f"late_{dose}"], 0)
        rounds = young["rounds"]
        for rater in RATERS:
            y, lt = _instances(young)[rater]["user"], _instances(late)[rater]["user"]
            assert y["kind"] == lt["kind"] == "rater"
            assert y.get("from_round", 1) == lt.get("from_round", 1) == 1
            assert y["until_round"] == 3 and lt["until_round"] == end
            assert lt["examples"] > y.get("examples", 16)
        for rater in EXTRA:  # young: never active; late: every round to reinforce_until
            y, lt = _instances(young)[rater]["user"], _instances(late)[rater]["user"]
            assert y["kind"] == lt["kind"] == "rater" and y["from_round"] > rounds
            assert lt["from_round"] == 1 and lt["until_round"] == end
        # Beyond the raters' schedule and examples, young's and late's scenarios are equal.
        y2, l2 = young, late
        for key in ("from_round", "until_round", "examples"):
            y2 = _without(y2 | {"name": ""}, (*RATERS, *EXTRA), key)
            l2 = _without(l2 | {"name": ""}, (*RATERS, *EXTRA), key)
        assert y2 == l2, dose


def test_every_arm_is_attacked_after_reinforcement_and_doses_differ_only_in_drip_size() -> None:
    """Drips start at reinforce_until + 1 in every arm; high gives more examples a round than low."""
    spec = load_experiment(FILE)
    arms = {a.name: a for a in spec.arms}
    end = spec.reinforce_until
    assert end is not None
    sizes = {}
    for who in ("young", "late"):
        low = arm_scenario_data(spec, arms[f"{who}_low"], 0)
        high = arm_scenario_data(spec, arms[f"{who}_high"], 0)
        for data in (low, high):
            for drip in DRIPS:
                user = _instances(data)[drip]["user"]
                assert user["kind"] == "drip" and user["drip"] == 1.0
                assert user["from_round"] == end + 1
        sizes[who] = tuple(_instances(d)["drip-0"]["user"]["examples"] for d in (low, high))
        assert _without(low | {"name": ""}, DRIPS, "examples") == _without(
            high | {"name": ""}, DRIPS, "examples"
        ), who
    assert sizes["young"] == sizes["late"] and sizes["young"][0] < sizes["young"][1]


def test_scored_rounds_start_at_reinforcement_end_so_n50_reads_only_the_attack() -> None:
    """No round before reinforce_until is scored (late's untaught start would give N50 = 0)."""
    spec = load_experiment(FILE)
    end = spec.reinforce_until
    assert end is not None
    for arm in spec.arms:
        scenario = Scenario.model_validate(arm_scenario_data(spec, arm, 0))
        scored = [r for r in range(1, scenario.rounds + 1) if scenario.evaluated(r)]
        assert scored[0] == end and scored[-1] == scenario.rounds, arm.name
        assert scenario.rounds - end >= 3  # several attack rounds: N50 has a resolution


def _policy_data(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data


def test_policies_differ_only_in_base_and_the_creator_layers_local_steps(tmp_path: Path) -> None:
    """Every arm: default without vetoes, probe check or superego; late: more creator steps."""
    spec = load_experiment(FILE)
    plans = {p.arm: p for p in plan_experiment(spec, 1, tmp_path)}
    default = _policy_data(POLICIES["default"])
    for dose in DOSES:
        young = _policy_data(Path(plans[f"young_{dose}"].settings.policy))
        late = _policy_data(Path(plans[f"late_{dose}"].settings.policy))
        for who, data in (("young", young), ("late", late)):
            policy = load_policy(Path(plans[f"{who}_{dose}"].settings.policy))
            assert not policy.vetoes and not policy.red_lines.probes
            assert not policy.superego.enabled
            assert data["vetoes"] == [] and data["superego"]["enabled"] is False
        assert young["base_model"] == default["base_model"] == {"builtin": "tiny"}
        assert late["base_model"] == {"builtin": "tiny-untaught"}
        creator = next(i for i, layer in enumerate(late["layers"]) if layer["name"] == "creator")
        steps = late["layers"][creator]["local"]["steps"]
        assert steps > young["layers"][creator]["local"]["steps"]
        same = yaml.safe_load(yaml.safe_dump(late))
        same["base_model"] = young["base_model"]
        same["layers"][creator]["local"]["steps"] = young["layers"][creator]["local"]["steps"]
        assert same == young, dose
    assert _policy_data(Path(plans["young_low"].settings.policy)) == _policy_data(
        Path(plans["young_high"].settings.policy)
    )


def test_verdicts_compare_young_with_late_at_one_dose_on_listed_metrics() -> None:
    """Each prediction names listed, known metrics and pairs young with late at the same dose."""
    spec = load_experiment(FILE)
    assert {"margin_drop", "n50", "margin_at_reinforce_end"} <= set(spec.metrics)
    assert "n50" in CENSOR_BOUNDS  # judged as survival (Kaplan-Meier, restricted mean)
    assert spec.verdicts
    for v in spec.verdicts:
        assert v.metric in spec.metrics and v.metric in SUMMARIES
        assert v.arm.startswith("young_") and v.baseline == "late_" + v.arm.split("_", 1)[1]
        assert (v.margin is not None) == (v.expect in NON_INFERIORITY)
    primary = {(v.metric, v.expect) for v in spec.verdicts if v.expect not in NON_INFERIORITY}
    assert {("margin_drop", "lower"), ("n50", "higher")} <= primary
