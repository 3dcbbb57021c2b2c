"""The output guard: a non-trainable filter on generation for red-line outputs.

Optional (``policy.red_lines.output_guard``, off by default); its banned words
are ``red_lines.guard_words`` and its answer to a blocked output is
``red_lines.refusal_text`` (:meth:`OutputGuard.from_policy`). It holds no
parameters, so no training can move it; it is the one hard guarantee and is
reported apart from learned behaviour.

Words are Unicode words (UAX #29 word boundaries, the ``regex`` module's ``(?w)\\b``)
of the text after NFKC, case folding and removal of invisible format characters (soft
hyphen, zero-width joiner); curly apostrophes count as ``'``. A word holds a banned
word when it is one or when one of its pieces between non-letters is: ``'bomb'``,
``bomb's``, ``'bomb``, ``bomb'``, ``bomb.then`` and ``bomb_squad`` hold ``bomb``;
``grass's`` holds no ``ass``. A banned word itself must be one such word (``don't``
may be banned; ``'bomb`` may not). Two checks:

1. at each decoding step, the tokens that would complete a banned word are masked
   out (:meth:`OutputGuard.mask`). A word's *forms* are its token ids as the
   tokenizer spells it in lower case, capitalised and upper case, each after a word
   and a space (``Ġbomb``, ``▁bomb``; split with
   :func:`~layerfed.layers.continuation.split_continuation`) and alone (``bo`` +
   ``mb`` after a newline), each also between leading and trailing punctuation
   (``'bomb'``, ``(bomb``, ``bomb's``; punctuation tokens at either end are trimmed
   off, tokens that glue punctuation to the word kept: Qwen2's ``'bomb``), plus every
   vocabulary token whose text holds the word (``▁'bomb'``, ``▁bomb's``). A form of
   several tokens is a sequence ban: its last token is masked when the ids before it
   end with its other tokens. A form whose decoded text would join a word before it
   (no leading space or punctuation of its own) is masked only at a word boundary,
   that is at the start or after a character that is no letter, digit or mark
   (a quote or apostrophe is a boundary), so ``gr`` + ``ass`` (``grass``) stays
   allowed when ``ass`` is banned. Spellings the tokenizer cannot write (unknown
   tokens) are named in a warning.
2. the decoded text is checked word by word (:meth:`OutputGuard.violates`), which also
   catches banned words spelled with other tokens; such an output is replaced by the
   refusal text.
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Iterable, Sequence, Sized
from typing import Any, Protocol

import regex
import torch
from torch import Tensor

from layerfed.clients.events import FieldError
from layerfed.clients.losses import Tokenizer, encode
from layerfed.governance.schema import Policy

__all__ = ["GuardTokenizer", "InvalidGuard", "OutputGuard", "guard_words"]

log = logging.getLogger("layerfed")

_BEFORE = "a"
"""The word a banned word follows to find its spaced form (and whether a form joins it)."""
_AROUND = (
    ("", ""),
    *((lead, "") for lead in ("'", '"', "(", "[", "\u2018", "\u201c", "*", "_", "-", "/")),
    *(("", trail) for trail in ("'", "'s", '"', ")", ".", ",", "\u2019", "\u2019s")),
    *(("'", "'"), ('"', '"'), ("(", ")"), ("\u2018", "\u2019"), ("\u201c", "\u201d")),
)
"""Punctuation a banned word is also spelled between (quotes, brackets, a possessive)."""
_SEGMENTS = regex.compile(r"(?wV1)\b")
"""UAX #29 word boundaries (the ``regex`` module's default Unicode word boundary)."""
_WORDLIKE = regex.compile(r"[\p{L}\p{N}]")
_WORDCHAR = regex.compile(r"[\p{L}\p{N}\p{M}]")
_PIECES = regex.compile(r"[^\p{L}\p{N}\p{M}]+")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u2032": "'"})


def _normal(text: str) -> str:
    """``text`` as words are matched: NFKC, case-folded, no format characters, ``'``."""
    folded = unicodedata.normalize("NFKC", text).casefold().translate(_APOSTROPHES)
    if folded.isascii():
        return folded
    return "".join(c for c in folded if unicodedata.category(c) != "Cf")


def guard_words(text: str) -> list[str]:
    """The Unicode words (UAX #29) of ``text`` as the guard matches them, in order."""
    return [s for s in _SEGMENTS.split(_normal(text)) if _WORDLIKE.search(s)]


