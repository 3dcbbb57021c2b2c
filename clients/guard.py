"""The output guard: a non-trainable filter on generation for red-line outputs.

Optional (``policy.red_lines.output_guard``, off by default); its banned words
are ``red_lines.guard_words`` and its answer to a blocked output is
``red_lines.refusal_text`` (:meth:`OutputGuard.from_policy`). It holds no
parameters, so no training can move it; it is the one hard guarantee and is
reported apart from learned behaviour. Two checks:

1. at each decoding step, the tokens that would complete a banned word are masked
   out (:meth:`OutputGuard.mask`). A word's *forms* are its token ids as the
   tokenizer spells it in lower case, capitalised and upper case, each after a word
   and a space (``Ġbomb``, ``▁bomb``; split with
   :func:`~layerfed.layers.continuation.split_continuation`), alone (``bo`` + ``mb``
   after a newline) and as the one vocabulary token spelling it, if any. A form of
   several tokens is a sequence ban: its last token is masked when the ids before it
   end with its other tokens. A form whose decoded text would join a word before it
   (no leading space of its own) is masked only at a word boundary, so ``gr`` +
   ``ass`` (``grass``) stays allowed when ``ass`` is banned. Spellings the tokenizer
   cannot write (unknown tokens) are named in a warning.
2. the decoded text is checked word by word (:meth:`OutputGuard.violates`), which also
   catches banned words spelled with other tokens; such an output is replaced by the
   refusal text.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from layerfed.clients.events import FieldError
from layerfed.clients.losses import Tokenizer, encode
from layerfed.governance.schema import Policy, text_words
from layerfed.layers.continuation import split_continuation

__all__ = ["GuardTokenizer", "InvalidGuard", "OutputGuard"]

log = logging.getLogger("layerfed")

_BEFORE = "a"
"""The word a banned word follows to find its spaced form (and whether a form joins it)."""


class GuardTokenizer(Tokenizer, Protocol):
    """The slice of a Hugging Face tokenizer the guard uses: encoding and decoding."""

    def decode(
        self, token_ids: list[int], skip_special_tokens: bool = ..., **kwargs: Any
    ) -> str | list[str]:
        """The text of ``token_ids`` (a string for a flat list of ids)."""


class InvalidGuard(FieldError):  # noqa: N818 (matches InvalidFeedback)
    """The output guard was configured with unusable words."""


class OutputGuard:
    """Blocks outputs that contain one of the ``banned`` words, answering ``refusal`` instead.

    ``banned_ids`` are masked after any context, ``boundary_ids`` only at a word
    boundary; ``unmasked`` lists the spellings no token form masks (the text check
    still refuses them).
    """

    def __init__(self, tokenizer: GuardTokenizer, banned: Iterable[str], refusal: str) -> None:
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
        self._tokenizer = tokenizer
        anywhere: set[int] = set()
        boundary: set[int] = set()
        self._sequences: dict[int, dict[tuple[int, ...], dict[int, bool]]] = {}
        unmasked: list[str] = []
        for word in sorted(self.banned):
            forms, missing = self._forms(word)
            unmasked += missing
            for ids, joins in forms:
                if len(ids) == 1:
                    (boundary if joins else anywhere).add(ids[0])
                    continue
                last = self._sequences.setdefault(len(ids) - 1, {}).setdefault(ids[:-1], {})
                last[ids[-1]] = last.get(ids[-1], True) and joins
        self.banned_ids = frozenset(anywhere)
        self.boundary_ids = frozenset(boundary - anywhere)
        self.unmasked = tuple(unmasked)
        if unmasked:
            log.warning(
                "output guard: the tokenizer cannot spell %s (unknown tokens): no token mask "
                "for them, only the check of the decoded text",
                ", ".join(repr(s) for s in unmasked),
            )

    @classmethod
    def from_policy(cls, policy: Policy, tokenizer: GuardTokenizer) -> OutputGuard | None:
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

    def banned_next(self, context: Sequence[int] = ()) -> frozenset[int]:
        """Token ids masked right after ``context`` (the prompt's ids, then those generated)."""
        extra: set[int] = set()
        if self.boundary_ids and self._at_boundary(context, len(context)):
            extra |= self.boundary_ids
        for k, table in self._sequences.items():
            if len(context) < k:
                continue
            for last, joins in table.get(tuple(context[len(context) - k :]), {}).items():
                if not joins or self._at_boundary(context, len(context) - k):
                    extra.add(last)
        return self.banned_ids | extra if extra else self.banned_ids

    def mask(self, logits: Tensor, context: Sequence[int] = ()) -> Tensor:
        """``logits`` (a copy) with every id banned after ``context`` set to ``-inf``."""
        out = logits.clone()
        ids = [i for i in self.banned_next(context) if i < out.shape[-1]]
        if ids:
            out[..., torch.tensor(ids, dtype=torch.long)] = float("-inf")
        return out

    def is_banned(self, token_id: int, context: Sequence[int] = ()) -> bool:
        """Whether the guard masks ``token_id`` right after ``context``."""
        return token_id in self.banned_next(context)

    def _words(self, ids: Sequence[int]) -> list[str]:
        return text_words(str(self._tokenizer.decode(list(ids), skip_special_tokens=True)))

    def _at_boundary(self, context: Sequence[int], end: int) -> bool:
        """Whether a word may start after ``context[:end]`` (its text ends in no word character)."""
        if end <= 0:
            return True
        text = str(self._tokenizer.decode([int(context[end - 1])], skip_special_tokens=True))
        return not text_words(text[-1:])

    def _forms(self, word: str) -> tuple[list[tuple[tuple[int, ...], bool]], list[str]]:
        """``word``'s forms, each with whether it joins a word before it; unspellable spellings.

        A form counts only if it decodes to ``word`` (no unknown token dropped from it).
        """
        forms: dict[tuple[int, ...], bool] = {}
        missing: list[str] = []
        before = text_words(_BEFORE)
        for spelling in dict.fromkeys((word, word.capitalize(), word.upper())):
            spaced = split_continuation(self._tokenizer, _BEFORE, spelling)
            alone = tuple(encode(self._tokenizer, spelling))
            found = False
            for ids in (spaced.ids, alone, self._vocab(spelling)):
                if ids in forms or (ids and self._words(ids) == [word]):
                    found = True
                    forms.setdefault(ids, self._words(spaced.context + ids) != [*before, word])
            if not found:
                missing.append(spelling)
        return list(forms.items()), missing

    def _vocab(self, spelling: str) -> tuple[int, ...]:
        """The one vocabulary token spelling ``spelling`` with no space marker, if any."""
        convert = getattr(self._tokenizer, "convert_tokens_to_ids", None)
        token = convert(spelling) if callable(convert) else None
        return (token,) if isinstance(token, int) else ()
