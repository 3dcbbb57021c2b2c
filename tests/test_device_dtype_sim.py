"""A bfloat16 instance with a float32 server commits what an all-float32 federation commits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from layerfed.governance.keys import load_private_key
from layerfed.governance.signing import sign_policy_file
from layerfed.layers.slots import SlotId
from layerfed.simulation.settings import DEFAULT_POLICY, SimSettings
from layerfed.simulation.simulate import simulate

pytestmark = pytest.mark.slow

ROUNDS = 2
TOLERANCE = {"superego off": 0.1, "superego on": 0.25}
"""Largest relative L2 difference of a committed slot between the two runs: bfloat16
activations change each instance's gradient a little, so the committed steps must agree
within a bound (the server, float32 in both runs, aggregates and commits float32 bytes);
the same slots are committed in both.

Measured on the 2-core EPYC (2026-12-07, 2 rounds, default scenario): superego off, worst
0.077 (median 0.039 over 16 arrays); superego on (the default policy), worst 0.183 (median
0.079). The superego's logit matching pulls the student's first-token logits toward a
table that, on a bfloat16 base, differs from them by rounding alone, so its gradient
carries that rounding; the 0.1 bound held for the default policy only while the superego
skipped demonstrations (before 36d3caf took effect). The superego-on bound was set after
seeing 0.183 (logged in docs/deployment.md, Devices and dtypes); the superego-off bound is
the one first stated."""


def _policy_without_superego(folder: Path) -> str:
    """The default policy with ``superego.enabled: false``, signed with the demo creator key."""
    data = yaml.safe_load(DEFAULT_POLICY.read_text(encoding="utf-8"))
    data["superego"]["enabled"] = False
    path = folder / "no-superego.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    key = DEFAULT_POLICY.parents[1] / "keys" / "creator-demo.pem"
    sign_policy_file(path, load_private_key(key))
    return str(path)


def _committed(out: Path, rounds: int, **placement: str) -> dict[str, dict[str, np.ndarray]]:
    state = simulate(SimSettings(out=str(out), rounds=rounds, **placement))  # type: ignore[arg-type]
    assert state.store.redline_digest() is not None
    assert ";dtype=" not in str(state.store.redline_digest())  # the server stays float32
    return {
        name: state.store.load(SlotId.parse(name))
        for name, record in state.committed.items()
        if record.get("version", 0)
    }


@pytest.mark.parametrize("superego", ["superego off", "superego on"])
def test_bf16_instances_fp32_server_match_fp32_run(tmp_path: Path, superego: str) -> None:
    """Same committed slots; every committed array float32 and within TOLERANCE (rel. L2)."""
    policy = {} if superego == "superego on" else {"policy": _policy_without_superego(tmp_path)}
    fp32 = _committed(tmp_path / "fp32", ROUNDS, **policy)
    mixed = _committed(tmp_path / "bf16", ROUNDS, instance_dtype="bfloat16", **policy)
    assert fp32 and set(mixed) == set(fp32)
    worst = 0.0
    for slot, arrays in fp32.items():
        assert set(mixed[slot]) == set(arrays)
        for name, a in arrays.items():
            b = mixed[slot][name]
            assert a.dtype == b.dtype == np.float32
            scale = max(float(np.linalg.norm(a)), 1e-12)
            worst = max(worst, float(np.linalg.norm(a - b)) / scale)
    assert worst <= TOLERANCE[superego], worst
