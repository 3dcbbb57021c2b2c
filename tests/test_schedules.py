"""Reinforcement schedules: statistics match their definitions; specs parse or fail typed."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerfed.clients.schedules import (
    Continuous,
    FixedRatio,
    Intermittent,
    InvalidSchedule,
    Schedule,
    VariableRatio,
    from_spec,
)


def run(schedule: Schedule, n: int) -> np.ndarray:
    """The first ``n`` answers of a schedule as a boolean array."""
    return np.array([schedule.reinforce() for _ in range(n)])


def intervals(answers: np.ndarray) -> np.ndarray:
    """Opportunities from one reinforcement to the next (the first counts from the start)."""
    hits = np.flatnonzero(answers) + 1
    return np.diff(np.concatenate([[0], hits]))


def test_continuous_reinforces_every_opportunity() -> None:
    """Continuous answers True every time."""
    assert run(Continuous(), 100).all()


@given(st.integers(1, 20), st.integers(1, 200))
def test_fixed_ratio_reinforces_exactly_every_nth(n: int, length: int) -> None:
    """FR n answers True exactly at opportunities n, 2n, 3n, ..."""
    answers = run(FixedRatio(n), length)
    expected = (np.arange(1, length + 1) % n) == 0
    assert np.array_equal(answers, expected)


@pytest.mark.parametrize("mean_n", [1, 3, 10])
def test_variable_ratio_mean_interval_is_n(mean_n: int) -> None:
    """VR n: intervals lie in 1..2n-1 and their mean is n within 4 standard errors."""
    gaps = intervals(run(VariableRatio(mean_n, seed=7), 40_000))
    assert gaps.min() >= 1 and gaps.max() <= 2 * mean_n - 1
    sd = math.sqrt(((2 * mean_n - 1) ** 2 - 1) / 12)  # discrete uniform on 1..2n-1
    assert abs(gaps.mean() - mean_n) <= 4 * sd / math.sqrt(len(gaps)) + 1e-12
    if mean_n > 1:
        assert len(set(gaps.tolist())) > 1  # the ratio does vary


@pytest.mark.parametrize("p", [0.0, 0.05, 0.3, 0.9, 1.0])
def test_intermittent_rate_is_p_within_a_binomial_bound(p: float) -> None:
    """Intermittent(p): the reinforced fraction is p within 4 binomial standard errors."""
    n = 20_000
    hits = int(run(Intermittent(p, seed=3), n).sum())
    assert abs(hits - n * p) <= 4 * math.sqrt(n * p * (1 - p)) + 1e-9


def test_intermittent_draws_are_independent() -> None:
    """Intermittent(p): P(hit | previous hit) is p too (lag-1 rate within the binomial bound)."""
    answers = run(Intermittent(0.4, seed=11), 20_000)
    after_hit = answers[1:][answers[:-1]]
    bound = 4 * math.sqrt(0.4 * 0.6 / len(after_hit))
    assert abs(after_hit.mean() - 0.4) <= bound


@given(st.integers(0, 2**32 - 1))
@settings(max_examples=20)
def test_same_seed_gives_same_answers(seed: int) -> None:
    """Random schedules are reproducible from their seed."""
    for make in (lambda s: VariableRatio(4, seed=s), lambda s: Intermittent(0.3, seed=s)):
        assert np.array_equal(run(make(seed), 200), run(make(seed), 200))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("continuous", Continuous),
        ("fixed_ratio:5", FixedRatio),
        (" Variable_Ratio : 4 ", VariableRatio),
        ("intermittent:0.25", Intermittent),
        ({"kind": "fixed_ratio", "n": 3}, FixedRatio),
        ({"kind": "intermittent", "p": 0.5}, Intermittent),
        ({"kind": "continuous"}, Continuous),
    ],
)
def test_from_spec_builds_the_named_schedule(spec: Any, expected: type) -> None:
    """from_spec parses both the string and the mapping spelling."""
    schedule = from_spec(spec, seed=0)
    assert isinstance(schedule, expected) and isinstance(schedule, Schedule)


def test_from_spec_passes_the_parameter_through() -> None:
    """The parsed parameter is the schedule's parameter."""
    fixed = from_spec("fixed_ratio:5")
    assert isinstance(fixed, FixedRatio) and fixed.n == 5
    rate = from_spec({"kind": "intermittent", "p": 0.25})
    assert isinstance(rate, Intermittent) and rate.p == 0.25


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ("sometimes", "kind"),
        ("fixed_ratio", "n"),
        ("fixed_ratio:0", "n"),
        ("fixed_ratio:2.5", "n"),
        ("variable_ratio:x", "mean_n"),
        ("intermittent:1.5", "p"),
        ("intermittent:-0.1", "p"),
        ("continuous:3", "continuous"),
        ({"kind": "fixed_ratio", "n": 2, "p": 0.1}, "p"),
        ({"kind": "intermittent", "p": True}, "p"),
        (42, "spec"),
    ],
)
def test_bad_specs_raise_typed_errors_naming_the_field(spec: Any, field: str) -> None:
    """Malformed or out-of-range specs raise InvalidSchedule naming the field."""
    with pytest.raises(InvalidSchedule) as err:
        from_spec(spec)
    assert err.value.field == field


def test_constructors_validate_their_parameter() -> None:
    """Direct construction with out-of-range parameters raises InvalidSchedule."""
    with pytest.raises(InvalidSchedule, match=r"^n: "):
        FixedRatio(0)
    with pytest.raises(InvalidSchedule, match=r"^mean_n: "):
        VariableRatio(-2)
    with pytest.raises(InvalidSchedule, match=r"^p: "):
        Intermittent(-0.1)
