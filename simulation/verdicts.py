"""One-line verdicts: does an arm differ from its baseline by more than the interval?

A verdict compares one summary metric between two arms of an experiment over the
same seeds (paired: the same simulated people and prompts in both arms). The
difference's 95% confidence interval (Student t) decides: the essay's prediction is
*supported* when the interval excludes zero in the predicted direction,
*contradicted* when it excludes zero the other way, and otherwise *not detectable*,
with the smallest difference these seeds could have detected (the half-width).
Censored values (a criterion never reached within the run) enter at their bound,
which understates the censored arm's value, and the line says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from layerfed.simulation.metrics import mean_ci, paired_difference

__all__ = ["VerdictSpec", "judge"]


class VerdictSpec(BaseModel):
    """What the essay predicts: ``arm`` has a ``lower`` or ``higher`` ``metric`` than ``baseline``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    metric: str
    arm: str
    baseline: str
    expect: Literal["lower", "higher"]
    claim: str = Field(description="The prediction in words, e.g. 'marks need fewer events'.")


def _bounded(values: Sequence[float], bounds: Sequence[float]) -> tuple[list[float], int]:
    out, censored = [], 0
    for i, v in enumerate(values):
        if math.isinf(v):
            out.append(bounds[i] if i < len(bounds) else math.nan)
            censored += 1
        else:
            out.append(v)
    return out, censored


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3g}"


def judge(spec: VerdictSpec, arms: Mapping[str, Any]) -> dict[str, Any]:
    """The verdict of ``spec`` on an experiment summary's ``arms`` (values and bounds)."""
    a, b = arms.get(spec.arm), arms.get(spec.baseline)
    if a is None or b is None or spec.metric not in a["values"]:
        return {"status": "missing", "text": f"{spec.claim}: no runs to judge", **spec.model_dump()}
    av, ac = _bounded(a["values"][spec.metric], a.get("bounds", {}).get(spec.metric, []))
    bv, bc = _bounded(b["values"][spec.metric], b.get("bounds", {}).get(spec.metric, []))
    diff, half = paired_difference(av, bv)
    (am, ah), (bm, bh) = mean_ci(av), mean_ci(bv)
    n = min(len(av), len(bv))
    if math.isnan(half):
        status = "not detectable"
    elif abs(diff) > half:
        predicted = diff < 0 if spec.expect == "lower" else diff > 0
        status = "supported" if predicted else "contradicted"
    else:
        status = "not detectable"
    numbers = (
        f"{spec.arm} {_fmt(am)} ± {_fmt(ah)} vs {spec.baseline} {_fmt(bm)} ± {_fmt(bh)}; "
        f"difference {_fmt(diff)} ± {_fmt(half)} (95% CI, {n} paired seeds)"
    )
    if ac or bc:
        numbers += f"; {ac + bc} censored run(s) counted at their bound"
    if status == "supported":
        text = f"Supported: {spec.claim} ({spec.metric}: {numbers})."
    elif status == "contradicted":
        text = f"Contradicted: the opposite of '{spec.claim}' ({spec.metric}: {numbers})."
    else:
        smallest = "unknown with one seed" if math.isnan(half) else f"about {half:.2g}"
        text = (
            f"No difference detectable for '{spec.claim}' ({spec.metric}: {numbers}); "
            f"with {n} seeds the smallest detectable effect is {smallest}."
        )
    return {
        "status": status,
        "text": text,
        "numbers": f"{spec.metric}: {numbers}",
        "difference": diff,
        "half_width": half,
        "seeds": n,
        **spec.model_dump(),
    }
