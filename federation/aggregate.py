"""Robust aggregation of a slot's replies: pure numpy, block-wise, memory-careful.

Every aggregator works on blocks of at most :data:`BLOCK` numbers so that 100
replies of 1M floats never need a stacked copy of all of them. FedAvg runs
the fused pass of :mod:`layerfed.layers.fused` (float64 accumulation in
place, no copy of any reply). FedAvg and
multi-Krum weight replies by their number of examples (as Flower does);
trimmed mean and median are unweighted and coordinate-wise. Trimmed mean
reuses Flower's ``trim_mean``; the others give the same numbers as Flower's
strategies on the same inputs (checked in the tests).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from numpy.typing import NDArray

from layerfed.errors import LayerfedError
from layerfed.federation.validate import ReplyChecks, Validation, refused
from layerfed.governance.schema import Aggregator
from layerfed.layers.arrays import Arrays
from layerfed.layers.fused import fold_norms, weighted_sums

__all__ = [
    "BLOCK",
    "DEFAULT_BYZANTINE",
    "DEFAULT_TRIM_FRACTION",
    "AggregateResult",
    "AggregationError",
    "Reply",
    "SlotOutcome",
    "aggregate",
    "fedavg",
    "krum",
    "krum_scores",
    "median",
    "trimmed_mean",
    "validate_and_aggregate",
]

log = logging.getLogger("layerfed")

BLOCK = 1 << 22
"""Most numbers (replies x columns) held in one stacked block."""
DEFAULT_TRIM_FRACTION = 0.2
"""Share cut at each end when the policy leaves ``trim_fraction`` unset (Flower's default)."""
DEFAULT_BYZANTINE = 0
"""Byzantine replies Krum tolerates when the policy leaves ``byzantine`` unset."""


class AggregationError(LayerfedError, ValueError):
    """Replies or settings an aggregator cannot work with; names field, expected and got."""

    def __init__(self, field_name: str, expected: str, got: object) -> None:
        self.field = field_name
        self.expected = expected
        self.got = got
        super().__init__(f"{field_name}: expected {expected}, got {got!r}")


@dataclass(frozen=True)
class Reply:
    """One client's arrays for a slot, weighted by its number of examples."""

    arrays: dict[str, NDArray[Any]]
    weight: float
    client_id: str


@dataclass(frozen=True)
class AggregateResult:
    """The aggregated arrays and which clients' replies went into them."""

    arrays: dict[str, NDArray[Any]]
    used: tuple[str, ...]
    dropped: tuple[str, ...] = ()


@dataclass(frozen=True)
class SlotOutcome:
    """Validation of every reply of a slot plus the aggregate of the survivors.

    ``result`` is None when fewer than ``min_clients`` replies survived.
    """

    validations: dict[str, Validation]
    result: AggregateResult | None = None
    refused: tuple[str, ...] = ()


def _check_weight(weight: float, client_id: str) -> None:
    if not (isinstance(weight, int | float) and math.isfinite(weight) and weight > 0):
        raise AggregationError(f"reply {client_id!r}.weight", "a finite number > 0", weight)


def _check_replies(replies: Sequence[Reply]) -> None:
    """Raise unless the replies are non-empty, uniquely named and alike in names/shapes/dtypes."""
    if not replies:
        raise AggregationError("replies", "at least one reply", 0)
    ids = [r.client_id for r in replies]
    if len(set(ids)) != len(ids):
        raise AggregationError("replies.client_id", "unique client ids", ids)
    first = replies[0]
    layout = {k: (v.shape, v.dtype) for k, v in first.arrays.items()}
    for name, (_, dtype) in layout.items():
        if not np.issubdtype(dtype, np.floating):
            raise AggregationError(f"array {name!r}.dtype", "a floating dtype", str(dtype))
    for reply in replies:
        _check_weight(reply.weight, reply.client_id)
        got = {k: (v.shape, v.dtype) for k, v in reply.arrays.items()}
        if got != layout:
            raise AggregationError(f"reply {reply.client_id!r}.arrays", str(layout), str(got))


def _flat(array: NDArray[Any]) -> NDArray[Any]:
    return array.reshape(-1)


def _finish(acc: NDArray[np.float64], total: float, like: NDArray[Any]) -> NDArray[Any]:
    out = np.empty(like.shape, dtype=like.dtype)
    np.divide(acc, np.float64(total), out=_flat(out), casting="same_kind")
    return out


def fedavg(replies: Sequence[Reply]) -> dict[str, NDArray[Any]]:
    """Weighted mean of the replies' arrays (float64 accumulation, dtypes kept)."""
    _check_replies(replies)
    total = math.fsum(r.weight for r in replies)
    like = replies[0].arrays
    sums = weighted_sums(
        {n: [r.arrays[n] for r in replies] for n in like}, [r.weight for r in replies]
    )
    return {name: _finish(sums[name][0], total, like[name]) for name in like}


def _blocks(replies: Sequence[Reply], name: str) -> Iterator[tuple[int, int, NDArray[Any]]]:
    """Column blocks ``(start, stop, stacked)`` of array ``name`` across the replies."""
    like = replies[0].arrays[name]
    width = max(1, BLOCK // len(replies))
    stacked = np.empty((len(replies), min(width, max(like.size, 1))), dtype=like.dtype)
    flats = [_flat(r.arrays[name]) for r in replies]
    for start in range(0, like.size, width):
        stop = min(start + width, like.size)
        block = stacked[:, : stop - start]
        for row, flat in zip(block, flats, strict=True):
            row[:] = flat[start:stop]
        yield start, stop, block


def _coordinatewise(replies: Sequence[Reply], reduce: Any) -> dict[str, NDArray[Any]]:
    _check_replies(replies)
    out: Arrays = {}
    for name, like in replies[0].arrays.items():
        result = np.empty(like.shape, dtype=like.dtype)
        flat = _flat(result)
        for start, stop, block in _blocks(replies, name):
            flat[start:stop] = reduce(block)
        out[name] = result
    return out


def trimmed_mean(replies: Sequence[Reply], trim_fraction: float) -> dict[str, NDArray[Any]]:
    """Coordinate-wise mean after cutting ``trim_fraction`` of the values at each end."""
    if not 0.0 <= trim_fraction < 0.5:
        raise AggregationError("aggregator.trim_fraction", "a number in [0, 0.5)", trim_fraction)
    return _coordinatewise(replies, lambda block: trim_mean(block, trim_fraction))


def median(replies: Sequence[Reply]) -> dict[str, NDArray[Any]]:
    """Coordinate-wise median (mean of the two middle values for an even count)."""
    return _coordinatewise(replies, lambda block: np.median(block, axis=0, overwrite_input=True))


def _gram(replies: Sequence[Reply]) -> NDArray[np.float64]:
    n = len(replies)
    gram = np.zeros((n, n), dtype=np.float64)
    for name in replies[0].arrays:
        for _, _, block in _blocks(replies, name):
            wide = block.astype(np.float64)
            gram += wide @ wide.T
    return gram


def krum_scores(replies: Sequence[Reply], byzantine: int) -> NDArray[np.float64]:
    """Krum score of each reply: summed squared distances to its n - f - 2 nearest others."""
    _check_replies(replies)
    n = len(replies)
    gram = _gram(replies)
    diag = np.diag(gram)
    dist = np.maximum(diag[:, None] + diag[None, :] - 2.0 * gram, 0.0)
    closest = max(1, n - byzantine - 2)
    scores = np.zeros(n, dtype=np.float64)
    for i in range(n):
        others = np.sort(np.delete(dist[i], i))
        scores[i] = float(others[:closest].sum())
    return scores


def _krum_select(replies: Sequence[Reply], byzantine: int, multi: int) -> list[int]:
    if byzantine < 0:
        raise AggregationError("aggregator.byzantine", "an integer >= 0", byzantine)
    if not 1 <= multi <= len(replies):
        raise AggregationError("krum.multi", f"an integer in [1, {len(replies)}]", multi)
    scores = krum_scores(replies, byzantine)
    return sorted(int(i) for i in np.argsort(scores, kind="stable")[:multi])


def krum(replies: Sequence[Reply], byzantine: int, multi: int = 1) -> dict[str, NDArray[Any]]:
    """Krum (Blanchard et al. 2017): the best-scored reply; multi-Krum: weighted mean of the best."""
    chosen = _krum_select(replies, byzantine, multi)
    return fedavg([replies[i] for i in chosen])


def aggregate(replies: Sequence[Reply], aggregator: Aggregator) -> AggregateResult:
    """Aggregate a slot's replies with the layer's aggregator."""
    _check_replies(replies)
    ids = tuple(r.client_id for r in replies)
    if aggregator.kind == "fedavg":
        return AggregateResult(fedavg(replies), used=ids)
    if aggregator.kind == "trimmed_mean":
        cut = aggregator.trim_fraction
        cut = DEFAULT_TRIM_FRACTION if cut is None else cut
        return AggregateResult(trimmed_mean(replies, cut), used=ids)
    if aggregator.kind == "median":
        return AggregateResult(median(replies), used=ids)
    byz = DEFAULT_BYZANTINE if aggregator.byzantine is None else aggregator.byzantine
    chosen = _krum_select(replies, byz, 1)
    arrays = fedavg([replies[i] for i in chosen])
    used = tuple(ids[i] for i in chosen)
    return AggregateResult(arrays, used=used, dropped=tuple(i for i in ids if i not in used))


def validate_and_aggregate(
    replies: Sequence[Reply],
    aggregator: Aggregator,
    checks: ReplyChecks,
    *,
    min_clients: int = 1,
) -> SlotOutcome:
    """Validate every reply of a slot, then aggregate the survivors.

    Equal to :meth:`ReplyChecks.validate` on each reply followed by
    :func:`aggregate` on the accepted (possibly clipped) ones. For FedAvg the
    data is read once: the norm pass also accumulates, and the sum is redone
    from the survivors only when some reply was refused or clipped late.
    """
    ids = [r.client_id for r in replies]
    if len(set(ids)) != len(ids):
        raise AggregationError("replies.client_id", "unique client ids", ids)
    if aggregator.kind == "fedavg":
        validations, survivors, arrays = _fused_fedavg(replies, checks)
    else:
        validations = {r.client_id: _validate_one(r, checks) for r in replies}
        survivors = _survivors(replies, validations)
        arrays = None
    refused_ids = tuple(i for i in ids if not validations[i].ok)
    if len(survivors) < min_clients or not survivors:
        log.info("slot not updated: %s of %s replies survived", len(survivors), min_clients)
        return SlotOutcome(validations, None, refused_ids)
    if arrays is None:
        result = aggregate(survivors, aggregator)
    else:
        result = AggregateResult(arrays, used=tuple(r.client_id for r in survivors))
    return SlotOutcome(validations, result, refused_ids)


def _validate_one(reply: Reply, checks: ReplyChecks) -> Validation:
    first = _precheck(reply, checks)
    return checks.validate(reply.arrays) if first is None else first


def _survivors(replies: Sequence[Reply], validations: dict[str, Validation]) -> list[Reply]:
    out = []
    for reply in replies:
        v = validations[reply.client_id]
        if v.ok:
            out.append(Reply(v.arrays, reply.weight, reply.client_id))
    return out


def _fused_fedavg(
    replies: Sequence[Reply], checks: ReplyChecks
) -> tuple[dict[str, Validation], list[Reply], Arrays | None]:
    """Validate and sum in one pass; None as the sum when some reply was refused or clipped.

    The replies that pass the structural checks are summed together (one
    :func:`weighted_sum` per array name, block norms alongside); each is then
    judged on its float64 sum of squares, folded from the same block norms
    :meth:`ReplyChecks.validate` uses, so verdicts and norms are identical.
    """
    validations: dict[str, Validation] = {}
    sound: list[Reply] = []
    for reply in replies:
        first = _precheck(reply, checks)
        if first is None:
            sound.append(reply)
        else:
            validations[reply.client_id] = first
    names = sorted(checks.expected) if sound else []
    columns = {n: [r.arrays[n] for r in sound] for n in names}
    sums = weighted_sums(columns, [r.weight for r in sound], norms=True)
    clean = True
    for i, reply in enumerate(sound):
        total = fold_norms([table[i] for _, table in sums.values() if table is not None])
        verdict = checks.judge(reply.arrays, total)
        validations[reply.client_id] = verdict
        clean = clean and verdict.ok and not verdict.clipped
    ordered = {r.client_id: validations[r.client_id] for r in replies}
    survivors = _survivors(replies, ordered)
    if not clean or not survivors:
        return ordered, survivors, None
    weight = math.fsum(r.weight for r in survivors)
    like = survivors[0].arrays
    return ordered, survivors, {n: _finish(sums[n][0], weight, like[n]) for n in like}


def _precheck(reply: Reply, checks: ReplyChecks) -> Validation | None:
    w = reply.weight
    if not (isinstance(w, int | float) and math.isfinite(w) and w > 0):
        return refused("bad_weight", f"weight: expected a finite number > 0, got {w!r}")
    return checks.structure(reply.arrays)
