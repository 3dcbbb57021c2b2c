"""Interval widths pinned against independent references: a CI with the wrong n must fail.

The verdict of a rate metric reports Newcombe's interval of the difference (method 10)
and each arm's Wilson interval, all with n = the number of paired seeds. Here the
references come from :func:`scipy.stats.binomtest`'s Wilson interval (no continuity
correction), combined by Newcombe's published formula (method 10); tests/test_stats.py pins
the textbook example of Newcombe (1998).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from layerfed.simulation.verdicts import VerdictSpec, judge

A = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]  # 3 of 10
B = [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0]  # 8 of 10


def _wilson(k: int, n: int) -> tuple[float, float]:
    ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
    return float(ci.low), float(ci.high)


def _verdict() -> dict[str, object]:
    spec = VerdictSpec(metric="violation", arm="a", baseline="b", expect="lower", claim="a")
    return judge(spec, {"a": {"values": {"violation": A}}, "b": {"values": {"violation": B}}})


def test_rate_difference_interval_is_newcombes_with_n_equal_to_the_seeds() -> None:
    """3/10 vs 8/10: Newcombe from scipy's Wilson intervals, half-width 0.3366 (n = 10)."""
    v = _verdict()
    la, ua = _wilson(3, 10)
    lb, ub = _wilson(8, 10)
    low = -0.5 - math.sqrt((0.3 - la) ** 2 + (ub - 0.8) ** 2)
    high = -0.5 + math.sqrt((ua - 0.3) ** 2 + (0.8 - lb) ** 2)
    assert v["interval"] == pytest.approx([low, high], abs=1e-9)
    assert v["half_width"] == pytest.approx((high - low) / 2, abs=1e-9)
    assert round(float(v["half_width"]), 4) == 0.3366  # type: ignore[arg-type]


def test_each_arm_interval_is_wilsons_with_n_equal_to_the_seeds() -> None:
    """Each arm's interval is scipy's Wilson interval of k of 10 seeds."""
    arms = _verdict()["arms"]
    assert isinstance(arms, dict)
    assert arms["a"] == pytest.approx([0.3, *_wilson(3, 10)], abs=1e-9)
    assert arms["b"] == pytest.approx([0.8, *_wilson(8, 10)], abs=1e-9)


def test_a_small_difference_of_rates_matches_the_reference_too() -> None:
    """7/10 vs 6/10: the verdict's interval is Newcombe's from scipy's Wilson intervals."""
    a = [1.0] * 7 + [0.0] * 3
    b = [1.0] * 6 + [0.0] * 4
    spec = VerdictSpec(metric="violation", arm="a", baseline="b", expect="higher", claim="a")
    v = judge(spec, {"a": {"values": {"violation": a}}, "b": {"values": {"violation": b}}})
    la, ua = _wilson(7, 10)
    lb, ub = _wilson(6, 10)
    expected = [
        0.1 - math.sqrt((0.7 - la) ** 2 + (ub - 0.6) ** 2),
        0.1 + math.sqrt((ua - 0.7) ** 2 + (0.6 - lb) ** 2),
    ]
    assert v["interval"] == pytest.approx(expected, abs=1e-9)


def test_mean_ci_half_width_is_students_with_n_minus_one_degrees() -> None:
    """mean_ci (the report's bands): t(0.975, n-1) * sd / sqrt(n), against scipy, n = 10 and 2."""
    from scipy.stats import t

    from layerfed.simulation.metrics import mean_ci

    values = [0.1, 0.4, 0.35, 0.8, 0.5, 0.45, 0.2, 0.9, 0.6, 0.3]
    sd = float(np.std(values, ddof=1))
    mean, half = mean_ci(values)
    assert mean == pytest.approx(float(np.mean(values)))
    assert half == pytest.approx(float(t.ppf(0.975, 9)) * sd / math.sqrt(10), rel=2e-4)
    mean, half = mean_ci([0.1, 0.5])
    expected = float(t.ppf(0.975, 1)) * float(np.std([0.1, 0.5], ddof=1)) / math.sqrt(2)
    assert half == pytest.approx(expected, rel=2e-4)


def test_paired_difference_drops_nan_pairs_and_has_an_interval_from_two_pairs() -> None:
    """paired_difference: a pair with one NaN is dropped; two pairs give t(0.975, 1) * sd / sqrt 2."""
    from scipy.stats import t

    from layerfed.simulation.metrics import paired_difference

    mean, half = paired_difference([1.0, 3.0, math.nan, 5.0], [0.0, 1.0, 2.0, math.nan])
    assert mean == pytest.approx(1.5)
    sd = float(np.std([1.0, 2.0], ddof=1))
    assert half == pytest.approx(float(t.ppf(0.975, 1)) * sd / math.sqrt(2), rel=2e-4)
    assert isinstance(half, float) and isinstance(mean, float)
