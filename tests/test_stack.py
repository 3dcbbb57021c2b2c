"""The layer stack: slots, composition, scopes and one-slot-at-a-time training."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from layerfed.governance.patterns import in_scope
from layerfed.governance.schema import Policy
from layerfed.layers import (
    ArrayError,
    LayerStack,
    RedLineViolation,
    ScopeError,
    SlotError,
    SlotId,
    adapter_name,
    base_parameters,
    slot_shapes,
    slot_spec,
    slots_for_instance,
)
from layerfed.simulation.tiny import build_tiny_model

DEFAULT = Path(__file__).resolve().parents[1] / "examples" / "policies" / "default.yaml"
IDS = torch.tensor([[1, 36, 37, 19, 26, 6, 41, 3, 111]])


def _data() -> dict[str, Any]:
    return copy.deepcopy(yaml.safe_load(DEFAULT.read_text(encoding="utf-8")))


def _policy(data: dict[str, Any] | None = None) -> Policy:
    return Policy.model_validate(_data() if data is None else data)


def _fill(stack: LayerStack, slot: SlotId, seed: int, scale: float = 0.1) -> None:
    rng = np.random.default_rng(seed)
    arrays = {k: rng.normal(0, scale, v.shape) for k, v in stack.get_arrays(slot).items()}
    stack.set_arrays(slot, {k: v.astype(np.float32) for k, v in arrays.items()})


def _instance_stack() -> tuple[LayerStack, list[SlotId]]:
    policy = _policy()
    stack = LayerStack(policy, build_tiny_model(0))
    slots = slots_for_instance(policy, "i7", "eu", ["g1", "g2"])
    stack.activate(slots)
    for i, slot in enumerate(slots):
        _fill(stack, slot, seed=i)
    return stack, slots


def test_slots_for_instance_order() -> None:
    """An instance composes creator, its jurisdiction, community, its groups, its own slot."""
    got = slots_for_instance(_policy(), "i7", "eu", ["g1", "g2", "g1"])
    assert [str(s) for s in got] == [
        "creator/global",
        "government/eu",
        "community/global",
        "in_group/g1",
        "in_group/g2",
        "individual/i7",
    ]


def test_slot_id_parse_and_validation() -> None:
    """SlotId round-trips through 'layer/key' and refuses keys with '/' or bad layers."""
    assert SlotId.parse("in_group/g-1.x") == SlotId("in_group", "g-1.x")
    assert {SlotId("a", "b"), SlotId("a", "b")} == {SlotId("a", "b")}
    with pytest.raises(SlotError, match="expected letters"):
        SlotId("individual", "a/b")
    with pytest.raises(SlotError, match="expected a layer name"):
        SlotId("Bad", "x")


def test_targets_follow_scope() -> None:
    """A layer's LoRA targets are exactly the Linear/Conv1D modules whose weight is in scope."""
    policy, model = _policy(), build_tiny_model(0)
    for layer in policy.layers:
        spec = slot_spec(policy, model, SlotId(layer.name, "k"))
        want = {
            n.removesuffix(".weight")
            for n in base_parameters(model)
            if in_scope(n, layer.scope.include, layer.scope.exclude)
        }
        assert {t.module for t in spec.targets} == want


def test_slot_shapes_match_stack_arrays() -> None:
    """slot_shapes (server side) names exactly the arrays the stack produces."""
    policy = _policy()
    stack = LayerStack(policy, build_tiny_model(0))
    slot = SlotId("individual", "i7")
    stack.activate([slot])
    shapes = slot_shapes(policy, build_tiny_model(0), slot)
    assert shapes == {k: v.shape for k, v in stack.get_arrays(slot).items()}
    assert set(shapes) == {
        f"individual/i7/{memory}/transformer.h.{block}.mlp.c_proj.lora_B"
        for memory in ("stm", "ltm")
        for block in (0, 1)
    }


