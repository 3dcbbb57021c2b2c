"""Policy diff: what counts as a change of meaning, and what loosens governance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from policy_helpers import default_data, write_yaml
from typer.testing import CliRunner

from layerfed.cli import app
from layerfed.governance.diff import diff_policies
from layerfed.governance.model_params import ModelParams
from layerfed.governance.schema import Policy
from layerfed.layers.param_names import read_param_names


def _policy(data: dict[str, Any]) -> Policy:
    return Policy.model_validate(data)


def test_identical_policies_have_no_changes() -> None:
    """A policy compared with itself has no changes."""
    assert diff_policies(_policy(default_data()), _policy(default_data())) == []


LOOSENINGS = [
    (["red_lines", "probes", 0, "max_violation_rate"], 0.5, "threshold raised"),
    (["red_lines", "output_guard"], False, None),
    (["superego", "enabled"], False, "superego disabled"),
    (["layers", 2, "norm_cap"], 50.0, "norm cap raised"),
    (["layers", 1, "min_clients"], 1, "fewer clients"),
    (
        ["layers", 4, "scope", "include"],
        ["transformer.h.1.mlp.c_proj.weight", "transformer.h.0.mlp.c_fc.weight"],
        "scope widened",
    ),
    (["vetoes", 2, "condition", "max_norm"], 9.0, "max_norm raised"),
    (["vetoes", 0, "applies_to"], ["government"], "no longer applies"),
    (["layers", 4, "memories", 1, "half_life"], 3000, "decays more slowly"),
    (["layers", 4, "updates_leave_instance"], True, "leave the instance"),
]


@pytest.mark.parametrize(("path", "value", "why"), LOOSENINGS)
def test_loosening_changes_are_flagged(path: list[Any], value: Any, why: str | None) -> None:
    """Each loosening edit is reported with its reason (output_guard already off: no flag)."""
    data = default_data()
    node: Any = data
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    changes = diff_policies(_policy(default_data()), _policy(data))
    if why is None:
        assert changes == []
        return
    assert any(c.loosened and why in c.why for c in changes), changes


def test_tightening_is_not_flagged() -> None:
    """Lowering a rate or adding a red line changes meaning without loosening."""
    data = default_data()
    data["layers"][0]["server_lr"] = 0.5
    data["red_lines"]["parameters"].append("transformer.h.0.attn.bias")
    changes = diff_policies(_policy(default_data()), _policy(data))
    assert len(changes) == 2 and not any(c.loosened for c in changes)


def test_removed_veto_is_one_flagged_change() -> None:
    """Removing a whole veto is reported once, as loosening."""
    data = default_data()
    data["vetoes"].pop(1)
    changes = diff_policies(_policy(default_data()), _policy(data))
    assert [(c.path, c.loosened) for c in changes] == [("vetoes.creator_scope", True)]


# --------------------------------------------------------------------- resolved parameters


@pytest.fixture(scope="module")
def tiny() -> ModelParams:
    """builtin:tiny's parameter names, shapes and ties (lm_head.weight = transformer.wte.weight)."""
    return read_param_names("builtin:tiny")


def _edited(**edits: Any) -> Policy:
    data = default_data()
    for key, value in edits.items():
        layer, field = key.split("__")
        index = next(i for i, la in enumerate(data["layers"]) if la["name"] == layer)
        data["layers"][index]["scope"][field] = value
    return _policy(data)


def test_narrowing_a_scope_is_never_a_loosening(tiny: ModelParams) -> None:
    """A scope narrowed to one block is a change of its parameters, not a loosening."""
    new = _edited(individual__include=["transformer.h.0.mlp.c_proj.weight"])
    changes = diff_policies(_policy(default_data()), new, tiny)
    assert [(c.path, c.old, c.new, c.loosened) for c in changes] == [
        ("layers.individual.scope.parameters", ["transformer.h.1.mlp.c_proj.weight"], [], False)
    ]


