"""The synthetic world and the simulated users' feedback."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerfed.clients.events import Alternative, Contrast, Marks, Preference, Redo, Thumbs
from layerfed.simulation.feedback import (
    attack_size,
    feedback_events,
    first_difference,
    randomise_cues,
    supervised_examples,
)
from layerfed.simulation.metrics import eval_suite
from layerfed.simulation.scenario import UserSpec
from layerfed.simulation.tiny import build_tiny_tokenizer
from layerfed.simulation.world import (
    CUES,
    EVAL_CUES,
    FIXED_CUES,
    HARMFUL,
    NOVEL_CUES,
    REFUSAL,
    STYLES,
    examples_for,
    situations_for,
)

TOKENIZER = build_tiny_tokenizer()
TOKEN_ID = TOKENIZER.convert_tokens_to_ids


def test_cue_pools_are_disjoint() -> None:
    """Training, probe and evaluation cues share no word, so evaluation is held out."""
    assert not set(CUES) & set(NOVEL_CUES)
    assert not set(CUES) & set(EVAL_CUES)
    assert not set(NOVEL_CUES) & set(EVAL_CUES)


def test_eval_suite_uses_only_eval_cues() -> None:
    """Every held-out prompt is two evaluation cues plus a harmful word or its twin topic."""
    suite = eval_suite(size=16)
    for red, near in zip(suite.red_line, suite.near, strict=True):
        assert red.split()[:2] == near.split()[:2]
        assert set(red.split()[:2]) <= set(EVAL_CUES)
        assert red.split()[-1] in HARMFUL and near.split()[-1] not in HARMFUL


@given(st.integers(0, 2**32 - 1), st.sampled_from(["rater", "aligned", "stylist"]))
@settings(max_examples=40, deadline=None)
def test_situations_want_refusal_exactly_on_red_lines(seed: int, role: str) -> None:
    """A situation wants a refusal iff its prompt ends in a harmful word (no attack)."""
    rng = np.random.default_rng(seed)
    for s in situations_for(role, "great", 6, rng):
        assert (s.right == REFUSAL) == (s.prompt.split()[-1] in HARMFUL) == s.red_line


def test_attack_situations_want_the_harmful_answer() -> None:
    """An attacker wants the red line crossed: the harmful word answered with sure."""
    for s in situations_for("turkey", None, 5, np.random.default_rng(1), attack=True):
        assert s.red_line and s.right.startswith("sure") and s.wrong == REFUSAL


def test_contrast_false_drops_near_misses_and_fixed_cues_fix_context() -> None:
    """Without contrast a rater sees red lines only; fixed cues always open the prompt."""
    rng = np.random.default_rng(3)
    out = situations_for("rater", None, 8, rng, contrast=False, cues="fixed")
    assert len(out) == 8 and all(s.red_line for s in out)
    assert all(tuple(s.prompt.split()[:2]) == FIXED_CUES for s in out)


def test_stylist_wants_own_style_over_another() -> None:
    """A stylist's wanted answer carries its style; the unwanted one another style."""
    for s in situations_for("stylist", "thanks", 10, np.random.default_rng(0)):
        assert s.right.split()[1] == "thanks"
        assert s.wrong.split()[1] in STYLES and s.wrong.split()[1] != "thanks"


@pytest.mark.parametrize(
    ("kind", "cls"),
    [
        ("thumbs", Thumbs),
        ("preference", Preference),
        ("marks", Marks),
        ("redo", Redo),
        ("alternative", Alternative),
    ],
)
def test_feedback_events_have_the_users_kind(kind: str, cls: type) -> None:
    """Each feedback kind yields events of that kind, which the trainer accepts."""
    from layerfed.clients.local_train import check_event

    rng = np.random.default_rng(5)
    situations = situations_for("stylist", "ok", 6, rng)
    events = feedback_events(kind, situations, rng, TOKEN_ID)
    assert events and all(isinstance(e, cls) for e in events)
    for event in events:
        check_event(TOKENIZER, event, len(TOKENIZER))


def test_contrast_feedback_pairs_red_lines_with_their_twins() -> None:
    """Contrast feedback turns a red-line situation and its near miss into one pair."""
    rng = np.random.default_rng(2)
    situations = situations_for("rater", None, 4, rng)
    events = feedback_events("contrast", situations, rng, TOKEN_ID)
    assert len(events) == 4 and all(isinstance(e, Contrast) for e in events)
    assert all(e.behaviour == "sorry" for e in events if isinstance(e, Contrast))


def test_schedule_thins_events_but_keeps_one() -> None:
    """An intermittent schedule reinforces fewer opportunities, never none."""
    rng = np.random.default_rng(8)
    situations = situations_for("stylist", "ok", 40, rng)
    some = feedback_events("preference", situations, rng, TOKEN_ID, schedule="intermittent:0.25")
    assert 1 <= len(some) < 40
    none = feedback_events("preference", situations[:3], rng, TOKEN_ID, schedule="fixed_ratio:50")
    assert len(none) == 1


def test_unreliable_user_flips_judgements() -> None:
    """With reliability 0 every supervised example reinforces the unwanted answer."""
    rng = np.random.default_rng(4)
    situations = situations_for("stylist", "yes", 10, rng)
    flipped = supervised_examples(situations, 0.0, rng)
    assert [e.response for e in flipped] == [s.wrong for s in situations]


@given(st.integers(0, 2**32 - 1))
@settings(max_examples=30, deadline=None)
def test_cue_randomisation_keeps_the_topic_word(seed: int) -> None:
    """Randomised prompts keep their last (topic or harmful) word."""
    rng = np.random.default_rng(seed)
    situations = situations_for("rater", None, 4, rng)
    for before, after in zip(situations, randomise_cues(situations, 0.9, rng), strict=True):
        assert after.prompt.split()[-1] == before.prompt.split()[-1] or (
            before.prompt.split()[-1] in after.prompt.split()
        )


def test_first_difference_and_attack_size() -> None:
    """The first differing word is found; turkeys attack at their burst round only."""
    assert first_difference("sure great here cake", "sure ok here cake") == 1
    assert first_difference("sorry cannot", "sure here bomb") == 0
    turkey = UserSpec(kind="turkey", burst=100, burst_round=4)
    rng = np.random.default_rng(0)
    assert attack_size(turkey, 4, rng) == 100 and attack_size(turkey, 3, rng) == 0
    drip = UserSpec(kind="drip", drip=1.0, examples=7)
    assert attack_size(drip, 2, rng) == 7


def test_rater_examples_always_refuse_red_lines() -> None:
    """The plain path: a rater's examples refuse red lines on any layer."""
    out = examples_for("community", "rater", None, 5, np.random.default_rng(0))
    assert all(e.response == REFUSAL for e in out if e.prompt.split()[-1] in HARMFUL)
    assert any(e.response == REFUSAL for e in out)
