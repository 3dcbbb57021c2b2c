"""Feedback text as token ids: each response as the continuation of its prompt.

A model reads (and generates) a response after its prompt, so training uses the ids
the response has there, not those of the response tokenized on its own: prompt and
response are tokenized together and split where the prompt's own tokens end
(:func:`~layerfed.layers.continuation.split_continuation`, the convention the probes
use). The response follows the prompt after one space, none when the prompt ends in
whitespace or the response starts with it (a decoded generation often does).

Token positions of a response (mark spans, a redo's ``first_wrong_token``, an
alternative's ``position`` and ``response_ids``) index these continuation tokens:
position 0 is the first token after the prompt's tokens. No continuation token holds
a prompt character; the first may hold the separating space as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from layerfed.clients.events import InvalidFeedback, Span
from layerfed.layers.continuation import split_continuation

__all__ = ["TokenSpan", "Tokenizer", "encode", "encode_pair", "token_spans"]


@dataclass(frozen=True)
class TokenSpan:
    """A half-open range ``[start, end)`` of continuation token indices, valence +1 or -1."""

    start: int
    end: int
    valence: int


class Tokenizer(Protocol):
    """The slice of a Hugging Face tokenizer the losses use (fast tokenizers for marks)."""

    def __call__(self, text: str, *, add_special_tokens: bool = ..., **kwargs: Any) -> Any:
        """Encode ``text``; the result maps ``"input_ids"`` (and offsets when asked)."""


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` on its own, without special tokens (a prompt, a word)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_pair(
    tokenizer: Tokenizer,
    prompt: str,
    response: str,
    field: str = "response",
    prompt_field: str = "prompt",
) -> tuple[list[int], list[int]]:
    """The prompt's ids and the response's as they follow them; no special tokens.

    Raises :class:`InvalidFeedback` naming ``prompt_field`` or ``field`` when either
    part encodes to no token.
    """
    split = split_continuation(tokenizer, prompt, response)
    for name, ids, text in ((prompt_field, split.context, prompt), (field, split.ids, response)):
        if not ids:
            raise InvalidFeedback(name, "text that encodes to at least one token", text)
    return list(split.context), list(split.ids)


def token_spans(
    tokenizer: Tokenizer, prompt: str, response: str, spans: Sequence[Span]
) -> list[TokenSpan]:
    """Character spans of ``response`` as spans of its continuation tokens after ``prompt``.

    A token belongs to every span its response characters overlap (a token partly
    covered, e.g. one holding the separating space and the response's first
    characters, is covered whole); a token holding no response character belongs to
    none. Needs a fast tokenizer (offsets).
    """
    split = split_continuation(tokenizer, prompt, response, offsets=True)
    owner: dict[int, int] = {}
    out: list[TokenSpan] = []
    for i, span in enumerate(spans):
        hits = [
            t for t, (a, b) in enumerate(split.offsets) if a < b and a < span.end and b > span.start
        ]
        if not hits:
            raise InvalidFeedback(f"spans[{i}]", "a span covering a token", (span.start, span.end))
        for t in hits:
            if t in owner:
                expected = f"spans that share no token (token {t} is also in spans[{owner[t]}])"
                raise InvalidFeedback(f"spans[{i}]", expected, (span.start, span.end))
            owner[t] = i
        out.append(TokenSpan(hits[0], hits[-1] + 1, span.valence))
    return out