def test_narrowing_by_text_is_not_flagged_without_a_model() -> None:
    """Without a model, an include covered by an old include is no widening."""
    new = _edited(individual__include=["transformer.h.0.mlp.c_proj.weight"])
    changes = diff_policies(_policy(default_data()), new)
    assert changes and not any(c.loosened for c in changes)


def test_same_parameters_under_another_pattern_is_no_change(tiny: ModelParams) -> None:
    """ln_f.* -> ln_f.** and a reordered include match the same parameters: no change."""
    data = default_data()
    data["red_lines"]["parameters"][-1] = "transformer.ln_f.**"
    data["layers"][0]["scope"]["include"].reverse()
    assert diff_policies(_policy(default_data()), _policy(data), tiny) == []
    text = diff_policies(_policy(default_data()), _policy(data))
    assert text and not any(c.loosened for c in text), text


def test_dropping_a_tied_red_line_kept_through_its_tie_is_not_removed(tiny: ModelParams) -> None:
    """Dropping lm_head.weight while transformer.wte.weight stays a red line protects the same."""
    data = default_data()
    data["red_lines"]["parameters"].remove("lm_head.weight")
    assert diff_policies(_policy(default_data()), _policy(data), tiny) == []
    text = diff_policies(_policy(default_data()), _policy(data))
    assert [c.why for c in text] == ["red-line parameters removed: ['lm_head.weight']"]


def test_unprotecting_a_parameter_is_flagged_with_its_names(tiny: ModelParams) -> None:
    """Dropping both tied names unprotects both; the change lists them and loosens."""
    data = default_data()
    for name in ("lm_head.weight", "transformer.wte.weight"):
        data["red_lines"]["parameters"].remove(name)
    changes = diff_policies(_policy(default_data()), _policy(data), tiny)
    assert [(c.path, c.old, c.loosened) for c in changes] == [
        ("red_lines.parameters.protected", ["lm_head.weight", "transformer.wte.weight"], True)
    ]


def test_widening_a_scope_names_the_new_parameters(tiny: ModelParams) -> None:
    """A scope reaching a parameter it did not is a loosening naming that parameter."""
    new = _edited(
        individual__include=["transformer.h.*.mlp.c_proj.weight", "transformer.h.0.mlp.c_fc.weight"]
    )
    (change,) = diff_policies(_policy(default_data()), new, tiny)
    assert change.loosened and change.new == ["transformer.h.0.mlp.c_fc.weight"]
    assert "1 more parameter(s)" in change.why


def test_an_exclusion_that_excluded_nothing_can_go(tiny: ModelParams) -> None:
    """Dropping an exclude that matched nothing in scope changes no parameter: no change."""
    old = _edited(creator__exclude=["transformer.h.9.**"])
    assert diff_policies(old, _policy(default_data()), tiny) == []
    assert any(c.loosened for c in diff_policies(old, _policy(default_data())))


def test_fail_on_loosen_is_exact_on_the_model(tmp_path: Path) -> None:
    """A tightening edit passes --fail-on-loosen on the model; a real widening still exits 2."""
    old = write_yaml(tmp_path, default_data(), "old.yaml")
    data = default_data()
    data["red_lines"]["parameters"].remove("lm_head.weight")
    data["red_lines"]["parameters"][-1] = "transformer.ln_f.**"
    data["layers"][4]["scope"]["include"] = ["transformer.h.1.mlp.c_proj.weight"]
    new = write_yaml(tmp_path, data, "new.yaml")
    runner = CliRunner()
    ok = runner.invoke(app, ["policy", "diff", str(old), str(new), "--fail-on-loosen"])
    assert ok.exit_code == 0, ok.output
    assert "1 change(s), 0 loosening" in ok.output
    data["layers"][4]["scope"]["include"].append("transformer.h.0.mlp.c_fc.weight")
    wider = write_yaml(tmp_path, data, "wider.yaml")
    bad = runner.invoke(app, ["policy", "diff", str(old), str(wider), "--fail-on-loosen"])
    assert bad.exit_code == 2, bad.output
