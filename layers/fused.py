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

Float32 replies go through a C kernel (``_fused_kernel.c``, :mod:`layerfed.layers.fused_kernel`)
where it was built and gives the torch path's bits on this machine: one sweep per
block reads each reply once and does the norm and the sum in cache (4-6x less CPU).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from layerfed.layers import fused_kernel
from layerfed.layers.fused_kernel import Kernel

__all__ = [
    "CHUNK",
    "THREADS",
    "block_norms",
    "fold_norms",
    "kernel",
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
log = logging.getLogger("layerfed")

_NATIVE = tuple(np.dtype(t) for t in (np.float16, np.float32, np.float64))

_pool: ThreadPoolExecutor | None = None
_kernel: list[Kernel | None] = []
"""The C kernel once resolved (empty: not yet looked for)."""
_kernel_lock = threading.Lock()

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


@dataclass(frozen=True)
class _KernelPass:
    """The same pass for float32 replies, run by the C kernel (one sweep per block)."""

    kernel: Kernel
    replies: list[NDArray[np.float32]]
    weights: NDArray[np.float64]
    acc: NDArray[np.float64] | None
    norms: NDArray[np.float64] | None

    def walk(self, first: int, stop: int) -> None:
        """Blocks ``first..stop-1`` of every reply, as :meth:`_Pass.walk` does them."""
        self.kernel.run(self.replies, self.weights, CHUNK, (first, stop), self.acc, self.norms)


def _torch_kernel_agree(k: Kernel) -> bool:
    """Whether ``k`` gives the torch path's bits on replies that cover every branch."""
    rng = np.random.default_rng(20261207)
    size = 2 * CHUNK + 7
    arrays = [(rng.standard_normal(size) * 10.0**e).astype(np.float32) for e in range(-3, 3)]
    arrays[2][5] = np.nan
    weights = [float(w) for w in rng.uniform(0.1, 100.0, len(arrays))]
    views = [torch.from_numpy(a) for a in arrays]
    want_acc = torch.empty(size, dtype=torch.float64)
    want_norms = torch.zeros((len(arrays), _blocks(size)), dtype=torch.float64)
    _Pass.of(views, weights, want_acc, want_norms).walk(0, _blocks(size))
    acc, norms = np.empty(size), np.zeros((len(arrays), _blocks(size)))
    k.run(arrays, np.asarray(weights), CHUNK, (0, _blocks(size)), acc, norms)
    return bool(
        np.array_equal(acc, want_acc.numpy(), equal_nan=True)
        and np.array_equal(norms, want_norms.numpy(), equal_nan=True)
    )


def kernel() -> Kernel | None:
    """The C kernel when it is built, enabled and gives the torch path's bits here, else None."""
    with _kernel_lock:
        if not _kernel:
            found = fused_kernel.load()
            if found is not None and not _torch_kernel_agree(found):
                log.warning("fused kernel differs from torch in the last bits; torch path runs")
                found = None
            _kernel.append(found)
        return _kernel[0]


def _as_float32(arrays: Sequence[NDArray[Any]]) -> list[NDArray[np.float32]] | None:
    """Flat C-order float32 views of ``arrays`` for the kernel, or None (torch path)."""
    if not arrays or arrays[0].size == 0 or kernel() is None:
        return None
    flats = [np.ravel(a) for a in arrays]
    size = flats[0].size  # the kernel reads this many numbers from every reply
    if any(f.dtype != np.float32 or not f.flags.c_contiguous or f.size != size for f in flats):
        return None
    return flats


def block_norms(array: NDArray[Any]) -> NDArray[np.float64]:
    """The float64 L2 norm of each :data:`CHUNK` block of ``array`` (C order)."""
    flats = _as_float32([array])
    if flats is not None:
        k = kernel()
        assert k is not None
        row = np.zeros(_blocks(array.size))
        work: _Pass | _KernelPass = _KernelPass(k, flats, np.ones(1), None, row.reshape(1, -1))
        _run([(work, array.size)], 1)
        return row
    norms = torch.zeros((1, _blocks(array.size)), dtype=torch.float64)
    _run([(_Pass.of([tensor_view(array)], None, None, norms), array.size)], 1)
    return norms[0].numpy()


def fold_norms(norms: Sequence[NDArray[np.float64]]) -> float:
    """The sum of squares of all the blocks whose norms are given (exactly rounded)."""
    return math.fsum(float(v) for part in norms for v in np.square(part))


def _run(passes: Sequence[tuple[_Pass | _KernelPass, int]], replies: int) -> None:
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
    passes: list[tuple[_Pass | _KernelPass, int]] = []
    out: dict[str, tuple[NDArray[np.float64], NDArray[np.float64] | None]] = {}
    for name, arrays in columns.items():
        flats = _as_float32(arrays)
        k = kernel()
        if flats is not None and k is not None:
            total = np.empty(flats[0].size)
            rows = np.zeros((len(flats), _blocks(total.size))) if norms else None
            passes.append(
                (_KernelPass(k, flats, np.asarray(weights, np.float64), total, rows), total.size)
            )
            out[name] = (total, rows)
            continue
        views = [tensor_view(a) for a in arrays]
        size = views[0].numel()
        acc = torch.empty(size, dtype=torch.float64)
        table = torch.zeros((len(views), _blocks(size)), dtype=torch.float64) if norms else None
        passes.append((_Pass.of(views, weights, acc, table), size))
        out[name] = (acc.numpy(), None if table is None else table.numpy())
    if passes:
        _run(passes, len(weights))
    return out
