"""The gym's statistics: exact sign-flip p, Holm, Wilson/Newcombe, bootstrap, Kaplan-Meier."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from layerfed.simulation.stats import (
    EXACT_MAX,
    bootstrap_mean,
    holm,
    min_seeds,
    newcombe,
    sign_flip_p,
    smallest_p,
    wilson,
)
from layerfed.simulation.stats_survival import kaplan_meier, restricted, restricted_mean

# quarters are exact in binary: ties are real ties for both implementations
DIFFS = st.lists(st.integers(-20, 20).map(lambda k: k / 4), min_size=2, max_size=10)


def test_sign_flip_p_of_a_hand_enumerated_case() -> None:
    """d = (1, 2, 3, -1): 6 of the 16 sign patterns reach |sum| >= 5, so p = 0.375."""
    # sums are u + v with u in {-2, 0, 0, 2} (the two 1s) and v in {-5, -1, 1, 5}:
    # |u + v| >= 5 for v = 5 with u in {0, 0, 2} and for v = -5 with u in {0, 0, -2}.
    assert sign_flip_p([1.0, 2.0, 3.0, -1.0]) == 0.375
    assert sign_flip_p([1.0, 2.0, 3.0, -1.0], "greater") == 3 / 16
    assert sign_flip_p([1.0, 2.0, 3.0, -1.0], "less") == 15 / 16  # all but u + v = 7
    assert sign_flip_p([1.0, 2.0, 3.0]) == 0.25  # only +6 and -6 reach 6


def test_ten_agreeing_seeds_give_the_smallest_p_which_passes_holm_at_25() -> None:
    """Ten same-sign seeds give p = 2/1024 = 0.00195 <= 0.05/25; five cannot go below 0.0625."""
    assert sign_flip_p([0.3] * 10) == smallest_p(10) == 2 / 1024
    assert smallest_p(10) <= 0.05 / 25 < smallest_p(9)
    assert sign_flip_p([0.3] * 5) == 0.0625
    assert min_seeds(25) == 10 and min_seeds(26) == 11 and min_seeds(12) == 9
    assert min_seeds(1) == 6  # 2/32 = 0.0625 > 0.05 even for a single prediction


def test_identical_arms_give_p_one_and_nan_without_pairs() -> None:
    """All-zero differences give p = 1; no pair gives NaN; NaN pairs are dropped."""
    assert sign_flip_p([0.0] * 8) == 1.0
    assert math.isnan(sign_flip_p([]))
    assert sign_flip_p([1.0, math.nan, 2.0, 3.0]) == sign_flip_p([1.0, 2.0, 3.0])


@given(DIFFS)
@settings(max_examples=40, deadline=None)
def test_exact_p_matches_scipy_permutation_test_and_is_a_probability(d: list[float]) -> None:
    """The enumeration equals scipy's exact paired permutation test and lies in (0, 1]."""
    p = sign_flip_p(d)
    assert 0.0 < p <= 1.0
    ref = sps.permutation_test(
        (np.asarray(d), np.zeros(len(d))),
        lambda x, y, axis: np.mean(x - y, axis=axis),
        permutation_type="samples",
        vectorized=True,
        n_resamples=np.inf,
    ).pvalue
    assert p == pytest.approx(min(1.0, ref), abs=1e-12)


def test_near_ties_are_not_merged() -> None:
    """(5, 1e-12): only the two patterns with +1e-12 reach |sum| >= 5 + 1e-12, so p = 0.5."""
    assert sign_flip_p([5.0, 1e-12]) == 0.5
    assert sign_flip_p([0.1, 0.2, 0.3, -0.6 + 1e-3]) == sign_flip_p([1.0, 2.0, 3.0, -5.99])


def test_many_pairs_use_a_seeded_resampled_test() -> None:
    """Beyond EXACT_MAX pairs scipy resamples with a fixed seed: repeatable and small."""
    d = [0.5 + 0.01 * i for i in range(EXACT_MAX + 4)]
    assert sign_flip_p(d) == sign_flip_p(d) < 0.001


def test_holm_on_a_known_vector() -> None:
    """Holm of (0.01, 0.04, 0.03, 0.005) is (0.03, 0.06, 0.06, 0.02)."""
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, math.nan]) == [1.0, 1.0]
    assert holm([]) == []
    with pytest.raises(ValueError, match="pvalues"):
        holm([1.5])


@given(st.lists(st.floats(0, 1), min_size=1, max_size=30))
@settings(max_examples=60, deadline=None)
def test_holm_is_monotone_and_never_below_the_raw_p(p: list[float]) -> None:
    """Adjusted p-values keep the raw order, are at least the raw p and at most 1."""
    adjusted = holm(p)
    for raw, adj in zip(p, adjusted, strict=True):
        assert raw <= adj <= 1.0
    for i in range(len(p)):
        for j in range(len(p)):
            if p[i] <= p[j]:
                assert adjusted[i] <= adjusted[j]


