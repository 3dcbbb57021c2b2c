"""The gym's inferential statistics: exact paired tests, Holm, bounded intervals (numpy, scipy).

Seeds are the unit: each arm of an experiment runs on the same seeds (the same simulated
people and prompts), so the arms are compared through per-seed differences.

* :func:`sign_flip_p`: the paired permutation test. Under the null hypothesis that the
  arm does not matter, each seed's difference is as likely to have either sign, so the
  p-value is the share of the ``2**n`` sign patterns whose mean difference is at least as
  extreme as the observed one, enumerated exactly for ``n <= EXACT_MAX`` (beyond:
  :func:`scipy.stats.permutation_test` with ``permutation_type='samples'``, seeded).
  The smallest two-sided p with ``n`` non-zero differences is ``2 / 2**n``
  (:func:`smallest_p`).
* :func:`non_inferiority_p`: the one-sided sign-flip test of a cost prediction ("the arm
  is no higher / no lower than the baseline by more than a stated margin") on the
  differences shifted by the margin; its smallest p is ``1 / 2**n``.
* :func:`holm`: Holm-Bonferroni adjusted p-values over a family of predictions.
* :func:`wilson` and :func:`newcombe`: score intervals for a rate and for a difference of
  two rates (Newcombe 1998, method 10). For a per-seed value in [0, 1] with mean ``mu`` the
  variance is at most ``mu * (1 - mu)`` (the Bernoulli's), so the Wilson interval with ``n``
  seeds is a conservative interval for the mean rate that never leaves [0, 1], and is not
  empty when every seed gives 0.
* :func:`bootstrap_mean`: a BCa bootstrap interval of a mean (:func:`scipy.stats.bootstrap`,
  seeded), which stays within the values' range.
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Literal

import numpy as np

__all__ = [
    "ALPHA",
    "EXACT_MAX",
    "Alternative",
    "bootstrap_mean",
    "holm",
    "min_seeds",
    "newcombe",
    "non_inferiority_p",
    "sign_flip_p",
    "smallest_p",
    "wilson",
    "z_value",
]


def _sps() -> ModuleType:
    """:mod:`scipy.stats`, imported on first use (it costs ~1.5 s; a CLI error path never needs it)."""
    return importlib.import_module("scipy.stats")


ALPHA = 0.05
"""Family-wise error rate of a suite's verdicts (two-sided, Holm-adjusted)."""
EXACT_MAX = 16
"""Up to this many pairs the sign-flip test enumerates all ``2**n`` patterns."""
_RESAMPLES = 20_000
_SEED = 20_251_207  # fixed: the same data give the same p and interval on every machine

Alternative = Literal["two-sided", "greater", "less"]


def _finite(values: Sequence[float]) -> np.ndarray[tuple[int], np.dtype[np.float64]]:
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 1:
        raise ValueError(f"values: expected a flat sequence of numbers, got shape {data.shape}")
    out: np.ndarray[tuple[int], np.dtype[np.float64]] = data[~np.isnan(data)]
    if np.isinf(out).any():
        raise ValueError("values: expected finite numbers (censored values enter restricted)")
    return out


def sign_flip_p(differences: Sequence[float], alternative: Alternative = "two-sided") -> float:
    """The paired permutation (sign-flip) p-value of the mean of ``differences``.

    ``greater``: the share of sign patterns whose mean is at least the observed one;
    ``less``: at most; ``two-sided``: at least as far from zero. NaNs are dropped; no
    pair left gives NaN. Exact (all ``2**n`` patterns) for ``n <= EXACT_MAX``; beyond,
    :func:`scipy.stats.permutation_test` with 20,000 seeded resamples. Sums within
    ``32 * eps * sum(|d|)`` of the observed one count as ties (float rounding of the sums).
    """
    d = _finite(differences)
    n = d.size
    if n == 0:
        return math.nan
    if n > EXACT_MAX:
        res = _sps().permutation_test(
            (d, np.zeros_like(d)),
            lambda x, y, axis: np.mean(x - y, axis=axis),
            permutation_type="samples",
            vectorized=True,
            n_resamples=_RESAMPLES,
            alternative=alternative,
            rng=np.random.default_rng(_SEED),
        )
        return float(min(1.0, res.pvalue))
    bits = (np.arange(2**n, dtype=np.int64)[:, None] >> np.arange(n, dtype=np.int64)) & 1
    sums = (1 - 2 * bits).astype(np.float64) @ d
    observed = float(d.sum())
    tol = 32 * float(np.finfo(np.float64).eps) * float(np.abs(d).sum())
    if alternative == "greater":
        hits = np.count_nonzero(sums >= observed - tol)
    elif alternative == "less":
        hits = np.count_nonzero(sums <= observed + tol)
    else:
        hits = np.count_nonzero(np.abs(sums) >= abs(observed) - tol)
    return float(hits / 2**n)


