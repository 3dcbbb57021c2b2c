"""The synthetic world (requests, intents, cue families, answers) and the simulated users' feedback."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerfed.clients.events import Alternative, Contrast, Marks, Preference, Redo, Thumbs
from layerfed.simulation import lexicon as lx
from layerfed.simulation.corpus import pretraining_examples
from layerfed.simulation.feedback import (
    attack_size,
    feedback_events,
    first_difference,
    randomise_cues,
    supervised_examples,
)
from layerfed.simulation.scenario import UserSpec
from layerfed.simulation.scoring import eval_suite
from layerfed.simulation.tiny import build_tiny_tokenizer, tiny_vocabulary
from layerfed.simulation.world import (
    COMPLY,
    CUES,
    EVAL_CUES,
    FIXED_CUES,
    FRAMES,
    NOVEL_CUES,
    REFUSAL,
    REFUSE,
    STYLES,
    builtin_suite,
    examples_for,
    is_red_line,
    red_line_prompt,
    situations_for,
)

TOKENIZER = build_tiny_tokenizer()
TOKEN_ID = TOKENIZER.convert_tokens_to_ids
REQUEST_WORDS = {
    *lx.ACQUIRE_VERBS,
    *lx.SAFE_VERBS,
    *lx.HARM_VERBS,
    *lx.KIND_VERBS,
    *lx.GENERAL_VERBS,
}


def _request(prompt: str) -> tuple[str, str]:
    """The (verb, object) in a prompt's request frame (frames may hold verb words too)."""
    for frame in FRAMES:
        pattern = (
            re.escape(frame.text).replace(r"\{v\}", r"(\w+)").replace(r"\{o\}", r"(?:the|my) (\w+)")
        )
        found = re.search(rf"(?:^| ){pattern}(?: |$)", prompt)
        if found:
            verb, obj = found.group(1), found.group(2)
            if frame.text.index("{o}") < frame.text.index("{v}"):
                verb, obj = obj, verb
            return verb, obj
    raise AssertionError(f"no request frame in {prompt!r}")


def test_language_is_large_and_word_classes_are_disjoint() -> None:
    """About a thousand tokens; no word is both a cue and a request word; pools disjoint."""
    assert len(tiny_vocabulary()) >= 900
    classes = [
        lx.DANGEROUS,
        lx.PEOPLE,
        lx.IDIOMS,
        lx.TOPICS,
        *(f[1] for f in lx.CUE_FAMILIES.values()),
    ]
    words = [w for c in classes for w in c]
    assert len(words) == len(set(words))
    assert not set(CUES) & set(NOVEL_CUES) and not set(CUES) & set(EVAL_CUES)
    assert not set(NOVEL_CUES) & set(EVAL_CUES)
    assert all(w.isalpha() for w in lx.WORDS)


@given(st.integers(0, 2**32 - 1), st.sampled_from(["rater", "aligned", "everyday", "stylist"]))
@settings(max_examples=40, deadline=None)
def test_situations_want_refusal_exactly_on_red_line_intents(seed: int, role: str) -> None:
    """A situation wants the refusal iff its request's intent crosses the red line."""
    rng = np.random.default_rng(seed)
    for s in situations_for(role, "great", 6, rng):
        refuses = s.right.split()[first_difference(s.right, s.wrong)] == REFUSE
        assert refuses == is_red_line(*_request(s.prompt)) == s.red_line


def test_red_line_sits_anywhere_and_twins_are_one_word_away() -> None:
    """Red-line requests appear at different positions; each twin swaps the verb or the object."""
    rng = np.random.default_rng(7)
    positions = set()
    for _ in range(60):
        bad, near = red_line_prompt(rng)
        a, b = bad.split(), near.split()
        differ = [x != y for x, y in zip(a, b, strict=True)]
        assert len(a) == len(b) and 1 <= sum(differ) <= 2  # my boss -> the photo
        assert is_red_line(*_request(bad)) and not is_red_line(*_request(near))
        positions.add(a.index(_request(bad)[1]))
    assert len(positions) >= 5


def test_answers_are_multi_token_and_the_decisive_token_is_not_always_first() -> None:
    """Refusal and compliance differ at `sure`/`sorry`, after an acknowledgement half the time."""
    rng = np.random.default_rng(0)
    where = [first_difference(s.right, s.wrong) for s in situations_for("rater", None, 40, rng)]
    assert set(where) == {0, 1}
    assert any(f.ack for f in FRAMES) and any(not f.ack for f in FRAMES)
    assert len(REFUSAL.split()) > 3


def test_eval_suite_uses_only_eval_families_and_is_large() -> None:
    """100 held-out pairs (one prompt = 1%), cues from the evaluation families only."""
    suite = eval_suite()
    assert len(suite.red_line) == 100 and len(set(suite.kinds)) == 4
    cue_words = set(CUES) | set(NOVEL_CUES)
    for red, near in zip(suite.red_line, suite.near, strict=True):
        assert not set(red.split()) & cue_words
        assert set(red.split()) & set(EVAL_CUES)
        assert 1 <= sum(x != y for x, y in zip(red.split(), near.split(), strict=True)) <= 2


def test_probe_suites_use_probe_families() -> None:
    """Probe prompts carry probe-family cues only and end where the decisive token comes."""
    for prompt, want in builtin_suite("red_line_refusals"):
        assert want == REFUSE and not set(prompt.split()) & (set(CUES) | set(EVAL_CUES))
    assert {w for _, w in builtin_suite("near_misses")} == {COMPLY}


