"""Training one slot with the frozen slots merged into the base (LayerStack.training)."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from policy_helpers import default_data

from layerfed.clients.events import Demonstration, Thumbs
from layerfed.clients.local_train import train_on_events
from layerfed.governance.schema import Policy
from layerfed.layers import LayerStack, SlotError, SlotId, base_parameters, slots_for_instance
from layerfed.layers.redlines import protected_parameters
from layerfed.simulation.tiny import build_tiny_model, build_tiny_tokenizer

IDS = torch.tensor([[1, 36, 37, 19, 26, 6, 41, 3, 111]])
OWN = SlotId("individual", "i7")


def _stack(policy: Policy | None = None, scale: float = 0.05, seed: int = 0) -> LayerStack:
    policy = policy or Policy.model_validate(default_data())
    stack = LayerStack(policy, build_tiny_model(0), build_tiny_tokenizer())
    slots = slots_for_instance(policy, OWN.key, "eu", ["g1"])
    stack.activate(slots)
    for i, slot in enumerate(slots):
        rng = np.random.default_rng([seed, i])
        arrays = stack.get_arrays(slot)
        stack.set_arrays(
            slot, {k: rng.normal(0, scale, v.shape).astype(np.float32) for k, v in arrays.items()}
        )
    return stack


def _snapshot(stack: LayerStack) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in base_parameters(stack.model).items()}


def _live(stack: LayerStack) -> list[str]:
    tuner: Any = getattr(stack.model, "base_model", None)
    return sorted(tuner.active_adapters)


def _demos(n: int = 8) -> list[Demonstration]:
    words = ["great cake", "thanks dog", "ok music", "good river", "yes book"]
    return [Demonstration(prompt=f"tell me about {w.split()[1]}", response=w) for w in words * n][
        :n
    ]


def test_training_keeps_one_live_adapter_and_the_same_function() -> None:
    """Inside training only the trained slot's adapters are live; logits match the live stack."""
    stack = _stack()
    with torch.no_grad():
        before = stack.model(input_ids=IDS).logits
    everything = _live(stack)
    with stack.training(OWN):
        assert _live(stack) == ["individual__i7__stm"]  # both memories folded into one
        assert stack.trainable_parameters()
        with torch.no_grad():
            merged = stack.model(input_ids=IDS).logits
        torch.testing.assert_close(merged, before, rtol=1e-5, atol=1e-5)
    assert _live(stack) == everything
    assert not stack.trainable_parameters()


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), scale=st.sampled_from([1e-3, 0.05, 3.0]))
def test_unmerge_restores_every_base_parameter_bit_for_bit(seed: int, scale: float) -> None:
    """After training (merge, steps, unmerge) every base parameter, red lines included, is bit-identical."""
    stack = _stack(scale=scale, seed=seed)
    base = _snapshot(stack)
    red = {
        n: t.detach().clone() for n, t in protected_parameters(stack.model, stack._patterns).items()
    }
    policy_layer = stack.policy.layer("individual")
    train_on_events(stack, OWN, policy_layer, build_tiny_tokenizer(), _demos(), seed=seed, steps=2)
    after = _snapshot(stack)
    assert after.keys() == base.keys()
    assert all(torch.equal(after[n], base[n]) for n in base)
    assert red and all(torch.equal(after[n], red[n]) for n in red)
    stack.verify_redlines()


@pytest.mark.parametrize(
    "events",
    [
        _demos(),
        [
            Thumbs(prompt=d.prompt, response=d.response, up=i % 2 == 0)
            for i, d in enumerate(_demos())
        ],
    ],
    ids=["supervised", "thumbs"],
)
def test_merged_training_gives_the_live_delta(events: list[Any]) -> None:
    """Training with frozen slots merged gives the delta of training them live (float32 tolerance)."""
    merged, live = _stack(), _stack()
    live.merge_frozen = False
    layer = merged.policy.layer("individual")
    tok = build_tiny_tokenizer()
    a = train_on_events(merged, OWN, layer, tok, events, seed=3, steps=4)
    b = train_on_events(live, OWN, layer, tok, events, seed=3, steps=4)
    assert a.delta.keys() == b.delta.keys()
    for k in a.delta:
        np.testing.assert_allclose(a.delta[k], b.delta[k], rtol=1e-4, atol=1e-6)
    assert a.norm > 0
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-5)


def test_merged_slots_refuse_changes_and_an_error_unmerges() -> None:
    """While training, composition and merged slots cannot change; an exception still unmerges."""
    stack = _stack()
    base = _snapshot(stack)
    creator = SlotId("creator", "global")
    with pytest.raises(RuntimeError, match="boom"), stack.training(OWN):
        with pytest.raises(SlotError, match="merged"):
            stack.activate([creator])
        with pytest.raises(SlotError, match="merged for training"):
            stack.set_arrays(creator, stack.get_arrays(creator))
        with pytest.raises(SlotError, match="merged for training"):
            stack.set_arrays(OWN, stack.get_arrays(OWN))
        raise RuntimeError("boom")
    assert all(torch.equal(t, base[n]) for n, t in _snapshot(stack).items())
    stack.activate([creator])


def test_dense_views_refused_inside_training() -> None:
    """delta() and effective_parameters() refuse to run while slots are merged (no double counting)."""
    stack = _stack()
    with stack.training(OWN):
        with pytest.raises(SlotError, match="merged"):
            stack.effective_parameters()
        with pytest.raises(SlotError, match="merged"):
            stack.delta(OWN)
    assert stack.delta(OWN)


def test_get_arrays_inside_training_splits_the_folded_step() -> None:
    """Inside training, get_arrays gives each memory its lr share of the folded adapter's step."""
    stack = _stack()
    before = stack.get_arrays(OWN)
    with stack.training(OWN):
        assert stack.get_arrays(OWN).keys() == before.keys()
        for k, v in stack.get_arrays(OWN).items():
            np.testing.assert_allclose(v, before[k], atol=1e-7)
        [(params, rate)] = stack.memory_lrs(OWN)
        assert rate == pytest.approx(1.05)  # stm 1.0 + ltm 0.05
        with torch.no_grad():
            for p in params:
                p.add_(1.0)
        inside = stack.get_arrays(OWN)
    after = stack.get_arrays(OWN)
    for k, v in after.items():
        share = 1.0 / 1.05 if "/stm/" in k else 0.05 / 1.05
        np.testing.assert_allclose(v, before[k] + share, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(inside[k], v, rtol=1e-6, atol=1e-7)


def test_slot_on_a_tied_weight_stays_live() -> None:
    """A frozen slot on a tied weight (lm_head = wte) is not merged: the tie stays untouched."""
    data = copy.deepcopy(default_data())
    data["red_lines"]["parameters"] = ["transformer.wpe.weight"]
    for layer in data["layers"]:
        if layer["name"] == "community":
            layer["scope"]["include"] = ["lm_head.weight"]
    stack = _stack(Policy.model_validate(data))
    wte = stack.model.get_input_embeddings().weight.detach().clone()  # type: ignore[operator]
    with stack.training(OWN):
        assert "community__global__main" in _live(stack)
        assert "creator__global__main" not in _live(stack)
        now = stack.model.get_input_embeddings().weight  # type: ignore[operator]
        assert torch.equal(now, wte)