def smallest_p(n: int, alternative: Alternative = "two-sided") -> float:
    """The smallest sign-flip p-value ``n`` non-zero differences can give.

    Two-sided ``2 / 2**n``; one-sided (``greater`` or ``less``, the non-inferiority
    tests of :func:`non_inferiority_p`) ``1 / 2**n``.
    """
    if n <= 0:
        return math.nan
    return float((2.0 if alternative == "two-sided" else 1.0) / 2**n)


def non_inferiority_p(
    differences: Sequence[float], expect: Literal["no_higher", "no_lower"], margin: float
) -> float:
    """The one-sided sign-flip p-value that the mean difference is within ``margin``.

    ``no_higher``: null hypothesis "the arm is higher by ``margin`` or more" (mean
    difference ``>= margin``), tested on the shifted differences ``d - margin`` with
    alternative ``less``. ``no_lower``: null "lower by ``margin`` or more" (``<= -margin``),
    tested on ``d + margin`` with alternative ``greater``. A small p supports "the arm
    costs no more than ``margin``". The smallest p is ``1 / 2**n`` (:func:`smallest_p`).
    """
    if not margin > 0:
        raise ValueError(f"margin: expected a positive number, got {margin}")
    d = _finite(differences)
    if expect == "no_higher":
        return sign_flip_p(list(d - margin), "less")
    if expect == "no_lower":
        return sign_flip_p(list(d + margin), "greater")
    raise ValueError(f"expect: expected 'no_higher' or 'no_lower', got {expect!r}")


def min_seeds(predictions: int, alpha: float = ALPHA) -> int:
    """The fewest seeds whose smallest p passes Holm's first step over ``predictions``.

    Holm compares the smallest p with ``alpha / m``; the exact two-sided sign-flip test
    reaches ``2 / 2**n`` at best, so ``n`` must satisfy ``2 / 2**n <= alpha / m``.
    """
    if predictions < 1:
        raise ValueError(f"predictions: expected at least 1, got {predictions}")
    n = 1
    while smallest_p(n) > alpha / predictions:
        n += 1
    return n


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the order given (NaN counts as 1).

    With the p-values sorted ascending, the i-th (from 0) becomes
    ``max over j <= i of min(1, (m - j) * p_j)``: monotone, never below the raw p.
    """
    p = np.asarray([1.0 if math.isnan(x) else x for x in pvalues], dtype=np.float64)
    m = p.size
    if m == 0:
        return []
    if ((p < 0) | (p > 1)).any():
        raise ValueError(f"pvalues: expected numbers in [0, 1], got {list(pvalues)}")
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted = np.empty(m, dtype=np.float64)
    adjusted[order] = np.maximum.accumulate(scaled)
    return [float(x) for x in adjusted]


def z_value(confidence: float = 0.95) -> float:
    """The two-sided standard normal quantile of ``confidence`` (1.959964 at 0.95)."""
    return float(_sps().norm.ppf(0.5 + confidence / 2))


def wilson(rate: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a rate observed over ``n`` trials (here: seeds)."""
    if n < 1 or math.isnan(rate):
        return math.nan, math.nan
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate: expected a number in [0, 1], got {rate}")
    z = z_value(confidence)
    z2n = z * z / n
    centre = (rate + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * math.sqrt(rate * (1 - rate) / n + z2n / (4 * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe(
    rate_a: float, n_a: int, rate_b: float, n_b: int, confidence: float = 0.95
) -> tuple[float, float]:
    """Newcombe's hybrid score interval (method 10) of ``rate_a - rate_b``.

    Built from the two Wilson intervals; it stays within [-1, 1]. It assumes independent
    arms; with paired seeds that correlate positively it is conservative.
    """
    la, ua = wilson(rate_a, n_a, confidence)
    lb, ub = wilson(rate_b, n_b, confidence)
    if math.isnan(la) or math.isnan(lb):
        return math.nan, math.nan
    d = rate_a - rate_b
    low = d - math.sqrt((rate_a - la) ** 2 + (ub - rate_b) ** 2)
    high = d + math.sqrt((ua - rate_a) ** 2 + (rate_b - lb) ** 2)
    return max(-1.0, low), min(1.0, high)


def bootstrap_mean(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """A BCa bootstrap interval of the mean (9,999 seeded resamples); within the values' range.

    NaNs are dropped. Fewer than two values: NaN. Values that all agree: that value twice
    (no spread to resample; the report says so). Where BCa is undefined (too few distinct
    values) the percentile interval is used.
    """
    x = _finite(values)
    if x.size < 2:
        return math.nan, math.nan
    if float(np.ptp(x)) == 0.0:
        return float(x[0]), float(x[0])
    low, high = math.nan, math.nan
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", _sps().DegenerateDataWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            res = _sps().bootstrap(
                (x,),
                np.mean,
                confidence_level=confidence,
                n_resamples=9_999,
                method=method,
                rng=np.random.default_rng(_SEED),
            )
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if not (math.isnan(low) or math.isnan(high)):
            break
    lo, hi = float(x.min()), float(x.max())
    return min(max(low, lo), hi), max(min(high, hi), lo)
