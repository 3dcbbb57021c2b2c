"""Cost predictions: one-sided non-inferiority against a margin, several credited mechanisms."""

from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic import ValidationError

from layerfed.simulation.stats import non_inferiority_p, sign_flip_p, smallest_p
from layerfed.simulation.verdicts import VerdictSpec, adjust, judge

ELEVEN = 11


def _arm(values: list[float], **extra: Any) -> dict[str, Any]:
    return {"values": {"false_refusal": values, "capability": values, "x": values}, **extra}


def _cost(expect: str = "no_higher", metric: str = "false_refusal", **kw: Any) -> VerdictSpec:
    return VerdictSpec(
        metric=metric,
        arm="a",
        baseline="b",
        expect=expect,  # type: ignore[arg-type]
        margin=kw.pop("margin", 0.05),
        claim="a costs no more",
        **kw,
    )


def test_non_inferiority_p_pins_the_exact_one_sided_values() -> None:
    """Within the margin in all 10 seeds: p = 1/1024 either way; a mixed case: 131/1024."""
    assert non_inferiority_p([0.01] * 10, "no_higher", 0.05) == 1 / 1024
    assert non_inferiority_p([-0.01] * 10, "no_lower", 0.05) == 1 / 1024
    # d - 0.05 = nine -0.05 and one +0.15 (sum -0.30): 1 + (1 + 9 + 36 + 84) patterns <= -0.30
    assert non_inferiority_p([0.0] * 9 + [0.2], "no_higher", 0.05) == 131 / 1024
    assert non_inferiority_p([0.0] * 9 + [-0.2], "no_lower", 0.05) == 131 / 1024
    assert smallest_p(ELEVEN, "less") == 1 / 2048 and smallest_p(ELEVEN) == 2 / 2048


def test_a_wrong_shift_direction_fails() -> None:
    """Beyond the margin gives p = 1; shifting by +margin (or testing the wrong tail) would not."""
    assert non_inferiority_p([0.1] * 10, "no_higher", 0.05) == 1.0
    assert non_inferiority_p([-0.1] * 10, "no_lower", 0.05) == 1.0
    # what each wrong shift would give on the same data (the mutants this test kills)
    assert sign_flip_p([0.1 + 0.05] * 10, "greater") == 1 / 1024
    assert sign_flip_p([-0.1 - 0.05] * 10, "less") == 1 / 1024
    # just inside the margin is supported, just outside is not: the shift is d - margin
    assert non_inferiority_p([0.04] * 10, "no_higher", 0.05) == 1 / 1024
    assert non_inferiority_p([0.06] * 10, "no_higher", 0.05) == 1.0
    assert non_inferiority_p([-0.04] * 10, "no_lower", 0.05) == 1 / 1024
    assert non_inferiority_p([-0.06] * 10, "no_lower", 0.05) == 1.0


def test_non_inferiority_rejects_a_bad_margin_or_form() -> None:
    """A margin must be positive and the form no_higher or no_lower; else a ValueError naming it."""
    with pytest.raises(ValueError, match="margin"):
        non_inferiority_p([0.1], "no_higher", 0.0)
    with pytest.raises(ValueError, match="expect"):
        non_inferiority_p([0.1], "lower", 0.1)  # type: ignore[arg-type]


def test_a_cost_within_its_margin_is_supported_at_eleven_seeds() -> None:
    """11 seeds 0.02 above the baseline with margin 0.05: p = 1/2048, supported, margin shown."""
    base = [0.2 + 0.01 * i for i in range(ELEVEN)]
    v = judge(_cost(), {"a": _arm([x + 0.02 for x in base]), "b": _arm(base)})
    assert v["status"] == "supported" and v["p"] == 1 / 2048 and v["seeds"] == ELEVEN
    assert "margin 0.05" in v["text"] and "one-sided on d - 0.05" in v["text"]
    lower = judge(_cost("no_lower", "capability"), {"a": _arm(base), "b": _arm(base[:1] * 11)})
    assert "one-sided on d + 0.05" in lower["text"]


def test_a_cost_beyond_its_margin_is_not_shown_never_contradicted() -> None:
    """0.10 more false refusals in every seed: p = 1, 'not detectable' with a 'not shown' text."""
    base = [0.2] * 5 + [0.3] * 6
    v = judge(_cost(), {"a": _arm([x + 0.1 for x in base]), "b": _arm(base)})
    assert v["p"] == 1.0 and v["status"] == "not detectable"
    assert v["text"].startswith("Not shown within the margin")
    assert "smallest attainable one-sided p is 0.000488" in v["text"]
    better = judge(_cost(), {"a": _arm([x - 0.1 for x in base]), "b": _arm(base)})
    assert better["status"] == "supported"  # lower cost is within "no higher"


