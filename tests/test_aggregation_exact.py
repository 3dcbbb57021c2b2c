"""Exact aggregation: averaging B with a shared frozen A equals averaging dense deltas."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from layerfed.governance.schema import Policy
from layerfed.layers import LayerStack, SlotId, apply_update, slot_spec
from layerfed.simulation.tiny import build_tiny_model

DEFAULT = Path(__file__).resolve().parents[1] / "examples" / "policies" / "default.yaml"
POLICY = Policy.model_validate(yaml.safe_load(DEFAULT.read_text(encoding="utf-8")))
MODEL = build_tiny_model(0)
SLOTS = [SlotId("creator", "global"), SlotId("government", "eu"), SlotId("individual", "i7")]


def _clients(
    spec_shapes: dict[str, tuple[int, ...]], n: int, seed: int
) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {k: rng.normal(0, 1, s).astype(np.float32) for k, s in spec_shapes.items()}
        for _ in range(n)
    ]


def _weighted_mean(items: list[dict[str, np.ndarray]], w: np.ndarray) -> dict[str, np.ndarray]:
    return {
        k: sum(wi * it[k].astype(np.float64) for wi, it in zip(w, items, strict=True))
        for k in items[0]
    }


@settings(max_examples=30, deadline=None)
@given(
    st.sampled_from(SLOTS),
    st.lists(st.floats(0.01, 100), min_size=1, max_size=6),
    st.integers(0, 2**32 - 1),
)
def test_b_average_equals_dense_weighted_mean(
    slot: SlotId, weights: list[float], seed: int
) -> None:
    """Delta of the weighted-mean B equals the weighted mean of the clients' dense deltas."""
    spec = slot_spec(POLICY, MODEL, slot, root_seed=seed % 7)
    clients = _clients(spec.shapes(), len(weights), seed)
    w = np.asarray(weights) / np.sum(weights)
    deltas = [spec.dense_delta(c, np.float64) for c in clients]
    want = _weighted_mean(deltas, w)
    got = spec.dense_delta(_weighted_mean(clients, w), np.float64)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-9, atol=1e-12)


def test_b_average_exact_in_peft() -> None:
    """On the PEFT stack, committing mean B gives a delta equal to the mean of client deltas."""
    stack = LayerStack(POLICY, build_tiny_model(0))
    slot = SlotId("individual", "i7")
    stack.activate([slot])
    clients = _clients(stack.spec(slot).shapes(), 5, seed=1)
    w = np.array([1.0, 2.0, 3.0, 4.0, 5.0]) / 15
    deltas = []
    for c in clients:
        stack.set_arrays(slot, c)
        deltas.append({k: v.double().numpy() for k, v in stack.delta(slot).items()})
    stack.set_arrays(slot, {k: v.astype(np.float32) for k, v in _weighted_mean(clients, w).items()})
    for name, want in _weighted_mean(deltas, w).items():
        np.testing.assert_allclose(stack.delta(slot)[name].double().numpy(), want, atol=1e-5)


def test_server_step_is_exact() -> None:
    """apply_update on B moves the dense delta by server_lr times the mean client update."""
    spec = slot_spec(POLICY, MODEL, SlotId("government", "eu"))
    current, *clients = _clients(spec.shapes(), 4, seed=2)
    updates = [{k: c[k] - current[k] for k in c} for c in clients]
    mean = {k: v.astype(np.float32) for k, v in _weighted_mean(updates, np.full(3, 1 / 3)).items()}
    new = apply_update(current, mean, 0.5, policy=POLICY)
    base = spec.dense_delta(current, np.float64)
    client_moves = [
        {k: v - base[k] for k, v in spec.dense_delta(c, np.float64).items()} for c in clients
    ]
    want = {
        k: base[k] + 0.5 * v for k, v in _weighted_mean(client_moves, np.full(3, 1 / 3)).items()
    }
    for name, value in spec.dense_delta(new, np.float64).items():
        np.testing.assert_allclose(value, want[name], rtol=1e-5, atol=1e-6)


def test_averaging_a_and_b_separately_is_not_exact() -> None:
    """Why A is frozen: with per-client A, mean(B) mean(A) differs from mean(B A)."""
    gen = torch.Generator().manual_seed(0)
    a = [torch.randn(2, 8, generator=gen) for _ in range(2)]
    b = [torch.randn(8, 2, generator=gen) for _ in range(2)]
    exact = (b[0] @ a[0] + b[1] @ a[1]) / 2
    naive = ((b[0] + b[1]) / 2) @ ((a[0] + a[1]) / 2)
    assert not torch.allclose(exact, naive, atol=1e-3)
