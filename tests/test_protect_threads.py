"""Projection bases build on one BLAS thread, also inside worker threads under load.

Root cause of the gym's basis-build hang (issue #23): numpy's OpenBLAS hands each of the
SVD's small BLAS calls to its own spinning worker threads; on 2 cores shared with torch's
OpenMP teams (one per gym lane) each hand-off waits for a descheduled thread, and a build
of about 1 s took over 10 min in a lane. ``layers/protect.py`` now runs every SVD with the
BLAS pool limited to one thread (restored after), one call at a time.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info, threadpool_limits

from layerfed.governance.schema import ProjectionBasis
from layerfed.layers import protect
from layerfed.layers.protect import ModuleBasis, module_basis

TIMEOUT_S = 120.0
"""A build of these matrices takes well under a second on one thread; 120 s leaves room
for a loaded 2-core machine, far below the hang's 10+ minutes."""


def activations(seed: int) -> np.ndarray:
    """Rows like the tiny base's probe activations: 1,160 positions, 64 inputs, decaying energy."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(1160, 64)) * np.geomspace(10.0, 1e-3, 64)


def blas_threads() -> list[int]:
    """The thread count of every BLAS pool loaded in this process."""
    return [int(d["num_threads"]) for d in threadpool_info() if d["user_api"] == "blas"]


def test_the_svd_runs_on_one_blas_thread_and_restores_the_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """module_basis's SVD sees a BLAS pool of one thread even when the process has two,
    and the pool is back at two afterwards."""
    seen: list[list[int]] = []
    real = np.linalg.svd

    def spy(x: np.ndarray, full_matrices: bool = True) -> Any:
        seen.append(blas_threads())
        return real(x, full_matrices=full_matrices)

    monkeypatch.setattr(np.linalg, "svd", spy)
    with threadpool_limits(limits=2, user_api="blas"):
        module_basis(activations(0), ProjectionBasis(energy=0.99))
        after = blas_threads()
    assert seen and all(counts == [1] * len(counts) for counts in seen), seen
    assert after and set(after) == {2}


def _busy(stop: threading.Event) -> None:
    """A gym lane's load: torch matmuls on its own OpenMP team until told to stop."""
    a = torch.randn(192, 192)
    while not stop.is_set():
        a = torch.tanh(a @ a / 14.0)


def test_bases_build_inside_worker_threads_under_load() -> None:
    """Three worker threads build bases at once beside two busy torch threads: all finish
    within TIMEOUT_S, each equal bit for bit to the same build in the main thread."""
    rules: list[str | ProjectionBasis] = ["exact", ProjectionBasis(energy=0.99)]
    jobs = [(seed, rule) for seed in range(3) for rule in rules]
    expected = [module_basis(activations(seed), rule) for seed, rule in jobs]
    got: dict[int, ModuleBasis] = {}

    def worker(k: int) -> None:
        for i in range(k, len(jobs), 3):
            seed, rule = jobs[i]
            got[i] = module_basis(activations(seed), rule)

    stop = threading.Event()
    busy = [threading.Thread(target=_busy, args=(stop,), daemon=True) for _ in range(2)]
    workers = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(3)]
    try:
        for t in [*busy, *workers]:
            t.start()
        for t in workers:
            t.join(TIMEOUT_S)
        assert not any(t.is_alive() for t in workers), f"a basis build ran over {TIMEOUT_S} s"
    finally:
        stop.set()
        for t in busy:
            t.join()
    for i, want in enumerate(expected):
        assert np.array_equal(got[i].vectors, want.vectors)
        assert np.array_equal(got[i].sigma, want.sigma)
        assert got[i].residual == want.residual
    assert not protect._SVD_LOCK.locked()
