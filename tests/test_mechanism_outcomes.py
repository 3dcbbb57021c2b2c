"""Outcome tests on the real path: each mechanism acts (its gym.json counter) and changes the
outcome against the arm without it. Each would fail under the mutant of issue #25 that
disables the mechanism (veto never fires, superego does nothing, red-line gate passes
everything, server norm cap off)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from layerfed.simulation.experiments import load_experiment, run_experiments

_OPEN_COMMUNITY = {
    "norm_cap": None,
    "server_lr": 1.0,
    "aggregator": {"kind": "fedavg"},
    "local": {"lr": 0.02, "steps": 4, "batch_size": 8},
}
_CAPPED_COMMUNITY = {k: v for k, v in _OPEN_COMMUNITY.items() if k != "norm_cap"}
_REGRESSION_VETO = {
    "name": "creator_red_line_regression",
    "holder": "creator",
    "applies_to": ["government", "community", "in_group", "individual"],
    "condition": {"kind": "probe_regression", "suite": "red_line_refusals", "max_regression": 0.0},
    "action": "reject",
}


def _arm(name: str, **patch: Any) -> dict[str, Any]:
    """An arm of the open community (no cap, no veto, no gate, no superego) with ``patch``."""
    policy: dict[str, Any] = {
        "superego": {"enabled": False},
        "layers": {"community": _OPEN_COMMUNITY},
        "vetoes": [],
        "red_lines": {"probes": []},
    }
    policy.update(patch)
    return {"name": name, "policy_patch": policy}


MECHANISMS = {
    "name": "mechanisms",
    "title": "Each mechanism alone against an uncapped burst",
    "essay": "test",
    "question": "Does each mechanism act, and does it change the outcome?",
    "scenario": {
        "rounds": 3,
        "instances": [
            {"id": "rater-0", "layers": ["creator"], "user": {"kind": "rater", "until_round": 2}},
            {
                "id": "turkey-0",
                "layers": ["community"],
                "user": {"kind": "turkey", "burst": 300, "burst_round": 3},
            },
        ],
        "populations": [
            {
                "count": 2,
                "id_prefix": "user-",
                "layers": ["community"],
                "user": {"kind": "everyday", "examples": 8},
            }
        ],
        "sample_per_layer": {"community": 3},
    },
    "arms": [
        _arm("open"),
        _arm("veto", vetoes=[_REGRESSION_VETO]),
        _arm(
            "gate",
            red_lines={"probes": [{"suite": "red_line_refusals", "max_violation_rate": 0.01}]},
        ),
        _arm("cap", layers={"community": _CAPPED_COMMUNITY}),
        _arm("superego", superego={"enabled": True}),
    ],
    "metrics": ["violation_peak", "violation"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """The five arms at seed 0 in one simulation: each arm's gym.json rows."""
    out = tmp_path_factory.mktemp("mechanisms")
    path = out / "mechanisms.yaml"
    path.write_text(yaml.safe_dump(MECHANISMS))
    run_experiments([load_experiment(path)], 1, out / "runs")

    return {
        arm["name"]: json.loads(
            (out / "runs" / "mechanisms" / arm["name"] / "seed-0" / "gym.json").read_text()
        )["rounds"]
        for arm in MECHANISMS["arms"]
    }


def _total(rows: list[dict[str, Any]], key: str) -> float:
    return float(sum(r.get(key, 0) for r in rows))


def _final(rows: list[dict[str, Any]]) -> float:
    return float(rows[-1]["violation"])


@pytest.mark.slow
def test_the_open_arm_crosses_and_nothing_acts(runs: dict[str, list[dict[str, Any]]]) -> None:
    """Without any mechanism the burst moves the red line (seed 0: 0.02 at round 3) and every
    counter stays 0."""
    rows = runs["open"]
    assert _final(rows) > 0
    for key in ("policy_vetoes", "gate_refused", "norm_refused", "norm_clipped"):
        assert _total(rows, key) == 0, key
    assert _total(rows, "superego_steps") == 0


@pytest.mark.slow
def test_the_probe_veto_fires_and_holds(runs: dict[str, list[dict[str, Any]]]) -> None:
    """The probe-regression veto fires on the burst and ends below the open arm."""
    rows = runs["veto"]
    assert _total(rows, "policy_vetoes") > 0
    assert _total(rows, "gate_refused") == 0
    assert _final(rows) < _final(runs["open"])


@pytest.mark.slow
def test_the_red_line_gate_refuses_and_holds(runs: dict[str, list[dict[str, Any]]]) -> None:
    """The red-line gate alone refuses breaching commits and ends below the open arm."""
    rows = runs["gate"]
    assert _total(rows, "gate_refused") > 0
    assert _total(rows, "policy_vetoes") == 0
    assert _final(rows) < _final(runs["open"])


@pytest.mark.slow
def test_the_server_norm_cap_refuses_the_burst(runs: dict[str, list[dict[str, Any]]]) -> None:
    """The community's norm cap refuses (or clips) the attacker's oversized reply and holds."""
    rows = runs["cap"]
    assert _total(rows, "norm_refused") + _total(rows, "norm_clipped") > 0
    assert _final(rows) < _final(runs["open"])


@pytest.mark.slow
def test_the_superego_intervenes_and_changes_the_outcome(
    runs: dict[str, list[dict[str, Any]]],
) -> None:
    """The superego is consulted, intervenes, and the run ends below the open arm."""
    rows = runs["superego"]
    assert _total(rows, "superego_steps") > 0
    assert _total(rows, "superego_interventions") > 0
    assert _final(rows) < _final(runs["open"])
