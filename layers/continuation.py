"""A continuation tokenized as a model sees it after its prompt.

Probes score a continuation after a prompt and clients train on a response after its
prompt; both must use the token ids the model reads (or would generate) there, not
those of the continuation tokenized on its own. With a byte-level BPE (GPT-2, Llama 3,
Qwen2) ``"sure"`` alone is another token than ``"sure"`` after a word (``"Ġsure"``);
with a SentencePiece tokenizer a leading space alone can become a lone ``"▁"``.

The convention, one for the whole project: the continuation follows the prompt after
one space, none when the prompt ends in whitespace or the continuation starts with it
(a decoded generation often does); prompt and continuation are tokenized together and
split where the prompt's own tokens end, so merges at the seam are the model's own.
When the prompt's tokens are not a prefix of the joint ones (the prompt's last token
would merge with the continuation), the separator and continuation are tokenized on
their own after the prompt's tokens instead. Either way the continuation's tokens
start exactly where the prompt's tokens end, and no continuation token holds a
character of the prompt (its first may hold the separating space).

Results are kept per tokenizer object (:data:`CACHE_SIZE` most recent splits): local
training encodes the same events at every step, and a tokenizer's encoding of a text
never changes while it is in use. A tokenizer that cannot be hashed is not cached.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

__all__ = ["CACHE_SIZE", "Continuation", "separator", "split_continuation"]

CACHE_SIZE = 16384
"""How many splits :func:`split_continuation` keeps (least recently used go first)."""


@dataclass(frozen=True)
class Continuation:
    """A prompt's token ids and its continuation's, as the model sees them in one row.

    ``offsets`` (when asked for) hold, per continuation token, its ``[start, end)``
    characters in the continuation text, clipped to it: a token holding only the
    separating space gets an empty range.
    """

    context: tuple[int, ...]
    ids: tuple[int, ...]
    offsets: tuple[tuple[int, int], ...] = ()


def separator(prompt: str, continuation: str) -> str:
    """``" "`` between prompt and continuation, ``""`` when either side has whitespace there."""
    return "" if prompt[-1:].isspace() or continuation[:1].isspace() else " "


def _encode(
    tokenizer: Any, text: str, special: bool, offsets: bool
) -> tuple[list[int], list[tuple[int, int]]]:
    if not offsets:
        return list(tokenizer(text, add_special_tokens=special)["input_ids"]), []
    out = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    return list(out["input_ids"]), [(int(a), int(b)) for a, b in out["offset_mapping"]]


def split_continuation(
    tokenizer: Any,
    prompt: str,
    continuation: str,
    *,
    special: bool = False,
    offsets: bool = False,
) -> Continuation:
    """``prompt``'s ids (with special tokens if ``special``) and ``continuation``'s after them.

    Either part may be empty (a text of whitespace only): callers raise their own
    typed error naming the field. ``offsets=True`` needs a fast tokenizer.
    """
    try:
        return _cached_split(tokenizer, prompt, continuation, special, offsets)
    except TypeError:  # an unhashable tokenizer
        return _split(tokenizer, prompt, continuation, special, offsets)


@functools.lru_cache(maxsize=CACHE_SIZE)
def _cached_split(
    tokenizer: Any, prompt: str, continuation: str, special: bool, offsets: bool
) -> Continuation:
    return _split(tokenizer, prompt, continuation, special, offsets)


def _split(
    tokenizer: Any, prompt: str, continuation: str, special: bool, offsets: bool
) -> Continuation:
    sep = separator(prompt, continuation)
    context, _ = _encode(tokenizer, prompt, special, False)
    joint, spans = _encode(tokenizer, prompt + sep + continuation, special, offsets)
    if joint[: len(context)] == context and len(joint) > len(context):
        ids, spans, start = joint[len(context) :], spans[len(context) :], len(prompt) + len(sep)
    else:
        ids, spans = _encode(tokenizer, sep + continuation, False, offsets)
        start = len(sep)
    end = len(continuation)
    clipped = tuple((min(max(a - start, 0), end), min(max(b - start, 0), end)) for a, b in spans)
    return Continuation(tuple(context), tuple(ids), clipped)
