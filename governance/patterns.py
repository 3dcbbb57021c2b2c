"""Glob patterns over dotted parameter names.

``*`` matches within one dotted segment (no ``.``), ``**`` matches across
segments (anything, dots included), ``?`` matches one character other than a
dot; everything else is literal. ``transformer.h.*.mlp.c_fc.weight`` thus
names the ``c_fc`` weight of every block, and ``transformer.**`` everything
under ``transformer``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache, lru_cache

__all__ = ["glob_covers", "globs_overlap", "in_scope", "matches", "matches_any"]

_ANY = "**"
_SEG = "*"
_ONE = "?"


def _tokens(pattern: str) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith(_ANY, i):
            out.append(_ANY)
            i += 2
            while pattern.startswith(_SEG, i):
                i += 1
        elif pattern[i] in (_SEG, _ONE):
            out.append(pattern[i])
            i += 1
        else:
            out.append(pattern[i])
            i += 1
    return tuple(out)


@lru_cache(maxsize=4096)
def _regex(pattern: str) -> re.Pattern[str]:
    parts: list[str] = []
    for tok in _tokens(pattern):
        if tok == _ANY:
            parts.append(".*")
        elif tok == _SEG:
            parts.append(r"[^.]*")
        elif tok == _ONE:
            parts.append(r"[^.]")
        else:
            parts.append(re.escape(tok))
    return re.compile("".join(parts), re.DOTALL)


def matches(name: str, pattern: str) -> bool:
    """Whether parameter ``name`` matches glob ``pattern``."""
    return _regex(pattern).fullmatch(name) is not None


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """Whether ``name`` matches at least one of ``patterns``."""
    return any(matches(name, p) for p in patterns)


def in_scope(name: str, include: Iterable[str], exclude: Iterable[str] = ()) -> bool:
    """Whether ``name`` is included and not excluded."""
    return matches_any(name, include) and not matches_any(name, exclude)


def _is_wild(tok: str) -> bool:
    return tok in (_ANY, _SEG, _ONE)


def _accepts(tok: str, char: str) -> bool:
    if tok == _ANY:
        return True
    if tok in (_SEG, _ONE):
        return char != "."
    return tok == char


def _loops(tok: str) -> bool:
    return tok in (_ANY, _SEG)


@lru_cache(maxsize=4096)
def globs_overlap(a: str, b: str) -> bool:
    """Whether some parameter name matches both ``a`` and ``b`` (exact, by product automaton)."""
    ta, tb = _tokens(a), _tokens(b)
    seen: set[tuple[int, int]] = set()
    stack = [(0, 0)]
    while stack:
        i, j = stack.pop()
        if (i, j) in seen:
            continue
        seen.add((i, j))
        if i == len(ta) and j == len(tb):
            return True
        x = ta[i] if i < len(ta) else None
        y = tb[j] if j < len(tb) else None
        if x is not None and _loops(x):
            stack.append((i + 1, j))
        if y is not None and _loops(y):
            stack.append((i, j + 1))
        if x is None or y is None:
            continue
        # One character consumed by both sides: a non-dot letter suits any wildcard.
        if _is_wild(x) and _is_wild(y):
            ok = True
        elif _is_wild(x):
            ok = _accepts(x, y)
        elif _is_wild(y):
            ok = _accepts(y, x)
        else:
            ok = x == y
        if ok:
            stack.append((i if _loops(x) else i + 1, j if _loops(y) else j + 1))
    return False


def glob_covers(outer: str, inner: str) -> bool:
    """Conservative test that every name matching ``inner`` matches ``outer``.

    True when ``outer`` matches the text of ``inner`` with each wildcard of
    ``inner`` absorbed by a wildcard of ``outer`` at least as wide.
    """
    to, ti = _tokens(outer), _tokens(inner)
    width = {_ONE: 1, _SEG: 2, _ANY: 3}

    @cache
    def go(i: int, j: int) -> bool:
        if i == len(to):
            return j == len(ti)
        tok = to[i]
        if _loops(tok):
            if go(i + 1, j):
                return True
            if j < len(ti):
                t = ti[j]
                fits = width.get(t, 0) <= width[tok] and (tok == _ANY or t != ".")
                return fits and go(i, j + 1)
            return False
        if j == len(ti):
            return False
        t = ti[j]
        if tok == _ONE:
            return (t == _ONE or not _is_wild(t)) and t != "." and go(i + 1, j + 1)
        return tok == t and go(i + 1, j + 1)

    return go(0, 0)