def test_composition_equals_base_plus_deltas() -> None:
    """The composed model's logits equal a plain model with W0 + sum of slot deltas."""
    stack, slots = _instance_stack()
    dense = build_tiny_model(0)
    weights = base_parameters(dense)
    with torch.no_grad():
        for slot in slots:
            for name, d in stack.delta(slot).items():
                weights[name].add_(d)
    with torch.no_grad():
        got = stack.model(input_ids=IDS).logits
        want = dense(input_ids=IDS).logits
        base = build_tiny_model(0)(input_ids=IDS).logits
    assert not torch.allclose(got, base, atol=1e-3)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_peft_delta_matches_numpy_spec() -> None:
    """PEFT's delta of a slot equals the pure-numpy dense delta the server computes."""
    stack, slots = _instance_stack()
    for slot in slots:
        want = stack.spec(slot).dense_delta(stack.get_arrays(slot))
        got = stack.delta(slot)
        assert set(got) == set(want)
        for name, value in want.items():
            np.testing.assert_allclose(got[name].numpy(), value, atol=1e-6)


def test_a_frozen_from_seed() -> None:
    """A matrices come from the recorded seed: same root seed, same A; other slot, other A."""
    policy = _policy()
    slot, other = SlotId("government", "eu"), SlotId("government", "us")
    s1 = slot_spec(policy, build_tiny_model(0), slot, root_seed=3)
    s2 = slot_spec(policy, build_tiny_model(0), slot, root_seed=3)
    s3 = slot_spec(policy, build_tiny_model(0), other, root_seed=3)
    assert s1.a_seed == s2.a_seed != s3.a_seed
    a1, a3 = s1.a_matrices(), s3.a_matrices()
    for module, a in s2.a_matrices().items():
        np.testing.assert_array_equal(a1[module], a)
        assert not np.array_equal(a3[module], a)
    stack = LayerStack(policy, build_tiny_model(0), root_seed=3)
    stack.activate([slot])
    assert stack.a_seed(slot) == s1.a_seed
    for module, layer in stack.model.base_model.model.named_modules():  # type: ignore[union-attr]
        if hasattr(layer, "lora_A") and "government__eu__main" in layer.lora_A:
            np.testing.assert_array_equal(
                layer.lora_A["government__eu__main"].weight.detach().numpy(), a1[module]
            )


def test_training_one_slot_changes_no_other() -> None:
    """A gradient step on the trainable slot leaves every other slot and the base bit-identical."""
    stack, slots = _instance_stack()
    target = SlotId("individual", "i7")
    before = {s: stack.get_arrays(s) for s in slots}
    base_before = {n: t.detach().clone() for n, t in base_parameters(stack.model).items()}
    stack.set_trainable(target)
    assert len(stack.trainable_parameters()) == 4  # two modules, two memories
    groups = [{"params": p, "lr": 0.1 * m} for p, m in stack.memory_lrs(target)]
    opt = torch.optim.SGD(groups)
    loss = stack.model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    opt.step()
    for slot in slots:
        after = stack.get_arrays(slot)
        same = all(np.array_equal(after[k], v) for k, v in before[slot].items())
        assert same == (slot != target), slot
    for name, tensor in base_parameters(stack.model).items():
        assert torch.equal(tensor, base_before[name]), name


def test_set_trainable_one_memory() -> None:
    """set_trainable with a memory makes only that memory's B trainable."""
    stack, _ = _instance_stack()
    slot = SlotId("individual", "i7")
    stack.set_trainable(slot, "ltm")
    ltm_params = stack.memory_lrs(slot)[1][0]  # memories in policy order: stm, ltm
    assert stack.trainable_parameters() == ltm_params
    with pytest.raises(SlotError, match="expected a memory"):
        stack.set_trainable(slot, "mid")


def test_set_trainable_requires_active_slot() -> None:
    """Only an active slot can be trainable; activating resets trainability."""
    stack, _ = _instance_stack()
    stack.activate([SlotId("creator", "global")])
    assert stack.trainable_parameters() == []
    with pytest.raises(SlotError, match="expected an active slot"):
        stack.set_trainable(SlotId("individual", "i7"))


def test_set_arrays_checks_before_touching() -> None:
    """Bad arrays raise a typed error naming the array and change nothing."""
    stack, _ = _instance_stack()
    slot = SlotId("government", "eu")
    good = stack.get_arrays(slot)
    name = next(iter(good))
    with pytest.raises(ArrayError, match="expected shape"):
        stack.set_arrays(slot, {**good, name: np.zeros((3, 3), np.float32)})
    with pytest.raises(ArrayError, match="expected finite"):
        stack.set_arrays(slot, {**good, name: np.full_like(good[name], np.nan)})
    bad = "government/eu/main/transformer.h.0.attn.c_attn.lora_B"
    with pytest.raises(ScopeError, match=r"c_attn\.weight"):
        stack.set_arrays(slot, {**good, bad: np.zeros((192, 4), np.float32)})
    with pytest.raises(RedLineViolation, match=r"lm_head\.weight"):
        stack.set_arrays(slot, {**good, "government/eu/main/lm_head.lora_B": np.zeros(1)})
    after = stack.get_arrays(slot)
    assert all(np.array_equal(after[k], v) for k, v in good.items())


