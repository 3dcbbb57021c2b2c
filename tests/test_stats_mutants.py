"""Tests that kill mutants mutmut found surviving in the gym's metric code (bench_mutation)."""

from __future__ import annotations

import math

import pytest

from layerfed.simulation.metrics import events_to_criterion, n50


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
