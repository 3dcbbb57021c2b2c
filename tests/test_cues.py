"""Cue randomisation: protected words are never touched; transforms happen at their rates."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerfed.clients.cues import CueRandomiser, InvalidCues, word_key

POOL = ["today", "please", "quickly", "the", "blue"]
MISDIRECT = ["as a pirate", "ignore the topic"]

words = st.text(alphabet="abcdefgh", min_size=1, max_size=6)
probability = st.floats(0, 1)


def protected_subsequence(text: str, keys: set[str]) -> list[str]:
    return [w for w in text.split() if word_key(w) in keys]


@given(
    st.lists(words, min_size=0, max_size=12),
    st.lists(words, min_size=1, max_size=3),
    probability,
    probability,
    probability,
    st.integers(0, 2**16),
)
@settings(max_examples=200, deadline=None)
def test_protected_words_are_never_touched(
    prompt_words: list[str],
    topic: list[str],
    p_context: float,
    p_misdirect: float,
    p_shuffle: float,
    seed: int,
) -> None:
    """Whatever the rates and seed, the protected words come out unchanged, in the same order."""
    prompt = " ".join(prompt_words + topic)
    pool = [*POOL, *topic]  # even a pool that contains the topic cannot add topic words
    cues = CueRandomiser(
        pool, p_context, p_misdirect, seed, misdirect=MISDIRECT, p_shuffle=p_shuffle
    )
    out = cues.apply(prompt, protected=topic)
    keys = {word_key(w) for w in topic}
    assert protected_subsequence(out, keys) == protected_subsequence(prompt, keys)


@given(st.lists(words, min_size=1, max_size=10), st.integers(0, 2**16))
def test_zero_rates_leave_the_prompt_unchanged(prompt_words: list[str], seed: int) -> None:
    """With every probability at zero, apply returns the prompt (whitespace normalised)."""
    prompt = " ".join(prompt_words)
    assert CueRandomiser(POOL, 0.0, 0.0, seed).apply(prompt) == prompt


def test_context_variation_uses_only_pool_words() -> None:
    """Replaced and inserted words all come from the pool; the topic stays."""
    cues = CueRandomiser(POOL, p_context=1.0, seed=0)
    out = cues.apply("tell me about volcanoes", protected=["volcanoes"]).split()
    assert "volcanoes" in out
    assert all(w in POOL for w in out if w != "volcanoes")
    assert len(out) == 4 + 5  # every word replaced, one insertion in each of the 5 gaps


def test_misdirecting_cue_is_inserted_at_its_rate() -> None:
    """With p_misdirect = 1 every output contains exactly one misdirecting phrase."""
    cues = CueRandomiser(POOL, 0.0, 1.0, seed=1, misdirect=["as a pirate"])
    for _ in range(20):
        out = cues.apply("explain volcanoes")
        assert out.count("as a pirate") == 1
        assert out.replace("as a pirate", "").split() == ["explain", "volcanoes"]


def test_rates_match_their_probability() -> None:
    """The fraction of prompts given a misdirecting cue is p_misdirect within 4 standard errors."""
    cues = CueRandomiser(POOL, 0.0, 0.3, seed=2, misdirect=["zzz"])
    n = 4000
    hits = sum("zzz" in cues.apply("a b c") for _ in range(n))
    assert abs(hits / n - 0.3) <= 4 * (0.3 * 0.7 / n) ** 0.5


def test_shuffle_permutes_only_unprotected_words() -> None:
    """Shuffling keeps protected words in place and the multiset of the others."""
    cues = CueRandomiser(POOL, 0.0, 0.0, seed=3, p_shuffle=1.0, protected=["lava"])
    prompt = "one two lava three four five"
    outs = {cues.apply(prompt) for _ in range(30)}
    assert len(outs) > 1
    for out in outs:
        assert out.split()[2] == "lava"
        assert sorted(out.split()) == sorted(prompt.split())


def test_same_seed_same_variants() -> None:
    """Two randomisers with the same seed produce the same sequence of variants."""
    a = CueRandomiser(POOL, 0.5, 0.5, seed=9, misdirect=MISDIRECT, p_shuffle=0.5)
    b = CueRandomiser(POOL, 0.5, 0.5, seed=9, misdirect=MISDIRECT, p_shuffle=0.5)
    prompt = "what is the capital of France"
    assert [a.apply(prompt) for _ in range(10)] == [b.apply(prompt) for _ in range(10)]


def test_protection_ignores_case_and_punctuation() -> None:
    """'France,' and 'france' are both protected by the topic word 'France'."""
    cues = CueRandomiser(POOL, 1.0, 0.0, seed=4, protected=["France"])
    out = cues.apply("Paris, France, is in france.")
    assert protected_subsequence(out, {"france"}) == ["France,", "france."]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"pool": POOL, "p_context": 1.5}, "p_context"),
        ({"pool": POOL, "p_misdirect": -0.1}, "p_misdirect"),
        ({"pool": POOL, "p_shuffle": 2}, "p_shuffle"),
        ({"pool": [], "p_context": 0.5}, "pool"),
        ({"pool": ["ok", "  "]}, "pool[1]"),
        ({"pool": POOL, "misdirect": [""]}, "misdirect[0]"),
    ],
)
def test_bad_parameters_raise_typed_errors(kwargs: dict[str, object], field: str) -> None:
    """Out-of-range probabilities and blank words raise InvalidCues naming the field."""
    with pytest.raises(InvalidCues) as err:
        CueRandomiser(**kwargs)  # type: ignore[arg-type]
    assert err.value.field == field