def test_cost_verdicts_pass_holm_at_47_predictions_with_eleven_seeds() -> None:
    """p = 1/2048 in a family of 47: Holm-adjusted 47/2048 <= 0.05, supported; 10 seeds: not."""
    base = [0.5 - 0.01 * i for i in range(ELEVEN)]
    good = judge(_cost(), {"a": _arm(base), "b": _arm(base[:1] * ELEVEN)})
    rest = [
        judge(_cost(), {"a": _arm([0.3] * ELEVEN), "b": _arm([0.1] * ELEVEN)}) for _ in range(46)
    ]
    family = adjust({"e": {"verdicts": [good, *rest]}})
    assert family["predictions"] == 47 and family["min_seeds"] == ELEVEN
    assert good["p_holm"] == pytest.approx(47 / 2048) and good["status"] == "supported"
    assert all(v["status"] == "not detectable" for v in rest)
    ten = judge(_cost(), {"a": _arm(base[:10]), "b": _arm(base[:1] * 10)})
    adjust({"e": {"verdicts": [ten, *rest]}})
    assert ten["p_holm"] == pytest.approx(47 / 1024) and ten["status"] == "supported"
    two_sided = judge(
        VerdictSpec(metric="x", arm="a", baseline="b", expect="lower", claim="lower"),
        {"a": _arm(base[:10]), "b": _arm([1.0] * 10)},
    )
    adjust({"e": {"verdicts": [two_sided, *rest]}})
    assert two_sided["p_holm"] == pytest.approx(47 * 2 / 1024) and two_sided["status"] == (
        "not detectable"
    )


def test_margin_goes_with_the_non_inferiority_forms_only() -> None:
    """no_higher/no_lower need a positive margin; lower/higher must not have one."""
    with pytest.raises(ValidationError, match="margin"):
        VerdictSpec(metric="x", arm="a", baseline="b", expect="no_higher", claim="c")
    with pytest.raises(ValidationError, match="margin"):
        VerdictSpec(metric="x", arm="a", baseline="b", expect="lower", claim="c", margin=0.1)
    with pytest.raises(ValidationError, match="margin"):
        _cost(margin=0.0)
    assert _cost(margin=0.1).margin == 0.1


def test_several_credited_mechanisms_none_acting_make_it_not_testable() -> None:
    """mechanism as a list: not testable when none acted, judged when any one did."""
    spec = VerdictSpec(
        metric="x",
        arm="a",
        baseline="b",
        expect="lower",
        claim="mechanisms lower x",
        mechanism=["vetoes", "norm_clipped"],  # type: ignore[arg-type]
    )
    assert spec.mechanism == ("vetoes", "norm_clipped")
    low, high = [0.01 * i for i in range(10)], [0.5 + 0.01 * i for i in range(10)]
    idle = {"vetoes": [0.0] * 10, "norm_clipped": [0.0] * 10}
    v = judge(spec, {"a": _arm(low, mechanisms=idle), "b": _arm(high)})
    assert v["status"] == "not testable"
    assert "mechanisms (vetoes, norm_clipped) never acted in arm a" in v["reason"]
    one = {"vetoes": [0.0] * 10, "norm_clipped": [0.0] * 9 + [2.0]}
    assert judge(spec, {"a": _arm(low, mechanisms=one), "b": _arm(high)})["status"] == "supported"
    v = judge(spec, {"a": _arm(low), "b": _arm(high)})
    assert "mechanism vetoes, norm_clipped not recorded" in v["text"]
    with pytest.raises(ValidationError, match=r"gym\.json counter"):
        VerdictSpec(**{**spec.model_dump(), "mechanism": ["vetoes", "median"]})
    with pytest.raises(ValidationError, match="at least one"):
        VerdictSpec(**{**spec.model_dump(), "mechanism": []})


def test_nan_seeds_are_dropped_from_a_cost_verdict() -> None:
    """A seed without the metric in one arm is left out of the pairs (10 of 11 judged)."""
    base = [0.2] * ELEVEN
    a = [math.nan] + [0.21] * 10
    v = judge(_cost(), {"a": _arm(a), "b": _arm(base)})
    assert v["seeds"] == 10 and v["p"] == 1 / 1024
