"""Splits are kept per tokenizer: a repeated split returns what a fresh tokenization gives.

Local training encodes the same events at every step; :func:`split_continuation` keeps
its results (least recently used first out) so each text is tokenized once, and the
ids it returns must be those the tokenizer gives, whatever was asked before.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from layerfed.layers.continuation import _split, split_continuation
from layerfed.simulation.lexicon import WORDS
from layerfed.simulation.tiny import build_tiny_tokenizer

TOKENIZER = build_tiny_tokenizer()
WORD = st.sampled_from(sorted(WORDS)[:200])
TEXT = st.lists(WORD, min_size=1, max_size=6).map(" ".join)


class Counting:
    """A hashable tokenizer that counts its calls (the tiny tokenizer underneath)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, text: str, **kwargs: Any) -> Any:
        self.calls += 1
        return TOKENIZER(text, **kwargs)


class Unhashable(Counting):
    """A tokenizer that defines equality without a hash (so it cannot be a cache key)."""

    def __eq__(self, other: object) -> bool:
        return self is other

    __hash__ = None  # type: ignore[assignment]


@settings(max_examples=60, deadline=None)
@given(prompt=TEXT, response=TEXT, offsets=st.booleans(), special=st.booleans())
def test_a_cached_split_equals_a_fresh_one(
    prompt: str, response: str, offsets: bool, special: bool
) -> None:
    """Asked twice (in any order with other texts), a split equals an uncached tokenization."""
    first = split_continuation(TOKENIZER, prompt, response, special=special, offsets=offsets)
    again = split_continuation(TOKENIZER, prompt, response, special=special, offsets=offsets)
    fresh = _split(TOKENIZER, prompt, response, special, offsets)
    assert first == again == fresh


def test_a_repeated_split_does_not_tokenize_again() -> None:
    """The second identical split costs no tokenizer call; another text or option does."""
    tok = Counting()
    split_continuation(tok, "how do i bake bread", "sure here is how")
    calls = tok.calls
    assert calls >= 2
    split_continuation(tok, "how do i bake bread", "sure here is how")
    assert tok.calls == calls
    split_continuation(tok, "how do i bake bread", "sorry")
    assert tok.calls > calls
    more = tok.calls
    split_continuation(tok, "how do i bake bread", "sorry", offsets=True)
    assert tok.calls > more


def test_another_tokenizer_object_is_asked_itself() -> None:
    """Results are kept per tokenizer object: a second tokenizer is called for the same text."""
    a, b = Counting(), Counting()
    split_continuation(a, "tell me a story", "sure here is a story")
    split_continuation(b, "tell me a story", "sure here is a story")
    assert a.calls >= 2 and b.calls >= 2


def test_an_unhashable_tokenizer_is_split_without_the_cache() -> None:
    """A tokenizer that cannot be hashed still splits, tokenizing every time."""
    tok = Unhashable()
    one = split_continuation(tok, "how do i bake bread", "sure here is how")
    calls = tok.calls
    two = split_continuation(tok, "how do i bake bread", "sure here is how")
    assert one == two
    assert tok.calls == 2 * calls
