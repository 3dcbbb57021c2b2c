"""Memories: per-memory learning rates, half-life decay and the server's update step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from layerfed.federation.server_state import ServerState
from layerfed.governance.schema import Memory, Policy
from layerfed.layers import (
    ArrayError,
    DecayError,
    LayerStack,
    RedLineViolation,
    ScopeError,
    SlotId,
    SlotSpec,
    Target,
    apply_update,
    decay_arrays,
    decay_factor,
)
from layerfed.layers.memory import seconds_between
from layerfed.simulation.tiny import build_tiny_model

DEFAULT = Path(__file__).resolve().parents[1] / "examples" / "policies" / "default.yaml"
POLICY = Policy.model_validate(yaml.safe_load(DEFAULT.read_text(encoding="utf-8")))
INDIVIDUAL = POLICY.layer("individual")
STM = "individual/i7/stm/transformer.h.1.mlp.c_proj.lora_B"
LTM = "individual/i7/ltm/transformer.h.1.mlp.c_proj.lora_B"
IDS = torch.tensor([[1, 36, 37, 19, 26, 6, 41, 3, 111]])

finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
b_arrays = arrays(np.float32, (4, 2), elements=finite32)


def test_half_life_in_rounds() -> None:
    """A round half-life halves per half-life and compounds."""
    stm = Memory(name="stm", half_life=3)
    assert decay_factor(stm, rounds=3) == 0.5
    assert decay_factor(stm, rounds=6) == 0.25
    assert decay_factor(stm, rounds=0) == 1.0
    assert decay_factor(stm, seconds=1e9) == 1.0  # rounds half-life ignores wall time


def test_half_life_in_time() -> None:
    """A duration half-life decays by elapsed seconds, not rounds."""
    mem = Memory(name="ltm", half_life="6h")
    assert decay_factor(mem, seconds=6 * 3600) == pytest.approx(0.5, rel=1e-15)
    assert decay_factor(mem, seconds=3 * 3600) == pytest.approx(2**-0.5, rel=1e-15)
    assert decay_factor(mem, rounds=1000) == 1.0


def test_no_half_life_never_decays() -> None:
    """A memory without a half-life keeps its weights."""
    assert decay_factor(Memory(name="main"), rounds=1e6, seconds=1e9) == 1.0


def test_negative_elapsed_refused() -> None:
    """Negative or non-finite elapsed time raises DecayError naming it."""
    with pytest.raises(DecayError, match="rounds"):
        decay_factor(Memory(name="stm", half_life=3), rounds=-1)
    with pytest.raises(DecayError, match="seconds"):
        decay_factor(Memory(name="stm", half_life=3), seconds=float("nan"))


def test_decay_arrays_per_memory() -> None:
    """decay_arrays applies each memory's own half-life and leaves the input untouched."""
    src = {STM: np.ones((64, 2), np.float32), LTM: np.ones((64, 2), np.float32)}
    out = decay_arrays(src, INDIVIDUAL, rounds=3)
    assert np.all(out[STM] == 0.5)
    np.testing.assert_allclose(out[LTM], 2 ** (-3 / 300), rtol=1e-7)
    assert np.all(src[STM] == 1.0)
    with pytest.raises(ArrayError, match="expected memory in"):
        decay_arrays({"community/global/main/x.lora_B": np.ones(2)}, INDIVIDUAL, rounds=1)


@settings(max_examples=60, deadline=None)
@given(b_arrays, st.lists(st.floats(0, 1e4), min_size=1, max_size=8))
def test_decay_never_overshoots(b: np.ndarray, steps: list[float]) -> None:
    """Each decay shrinks every entry's magnitude without crossing zero or changing sign."""
    current = {STM: b, LTM: b.copy()}
    for rounds in steps:
        nxt = decay_arrays(current, INDIVIDUAL, rounds=rounds)
        for name, value in nxt.items():
            prev = current[name]
            assert value.dtype == np.float32
            assert np.all(np.abs(value) <= np.abs(prev))
            assert np.all((value == 0) | (np.sign(value) == np.sign(prev)))
        current = nxt


