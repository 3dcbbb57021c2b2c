"""The output guard: a non-trainable filter on generation for red-line outputs.

Optional (``policy.red_lines.output_guard``, off by default); its banned words
are ``red_lines.guard_words`` and its answer to a blocked output is
``red_lines.refusal_text`` (:meth:`OutputGuard.from_policy`). It holds no
parameters, so no training can move it; it is the one hard guarantee and is
reported apart from learned behaviour. Two checks:

1. at each decoding step, token ids that spell a banned word on their own are
   masked out (:meth:`OutputGuard.mask`);
2. the decoded text is checked word by word (:meth:`OutputGuard.violates`), which also
   catches banned words spelled across several tokens; such an output is replaced
   by the refusal text.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import Tensor

from layerfed.clients.events import FieldError
from layerfed.clients.losses import Tokenizer, encode
from layerfed.governance.schema import Policy, text_words

__all__ = ["InvalidGuard", "OutputGuard"]

log = logging.getLogger("layerfed")


class InvalidGuard(FieldError):  # noqa: N818 (matches InvalidFeedback)
    """The output guard was configured with unusable words."""


class OutputGuard:
    """Blocks outputs that contain one of the ``banned`` words, answering ``refusal`` instead."""

    def __init__(self, tokenizer: Tokenizer, banned: Iterable[str], refusal: str) -> None:
        words = tuple(banned)
        for i, word in enumerate(words):
            if not isinstance(word, str) or text_words(word) != [word.lower()]:
                raise InvalidGuard(f"banned[{i}]", "a single word of letters or digits", word)
        if not words:
            raise InvalidGuard("banned", "at least one word", [])
        self.banned = frozenset(w.lower() for w in words)
        if not isinstance(refusal, str) or not refusal.strip():
            raise InvalidGuard("refusal", "a non-empty text", refusal)
        self.refusal = refusal
        if self.violates(refusal):
            raise InvalidGuard("refusal", "a text without banned words", refusal)
        self.banned_ids = frozenset(
            ids[0] for ids in (encode(tokenizer, w) for w in self.banned) if len(ids) == 1
        )

    @classmethod
    def from_policy(cls, policy: Policy, tokenizer: Tokenizer) -> OutputGuard | None:
        """The policy's guard (``red_lines.guard_words``, ``refusal_text``); ``None`` when off."""
        red = policy.red_lines
        if not red.output_guard:
            return None
        try:
            return cls(tokenizer, red.guard_words, red.refusal_text)
        except InvalidGuard as e:
            field = {"banned": "guard_words", "refusal": "refusal_text"}
            head, _, tail = e.field.partition("[")
            name = f"red_lines.{field.get(head, head)}" + (f"[{tail}" if tail else "")
            raise InvalidGuard(name, e.expected, e.got) from e

    def violates(self, text: str) -> bool:
        """Whether ``text`` contains a banned word (case-insensitive, whole words)."""
        return any(word in self.banned for word in text_words(text))

    def mask(self, logits: Tensor) -> Tensor:
        """``logits`` with every banned single-token id set to ``-inf`` (a copy)."""
        out = logits.clone()
        ids = [i for i in self.banned_ids if i < out.shape[-1]]
        if ids:
            out[..., torch.tensor(ids, dtype=torch.long)] = float("-inf")
        return out

    def is_banned(self, token_id: int) -> bool:
        """Whether a token id is masked by the guard."""
        return token_id in self.banned_ids
