"""Every semantic rule of the policy language, each with its own located error."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from policy_helpers import default_data, write_yaml

from layerfed.governance.loader import check_policy_file

Mutator = Callable[[dict[str, Any]], None]


def _set(path: list[Any], value: Any) -> Mutator:
    def mutate(data: dict[str, Any]) -> None:
        node = data
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value

    return mutate


def _append(path: list[Any], value: Any) -> Mutator:
    def mutate(data: dict[str, Any]) -> None:
        node = data
        for part in path:
            node = node[part]
        node.append(value)

    return mutate


def _both(first: Mutator, second: Mutator) -> Mutator:
    def mutate(data: dict[str, Any]) -> None:
        first(data)
        second(data)

    return mutate


# (rule, mutation, field path of the error, message fragment)
RULES: list[tuple[str, Mutator, str, str]] = [
    (
        "unique layer names",
        _set(["layers", 1, "name"], "creator"),
        "layers[1].name",
        "unique layer name",
    ),
    ("unique ranks", _set(["layers", 2, "rank"], 100), "layers[2].rank", "unique rank"),
    (
        "veto holder outranks target",
        _set(["vetoes", 2, "applies_to"], ["creator"]),
        "vetoes[2].applies_to[0]",
        "ranked below holder 'government'",
    ),
    (
        "veto holder resolves",
        _set(["vetoes", 0, "holder"], "king"),
        "vetoes[0].holder",
        "got 'king'",
    ),
    (
        "veto target resolves",
        _set(["vetoes", 0, "applies_to"], ["nobody"]),
        "vetoes[0].applies_to[0]",
        "got 'nobody'",
    ),
    (
        "veto probe suite resolves",
        _set(["vetoes", 0, "condition", "suite"], "ghost"),
        "vetoes[0].condition.suite",
        "got 'ghost'",
    ),
    (
        "quorum within holder principals",
        _set(["vetoes", 1, "condition"], {"kind": "quorum", "min_signatures": 3}),
        "vetoes[1].condition.min_signatures",
        "principals of 'creator'",
    ),
    (
        "clip needs a norm condition",
        _set(["vetoes", 1, "action"], "clip"),
        "vetoes[1].action",
        "clip",
    ),
    (
        "red line overlaps no scope",
        _set(["layers", 4, "scope", "include"], ["transformer.h.1.**"]),
        "layers[4].scope.include[0]",
        "red line 'transformer.h.*.ln_*.*'",
    ),
    (
        "red-line probe suite resolves",
        _set(["red_lines", "probes", 0, "suite"], "ghost"),
        "red_lines.probes[0].suite",
        "got 'ghost'",
    ),
    (
        "superego suite resolves",
        _set(["superego", "suites"], ["ghost"]),
        "superego.suites[0]",
        "ghost",
    ),
    (
        "principal layer resolves",
        _set(["principals", 1, "layer"], "army"),
        "principals[1].layer",
        "army",
    ),
    (
        "principal names unique",
        _set(["principals", 1, "name"], "creator_root"),
        "principals[1].name",
        "unique principal",
    ),
    (
        "policy signers resolve",
        _set(["policy_signers", "principals"], ["ghost"]),
        "policy_signers.principals[0]",
        "got 'ghost'",
    ),
    (
        "policy signers belong to the top layer",
        _set(["policy_signers", "principals"], ["government_eu"]),
        "policy_signers.principals[0]",
        "top layer 'creator'",
    ),
    (
        "threshold within signers",
        _set(["policy_signers", "threshold"], 2),
        "policy_signers.threshold",
        "at most 1",
    ),
    (
        "unique memory names",
        _set(["layers", 4, "memories", 1, "name"], "stm"),
        "layers[4].memories[1].name",
        "unique memory",
    ),
    (
        "half-life of at least half a round",
        _set(["layers", 4, "memories", 0, "half_life"], 0.1),
        "layers[4].memories[0].half_life",
        "at least 0.5 rounds",
    ),
    (
        "duration half-life above zero",
        _set(["layers", 4, "memories", 0, "half_life"], "0h"),
        "layers[4].memories[0].half_life",
        "duration > 0",
    ),
    (
        "effective local rate at most one",
        _set(["layers", 4, "memories", 0, "lr_multiplier"], 200),
        "layers[4].memories[0].lr_multiplier",
        "<= 100",
    ),
    (
        "effective local rate product at most one",
        _both(
            _set(["layers", 4, "local", "lr"], 0.5),
            _set(["layers", 4, "memories", 0, "lr_multiplier"], 4),
        ),
        "layers[4].memories[0].lr_multiplier",
        "local.lr x lr_multiplier <= 1",
    ),
    (
        "aggregator parameters fit the kind",
        _set(["layers", 0, "aggregator"], {"kind": "median", "trim_fraction": 0.1}),
        "layers[0].aggregator.trim_fraction",
        "no trim_fraction for median",
    ),
    (
        "krum needs enough clients",
        _set(["layers", 0, "aggregator"], {"kind": "krum", "byzantine": 2}),
        "layers[0].min_clients",
        "min_clients >= 7",
    ),
    ("expiry in the future", _set(["expires"], "2020-01-01T00:00:00Z"), "expires", "after now"),
    (
        "duplicate suites",
        _append(["probe_suites"], {"name": "near_misses", "source": "builtin:x"}),
        "probe_suites[2].name",
        "unique suite",
    ),
]


@pytest.mark.parametrize(("rule", "mutate", "field", "fragment"), RULES, ids=[r[0] for r in RULES])
def test_semantic_rule_reports_located_error(
    tmp_path: Path, rule: str, mutate: Mutator, field: str, fragment: str
) -> None:
    """Breaking one rule gives an error on exactly that field, with a line inside the file."""
    data = default_data()
    mutate(data)
    path = write_yaml(tmp_path, data)
    result = check_policy_file(path, now=datetime(2026, 11, 26, tzinfo=UTC))
    errors = [d for d in result.diagnostics if d.severity == "error"]
    assert any(d.path == field and fragment in d.message for d in errors), [str(d) for d in errors]
    hit = next(d for d in errors if d.path == field)
    assert 1 < hit.line <= len(path.read_text().splitlines())


def test_default_policy_has_no_issues(tmp_path: Path) -> None:
    """The shipped default breaks no rule."""
    path = write_yaml(tmp_path, default_data())
    assert check_policy_file(path, now=datetime(2026, 11, 26, tzinfo=UTC)).diagnostics == []


def test_expiry_uses_injected_clock(tmp_path: Path) -> None:
    """The same policy is valid before its expiry and refused after, by the clock given."""
    path = write_yaml(tmp_path, default_data())
    assert check_policy_file(path, now=datetime(2029, 12, 31, tzinfo=UTC)).ok
    assert not check_policy_file(path, now=datetime(2030, 1, 2, tzinfo=UTC)).ok


def test_exclude_lifts_red_line_overlap(tmp_path: Path) -> None:
    """A scope that overlaps a red line but excludes it is accepted."""
    data = default_data()
    data["layers"][4]["scope"]["include"] = ["transformer.h.1.**"]
    data["layers"][4]["scope"]["exclude"] = ["transformer.h.*.ln_*.*"]
    assert check_policy_file(write_yaml(tmp_path, data), now=datetime(2026, 11, 26, tzinfo=UTC)).ok


def test_model_params_make_red_line_check_exact(tmp_path: Path) -> None:
    """With model parameter names, overlap is decided on real names, and unmatched patterns warn."""
    data = default_data()
    data["layers"][4]["scope"]["include"] = ["transformer.h.1.**", "nothing.here"]
    params = ["transformer.h.1.mlp.c_proj.weight", "transformer.h.1.ln_1.weight"]
    result = check_policy_file(write_yaml(tmp_path, data), model_params=params)
    errors = {d.path for d in result.diagnostics if d.severity == "error"}
    warnings = {d.path for d in result.diagnostics if d.severity == "warning"}
    assert "layers[4].scope.include[0]" in errors
    assert "layers[4].scope.include[1]" in warnings
