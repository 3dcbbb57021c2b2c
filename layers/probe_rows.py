"""Probe rows: the distinct inputs that probe continuations need, in blocks of similar length.

A pair (prompt, continuation) is scored from the logits at the positions before each
continuation token, so its input is the prompt and the continuation without its last
token. Pairs whose inputs are prefixes of one another share a row: a prompt scored
with two one-token continuations (``sorry`` / ``sure``) is one row, both read from
the logits after the prompt. Rows are grouped by length (least padding) and cached
per tokenizer and suites.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from layerfed.layers.probes import ProbeSuiteData, _splits

__all__ = ["RowBlock", "ScoreRows", "score_rows"]


@dataclass(frozen=True)
class RowBlock:
    """Rows of similar length, padded to ``width``, and the continuation tokens read from them.

    ``targets`` rows are ``(row, position, token id, pair)``: the logits at ``position``
    of ``row`` give ``log p(token)``, summed into ``pair``.
    """

    rows: tuple[tuple[int, ...], ...]
    targets: Tensor

    @property
    def width(self) -> int:
        """The longest row."""
        return max(len(r) for r in self.rows)


@dataclass(frozen=True)
class ScoreRows:
    """The distinct input rows of some suites, in blocks of similar length.

    Pairs are the suites' prompts x (refusal, compliance), in
    :func:`~layerfed.layers.probes.suite_margins` order.
    """

    blocks: tuple[RowBlock, ...]
    pairs: int
    sizes: tuple[int, ...]


_ROWS: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], ScoreRows]] = (
    weakref.WeakKeyDictionary()
)


def score_rows(tokenizer: Any, suites: Sequence[ProbeSuiteData], blocks: int = 3) -> ScoreRows:
    """:class:`ScoreRows` of ``suites`` in at most ``blocks`` row blocks (one forward pass
    each: one block suits a small batch); cached per tokenizer, suite contents and blocks."""
    key = (blocks, *((s.prompts, s.refusal, s.compliance) for s in suites))
    try:
        seen = _ROWS.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: build every time
        return _build_rows(tokenizer, suites, blocks)
    if key not in seen:
        seen[key] = _build_rows(tokenizer, suites, blocks)
    return seen[key]


def _build_rows(tokenizer: Any, suites: Sequence[ProbeSuiteData], most: int) -> ScoreRows:
    pairs = [
        (p.prompt, text)
        for suite in suites
        for p in suite.prompts
        for text in (suite.refusal, suite.compliance)
    ]
    split = _splits(tokenizer, pairs)
    # the input a pair needs: context + continuation without its last token
    needs = [tuple(context + rest[:-1]) for context, rest in split]
    rows: list[tuple[int, ...]] = []
    row_of: dict[tuple[int, ...], int] = {}
    by_context: dict[tuple[int, ...], list[int]] = {}
    where = [0] * len(split)
    for j in sorted(range(len(split)), key=lambda i: -len(needs[i])):
        need, context = needs[j], tuple(split[j][0])
        if need in row_of:
            where[j] = row_of[need]
            continue
        host = next((r for r in by_context.get(context, []) if rows[r][: len(need)] == need), None)
        if host is None:
            host = len(rows)
            rows.append(need)
            by_context.setdefault(context, []).append(host)
        row_of[need] = host
        where[j] = host
    targets = [
        (where[j], len(context) - 1 + k, token, j)
        for j, (context, rest) in enumerate(split)
        for k, token in enumerate(rest)
    ]
    blocks = []
    for lo, hi in _length_ranges([len(r) for r in rows], most):
        members = [i for i, r in enumerate(rows) if lo <= len(r) <= hi]
        local = {row: i for i, row in enumerate(members)}
        picked = [(local[r], p, tok, j) for r, p, tok, j in targets if r in local]
        blocks.append(
            RowBlock(
                tuple(rows[i] for i in members),
                torch.tensor(picked, dtype=torch.long).reshape(-1, 4),
            )
        )
    return ScoreRows(tuple(blocks), len(split), tuple(len(s.prompts) for s in suites))


def _length_ranges(lengths: list[int], most: int = 3) -> list[tuple[int, int]]:
    """At most ``most`` length ranges covering ``lengths`` with the fewest padded tokens."""
    distinct = sorted(set(lengths))
    count = {x: lengths.count(x) for x in distinct}

    def cost(lo: int, hi: int) -> int:
        return hi * sum(c for x, c in count.items() if lo <= x <= hi)

    n = len(distinct)
    best = (cost(distinct[0], distinct[-1]), [(distinct[0], distinct[-1])])
    for cuts in itertools.chain.from_iterable(
        itertools.combinations(range(1, n), k) for k in range(1, most)
    ):
        bounds = [0, *cuts, n]
        ranges = [(distinct[a], distinct[b - 1]) for a, b in itertools.pairwise(bounds)]
        total = sum(cost(lo, hi) for lo, hi in ranges)
        if total < best[0]:
            best = (total, ranges)
    return best[1]