@given(st.integers(0, 2**32 - 1))
@settings(max_examples=20, deadline=None)
def test_untaught_corpus_never_holds_a_red_line(seed: int) -> None:
    """The untaught base's corpus has no red-line request; the taught one refuses them all."""
    rng = np.random.default_rng(seed)
    for ex in pretraining_examples(30, rng, red_share=0.0):
        words = ex.prompt.split()
        if not any(w in REQUEST_WORDS for w in words) or "safe" in words:
            continue
        verbs = [w for w in words if w in REQUEST_WORDS]
        objects = [w for w in words if w in {*lx.DANGEROUS, *lx.PEOPLE}]
        assert not any(is_red_line(v, o) for v in verbs for o in objects)
        assert not set(ex.response.split()) & set(STYLES)
    for ex in pretraining_examples(30, rng, red_share=1.0):
        assert REFUSAL in ex.response


def test_attack_situations_want_the_red_line_crossed() -> None:
    """An attacker wants red-line requests answered."""
    for s in situations_for("turkey", None, 5, np.random.default_rng(1), attack=True):
        assert s.red_line and COMPLY in s.right.split() and REFUSAL in s.wrong


def test_distant_contrast_keeps_counts_and_fixed_cues_fix_context() -> None:
    """Without contrast each red line comes with an everyday request instead of its twin."""
    rng = np.random.default_rng(3)
    out = situations_for("rater", None, 8, rng, contrast=False, cues="fixed")
    assert len(out) == 16 and sum(s.red_line for s in out) == 8
    for red, other in zip(out[::2], out[1::2], strict=True):
        assert other.twin is None and _request(other.prompt)[0] in lx.GENERAL_VERBS
        assert all(cue in red.prompt for cue in FIXED_CUES)


def test_stylist_wants_own_style_over_another() -> None:
    """A stylist's wanted answer carries its style right after `sure`; the other another style."""
    for s in situations_for("stylist", "thanks", 10, np.random.default_rng(0)):
        right, wrong = s.right.split(), s.wrong.split()
        at = right.index(COMPLY) + 1
        assert right[at] == "thanks" and wrong[at] in STYLES and wrong[at] != "thanks"


@pytest.mark.parametrize(
    ("kind", "cls"),
    [
        ("thumbs", Thumbs),
        ("preference", Preference),
        ("marks", Marks),
        ("redo", Redo),
        ("alternative", Alternative),
        ("contrast", Contrast),
    ],
)
def test_feedback_events_have_the_users_kind(kind: str, cls: type) -> None:
    """Each feedback kind yields events of that kind, which the trainer accepts."""
    from layerfed.clients.local_train import check_event

    rng = np.random.default_rng(5)
    situations = situations_for("rater", None, 6, rng)
    events = feedback_events(kind, situations, rng, TOKEN_ID)
    assert events and all(isinstance(e, cls) for e in events)
    for event in events:
        check_event(TOKENIZER, event, len(TOKENIZER))


def test_marks_and_alternatives_sit_on_the_decisive_token() -> None:
    """Marks cover exactly `sure`/`sorry`; alternatives choose it at its position."""
    rng = np.random.default_rng(11)
    situations = situations_for("rater", None, 10, rng)
    for event in feedback_events("marks", situations, rng, TOKEN_ID):
        assert isinstance(event, Marks)
        (span,) = event.spans
        assert event.response[span.start : span.end] in (COMPLY, REFUSE)
    for event in feedback_events("alternative", situations, rng, TOKEN_ID):
        assert isinstance(event, Alternative)
        assert event.chosen_token in (TOKEN_ID(COMPLY), TOKEN_ID(REFUSE))


def test_contrast_feedback_pairs_red_lines_with_their_twins() -> None:
    """Contrast feedback turns a red-line situation and its twin into one pair on `sorry`."""
    rng = np.random.default_rng(2)
    situations = situations_for("rater", None, 4, rng)
    events = feedback_events("contrast", situations, rng, TOKEN_ID)
    assert len(events) == 4 and all(isinstance(e, Contrast) for e in events)
    assert all(e.behaviour == REFUSE for e in events if isinstance(e, Contrast))


def test_schedule_thins_events_but_keeps_one() -> None:
    """An intermittent schedule reinforces fewer opportunities, never none."""
    rng = np.random.default_rng(8)
    situations = situations_for("stylist", "lovely", 40, rng)
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
def test_cue_randomisation_keeps_the_request(seed: int) -> None:
    """Randomised prompts keep every word of their request, in order (the intent is unchanged)."""
    rng = np.random.default_rng(seed)
    situations = situations_for("rater", None, 4, rng, cues="fixed")
    for before, after in zip(situations, randomise_cues(situations, 0.9, rng), strict=True):
        core = [w for w in before.prompt.split() if w in before.protected]
        words = iter(after.prompt.split())
        assert all(any(w == x for x in words) for w in core), (before.prompt, after.prompt)


def test_first_difference_and_attack_size() -> None:
    """The first differing word is found; turkeys attack at their burst round only."""
    assert first_difference("well sure great here", "well sure ok here") == 2
    assert first_difference(REFUSAL, "sure here is how") == 0
    turkey = UserSpec(kind="turkey", burst=100, burst_round=4)
    rng = np.random.default_rng(0)
    assert attack_size(turkey, 4, rng) == 100 and attack_size(turkey, 3, rng) == 0
    drip = UserSpec(kind="drip", drip=1.0, examples=7)
    assert attack_size(drip, 2, rng) == 7


def test_rater_examples_refuse_exactly_the_red_lines() -> None:
    """The plain path: a rater's examples refuse red-line intents and answer their twins."""
    out = examples_for("community", "rater", None, 5, np.random.default_rng(0))
    assert len(out) == 10
    for e in out:
        assert (REFUSAL in e.response) == is_red_line(*_request(e.prompt))
