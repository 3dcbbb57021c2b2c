"""Policy diff: what counts as a change of meaning, and what loosens governance."""

from __future__ import annotations

from typing import Any

import pytest
from policy_helpers import default_data

from layerfed.governance.diff import diff_policies
from layerfed.governance.schema import Policy


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
