"""Cue randomisation: vary what should not matter so that training generalises.

A prompt is a sequence of whitespace-separated words. :class:`CueRandomiser` applies,
in order and each with its own probability, from one seeded generator:

1. replace each unprotected word by a distractor from ``pool`` (``p_context``);
2. insert distractor words into gaps between words (``p_context`` per gap);
3. insert one misdirecting cue, a word or phrase from ``misdirect`` (``p_misdirect``);
4. shuffle the unprotected words among their own positions (``p_shuffle``).

Protected words (the topic) are never replaced, moved or dropped, and no inserted
word is protected, so the protected words of the output are those of the input in
the same order. Words match case-insensitively, ignoring surrounding punctuation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np

from layerfed.clients.events import FieldError

__all__ = ["CueRandomiser", "InvalidCues", "word_key"]

log = logging.getLogger("layerfed")
_PUNCTUATION = ".,;:!?\"'()[]{}"


class InvalidCues(FieldError):  # noqa: N818 (matches InvalidFeedback)
    """A cue randomiser parameter is malformed or out of range."""


def word_key(word: str) -> str:
    """The form under which words are compared: lower case, outer punctuation stripped."""
    return word.strip(_PUNCTUATION).lower()


def _probability(field: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise InvalidCues(field, "a probability in [0, 1]", value)
    return float(value)


def _words(field: str, items: Iterable[str]) -> tuple[str, ...]:
    out = tuple(items)
    for i, item in enumerate(out):
        if not isinstance(item, str) or not item.split():
            raise InvalidCues(f"{field}[{i}]", "a non-blank string", item)
    return out


class CueRandomiser:
    """Seeded transforms that vary irrelevant context and insert misdirecting cues."""

    def __init__(
        self,
        pool: Sequence[str],
        p_context: float = 0.1,
        p_misdirect: float = 0.0,
        seed: int | np.random.Generator | None = None,
        *,
        misdirect: Sequence[str] = (),
        p_shuffle: float = 0.0,
        protected: Iterable[str] = (),
    ) -> None:
        self.pool = _words("pool", pool)
        self.misdirect = _words("misdirect", misdirect) or self.pool
        self.p_context = _probability("p_context", p_context)
        self.p_misdirect = _probability("p_misdirect", p_misdirect)
        self.p_shuffle = _probability("p_shuffle", p_shuffle)
        self.protected = frozenset(word_key(w) for w in _words("protected", protected))
        if not self.pool and self.p_context > 0:
            raise InvalidCues("pool", "at least one distractor when p_context > 0", [])
        self._rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    def apply(self, prompt: str, protected: Iterable[str] = ()) -> str:
        """A randomised variant of ``prompt``; ``protected`` adds to the constructor's words."""
        keep = self.protected | {word_key(w) for w in protected}
        words = prompt.split()
        fixed = [word_key(w) in keep for w in words]
        distractors = [w for w in self.pool if not _mentions(w, keep)]
        cues = [c for c in self.misdirect if not _mentions(c, keep)]
        words = self._replace(words, fixed, distractors)
        words, fixed = self._insert(words, fixed, distractors)
        words, fixed = self._misdirect(words, fixed, cues)
        words = self._shuffle(words, fixed)
        return " ".join(words)

    def _replace(self, words: list[str], fixed: list[bool], pool: list[str]) -> list[str]:
        out = list(words)
        for i, is_fixed in enumerate(fixed):
            if not is_fixed and pool and self._rng.random() < self.p_context:
                out[i] = pool[int(self._rng.integers(len(pool)))]
        return out

    def _insert(
        self, words: list[str], fixed: list[bool], pool: list[str]
    ) -> tuple[list[str], list[bool]]:
        out_words: list[str] = []
        out_fixed: list[bool] = []
        for i in range(len(words) + 1):
            if pool and self._rng.random() < self.p_context:
                out_words.append(pool[int(self._rng.integers(len(pool)))])
                out_fixed.append(False)
            if i < len(words):
                out_words.append(words[i])
                out_fixed.append(fixed[i])
        return out_words, out_fixed

    def _misdirect(
        self, words: list[str], fixed: list[bool], cues: list[str]
    ) -> tuple[list[str], list[bool]]:
        if not cues or self._rng.random() >= self.p_misdirect:
            return words, fixed
        cue = cues[int(self._rng.integers(len(cues)))].split()
        at = int(self._rng.integers(len(words) + 1))
        log.debug("misdirecting cue %s inserted at word %s", cue, at)
        return words[:at] + cue + words[at:], fixed[:at] + [False] * len(cue) + fixed[at:]

    def _shuffle(self, words: list[str], fixed: list[bool]) -> list[str]:
        if self._rng.random() >= self.p_shuffle:
            return words
        free = [i for i, is_fixed in enumerate(fixed) if not is_fixed]
        order = self._rng.permutation(len(free))
        out = list(words)
        for slot, source in zip(free, order, strict=True):
            out[slot] = words[free[int(source)]]
        return out


def _mentions(phrase: str, keys: frozenset[str]) -> bool:
    """Whether any word of ``phrase`` is protected (such phrases are never inserted)."""
    return any(word_key(w) in keys for w in phrase.split())
