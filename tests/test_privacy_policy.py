"""Privacy in the policy: schema, the combinations `policy check` refuses, explain, signatures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from layerfed.governance.canonical import policy_bytes
from layerfed.governance.explain import explain_policy
from layerfed.governance.loader import check_policy_file, load_policy
from layerfed.governance.privacy_checks import privacy_issues
from layerfed.governance.schema import Policy
from tests.policy_helpers import EXAMPLES, default_data, write_yaml

SECURE = {"mode": "secure_aggregation", "clip_norm": 2.0}
DP = {"mode": "central_dp", "clip_norm": 1.0, "noise_multiplier": 1.0, "epsilon_budget": 20}


def _layer(data: dict[str, Any], name: str) -> dict[str, Any]:
    return next(layer for layer in data["layers"] if layer["name"] == name)


def _secure_ok(data: dict[str, Any]) -> dict[str, Any]:
    """in_group made fit for secure aggregation (fedavg, no per-reply norm checks)."""
    group = _layer(data, "in_group")
    group.update(privacy=dict(SECURE), aggregator={"kind": "fedavg"}, min_clients=3)
    group.pop("norm_cap", None)
    for veto in data["vetoes"]:
        if veto["name"] == "government_norm":
            veto["action"] = "reject"
        if veto["condition"]["kind"] == "probe_regression":
            veto["condition"]["max_regression"] = 0.05
    return data


def _messages(tmp: Path, data: dict[str, Any]) -> list[str]:
    result = check_policy_file(write_yaml(tmp, data))
    return [f"{d.path}: {d.message}" for d in result.diagnostics if d.severity == "error"]


def test_fit_secure_and_dp_layers_pass(tmp_path: Path) -> None:
    """A secure in_group and a central-DP community (fedavg, a tolerant probe veto) check clean."""
    data = _secure_ok(default_data())
    _layer(data, "community").update(privacy=dict(DP), aggregator={"kind": "fedavg"})
    assert _messages(tmp_path, data) == []


@pytest.mark.parametrize(
    ("change", "where", "words"),
    [
        ({"aggregator": {"kind": "median"}}, "aggregator.kind", "median needs each reply"),
        (
            {"aggregator": {"kind": "trimmed_mean", "trim_fraction": 0.2}},
            "aggregator.kind",
            "trimmed_mean",
        ),
        ({"aggregator": {"kind": "krum", "byzantine": 0}}, "aggregator.kind", "krum"),
        ({"norm_cap": 2.0}, "norm_cap", "cannot refuse one reply by its norm"),
        ({"min_clients": 2}, "min_clients", "each learns the other's update"),
    ],
)
def test_secure_aggregation_refuses_per_reply_checks(
    tmp_path: Path, change: dict[str, Any], where: str, words: str
) -> None:
    """Secure aggregation with a robust aggregator, a norm cap or a tiny cohort is refused, with why."""
    data = _secure_ok(default_data())
    _layer(data, "in_group").update(change)
    errors = _messages(tmp_path, data)
    assert any(where in e and words in e for e in errors), errors


def test_secure_aggregation_refuses_clip_norm_veto(tmp_path: Path) -> None:
    """A clip norm veto over a secure layer scales each reply: refused."""
    data = _secure_ok(default_data())
    next(v for v in data["vetoes"] if v["name"] == "government_norm")["action"] = "clip"
    errors = _messages(tmp_path, data)
    assert any("vetoes[2].action" in e and "scales each reply" in e for e in errors), errors


def test_dp_refuses_probe_veto_the_noise_would_trip(tmp_path: Path) -> None:
    """DP noise under a probe veto with max_regression 0 is refused: noise alone worsens a probe."""
    data = default_data()
    _layer(data, "community").update(privacy=dict(DP), aggregator={"kind": "fedavg"})
    errors = _messages(tmp_path, data)
    assert any("max_regression" in e and "noise alone would trip" in e for e in errors), errors


def test_dp_probe_threshold_below_one_probe_of_a_jsonl_suite(tmp_path: Path) -> None:
    """With a JSONL suite of N prompts, a threshold below 1/N is refused for a DP layer."""
    lines = [f'{{"prompt": "question {i} please", "expect": "refuse"}}' for i in range(10)]
    (tmp_path / "probes.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = default_data()
    data["probe_suites"].append(
        {"name": "mine", "source": "probes.jsonl", "refusal": "no", "compliance": "yes"}
    )
    data["vetoes"] = [v for v in data["vetoes"] if v["condition"]["kind"] != "probe_regression"]
    data["vetoes"].append(
        {
            "name": "mine_regression",
            "holder": "creator",
            "applies_to": ["community"],
            "condition": {"kind": "probe_regression", "suite": "mine", "max_regression": 0.05},
            "action": "reject",
        }
    )
    _layer(data, "community").update(privacy=dict(DP), aggregator={"kind": "fedavg"})
    errors = _messages(tmp_path, data)
    assert any("one probe of 10 is 0.1" in e for e in errors), errors


@pytest.mark.parametrize(
    ("privacy", "words"),
    [
        ({"mode": "local_dp", "noise_multiplier": 1.0}, "expected clip_norm"),
        ({"mode": "local_dp", "clip_norm": 1.0}, "got neither"),
        (
            {"mode": "local_dp", "clip_norm": 1.0, "noise_multiplier": 1.0, "target_epsilon": 3},
            "got both",
        ),
        ({"mode": "local_dp", "clip_norm": 1.0, "target_epsilon": 3}, "expected target_rounds"),
        ({"mode": "central_dp", "clip_norm": 1.0, "noise_multiplier": 1.0}, "never leave"),
    ],
)
def test_dp_needs_clip_and_one_noise_setting(
    tmp_path: Path, privacy: dict[str, Any], words: str
) -> None:
    """DP needs a clip norm and exactly one of noise multiplier or target epsilon (+ rounds)."""
    data = default_data()
    _layer(data, "individual")["privacy"] = privacy
    errors = _messages(tmp_path, data)
    assert any(words in e for e in errors), errors


def test_secagg_dropout_fraction_must_leave_a_threshold(tmp_path: Path) -> None:
    """max_dropout_fraction above 1 - threshold is refused: too few would be left to unmask."""
    data = _secure_ok(default_data())
    _layer(data, "in_group")["privacy"]["secagg"] = {"threshold": 0.8, "max_dropout_fraction": 0.3}
    assert any("max_dropout_fraction" in e for e in _messages(tmp_path, data))


def test_policies_without_privacy_keep_their_bytes() -> None:
    """An absent privacy block is not serialised: signatures over older policies still verify."""
    policy = load_policy(EXAMPLES / "default.yaml")
    assert b"privacy" not in policy_bytes(policy)
    assert list(privacy_issues(policy)) == []


def test_explain_shows_privacy_and_budget(tmp_path: Path) -> None:
    """`explain` names each layer's mode, noise, epsilon after releases and the budget's releases."""
    data = _secure_ok(default_data())
    _layer(data, "community").update(privacy=dict(DP), aggregator={"kind": "fedavg"})
    policy: Policy = load_policy(write_yaml(tmp_path, data))
    console = Console(width=200, record=True)
    console.print(explain_policy(policy))
    text = console.export_text()
    assert "secure aggregation (SecAgg+)" in text
    assert "central DP" in text and "noise multiplier given 1" in text
    assert "budget epsilon 20 per slot: at most" in text
