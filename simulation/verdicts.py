"""One-line verdicts: an exact paired test per prediction, Holm across a suite's predictions.

A verdict compares one summary metric between two arms of an experiment over the same
seeds (paired: the same simulated people and prompts in both arms). :func:`judge` gives
each prediction the exact two-sided sign-flip p-value of the mean per-seed difference
(:func:`~layerfed.simulation.stats.sign_flip_p`) and an interval that respects the
metric's bounds: Newcombe's score interval for a difference of rates, a BCa bootstrap of
the mean difference otherwise. Censored metrics (a criterion a run may never reach) are
compared as survival: each run's value restricted to the smallest bound ``tau`` of the
runs compared, Kaplan-Meier curves and restricted means per arm
(:mod:`~layerfed.simulation.stats_survival`).

A prediction is **not testable** when the arms agree in every seed (nothing to test), or
when it names a ``mechanism`` (a counter of ``gym.json``, e.g. ``vetoes``) that never acted
in the arm credited with it. :func:`adjust` then applies Holm-Bonferroni over every
prediction of a suite (the family: all predictions judged together, the not testable and
missing ones entering with p = 1): *supported* when the adjusted p is at most
:data:`~layerfed.simulation.stats.ALPHA` and the difference goes the predicted way,
*contradicted* when it goes the other way, else *not detectable*.

A **cost** prediction (``expect: no_higher`` or ``no_lower`` with a ``margin``) is a
non-inferiority claim: "the arm is higher (lower) than the baseline by less than
``margin``". Its p is the one-sided exact sign-flip p of the differences shifted by the
margin (:func:`~layerfed.simulation.stats.non_inferiority_p`; smallest ``1 / 2**n``); it
is *supported* when the Holm-adjusted p is at most alpha, else *not shown* (status *not
detectable*): a two-sided difference test could never support "no more than".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from layerfed.simulation import stats
from layerfed.simulation.stats_survival import kaplan_meier, restricted, restricted_mean
from layerfed.simulation.summaries import MECHANISMS, RATES

__all__ = ["NON_INFERIORITY", "VerdictSpec", "adjust", "judge", "mechanism_names", "render"]

NON_INFERIORITY = ("no_higher", "no_lower")
"""The ``expect`` forms of a cost prediction (one-sided, against a stated ``margin``)."""


class VerdictSpec(BaseModel):
    """What the essay predicts: ``arm`` has a ``lower`` or ``higher`` ``metric`` than
    ``baseline``, or (a cost) is ``no_higher`` / ``no_lower`` than it within ``margin``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    metric: str
    arm: str
    baseline: str
    expect: Literal["lower", "higher", "no_higher", "no_lower"]
    claim: str = Field(description="The prediction in words, e.g. 'marks need fewer events'.")
    margin: float | None = Field(
        default=None,
        gt=0,
        description="no_higher/no_lower only: the largest difference (in the metric's "
        "units) still counted as 'no more cost', stated before any run.",
    )
    mechanism: str | tuple[str, ...] | None = Field(
        default=None,
        description="A gym.json counter (e.g. 'vetoes'), or several, of which at least one "
        "must act in 'arm' for the prediction to test the mechanism credited with it.",
    )

    @field_validator("mechanism")
    @classmethod
    def _known_counter(cls, value: str | tuple[str, ...] | None) -> str | tuple[str, ...] | None:
        names = (value,) if isinstance(value, str) else value or ()
        if isinstance(value, tuple) and not value:
            raise ValueError("expected at least one gym.json counter, got an empty list")
        for name in names:
            if name not in MECHANISMS:
                raise ValueError(
                    f"expected a gym.json counter, one of {list(MECHANISMS)}, got {name!r}"
                )
        return value

    @model_validator(mode="after")
    def _margin_with_non_inferiority(self) -> VerdictSpec:
        if (self.expect in NON_INFERIORITY) != (self.margin is not None):
            raise ValueError(
                f"margin: expected a margin with expect no_higher/no_lower and none with "
                f"lower/higher, got expect {self.expect!r} and margin {self.margin!r}"
            )
        return self


def mechanism_names(mechanism: str | Sequence[str] | None) -> tuple[str, ...]:
    """The counters a verdict's ``mechanism`` names (none, one or several)."""
    if mechanism is None:
        return ()
    return (mechanism,) if isinstance(mechanism, str) else tuple(mechanism)


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3g}"


def _interval(low: float, high: float) -> str:
    return f"[{_fmt(low)}, {_fmt(high)}]"