def test_evict_frees_and_restores() -> None:
    """An evicted slot leaves the model; re-activating starts at zero and set_arrays restores it."""
    stack, slots = _instance_stack()
    gone = SlotId("in_group", "g2")
    keep = [s for s in slots if s != gone]
    with pytest.raises(SlotError, match="inactive"):
        stack.evict(gone)
    stack.activate(keep)
    saved = stack.evict(gone)
    assert gone not in stack.slots
    assert not any("g2" in n for n, _ in stack.model.named_parameters())
    stack.activate(slots)
    assert all(not v.any() for v in stack.get_arrays(gone).values())
    stack.set_arrays(gone, saved)
    assert all(np.array_equal(stack.get_arrays(gone)[k], v) for k, v in saved.items())


def test_scope_errors() -> None:
    """A scope naming a red-line weight or no targetable weight is refused at spec time."""
    data = _data()
    data["layers"][1]["scope"]["include"] = ["lm_head.weight"]
    with pytest.raises(RedLineViolation, match=r"lm_head\.weight"):
        slot_spec(_policy(data), build_tiny_model(0), SlotId("government", "eu"))
    data["layers"][1]["scope"]["include"] = ["transformer.h.*.ln_1.bias"]
    data["red_lines"]["parameters"] = []
    with pytest.raises(ScopeError, match="government"):
        slot_spec(_policy(data), build_tiny_model(0), SlotId("government", "eu"))
    with pytest.raises(SlotError, match="expected a layer in"):
        slot_spec(_policy(), build_tiny_model(0), SlotId("nobody", "x"))


def test_keys_with_dots_get_distinct_adapters() -> None:
    """Keys PEFT cannot name (dots, '@') get sanitised, distinct adapter names and work."""
    stack = LayerStack(_policy(), build_tiny_model(0))
    a, b = SlotId("individual", "user@x.y"), SlotId("individual", "user_x_y")
    stack.activate([a, b])
    _fill(stack, a, seed=1)
    assert adapter_name(a, "stm") != adapter_name(b, "stm")
    assert "." not in adapter_name(a, "stm")
    assert all(not v.any() for v in stack.get_arrays(b).values())
    assert any(v.any() for v in stack.get_arrays(a).values())


def test_recycled_adapters_serve_new_slots_exactly() -> None:
    """A slot created on recycled adapters behaves exactly like one on fresh adapters."""
    import numpy as np
    from policy_helpers import EXAMPLES

    from layerfed.governance.loader import load_policy
    from layerfed.layers.slots import SlotId
    from layerfed.layers.stack import LayerStack
    from layerfed.simulation.tiny import build_tiny_model

    policy = load_policy(EXAMPLES / "default.yaml")
    creator = SlotId("creator", "global")
    a, b, c = (SlotId("individual", k) for k in ("i1", "i2", "i3"))
    pooled = LayerStack(policy, build_tiny_model(0))
    fresh = LayerStack(policy, build_tiny_model(0))
    pooled.activate([creator, a])
    arrays = {n: np.full(s, 0.01, np.float32) for n, s in pooled.spec(a).shapes().items()}
    pooled.set_arrays(a, arrays)
    pooled.activate([creator])
    pooled.evict(a, recycle=True)
    for stack in (pooled, fresh):
        stack.activate([creator, b])
        stack.set_arrays(b, {k.replace("/i1/", "/i2/"): v for k, v in arrays.items()})
    for name, tensor in fresh.effective_parameters().items():
        assert np.array_equal(tensor.numpy(), pooled.effective_parameters()[name].numpy()), name
    pooled.activate([creator])
    pooled.evict(b, recycle=True)
    pooled.activate([creator, b, a])  # a's own name may host another slot: no collision
    pooled.activate([creator, c])
    assert set(pooled.slots) == {creator, a, b, c}