@settings(max_examples=40, deadline=None)
@given(b_arrays)
def test_decay_tends_to_zero(b: np.ndarray) -> None:
    """Long enough decay reaches exactly zero, for round and time half-lives alike."""
    out = decay_arrays({STM: b}, INDIVIDUAL, rounds=1e5)
    assert not out[STM].any()
    timed = INDIVIDUAL.model_copy(update={"memories": [Memory(name="stm", half_life="1h")]})
    assert not decay_arrays({STM: b}, timed, seconds=1e8)[STM].any()
    assert np.array_equal(decay_arrays({STM: b}, timed, rounds=1e5)[STM], b)


@settings(max_examples=40, deadline=None)
@given(st.floats(0, 50), st.floats(0, 50))
def test_decay_composes(a: float, b: float) -> None:
    """Decaying by a then b equals decaying by a + b (within float rounding)."""
    mem = Memory(name="stm", half_life=3)
    both = decay_factor(mem, rounds=a) * decay_factor(mem, rounds=b)
    assert both == pytest.approx(decay_factor(mem, rounds=a + b), rel=1e-12)


def test_stack_decay_per_memory() -> None:
    """LayerStack.decay halves stm after its half-life while ltm barely moves."""
    stack = LayerStack(POLICY, build_tiny_model(0))
    slot = SlotId("individual", "i7")
    stack.activate([slot])
    ones = {k: np.ones_like(v) for k, v in stack.get_arrays(slot).items()}
    stack.set_arrays(slot, ones)
    stack.decay(slot, rounds=3)
    got = stack.get_arrays(slot)
    assert np.all(got[STM] == 0.5)
    np.testing.assert_allclose(got[LTM], 2 ** (-3 / 300), rtol=1e-7)


