"""What the page shows: a generation token by token, and one line per feedback event.

A :class:`Turn` is a :class:`~layerfed.clients.instance.Generation` made ready for
the browser: each position's text piece with its character range in the answer
(the pieces concatenate to the answer exactly, so a selection in the page maps to
the character spans :class:`~layerfed.clients.events.Marks` expects) and its top-k
candidates with probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from layerfed.clients.events import (
    Alternative,
    Contrast,
    FeedbackEvent,
    Marks,
    Preference,
    Redo,
    Thumbs,
)
from layerfed.clients.generation import Generation

__all__ = ["Candidate", "TokenView", "Turn", "render_turn", "summarize"]


@dataclass(frozen=True)
class Candidate:
    """One of a position's top-k candidates: token id, its text, its probability."""

    id: int
    text: str
    prob: float


@dataclass(frozen=True)
class TokenView:
    """One generated token: its piece of the answer ``text[start:end]`` and candidates."""

    position: int
    id: int
    text: str
    start: int
    end: int
    candidates: tuple[Candidate, ...]


@dataclass(frozen=True)
class Turn:
    """A prompt and the instance's answer as the page shows it."""

    id: int
    prompt: str
    text: str
    tokens: tuple[TokenView, ...]
    guarded: bool
    temperature: float

    def as_json(self) -> dict[str, Any]:
        """Plain data for the browser (token ids as the SDK's ``response_ids``)."""
        return {
            "id": self.id,
            "prompt": self.prompt,
            "text": self.text,
            "guarded": self.guarded,
            "temperature": self.temperature,
            "response_ids": [t.id for t in self.tokens],
            "tokens": [
                {
                    "position": t.position,
                    "id": t.id,
                    "text": t.text,
                    "start": t.start,
                    "end": t.end,
                    "candidates": [
                        {"id": c.id, "text": c.text, "prob": round(c.prob, 6)} for c in t.candidates
                    ],
                }
                for t in self.tokens
            ],
        }


def _offsets(tokenizer: PreTrainedTokenizerBase, tokens: tuple[int, ...], text: str) -> list[int]:
    """Where each token's piece starts in ``text``: the length of the decoded prefix.

    Tokenizers may drop or add spaces between pieces; an offset that does not
    fit (the prefix is not a prefix of ``text``) repeats the previous one, so the
    pieces always concatenate to ``text``.
    """
    starts: list[int] = []
    previous = 0
    for i in range(len(tokens)):
        prefix = str(tokenizer.decode(list(tokens[:i]), skip_special_tokens=True))
        if i and text.startswith(prefix) and len(prefix) >= previous:
            previous = len(prefix)
        starts.append(previous)
    return starts


def render_turn(
    generation: Generation,
    tokenizer: PreTrainedTokenizerBase,
    turn_id: int,
    temperature: float = 0.0,
) -> Turn:
    """The page's view of ``generation``: pieces with character ranges and top-k candidates."""
    text = generation.text
    starts = _offsets(tokenizer, generation.tokens, text)
    ends = [*starts[1:], len(text)]
    views: list[TokenView] = []
    for position, token in enumerate(generation.tokens):
        recorded = (
            generation.alternatives[position] if position < len(generation.alternatives) else ()
        )
        candidates = tuple(
            Candidate(int(cid), str(tokenizer.decode([int(cid)])), math.exp(logp))
            for cid, logp in recorded
        )
        start, end = starts[position], ends[position]
        views.append(TokenView(position, int(token), text[start:end], start, end, candidates))
    return Turn(turn_id, generation.prompt, text, tuple(views), generation.guarded, temperature)


def _quote(text: str, limit: int = 60) -> str:
    short = text if len(text) <= limit else text[: limit - 1] + "…"
    return f"“{short}”"


def summarize(event: FeedbackEvent, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """One line a person recognises: what kind of feedback, on what."""
    if isinstance(event, Thumbs):
        return f"thumbs {'up' if event.up else 'down'} on {_quote(event.response)}"
    if isinstance(event, Preference):
        return f"preferred {_quote(event.chosen)} over {_quote(event.rejected)}"
    if isinstance(event, Marks):
        parts = [
            f"{'good' if s.valence > 0 else 'bad'} {_quote(event.response[s.start : s.end], 30)}"
            for s in event.spans
        ]
        return f"marked {', '.join(parts)} in {_quote(event.response)}"
    if isinstance(event, Redo):
        return f"re-did {_quote(event.original)} as {_quote(event.corrected)}"
    if isinstance(event, Alternative):
        token = f"token {event.chosen_token}"
        if tokenizer is not None:
            token = _quote(str(tokenizer.decode([event.chosen_token])).strip(), 20)
        return f"at position {event.position} of {_quote(event.response)} chose {token}"
    if isinstance(event, Contrast):
        return (
            f"{_quote(event.behaviour)} for {_quote(event.positive_prompt)}, "
            f"not for {_quote(event.negative_prompt)}"
        )
    return str(event.kind)
