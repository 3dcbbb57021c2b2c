"""The gym's metrics: scores of a composed model and the pure summaries over runs."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from layerfed.simulation.metrics import (
    events_to_criterion,
    leakage,
    mean_ci,
    n50,
    paired_difference,
    retention,
    satisfaction,
)
from layerfed.simulation.scoring import OBJECTS, Scores, eval_suite, prepare, score
from layerfed.simulation.tiny import build_tiny_model, build_tiny_tokenizer
from layerfed.simulation.verdicts import VerdictSpec, judge
from layerfed.simulation.world import COMPLY, REFUSE, STYLES


def _scores(style_top: dict[str, float]) -> Scores:
    full = {s: style_top.get(s, 0.0) for s in STYLES}
    return Scores(violation=0.0, false_refusal=0.0, style_top=full, capability=0.0)


def test_score_of_a_biased_model_is_exact() -> None:
    """A model that always prefers sorry violates nothing and refuses every near miss."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(0)
    refuse = tokenizer.convert_tokens_to_ids(REFUSE)
    great = tokenizer.convert_tokens_to_ids("great")
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[refuse, 0] = 100.0
        model.lm_head.weight[great, 0] = 50.0
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
    result = score(model, tokenizer, eval_suite(size=8))
    assert result.violation == 0.0 and result.false_refusal == 1.0
    assert result.style_top["great"] == 1.0 and sum(result.style_top.values()) == 1.0
    assert result.margin > 0 and result.near_margin < 0
    assert result.decisions is not None and not result.decisions[0].any()


def test_score_is_deterministic_and_bounded() -> None:
    """The same model scores the same; every rate lies in [0, 1]."""
    tokenizer, model, suite = build_tiny_tokenizer(), build_tiny_model(3), eval_suite(size=8)
    a, b = score(model, tokenizer, suite), score(model, tokenizer, prepare(tokenizer, suite))
    assert a == b
    for value in (a.violation, a.false_refusal, a.capability, *a.style_top.values()):
        assert 0.0 <= value <= 1.0
    assert math.isclose(sum(a.style_top.values()), 1.0)
    assert COMPLY not in OBJECTS and REFUSE not in OBJECTS


def test_capability_reads_the_copied_object() -> None:
    """A model whose logits always favour the wanted object scores capability 1 (one prompt)."""
    tokenizer, suite = build_tiny_tokenizer(), eval_suite(size=1)
    wanted = tokenizer.convert_tokens_to_ids(suite.objects[0])
    model = build_tiny_model(0)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[wanted, 0] = 10.0
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
    assert score(model, tokenizer, suite).capability == 1.0


def test_leakage_counts_only_preference_beyond_the_base() -> None:
    """Leakage is how much more j prefers i's style than the base model does."""
    base = _scores({"lovely": 0.2, "good": 0.2})
    wanted = {"i": "lovely", "j": "good"}
    private = {"i": _scores({"lovely": 1.0}), "j": _scores({"good": 1.0})}
    assert leakage(wanted, private, base) == 0.0
    leaky = {"i": _scores({"lovely": 1.0}), "j": _scores({"lovely": 0.6, "good": 0.4})}
    assert math.isclose(leakage(wanted, leaky, base), (0.4 + 0.0) / 2)
    assert leakage(wanted, leaky, base, shared={"j": {"lovely"}}) == 0.0


@given(st.dictionaries(st.sampled_from(STYLES), st.floats(0, 1), min_size=1))
@settings(max_examples=50, deadline=None)
def test_leakage_is_zero_when_everyone_wants_the_same(tops: dict[str, float]) -> None:
    """Instances that want the same style cannot leak to each other."""
    wanted = {"a": "lovely", "b": "lovely", "c": "lovely"}
    scores = {k: _scores(tops) for k in wanted}
    assert leakage(wanted, scores, _scores({})) == 0.0
    assert satisfaction(scores["a"], "lovely") == tops.get("lovely", 0.0)


def test_n50_and_events_to_criterion() -> None:
    """N50 sums attacks until 50% violations; censored runs give infinity."""
    assert n50([0, 10, 10, 10], [0.0, 0.2, 0.5, 0.9]) == 20
    assert n50([10, 10], [0.1, 0.2]) == math.inf
    assert events_to_criterion([8, 8, 8], [0.5, 0.1, 0.0], 0.1) == 16
    assert events_to_criterion([8], [0.5], 0.1) == math.inf


def test_paired_difference_and_verdicts() -> None:
    """Paired differences over seeds; exact tests decide verdicts, small effects are 'not detectable'."""
    assert paired_difference([1.0, 2.0, 3.0], [0.0, 1.0, 2.0]) == (1.0, 0.0)
    diff, half = paired_difference([1.0, 2.5, 3.0], [0.0, 1.0, 2.0])
    assert math.isclose(diff, 7 / 6) and half > 0
    assert math.isnan(paired_difference([1.0], [0.0])[1])

    def arm(values: list[float], bounds: list[float] | None = None) -> dict[str, object]:
        return {"values": {"x": values}, "bounds": {"x": bounds or []}}

    spec = VerdictSpec(metric="x", arm="a", baseline="b", expect="lower", claim="a is lower")
    low, high = [1, 1.1, 0.9] * 2, [5, 5.2, 4.8] * 2  # six seeds: the smallest p is 2/64
    assert judge(spec, {"a": arm(low), "b": arm(high)})["status"] == "supported"
    assert judge(spec, {"a": arm(high), "b": arm(low)})["status"] == "contradicted"
    vague = judge(spec, {"a": arm([1, 3, 2] * 2), "b": arm([2, 1, 3] * 2)})
    assert vague["status"] == "not detectable" and "smallest attainable p" in vague["text"]
    censored = judge(spec, {"a": arm([8] * 6), "b": arm([math.inf] * 6, [48] * 6)})
    assert censored["status"] == "supported" and "censored 6/6" in censored["text"]


def test_retention_is_a_capped_ratio() -> None:
    """Retention is the share of the refusal rate kept, at most 1."""
    assert retention(0.8, 0.4) == 0.5
    assert retention(0.5, 0.9) == 1.0
    assert retention(0.0, 0.3) == 0.0


@given(st.lists(st.floats(0, 1), min_size=2, max_size=12))
@settings(max_examples=60, deadline=None)
def test_mean_ci_contains_the_mean_and_shrinks_with_agreement(values: list[float]) -> None:
    """The CI is centred on the mean, non-negative, and zero when all values agree."""
    mean, half = mean_ci(values)
    assert math.isclose(mean, float(np.mean(values)), abs_tol=1e-12)
    assert half >= 0.0
    assert mean_ci([values[0]] * len(values))[1] < 1e-9


def test_mean_ci_edge_cases() -> None:
    """One value has no spread; censored values make the mean infinite; NaN is ignored."""
    assert mean_ci([0.3]) == (0.3, 0.0)
    assert mean_ci([1.0, math.inf])[0] == math.inf
    assert mean_ci([1.0, math.nan, 3.0])[0] == 2.0
    assert math.isclose(mean_ci([1.0, 3.0])[1], 12.706 * math.sqrt(2) / math.sqrt(2))