def test_one_step_uses_each_memory_rate() -> None:
    """One SGD step moves each memory by the same gradient times its own rate multiplier."""
    stack = LayerStack(POLICY, build_tiny_model(0))
    slot = SlotId("individual", "i7")
    stack.activate([SlotId("creator", "global"), slot])
    stack.set_trainable(slot)
    lr = 0.5
    groups = [{"params": p, "lr": lr * m} for p, m in stack.memory_lrs(slot)]
    opt = torch.optim.SGD(groups)
    stack.model(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    got = stack.get_arrays(slot)
    assert np.abs(got[STM]).max() > 0
    np.testing.assert_allclose(got[STM] * 0.05, got[LTM], rtol=1e-5, atol=1e-9)


def test_apply_update_is_pure() -> None:
    """apply_update returns current + lr * delta for the named arrays, inputs untouched."""
    current = {STM: np.ones((64, 2), np.float32), LTM: np.zeros((64, 2), np.float32)}
    delta = {STM: np.full((64, 2), 2.0, np.float32)}
    out = apply_update(current, delta, 0.25, policy=POLICY)
    assert np.all(out[STM] == 1.5) and np.all(out[LTM] == 0)
    assert np.all(current[STM] == 1) and out[LTM] is not current[LTM]


def test_apply_update_refuses_bad_arrays() -> None:
    """Unknown, mis-shaped, out-of-scope or red-line arrays raise typed errors naming them."""
    current = {STM: np.ones((64, 2), np.float32)}
    with pytest.raises(ArrayError, match="unknown name"):
        apply_update(current, {LTM: np.ones((64, 2))}, 1.0)
    with pytest.raises(ArrayError, match="expected shape"):
        apply_update(current, {STM: np.ones((2, 64))}, 1.0)
    scope = "individual/i7/stm/transformer.h.0.mlp.c_fc.lora_B"
    with pytest.raises(ScopeError, match=r"h\.0\.mlp\.c_fc"):
        apply_update(current, {scope: np.ones((64, 2))}, 1.0, policy=POLICY)
    with pytest.raises(RedLineViolation, match="lm_head"):
        apply_update(current, {"individual/i7/stm/lm_head.lora_B": np.ones(1)}, 1.0, policy=POLICY)
    with pytest.raises(ArrayError, match="server_lr"):
        apply_update(current, {}, float("nan"))


def _timed_policy() -> Policy:
    """The default policy with the individual stm half-life as a duration ('1h')."""
    data = yaml.safe_load(DEFAULT.read_text(encoding="utf-8"))
    individual = next(la for la in data["layers"] if la["name"] == "individual")
    individual["memories"] = [
        {"name": "stm", "lr_multiplier": 1.0, "half_life": "1h"},
        {"name": "ltm", "lr_multiplier": 0.1, "half_life": 300},
    ]
    return Policy.model_validate(data)


class _Clock:
    """An injectable wall clock (POSIX seconds) that tests move by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _slot_spec() -> SlotSpec:
    target = Target("transformer.h.1.mlp.c_proj", 256, 64, True)
    return SlotSpec(SlotId("individual", "i7"), 1, 2, 4.0, ("stm", "ltm"), (target,))


def test_server_decays_duration_half_life_by_wall_clock(tmp_path: Path) -> None:
    """The server decays a duration half-life by clock seconds since the commit, rounds by rounds."""
    clock = _Clock(1_000_000.0)
    policy = _timed_policy()
    spec = _slot_spec()
    state = ServerState(tmp_path, policy, "run", clock=clock)
    ones = {n: np.ones(s, np.float32) for n, s in spec.shapes().items()}
    state.commit(spec.slot, ones, spec, 1)
    stm, ltm = (spec.array_name(m, "transformer.h.1.mlp.c_proj") for m in ("stm", "ltm"))
    assert np.all(state.current(spec.slot, spec, 1)[stm] == 1.0)  # no time, no rounds
    clock.now += 3600.0
    now = state.current(spec.slot, spec, 1)
    assert np.all(now[stm] == 0.5) and np.all(now[ltm] == 1.0)
    later = state.current(spec.slot, spec, 301)
    assert np.all(later[stm] == 0.5) and np.all(later[ltm] == 0.5)
    state.checkpoint(1, "", {"round": 1})
    resumed = ServerState(tmp_path, policy, "run", clock=clock)
    assert resumed.load()
    clock.now += 3600.0
    assert np.all(resumed.current(spec.slot, spec, 1)[stm] == 0.25)
    clock.now -= 10 * 3600.0  # a clock that went backwards never grows a memory
    assert np.all(resumed.current(spec.slot, spec, 1)[stm] == 1.0)
    resumed.committed[str(spec.slot)].pop("time")  # a checkpoint from before times were kept
    assert np.all(resumed.current(spec.slot, spec, 1)[stm] == 1.0)


def test_seconds_between() -> None:
    """Elapsed seconds are end - start, 0 for no start or a clock gone back, finite only."""
    assert seconds_between(10.0, 70.0) == 60.0
    assert seconds_between(None, 70.0) == 0.0
    assert seconds_between(70.0, 10.0) == 0.0
    with pytest.raises(DecayError, match="finite"):
        seconds_between(float("nan"), 1.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_refused_before_any_change(bad: float) -> None:
    """NaN or inf in an update, the current slot or a decay raises ArrayError, inputs untouched."""
    current = {STM: np.ones((64, 2), np.float32), LTM: np.ones((64, 2), np.float32)}
    delta = {STM: np.full((64, 2), 0.5, np.float32)}
    delta[STM][3, 1] = bad
    with pytest.raises(ArrayError, match=r"expected finite values, got NaN or inf"):
        apply_update(current, delta, 0.5, policy=POLICY)
    assert np.all(current[STM] == 1.0) and np.all(current[LTM] == 1.0)
    poisoned = {STM: current[STM].copy(), LTM: current[LTM]}
    poisoned[STM][0, 0] = bad
    with pytest.raises(ArrayError, match="current array"):
        apply_update(poisoned, {STM: np.ones((64, 2), np.float32)}, 0.5)
    with pytest.raises(ArrayError, match="decay"):
        decay_arrays(poisoned, INDIVIDUAL, rounds=1)
    assert poisoned[LTM] is current[LTM] and np.all(current[LTM] == 1.0)