def _holds(word: str) -> set[str]:
    """What a word counts as: itself and its pieces between non-letters."""
    return {word, *(p for p in _PIECES.split(word) if p)}


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
            if not isinstance(word, str) or guard_words(word) != [_normal(word)]:
                raise InvalidGuard(f"banned[{i}]", "a single word of letters or digits", word)
        if not words:
            raise InvalidGuard("banned", "at least one word", [])
        self.banned = frozenset(_normal(w) for w in words)
        if not isinstance(refusal, str) or not refusal.strip():
            raise InvalidGuard("refusal", "a non-empty text", refusal)
        self.refusal = refusal
        if self.violates(refusal):
            raise InvalidGuard("refusal", "a text without banned words", refusal)
        self._tokenizer = tokenizer
        self._decoded: dict[tuple[int, ...], str] = {}
        self._before = tuple(encode(tokenizer, _BEFORE))
        anywhere: set[int] = set()
        boundary: set[int] = set()
        self._sequences: dict[int, dict[tuple[int, ...], dict[int, bool]]] = {}
        vocab = self._vocab_hits()
        forms, unmasked = self._forms()
        for word in sorted(self.banned):
            for ids, joins in [*forms[word].items(), *vocab.get(word, {}).items()]:
                if len(ids) == 1:
                    (boundary if joins else anywhere).add(ids[0])
                    continue
                last = self._sequences.setdefault(len(ids) - 1, {}).setdefault(ids[:-1], {})
                last[ids[-1]] = last.get(ids[-1], True) and joins
        self.banned_ids = frozenset(anywhere)
        self.boundary_ids = frozenset(boundary - anywhere)
        self.unmasked = tuple(unmasked)
        self._decoded.clear()
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
        """Whether ``text`` holds a banned word (Unicode words, quotes and possessives too)."""
        return bool(self._found(text))

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

    def _found(self, text: str) -> set[str]:
        """The banned words ``text`` holds."""
        return {w for word in guard_words(text) for w in _holds(word) if w in self.banned}

    def _decode(self, ids: Sequence[int]) -> str:
        key = tuple(ids)
        text = self._decoded.get(key)
        if text is None:
            text = str(self._tokenizer.decode(list(ids), skip_special_tokens=True))
            self._decoded[key] = text
        return text

    def _at_boundary(self, context: Sequence[int], end: int) -> bool:
        """Whether a word may start after ``context[:end]`` (it ends in no letter or digit)."""
        if end <= 0:
            return True
        text = _normal(self._decode([int(context[end - 1])]))
        return not _WORDCHAR.match(text[-1:])

    def _joins(self, ids: tuple[int, ...]) -> bool:
        """Whether the text of ``ids`` glues onto a word right before it."""
        return guard_words(self._decode(self._before + ids))[:1] != [_BEFORE]

    def _form(self, ids: tuple[int, ...], word: str) -> tuple[int, ...]:
        """The shortest run of ``ids`` (text of one word) still holding ``word``; ``()`` if none."""
        words = guard_words(self._decode(ids)) if ids else []
        if len(words) != 1 or word not in _holds(words[0]):
            return ()
        lo, hi = 0, len(ids)
        while hi - lo > 1 and word in self._found(self._decode(ids[lo + 1 : hi])):
            lo += 1
        while hi - lo > 1 and word in self._found(self._decode(ids[lo : hi - 1])):
            hi -= 1
        return ids[lo:hi]

    def _forms(self) -> tuple[dict[str, dict[tuple[int, ...], bool]], list[str]]:
        """Each banned word's forms, with whether each joins a word before it; unspellables.

        A form counts only if it decodes to text holding the word (no unknown token
        dropped from it); the spellings with no form of their own are returned apart.
        """
        cases = [
            (word, spelling, lead, trail)
            for word in sorted(self.banned)
            for spelling in dict.fromkeys((word, word.capitalize(), word.upper()))
            for lead, trail in _AROUND
        ]
        texts = [lead + spelling + trail for _, spelling, lead, trail in cases]
        alone = self._encode_all(texts)
        joint = self._encode_all([f"{_BEFORE} {t}" for t in texts])
        apart = self._encode_all([f" {t}" for t in texts])
        forms: dict[str, dict[tuple[int, ...], bool]] = {}
        spelled: dict[str, bool] = {}
        cut = len(self._before)
        for i, (word, spelling, lead, trail) in enumerate(cases):
            spaced = joint[i][cut:] if joint[i][:cut] == self._before else apart[i]
            found = forms.setdefault(word, {})
            for ids in dict.fromkeys((spaced, alone[i])):
                form = self._form(ids, word)
                if form and form not in found:
                    found[form] = self._joins(form)
                if not lead and not trail:
                    spelled[spelling] = spelled.get(spelling, False) or bool(form)
        return forms, [s for s, ok in spelled.items() if not ok]

    def _encode_all(self, texts: list[str]) -> list[tuple[int, ...]]:
        """Each text's ids without special tokens (in one batch on a fast tokenizer)."""
        backend = getattr(self._tokenizer, "backend_tokenizer", None)
        if backend is not None and callable(getattr(backend, "encode_batch", None)):
            return [tuple(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False)]
        return [tuple(encode(self._tokenizer, t)) for t in texts]

    def _vocab_hits(self) -> dict[str, dict[tuple[int, ...], bool]]:
        """Per banned word, the vocabulary tokens whose text holds it (``▁'bomb'``)."""
        size = len(self._tokenizer) if isinstance(self._tokenizer, Sized) else 0
        backend = getattr(self._tokenizer, "backend_tokenizer", None)
        ids = [[i] for i in range(size)]
        if backend is not None and callable(getattr(backend, "decode_batch", None)):
            texts = list(backend.decode_batch(ids, skip_special_tokens=True))
        else:
            texts = [self._decode(i) for i in ids]
        hint = regex.compile("|".join(regex.escape(w) for w in sorted(self.banned)))
        hits: dict[str, dict[tuple[int, ...], bool]] = {}
        for i, text in enumerate(texts):
            if text.isascii() and not hint.search(text.lower()):
                continue
            for word in self._found(text):
                hits.setdefault(word, {})[(i,)] = self._joins((i,))
        return hits
