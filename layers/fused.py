"""One fused pass over a slot's replies: block norms and the weighted sum together.

Every array is cut into blocks of :data:`CHUNK` numbers, walked column by
column: block ``j`` of every reply before block ``j + 1``, so the float64
accumulator block stays in the core's cache while each reply's bytes are read
from memory once. Per reply and block: widen the float32 block to float64 in a
cached buffer, take its norm (finite check and sum of squares in one float64
reduction) and add ``weight * block`` to the accumulator in place. Replies are
torch views of the decoded message bytes: nothing is copied. Column ranges are
shared among a few threads (torch releases the GIL). Results do not depend on
the threading: every element is summed over the replies in reply order, and
block norms are folded with :func:`math.fsum`.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

__all__ = [
    "CHUNK",
    "THREADS",
    "block_norms",
    "fold_norms",
    "tensor_view",
    "weighted_sums",
]

CHUNK = 32_000
"""Numbers per block: accumulator and buffer blocks (250 KB float64 each) stay in L2, and
every torch call stays under torch's intra-op grain (32,768), so it runs in the calling thread."""
THREADS = max(1, min(4, len(os.sched_getaffinity(0))))
"""Threads that share the columns of a large pass."""
_PARALLEL_FROM = 1 << 21
"""Numbers (replies x columns) below which a pass runs in the calling thread."""
_SPAN = 4
"""Most blocks one thread task walks through."""
_NATIVE = tuple(np.dtype(t) for t in (np.float16, np.float32, np.float64))

_pool: ThreadPoolExecutor | None = None

# Views of message bytes are read-only; these tensors are only ever read.
warnings.filterwarnings(
    "ignore", "The given NumPy array is not writable", UserWarning, r"layerfed\.layers\.fused"
)


def tensor_view(array: NDArray[Any]) -> torch.Tensor:
    """A flat torch view of ``array`` (C order); copies only non-contiguous or exotic dtypes.

    Read-only arrays (decoded message bytes) are viewed as they are; callers
    never write through the view.
    """
    flat = np.ravel(array)
    if flat.dtype not in _NATIVE:
        flat = flat.astype(np.float64)
    return torch.from_numpy(flat)


def _blocks(size: int) -> int:
    return max(1, -(-size // CHUNK))


@dataclass(frozen=True)
class _Pass:
    """The operands of one pass, cut into blocks once (views, no copies)."""

    blocks: list[tuple[torch.Tensor, ...]]
    weights: list[float] | None
    acc: tuple[torch.Tensor, ...] | None
    norms: list[tuple[torch.Tensor, ...]] | None

    @classmethod
    def of(
        cls,
        views: Sequence[torch.Tensor],
        weights: Sequence[float] | None,
        acc: torch.Tensor | None,
        norms: torch.Tensor | None,
    ) -> _Pass:
        return cls(
            blocks=[torch.split(v, CHUNK) if v.numel() else (v,) for v in views],
            weights=None if weights is None else [float(w) for w in weights],
            acc=None if acc is None else (torch.split(acc, CHUNK) if acc.numel() else (acc,)),
            norms=None if norms is None else [row.unbind() for row in norms],
        )

    def walk(self, first: int, stop: int) -> None:
        """Blocks ``first..stop-1``: each reply's block norm, then ``acc += w * block``.

        A block is widened to float64 once, in a buffer that stays in cache;
        the first reply's block initialises ``acc`` (``w * x``, no zeroing).
        Blocks stay under torch's intra-op grain, so each call runs in this thread.
        """
        norm, f64 = torch.linalg.vector_norm, torch.float64
        wide = torch.empty(CHUNK, dtype=f64)
        for j in range(first, stop):
            size = self.blocks[0][j].numel()
            buf = wide if size == CHUNK else wide[:size]
            target = None if self.acc is None else self.acc[j]
            for i, blocks in enumerate(self.blocks):
                buf.copy_(blocks[j])
                if self.norms is not None:
                    norm(buf, out=self.norms[i][j])
                if target is None or self.weights is None:
                    continue
                if i == 0:
                    torch.mul(buf, self.weights[0], out=target)
                else:
                    target.add_(buf, alpha=self.weights[i])


def block_norms(array: NDArray[Any]) -> NDArray[np.float64]:
    """The float64 L2 norm of each :data:`CHUNK` block of ``array`` (C order)."""
    norms = torch.zeros((1, _blocks(array.size)), dtype=torch.float64)
    _run([(_Pass.of([tensor_view(array)], None, None, norms), array.size)], 1)
    return norms[0].numpy()


def fold_norms(norms: Sequence[NDArray[np.float64]]) -> float:
    """The sum of squares of all the blocks whose norms are given (exactly rounded)."""
    return math.fsum(float(v) for part in norms for v in np.square(part))


def _run(passes: Sequence[tuple[_Pass, int]], replies: int) -> None:
    """Walk every block of every pass; in the pool when the work is large."""
    global _pool
    total = replies * sum(size for _, size in passes)
    if THREADS == 1 or total < _PARALLEL_FROM:
        for work, size in passes:
            work.walk(0, _blocks(size))
        return
    if _pool is None:
        _pool = ThreadPoolExecutor(THREADS, thread_name_prefix="layerfed-agg")
    tasks = []
    for work, size in passes:
        count = _blocks(size)
        span = max(1, min(_SPAN, -(-count // THREADS)))
        for s in range(0, count, span):
            tasks.append(_pool.submit(work.walk, s, min(s + span, count)))
    for task in tasks:
        task.result()


def weighted_sums(
    columns: Mapping[str, Sequence[NDArray[Any]]], weights: Sequence[float], *, norms: bool = False
) -> dict[str, tuple[NDArray[np.float64], NDArray[np.float64] | None]]:
    """Per name: ``sum(w_i * x_i)`` in float64 (flat) and, with ``norms``, block norms.

    ``columns[name][i]`` is reply ``i``'s array ``name``. Row ``i`` of a name's
    norm table equals :func:`block_norms` of that array. All names share one
    pass of the thread pool.
    """
    passes: list[tuple[_Pass, int]] = []
    out: dict[str, tuple[NDArray[np.float64], NDArray[np.float64] | None]] = {}
    for name, arrays in columns.items():
        views = [tensor_view(a) for a in arrays]
        size = views[0].numel()
        acc = torch.empty(size, dtype=torch.float64)
        table = torch.zeros((len(views), _blocks(size)), dtype=torch.float64) if norms else None
        passes.append((_Pass.of(views, weights, acc, table), size))
        out[name] = (acc.numpy(), None if table is None else table.numpy())
    if passes:
        _run(passes, len(weights))
    return out
