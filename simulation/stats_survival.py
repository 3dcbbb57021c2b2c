"""Censored metrics as survival: Kaplan-Meier curves and restricted means (scipy.stats.ecdf).

Some metrics are times to an event that may not come within a run: N50 (adversarial
examples until violations first reach 50%) and events to criterion. A run that never
reaches it is right-censored at its bound (everything it saw). Such a metric is
summarised per arm by the Kaplan-Meier estimate of ``S(t) = P(not reached by t)``
(:func:`scipy.stats.ecdf` on :class:`scipy.stats.CensoredData`; scipy is maintained and
already installed, so no survival library is added; scipy >= 1.15 for the ``rng`` arguments) and by the restricted mean
``integral of S from 0 to tau`` (RMST), with ``tau`` the smallest bound of all runs compared.

Paired comparisons use each run's restricted value ``min(T, tau)``: a run censored at a
bound ``b >= tau`` has ``min(T, tau) = tau`` exactly, so every restricted value is observed
and the sign-flip test on them is exact. When every run is followed to ``tau`` (the gym's
case: censoring only at the run's end), the arm's RMST equals the mean restricted value.
"""

from __future__ import annotations

import importlib
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np

__all__ = ["Survival", "kaplan_meier", "restricted", "restricted_mean"]


def _sps() -> ModuleType:
    """:mod:`scipy.stats`, imported on first use (it costs ~1.5 s; a CLI error path never needs it)."""
    return importlib.import_module("scipy.stats")


@dataclass(frozen=True)
class Survival:
    """A Kaplan-Meier curve: ``survival[i]`` holds from ``times[i]`` until the next time."""

    times: tuple[float, ...]
    survival: tuple[float, ...]
    runs: int
    censored: int

    def at(self, t: float) -> float:
        """``S(t)``: the estimated share of runs that have not reached the event by ``t``."""
        value = 1.0
        for time, s in zip(self.times, self.survival, strict=True):
            if time > t:
                break
            value = s
        return value


def _split(values: Sequence[float], bounds: Sequence[float]) -> tuple[list[float], list[float]]:
    """Observed event times and censoring times (an infinite value is censored at its bound)."""
    events, censored = [], []
    for i, v in enumerate(values):
        if math.isnan(v):
            continue
        if math.isinf(v):
            if i >= len(bounds) or not math.isfinite(bounds[i]):
                raise ValueError(f"bounds: expected a finite bound for censored run {i}, got none")
            censored.append(float(bounds[i]))
        else:
            events.append(float(v))
    return events, censored


def kaplan_meier(values: Sequence[float], bounds: Sequence[float]) -> Survival:
    """The Kaplan-Meier estimate over runs; ``values[i]`` infinite means censored at ``bounds[i]``.

    Events tied with a censoring time count first (the usual convention).
    """
    events, censored = _split(values, bounds)
    if not events and not censored:
        return Survival((), (), 0, 0)
    if not events:  # scipy needs one event; no event: S = 1 throughout
        return Survival((), (), len(censored), len(censored))
    res = _sps().ecdf(_sps().CensoredData(uncensored=events, right=censored))
    times = tuple(float(t) for t in res.sf.quantiles)
    surv = tuple(float(s) for s in res.sf.probabilities)
    return Survival(times, surv, len(events) + len(censored), len(censored))


def restricted_mean(curve: Survival, tau: float) -> float:
    """The restricted mean ``integral of S(t) dt from 0 to tau`` (times start at 0)."""
    if curve.runs == 0 or math.isnan(tau):
        return math.nan
    edges = [0.0] + [t for t in curve.times if t < tau] + [tau]
    total, level = 0.0, 1.0
    steps = dict(zip(curve.times, curve.survival, strict=True))
    for start, end in itertools.pairwise(edges):
        level = steps.get(start, level)
        total += level * (end - start)
    return total


def restricted(values: Sequence[float], tau: float) -> list[float]:
    """Each run's ``min(T, tau)`` (censored runs, infinite, give ``tau``; NaN stays NaN)."""
    out = np.minimum(np.asarray(values, dtype=np.float64), tau)
    return [float(x) for x in out]
