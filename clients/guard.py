"""The output guard: a non-trainable filter on generation for red-line outputs.

Optional (``policy.red_lines.output_guard``, off by default). It holds no
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
import re
from collections.abc import Iterable

import torch
from layerfed.clients.events import FieldError
from layerfed.clients.losses import Tokenizer, encode
from layerfed.simulation.world import HARMFUL
from torch import Tensor

__all__ = ["DEFAULT_REFUSAL", "InvalidGuard", "OutputGuard"]

log = logging.getLogger("layerfed")
DEFAULT_REFUSAL = "sorry cannot"
_WORD = re.compile(r"[a-z0-9']+")


class InvalidGuard(FieldError):  # noqa: N818 (matches InvalidFeedback)
    """The output guard was configured with unusable words."""


class OutputGuard:
    """Blocks outputs that contain a banned word (default: the tiny world's harmful words)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        banned: Iterable[str] = HARMFUL,
        refusal: str = DEFAULT_REFUSAL,
    ) -> None:
        words = tuple(banned)
        for i, word in enumerate(words):
            if not isinstance(word, str) or _WORD.fullmatch(word.lower()) is None:
                raise InvalidGuard(f"banned[{i}]", "a single word of letters or digits", word)
        if not words:
            raise InvalidGuard("banned", "at least one word", [])
        self.banned = frozenset(w.lower() for w in words)
        self.refusal = refusal
        if self.violates(refusal):
            raise InvalidGuard("refusal", "a text without banned words", refusal)
        self.banned_ids = frozenset(
            ids[0] for ids in (encode(tokenizer, w) for w in self.banned) if len(ids) == 1
        )

    def violates(self, text: str) -> bool:
        """Whether ``text`` contains a banned word (case-insensitive, whole words)."""
        return any(word in self.banned for word in _WORD.findall(text.lower()))

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
