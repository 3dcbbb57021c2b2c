"""Tests that kill mutants mutmut found surviving in the gym's verdict and metric code
(bench/bench_mutation.py)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from layerfed.simulation.metrics import events_to_criterion, n50
from layerfed.simulation.stats import newcombe
from layerfed.simulation.verdicts import VerdictSpec, adjust, judge


def test_n50_refuses_series_of_different_lengths() -> None:
    """n50 pairs each round's attacks with its violation rate: unequal lengths are an error."""
    assert n50([10, 20, 30], [0.1, 0.6, 0.9]) == 30
    assert math.isinf(n50([10, 20], [0.1, 0.2]))
    with pytest.raises(ValueError):
        n50([10, 20, 30], [0.1, 0.2])
    with pytest.raises(ValueError):
        n50([10, 20], [0.1, 0.2, 0.9])


def test_events_to_criterion_refuses_series_of_different_lengths() -> None:
    """events_to_criterion pairs events with errors round by round: unequal lengths are an error."""
    assert events_to_criterion([4, 4, 4], [0.5, 0.2, 0.05], 0.1) == 12
    with pytest.raises(ValueError):
        events_to_criterion([4, 4, 4], [0.5, 0.2], 0.1)
    with pytest.raises(ValueError):
        events_to_criterion([4, 4], [0.5, 0.2, 0.05], 0.1)


LOW = [0.0, 0.01, 0.0, 0.02, 0.0, 0.01, 0.0, 0.0, 0.03, 0.0]
HIGH = [0.5, 0.6, 0.7, 0.4, 0.5, 0.6, 0.9, 0.8, 0.5, 0.6]


def _judged(a: list[float], b: list[float], **kw: Any) -> dict[str, Any]:
    spec = VerdictSpec(metric="x", arm="a", baseline="b", expect="lower", claim="c", **kw)
    arm_a = {"values": {"x": a}, "mechanisms": {"vetoes": [0.0] * len(a)}}
    return judge(spec, {"a": arm_a, "b": {"values": {"x": b}}})


def test_holm_enters_a_not_testable_prediction_with_p_one() -> None:
    """A not testable verdict counts as p = 1 in Holm even when its raw p is small: a third
    prediction with p = 0.0195 is adjusted to 2 x 0.0195, not left at 0.0195."""
    supported = _judged(LOW, HIGH)
    not_testable = _judged(LOW, HIGH, mechanism="vetoes")
    diffs = [-0.5, -0.6, -0.7, -0.4, -0.5, -0.6, -0.9, 0.3, -0.5, 0.3]
    third = _judged([1.0 + d for d in diffs], [1.0] * 10)
    assert not_testable["status"] == "not testable" and not_testable["p"] == 2 / 1024
    assert third["p"] == 0.01953125
    family = adjust({"e": {"verdicts": [supported, not_testable, third]}, "none": {}})
    assert family == {
        "predictions": 3,
        "alpha": 0.05,
        "correction": "Holm-Bonferroni",
        "test": "exact paired sign-flip (two-sided; costs: one-sided on d -/+ margin)",
        "min_seeds": 7,
    }
    assert supported["p_holm"] == 3 * 2 / 1024
    assert not_testable["p_holm"] == 1.0 and not_testable["status"] == "not testable"
    assert third["p_holm"] == 2 * 0.01953125 and third["status"] == "supported"


def test_a_missing_arm_enters_holm_with_p_one_and_stays_missing() -> None:
    """A missing verdict (no runs) keeps its status after Holm and counts as p = 1."""
    spec = VerdictSpec(metric="x", arm="a", baseline="gone", expect="lower", claim="c")
    missing = judge(spec, {"a": {"values": {"x": LOW}}})
    supported = _judged(LOW, HIGH)
    adjust({"e": {"verdicts": [missing, supported]}})
    assert missing["status"] == "missing" and supported["p_holm"] == 2 * 2 / 1024


def test_newcombe_clamps_to_minus_one_and_one_and_honours_the_confidence() -> None:
    """Newcombe stays in [-1, 1] at the extremes, is NaN when either arm has no trials, and
    uses the confidence given (90%: narrower, equal to scipy's Wilson at 90%)."""
    from scipy.stats import binomtest

    assert newcombe(0.0, 1, 1.0, 1)[0] == -1.0
    assert newcombe(1.0, 1, 0.0, 1)[1] == 1.0
    assert all(math.isnan(x) for x in newcombe(0.5, 0, 0.5, 10))
    assert all(math.isnan(x) for x in newcombe(0.5, 10, 0.5, 0))
    la, ua = (float(v) for v in binomtest(3, 10).proportion_ci(0.9, method="wilson"))
    lb, ub = (float(v) for v in binomtest(8, 10).proportion_ci(0.9, method="wilson"))
    low, high = newcombe(0.3, 10, 0.8, 10, confidence=0.9)
    assert low == pytest.approx(-0.5 - math.sqrt((0.3 - la) ** 2 + (ub - 0.8) ** 2), abs=1e-9)
    assert high == pytest.approx(-0.5 + math.sqrt((ua - 0.3) ** 2 + (0.8 - lb) ** 2), abs=1e-9)


def test_survival_verdict_with_one_arm_missing_its_bounds() -> None:
    """A censored metric where one arm records no bounds still restricts both to the other's."""
    spec = VerdictSpec(metric="n50", arm="a", baseline="b", expect="higher", claim="c")
    a = {"values": {"n50": [math.inf] * 10}, "bounds": {"n50": [500.0] * 10}}
    b = {"values": {"n50": [100.0 + i for i in range(10)]}}
    v = judge(spec, {"a": a, "b": b})
    assert v["survival"]["tau"] == 500.0 and v["status"] == "supported"


def test_status_boundaries_of_direction_and_alpha() -> None:
    """_status: p = alpha passes; a difference of 0 is never 'as predicted'; 'higher' holds
    for any positive difference, also below 1."""
    from layerfed.simulation.verdicts import _status

    assert _status("higher", 0.3, 0.05) == "supported"
    assert _status("higher", 0.0, 0.01) == "contradicted"
    assert _status("lower", 0.0, 0.01) == "contradicted"
    assert _status("lower", -0.3, 0.0500001) == "not detectable"


def test_seed_bounds_at_their_edges() -> None:
    """smallest_p(0) is NaN; min_seeds stops at the first n whose smallest p equals the
    threshold; Wilson of a NaN rate is NaN, not an error."""
    from layerfed.simulation.stats import min_seeds, smallest_p, wilson

    assert math.isnan(smallest_p(0)) and smallest_p(1) == 1.0
    assert min_seeds(1, alpha=0.5) == 2
    assert all(math.isnan(x) for x in wilson(math.nan, 10))