def _arm_interval(metric: str, values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    if metric in RATES:
        return stats.wilson(min(1.0, max(0.0, sum(finite) / len(finite))), len(finite))
    return stats.bootstrap_mean(finite)


def _pairs(a: Sequence[float], b: Sequence[float]) -> tuple[list[float], list[float]]:
    kept = [(x, y) for x, y in zip(a, b, strict=False) if not (math.isnan(x) or math.isnan(y))]
    return [x for x, _ in kept], [y for _, y in kept]


def _survival(
    spec: VerdictSpec, a: Mapping[str, Any], b: Mapping[str, Any]
) -> tuple[list[float], list[float], dict[str, Any]]:
    """Restricted values of both arms and the Kaplan-Meier summary of each."""
    raw = {spec.arm: a, spec.baseline: b}
    bounds = {k: list(v.get("bounds", {}).get(spec.metric, [])) for k, v in raw.items()}
    values = {k: list(v["values"][spec.metric]) for k, v in raw.items()}
    tau = min(x for k in raw for x in bounds[k] if math.isfinite(x))
    out: dict[str, Any] = {"tau": tau, "arms": {}}
    for name in raw:
        curve = kaplan_meier(values[name], bounds[name])
        out["arms"][name] = {
            "times": list(curve.times),
            "survival": list(curve.survival),
            "runs": curve.runs,
            "censored": curve.censored,
            "restricted_mean": restricted_mean(curve, tau),
        }
    return restricted(values[spec.arm], tau), restricted(values[spec.baseline], tau), out


def _status(expect: str, difference: float, p: float) -> str:
    if math.isnan(p) or p > stats.ALPHA:
        return "not detectable"
    if expect in NON_INFERIORITY:  # the one-sided test on d -/+ margin already has the direction
        return "supported"
    predicted = difference < 0 if expect == "lower" else difference > 0
    return "supported" if predicted else "contradicted"


def judge(spec: VerdictSpec, arms: Mapping[str, Any]) -> dict[str, Any]:
    """The verdict of ``spec`` on an experiment summary's ``arms`` (a family of one).

    Each arm holds ``values`` (per seed), optionally ``bounds`` (censored metrics) and
    ``mechanisms`` (per-seed totals of ``gym.json`` counters). :func:`adjust` later makes
    the status the Holm-adjusted one over a whole suite.
    """
    a, b = arms.get(spec.arm), arms.get(spec.baseline)
    if a is None or b is None or spec.metric not in a["values"]:
        return {
            "status": "missing",
            "text": f"{spec.claim}: no runs to judge",
            "p": math.nan,
            "p_holm": math.nan,
            **spec.model_dump(),
        }
    survival: dict[str, Any] | None = None
    censored = any(math.isinf(v) for arm in (a, b) for v in arm["values"][spec.metric])
    bounded = any(
        math.isfinite(x) for arm in (a, b) for x in arm.get("bounds", {}).get(spec.metric, [])
    )
    if censored and not bounded:
        return {
            "status": "missing",
            "text": f"{spec.claim}: censored runs without a bound to restrict them to",
            "p": math.nan,
            "p_holm": math.nan,
            **spec.model_dump(),
        }
    if bounded:
        av, bv, survival = _survival(spec, a, b)
    else:
        av, bv = list(a["values"][spec.metric]), list(b["values"][spec.metric])
    av, bv = _pairs(av, bv)
    diffs = [x - y for x, y in zip(av, bv, strict=True)]
    n = len(diffs)
    difference = sum(diffs) / n if n else math.nan
    if not n:
        p = math.nan
    elif spec.expect == "no_higher" or spec.expect == "no_lower":
        p = stats.non_inferiority_p(diffs, spec.expect, float(spec.margin or math.nan))
    else:
        p = stats.sign_flip_p(diffs)
    if spec.metric in RATES and n:
        low, high = stats.newcombe(sum(av) / n, n, sum(bv) / n, n)
        method = "95% Newcombe score interval"
    else:
        low, high = stats.bootstrap_mean(diffs) if n else (math.nan, math.nan)
        method = "95% BCa bootstrap" if low != high else "no spread across seeds"
    reason = ""
    if n and all(d == 0 for d in diffs):
        reason = f"the arms are identical in every one of the {n} seeds"
    names = mechanism_names(spec.mechanism)
    counted = [(a.get("mechanisms") or {}).get(k) for k in names]
    recorded = [list(c) for c in counted if c is not None]
    acted = [sum(x) for x in zip(*recorded, strict=True)] if recorded else None
    if names and acted is not None and sum(acted) == 0 and not reason:
        what = "mechanism" if len(names) == 1 else "mechanisms"
        reason = f"the credited {what} ({', '.join(names)}) never acted in arm {spec.arm}"
    verdict: dict[str, Any] = {
        **spec.model_dump(),
        "status": "not testable" if reason else _status(spec.expect, difference, p),
        "reason": reason,
        "mechanism_recorded": None if not names else acted is not None,
        "difference": difference,
        "interval": [low, high],
        "half_width": (high - low) / 2,
        "method": method,
        "p": p,
        "p_holm": p,
        "family": 1,
        "seeds": n,
        "arms": {
            spec.arm: [sum(av) / n if n else math.nan, *_arm_interval(spec.metric, av)],
            spec.baseline: [sum(bv) / n if n else math.nan, *_arm_interval(spec.metric, bv)],
        },
        "survival": survival,
    }
    return render(verdict)


def render(verdict: dict[str, Any]) -> dict[str, Any]:
    """``verdict`` with its ``numbers`` and ``text`` written from its fields (returned)."""
    if verdict["status"] == "missing":
        return verdict
    arm, base, n = verdict["arm"], verdict["baseline"], verdict["seeds"]
    (am, al, ah), (bm, bl, bh) = verdict["arms"][arm], verdict["arms"][base]
    survival = verdict.get("survival")
    kind = f"restricted to {_fmt(survival['tau'])}, " if survival else ""
    margin = verdict.get("margin")
    non_inferior = verdict["expect"] in NON_INFERIORITY
    shift = f"d {'-' if verdict['expect'] == 'no_higher' else '+'} {_fmt(margin or math.nan)}"
    test = f"one-sided on {shift}, " if non_inferior else ""
    numbers = (
        f"{arm} {_fmt(am)} {_interval(al, ah)} vs {base} {_fmt(bm)} {_interval(bl, bh)}; "
        f"difference {_fmt(verdict['difference'])} {_interval(*verdict['interval'])} "
        f"({kind}{verdict['method']}); "
        + (f"margin {_fmt(margin or math.nan)}; " if non_inferior else "")
        + f"p = {_fmt(verdict['p'])} (exact paired sign-flip, {test}"
        f"{n} seeds), Holm-adjusted {_fmt(verdict['p_holm'])} over {verdict['family']}"
    )
    if survival:
        parts = [
            f"{name} restricted mean {_fmt(s['restricted_mean'])}, censored {s['censored']}/{s['runs']}"
            for name, s in survival["arms"].items()
        ]
        numbers += "; Kaplan-Meier: " + ", ".join(parts)
    if verdict.get("mechanism_recorded") is False:
        named = ", ".join(mechanism_names(verdict["mechanism"]))
        numbers += f"; mechanism {named} not recorded in gym.json (not checked)"
    verdict["numbers"] = f"{verdict['metric']}: {numbers}"
    claim, status = verdict["claim"], verdict["status"]
    if status == "supported":
        text = f"Supported: {claim} ({verdict['numbers']})."
    elif status == "contradicted":
        text = f"Contradicted: the opposite of '{claim}' ({verdict['numbers']})."
    elif status == "not detectable" and non_inferior:
        text = (
            f"Not shown within the margin: '{claim}' ({verdict['numbers']}); with {n} seeds "
            f"the smallest attainable one-sided p is {_fmt(stats.smallest_p(n, 'less'))}."
        )
    elif status == "not testable":
        text = f"Not testable: '{claim}': {verdict['reason']} ({verdict['numbers']})."
    else:
        text = (
            f"No difference detectable for '{claim}' ({verdict['numbers']}); with {n} seeds "
            f"the smallest attainable p is {_fmt(stats.smallest_p(n))}."
        )
    verdict["text"] = text
    return verdict


def adjust(results: Mapping[str, MutableMapping[str, Any]]) -> dict[str, Any]:
    """Holm-Bonferroni over every verdict in ``results`` (experiment summaries), in place.

    The family is every prediction judged; not testable and missing ones enter with p = 1.
    Each verdict gets ``p_holm``, ``family`` and the status and text its adjusted p gives.
    Returns the family's size, alpha and the fewest seeds that could pass its first step.
    """
    verdicts = [v for r in results.values() for v in r.get("verdicts", [])]
    raw = [
        1.0 if v["status"] in ("missing", "not testable") or math.isnan(v["p"]) else v["p"]
        for v in verdicts
    ]
    for verdict, p_holm in zip(verdicts, stats.holm(raw), strict=True):
        verdict["p_holm"], verdict["family"] = p_holm, len(verdicts)
        if verdict["status"] not in ("missing", "not testable"):
            verdict["status"] = _status(verdict["expect"], verdict["difference"], p_holm)
        render(verdict)
    m = len(verdicts)
    return {
        "predictions": m,
        "alpha": stats.ALPHA,
        "correction": "Holm-Bonferroni",
        "test": "exact paired sign-flip (two-sided; costs: one-sided on d -/+ margin)",
        "min_seeds": stats.min_seeds(m) if m else None,
    }
