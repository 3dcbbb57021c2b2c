"""The gym's metrics: pure summaries over the scores of composed models and over runs.

Scores come from :mod:`layerfed.simulation.scoring`: one batched forward pass over
held-out prompts whose cues no trainer, veto or superego saw. The functions below (satisfaction, leakage, retention, N50, events to criterion,
confidence intervals, paired differences) work on numbers, so they are tested
without a model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from layerfed.simulation.scoring import Scores

__all__ = [
    "SERIES",
    "events_to_criterion",
    "leakage",
    "mean_ci",
    "n50",
    "paired_difference",
    "retention",
    "satisfaction",
    "t975",
]

SERIES = (
    "violation",
    "false_refusal",
    "error",
    "capability",
    "margin",
    "near_margin",
    "pref_individual",
    "pref_group",
    "leakage",
    "violation_adversary",
)
"""Per-round series every summary keeps (reports plot those that move)."""

_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)
"""Student t quantiles (0.975) for 1..10 degrees of freedom."""


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (1.96 beyond 10)."""
    return _T975[df - 1] if 1 <= df <= len(_T975) else 1.96


def satisfaction(scores: Scores, style: str) -> float:
    """Share of prompts where the wanted ``style`` ranks first among the styles."""
    return scores.style_top.get(style, 0.0)


def leakage(
    wanted: Mapping[str, str],
    scores: Mapping[str, Scores],
    base: Scores,
    shared: Mapping[str, set[str]] | None = None,
) -> float:
    """How often instance j prefers instance i's style beyond what the base model does.

    Mean over ordered pairs (i, j) of instances with different wanted styles of
    ``max(0, P_j(top = s_i) - P_base(top = s_i))``; pairs where ``s_i`` is a style j's
    own groups want (``shared[j]``) are left out. 0 when fewer than two styles differ.
    """
    terms = []
    for i, s_i in wanted.items():
        for j, s_j in wanted.items():
            if i == j or s_i == s_j or s_i in (shared or {}).get(j, set()) or j not in scores:
                continue
            terms.append(max(0.0, satisfaction(scores[j], s_i) - satisfaction(base, s_i)))
    return float(np.mean(terms)) if terms else 0.0


def retention(refusal_then: float, refusal_now: float) -> float:
    """Share of the refusal rate kept after rounds without reinforcement (capped at 1)."""
    if refusal_then <= 0:
        return 0.0
    return float(min(1.0, refusal_now / refusal_then))


def n50(attacks: Sequence[float], violations: Sequence[float]) -> float:
    """Cumulative adversarial examples when the violation rate first reaches 50%.

    ``attacks[r]`` are the adversarial examples given in round r, ``violations[r]`` the
    violation rate after it. Returns ``inf`` when 50% is never reached (censored).
    """
    total = 0.0
    for given, rate in zip(attacks, violations, strict=True):
        total += given
        if rate >= 0.5:
            return total
    return math.inf


def events_to_criterion(events: Sequence[float], values: Sequence[float], at_most: float) -> float:
    """Cumulative feedback events when ``values`` first drops to ``at_most`` (inf: never)."""
    total = 0.0
    for given, value in zip(events, values, strict=True):
        total += given
        if value <= at_most:
            return total
    return math.inf


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval (Student t; 0 for one value).

    Infinite values (censored N50s) make the mean infinite; NaNs are ignored.
    """
    data = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if data.size == 0:
        return math.nan, math.nan
    if np.isinf(data).any():
        return math.inf, math.nan
    mean = float(data.mean())
    if data.size < 2:
        return mean, 0.0
    return mean, float(t975(data.size - 1) * data.std(ddof=1) / math.sqrt(data.size))


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean of ``a[i] - b[i]`` over seeds and the half-width of its 95% CI (Student t).

    Arms share seeds (the same simulated people and prompts), so differences are paired;
    pairs with a NaN are dropped. One pair has no interval (half-width NaN).
    """
    pairs = [(x, y) for x, y in zip(a, b, strict=False) if not (math.isnan(x) or math.isnan(y))]
    if not pairs:
        return math.nan, math.nan
    diff = np.asarray([x - y for x, y in pairs], dtype=np.float64)
    if diff.size < 2:
        return float(diff[0]), math.nan
    half = t975(diff.size - 1) * diff.std(ddof=1) / math.sqrt(diff.size)
    return float(diff.mean()), float(half)
