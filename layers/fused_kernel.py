"""The C kernel of the fused pass (``_fused_kernel.c``), loaded with ctypes where it was built.

The extension is optional (setup.py): :func:`load` returns None when it is absent,
when ``LAYERFED_FUSED_KERNEL=0``, or when this CPU or torch would not give the
same bits (the kernel copies torch's AVX2 arithmetic, so it is used only where
torch runs its AVX2 kernels and the CPU has AVX2 and FMA). The caller
(:mod:`layerfed.layers.fused`) also checks the bits against its torch path once
before it trusts the kernel. A call releases the GIL, so threads can share blocks.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

__all__ = ["ENV", "Kernel", "load"]

log = logging.getLogger("layerfed")

ENV = "LAYERFED_FUSED_KERNEL"
"""Set to ``0`` to run the torch path only."""
_MODULE = "layerfed.layers._fused_kernel"
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


@dataclass(frozen=True)
class Kernel:
    """``lf_fused_f32``: block norms and the weighted sum of float32 replies, blocks b0..b1-1."""

    fn: Any
    simd: bool

    def run(
        self,
        replies: Sequence[NDArray[np.float32]],
        weights: NDArray[np.float64],
        chunk: int,
        blocks: tuple[int, int],
        acc: NDArray[np.float64] | None,
        norms: NDArray[np.float64] | None,
    ) -> None:
        """Fill ``acc[...]`` and ``norms[:, b0:b1]`` for blocks ``b0..b1-1`` (C-contiguous inputs).

        Raises ValueError on operands the C code would read or write out of bounds.
        """
        n = replies[0].size
        nblocks = 0 if norms is None else norms.shape[1]
        ok = (
            all(r.dtype == np.float32 and r.flags.c_contiguous and r.size == n for r in replies)
            and weights.dtype == np.float64
            and weights.size >= len(replies)
            and 0 <= blocks[0] <= blocks[1] <= max(1, -(-n // chunk))
            and (
                acc is None
                or (acc.dtype == np.float64 and acc.flags.c_contiguous and acc.size == n)
            )
            and (
                norms is None
                or (
                    norms.dtype == np.float64
                    and norms.flags.c_contiguous
                    and norms.shape[0] == len(replies)
                    and nblocks >= blocks[1]
                )
            )
        )
        if not ok:
            raise ValueError("fused kernel: expected alike float32 replies and fitting outputs")
        pointers = (_PTR * len(replies))(*[r.ctypes.data for r in replies])
        self.fn(
            pointers,
            weights.ctypes.data,
            len(replies),
            n,
            chunk,
            blocks[0],
            blocks[1],
            None if acc is None else acc.ctypes.data,
            None if norms is None else norms.ctypes.data,
            nblocks,
            int(self.simd),
        )


def load() -> Kernel | None:
    """The kernel, or None where it is absent, switched off, or unable to match torch's bits."""
    if os.environ.get(ENV, "1") == "0":
        return None
    spec = importlib.util.find_spec(_MODULE)
    if spec is None or spec.origin is None:
        log.debug("fused kernel not built; the torch path runs")
        return None
    if torch.backends.cpu.get_cpu_capability() != "AVX2":
        log.debug("torch runs %s kernels; the fused kernel matches AVX2 only", "non-AVX2")
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError as e:
        log.debug("fused kernel not loadable (%s); the torch path runs", e)
        return None
    if not lib.lf_has_avx2():
        return None
    fn = lib.lf_fused_f32
    fn.argtypes = [_PTR, _PTR, _I64, _I64, _I64, _I64, _I64, _PTR, _PTR, _I64, ctypes.c_int]
    fn.restype = None
    return Kernel(fn, simd=True)