def test_wilson_and_newcombe_against_newcombe_1998() -> None:
    """81/263: Wilson 0.2553-0.3662; 56/70 - 48/80: method 10 gives 0.0524-0.3339."""
    low, high = wilson(81 / 263, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)
    low, high = newcombe(56 / 70, 70, 48 / 80, 80)
    assert (round(low, 4), round(high, 4)) == (0.0524, 0.3339)


def test_wilson_of_zero_in_ten_seeds_has_a_known_half_width() -> None:
    """0 of 10: [0, z^2/(n + z^2)] = [0, 0.2775]; a wrong n (e.g. 12) would give 0.2425."""
    low, high = wilson(0.0, 10)
    assert low == 0.0 and high == pytest.approx(1.959964**2 / (10 + 1.959964**2), abs=1e-6)
    assert round(high, 4) == 0.2775
    assert round(wilson(0.0, 12)[1], 4) == 0.2425
    with pytest.raises(ValueError, match="rate"):
        wilson(1.2, 10)


@given(st.floats(0, 1), st.integers(1, 50), st.floats(0, 1), st.integers(1, 50))
@settings(max_examples=80, deadline=None)
def test_score_intervals_contain_the_estimate_and_respect_bounds(
    a: float, na: int, b: float, nb: int
) -> None:
    """Wilson stays in [0, 1] around the rate; Newcombe in [-1, 1] around the difference."""
    low, high = wilson(a, na)
    assert 0.0 <= low <= a + 1e-12 and a - 1e-12 <= high <= 1.0
    low, high = newcombe(a, na, b, nb)
    assert -1.0 <= low <= a - b + 1e-12 and a - b - 1e-12 <= high <= 1.0


@given(st.lists(st.floats(0, 1), min_size=2, max_size=10))
@settings(max_examples=25, deadline=None)
def test_bootstrap_interval_contains_the_mean_within_the_range(values: list[float]) -> None:
    """The bootstrap interval lies within the values' range and contains their mean."""
    low, high = bootstrap_mean(values)
    mean = float(np.mean(values))
    assert min(values) - 1e-12 <= low <= mean + 1e-9
    assert mean - 1e-9 <= high <= max(values) + 1e-12


def test_bootstrap_is_repeatable_and_degenerate_data_give_a_point() -> None:
    """Seeded: the same values give the same interval; agreeing values give that value."""
    values = [0.1, 0.2, 0.4, 0.3, 0.9]
    assert bootstrap_mean(values) == bootstrap_mean(values)
    assert bootstrap_mean([0.4] * 5) == (0.4, 0.4)
    assert all(math.isnan(x) for x in bootstrap_mean([0.4]))


def test_kaplan_meier_and_restricted_mean_of_a_hand_example() -> None:
    """Times 2, 3+, 4, 4, 6+: S = 0.8 from 2, 0.8 * 1/3 from 4; RMST to 6 = 2 + 1.6 + 0.5333."""
    curve = kaplan_meier([2.0, math.inf, 4.0, 4.0, math.inf], [9.0, 3.0, 9.0, 9.0, 6.0])
    assert curve.runs == 5 and curve.censored == 2
    assert curve.at(1.9) == 1.0 and curve.at(2.0) == pytest.approx(0.8)
    assert curve.at(4.5) == pytest.approx(0.8 / 3)
    assert restricted_mean(curve, 6.0) == pytest.approx(2 + 1.6 + 2 * 0.8 / 3)


def test_all_censored_curve_stays_at_one_and_restricted_values_stop_at_tau() -> None:
    """No event: S = 1 and the restricted mean is tau; min(T, tau) holds censored runs at tau."""
    curve = kaplan_meier([math.inf, math.inf], [80.0, 80.0])
    assert curve.censored == 2 and curve.at(1e9) == 1.0
    assert restricted_mean(curve, 80.0) == 80.0
    assert restricted([20.0, math.inf, 90.0], 80.0) == [20.0, 80.0, 80.0]
    with pytest.raises(ValueError, match="bounds"):
        kaplan_meier([math.inf], [])


@given(st.lists(st.floats(1, 100), min_size=1, max_size=10))
@settings(max_examples=30, deadline=None)
def test_uncensored_restricted_mean_is_the_mean_of_restricted_values(times: list[float]) -> None:
    """Without censoring before tau, the KM restricted mean equals the mean of min(T, tau)."""
    tau = 60.0
    curve = kaplan_meier(times, [100.0] * len(times))
    assert restricted_mean(curve, tau) == pytest.approx(float(np.mean(restricted(times, tau))))
