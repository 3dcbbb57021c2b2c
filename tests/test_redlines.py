"""Red lines: digests, checks on every commit, and the scope/red-line invariant under updates."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from layerfed.governance.patterns import in_scope, matches_any
from layerfed.governance.schema import Policy
from layerfed.layers import (
    LayerError,
    LayerStack,
    RedLineViolation,
    SlotId,
    SlotStore,
    apply_update,
    base_parameters,
    redline_digest,
    slots_for_instance,
    verify_redlines,
)
from layerfed.simulation.tiny import build_tiny_model

DEFAULT = Path(__file__).resolve().parents[1] / "examples" / "policies" / "default.yaml"
POLICY = Policy.model_validate(yaml.safe_load(DEFAULT.read_text(encoding="utf-8")))
PATTERNS = POLICY.red_lines.parameters
IDS = torch.tensor([[1, 36, 37, 19, 26, 6, 41, 3, 111]])
LOWER = ["government", "community", "in_group", "individual"]
KEYS = {"government": ["eu", "us"], "community": ["global"], "in_group": ["g1", "g2"]}


def test_digest_covers_protected_parameters() -> None:
    """The digest is stable, and changes when any red-line parameter (tied ones too) changes."""
    model = build_tiny_model(0)
    digest = redline_digest(model, PATTERNS)
    assert digest == redline_digest(build_tiny_model(0), PATTERNS)
    assert digest != redline_digest(build_tiny_model(1), PATTERNS)
    with torch.no_grad():
        base_parameters(model)["transformer.h.1.ln_2.bias"][3] += 1e-6
    with pytest.raises(RedLineViolation, match="expected digest"):
        verify_redlines(model, PATTERNS, digest)
    model = build_tiny_model(0)
    with torch.no_grad():
        base_parameters(model)["transformer.h.0.mlp.c_fc.weight"][0, 0] += 1.0  # not a red line
    verify_redlines(model, PATTERNS, digest)


def test_digest_checked_on_load() -> None:
    """A stack built with a recorded digest refuses a base whose red lines differ."""
    recorded = redline_digest(build_tiny_model(0), PATTERNS)
    LayerStack(POLICY, build_tiny_model(0), expected_redline_digest=recorded)
    with pytest.raises(RedLineViolation):
        LayerStack(POLICY, build_tiny_model(1), expected_redline_digest=recorded)


def test_digest_recorded_in_store(tmp_path: Path) -> None:
    """The store records the red-line digest; a stack loaded against it checks the base."""
    store = SlotStore(tmp_path)
    assert store.redline_digest() is None
    store.record_redlines(LayerStack(POLICY, build_tiny_model(0)).redline_digest)
    recorded = SlotStore(tmp_path).redline_digest()
    assert recorded is not None
    LayerStack(POLICY, build_tiny_model(0), expected_redline_digest=recorded)
    with pytest.raises(RedLineViolation, match="expected digest"):
        LayerStack(POLICY, build_tiny_model(2), expected_redline_digest=recorded)


def test_digest_checked_after_every_commit() -> None:
    """A commit after a red-line parameter was tampered with raises RedLineViolation."""
    stack = LayerStack(POLICY, build_tiny_model(0))
    slot = SlotId("community", "global")
    stack.activate([slot])
    stack.set_arrays(slot, stack.get_arrays(slot))
    with torch.no_grad():
        base_parameters(stack.model)["transformer.wpe.weight"][0, 0] += 1.0
    with pytest.raises(RedLineViolation):
        stack.set_arrays(slot, stack.get_arrays(slot))
    with pytest.raises(RedLineViolation):
        stack.decay(slot, rounds=1)


@cache
def _stack() -> tuple[LayerStack, dict[str, torch.Tensor]]:
    stack = LayerStack(POLICY, build_tiny_model(0))
    base = {n: t.detach().clone() for n, t in base_parameters(stack.model).items()}
    return stack, base


def _lower_scope(name: str) -> bool:
    return any(
        in_scope(name, POLICY.layer(n).scope.include, POLICY.layer(n).scope.exclude) for n in LOWER
    )


slot_st = st.sampled_from(LOWER).flatmap(
    lambda layer: st.sampled_from(KEYS.get(layer, ["i1", "i2"])).map(lambda k: SlotId(layer, k))
)
module_st = st.sampled_from(
    [
        f"transformer.h.{i}.{m}"
        for i in (0, 1)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    + ["lm_head"]
)
op_st = st.one_of(
    st.tuples(st.just("update"), slot_st, st.floats(0, 10), st.integers(0, 2**31)),
    st.tuples(st.just("train"), slot_st, st.floats(0.01, 5), st.integers(0, 2**31)),
    st.tuples(st.just("decay"), slot_st, st.floats(0, 100), st.integers(0, 1)),
    st.tuples(st.just("stray"), slot_st, module_st, st.integers(0, 2**31)),
)


def _apply(stack: LayerStack, op: tuple[str, SlotId, float | str, int]) -> None:
    kind, slot, arg, seed = op
    number = arg if isinstance(arg, float) else 0.0
    jur = slot.key if slot.layer == "government" else "eu"
    groups = [slot.key] if slot.layer == "in_group" else ["g1"]
    inst = slot.key if slot.layer == "individual" else "i1"
    stack.activate(slots_for_instance(POLICY, inst, jur, groups))
    rng = np.random.default_rng(seed)
    if kind == "update":
        cur = stack.get_arrays(slot)
        delta = {k: rng.normal(0, 1, v.shape).astype(np.float32) for k, v in cur.items()}
        stack.set_arrays(slot, apply_update(cur, delta, number, policy=POLICY))
    elif kind == "train":
        stack.set_trainable(slot)
        groups_ = [{"params": p, "lr": number * m} for p, m in stack.memory_lrs(slot)]
        opt = torch.optim.SGD(groups_)
        stack.model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    elif kind == "decay":
        stack.decay(slot, rounds=number, seconds=float(seed * 3600))
    else:
        name = f"{slot}/{POLICY.layer(slot.layer).memories[0].name}/{arg}.lora_B"
        stray = {name: rng.normal(0, 1, (8, 2)).astype(np.float32)}
        if f"{arg}.weight" not in _slot_params(stack, slot):
            with pytest.raises(LayerError, match=str(arg).replace(".", r"\.")):
                apply_update(stack.get_arrays(slot), stray, 1.0, policy=POLICY)


def _slot_params(stack: LayerStack, slot: SlotId) -> set[str]:
    return {f"{t.module}.weight" for t in stack.spec(slot).targets}


@settings(max_examples=25, deadline=None)
@given(st.lists(op_st, min_size=1, max_size=6))
def test_lower_layer_updates_keep_out_of_scope_and_red_lines(
    ops: list[tuple[str, SlotId, float | str, int]],
) -> None:
    """Any sequence of non-creator updates leaves out-of-scope and red-line weights bit-identical."""
    stack, base = _stack()
    for op in ops:
        _apply(stack, op)
        effective = stack.effective_parameters()
        for name, tensor in base_parameters(stack.model).items():
            assert torch.equal(tensor, base[name]), name  # the frozen base never moves
        for slot in stack.active:
            for name in stack.delta(slot):
                assert in_scope(name, *_scope(slot)) and not matches_any(name, PATTERNS), name
        for name, value in effective.items():
            if matches_any(name, PATTERNS) or not _lower_scope(name):
                assert torch.equal(value, base[name]), name
        stack.verify_redlines()


def _scope(slot: SlotId) -> tuple[list[str], list[str]]:
    scope = POLICY.layer(slot.layer).scope
    return scope.include, scope.exclude
