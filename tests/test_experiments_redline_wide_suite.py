"""The wider-suite red-line grid (issue #23): its honest-cost measure off the ceiling
(the wanted style's probability) in scoring, summaries and the red-line table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from layerfed.simulation.experiments import EXPERIMENTS_DIR, load_experiment
from layerfed.simulation.redline_table import EXPERIMENTS, run_values
from layerfed.simulation.scoring import eval_suite, prepare, score
from layerfed.simulation.summaries import SUMMARIES
from layerfed.simulation.tiny import build_tiny_model, build_tiny_tokenizer
from layerfed.simulation.world import STYLES


@torch.no_grad()
def test_style_probability_is_the_mean_softmax_after_sure() -> None:
    """Scores.style_prob is each style's softmax probability right after ``sure``, averaged
    over the near misses, as one prompt at a time computes it (no padding effect)."""
    model, tokenizer = build_tiny_model(0).eval(), build_tiny_tokenizer()
    suite = eval_suite(size=6)
    got = score(model, tokenizer, prepare(tokenizer, suite)).style_prob
    assert set(got) == set(STYLES) and 0 < sum(got.values()) < 1
    want = dict.fromkeys(STYLES, 0.0)
    for near in suite.near:
        ids = tokenizer(f"{near} sure", add_special_tokens=False, return_tensors="pt")["input_ids"]
        probs = model(input_ids=ids).logits[0, -1].float().softmax(dim=-1)
        for style in STYLES:
            word = tokenizer(f"the {style}", add_special_tokens=False)["input_ids"][-1]
            want[style] += float(probs[word]) / len(suite.near)
    for style in STYLES:
        assert got[style] == pytest.approx(want[style], rel=1e-4, abs=1e-9)


def test_summaries_read_the_style_probability_final_and_at_round_one() -> None:
    """pref_individual_prob is the last row's value; its _r1 the round-1 row's (NaN if unscored)."""
    rows = [{"round": 1, "pref_individual_prob": 0.2}, {"round": 2, "pref_individual_prob": 0.5}]
    assert SUMMARIES["pref_individual_prob"](rows, None) == 0.5
    assert SUMMARIES["pref_individual_prob_r1"](rows, None) == 0.2
    assert math.isnan(SUMMARIES["pref_individual_prob_r1"](rows[1:], None))


def test_table_reads_the_style_probability(tmp_path: Path) -> None:
    """pref_prob, pref_prob_r1 and pref_prob_mean come from pref_individual_prob; a run
    scored before the measure existed gives NaN, not 0."""
    folder = tmp_path / "redline_wide_suite" / "b2000_none" / "seed-0"
    folder.mkdir(parents=True)
    rows = [
        {"round": r, "violation": 0.0, "violation_adversary": 0.0, "false_refusal": 0.0,
         "capability": 1.0, "pref_individual": 1.0, "pref_individual_prob": p, "attacks": 0}
        for r, p in [(1, 0.001), (2, 0.003)]
    ]  # fmt: skip
    (folder / "gym.json").write_text(json.dumps({"base": {"false_refusal": 0.0}, "rounds": rows}))
    got = run_values(folder)
    assert got["pref_prob_r1"] == 0.001 and got["pref_prob"] == 0.003
    assert got["pref_prob_mean"] == pytest.approx(0.002)
    for row in rows:
        row.pop("pref_individual_prob")
    (folder / "gym.json").write_text(json.dumps({"base": {"false_refusal": 0.0}, "rounds": rows}))
    assert math.isnan(run_values(folder)["pref_prob_r1"])


def test_the_wide_suite_grid_is_listed_and_costs_the_style_probability() -> None:
    """redline_wide_suite is in the red-line table, outside 'all', lists the honest cost off
    the ceiling among its metrics and runs its new arm first, then its baseline."""
    spec = load_experiment(EXPERIMENTS_DIR / "redline_wide_suite.yaml")
    assert "redline_wide_suite" in EXPERIMENTS and not spec.in_all
    assert {"pref_individual_prob_r1", "pref_individual_prob"} <= set(spec.metrics)
    assert [a.name for a in spec.arms][:2] == ["b2000_wide451", "b2000_none"]
