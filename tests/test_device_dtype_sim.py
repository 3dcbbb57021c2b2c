"""A bfloat16 instance with a float32 server commits what an all-float32 federation commits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from layerfed.layers.slots import SlotId
from layerfed.simulation.settings import SimSettings
from layerfed.simulation.simulate import simulate

pytestmark = pytest.mark.slow

ROUNDS = 2
TOLERANCE = 0.1
"""Largest relative L2 difference of a committed slot between the two runs: bfloat16
activations change each instance's gradient a little, so the committed steps must agree
within 10 % (the server, float32 in both runs, aggregates and commits float32 bytes);
the same slots are committed in both."""


def _committed(out: Path, rounds: int, **placement: str) -> dict[str, dict[str, np.ndarray]]:
    state = simulate(SimSettings(out=str(out), rounds=rounds, **placement))  # type: ignore[arg-type]
    assert state.store.redline_digest() is not None
    assert ";dtype=" not in str(state.store.redline_digest())  # the server stays float32
    return {
        name: state.store.load(SlotId.parse(name))
        for name, record in state.committed.items()
        if record.get("version", 0)
    }


def test_bf16_instances_fp32_server_match_fp32_run(tmp_path: Path) -> None:
    """Same committed slots; every committed array float32 and within TOLERANCE (rel. L2)."""
    fp32 = _committed(tmp_path / "fp32", ROUNDS)
    mixed = _committed(tmp_path / "bf16", ROUNDS, instance_dtype="bfloat16")
    assert fp32 and set(mixed) == set(fp32)
    worst = 0.0
    for slot, arrays in fp32.items():
        assert set(mixed[slot]) == set(arrays)
        for name, a in arrays.items():
            b = mixed[slot][name]
            assert a.dtype == b.dtype == np.float32
            scale = max(float(np.linalg.norm(a)), 1e-12)
            worst = max(worst, float(np.linalg.norm(a - b)) / scale)
    assert worst <= TOLERANCE, worst
