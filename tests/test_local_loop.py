"""One local optimiser loop for every feedback kind: a function of its seed, RNG kept apart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from layerfed.clients.events import Demonstration, FeedbackEvent, InvalidFeedback, Thumbs
from layerfed.clients.instance import Instance
from layerfed.clients.local_train import PREFERENCE_SEEDING, train_on_events
from layerfed.clients.supervised import SUPERVISED_SEEDING
from layerfed.governance.schema import Policy
from layerfed.layers.slots import policy_layer

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("cake", "bread", "bomb", "here", "sure", "no", "tea", "soup", "milk", "rice")


def _instance() -> Instance:
    data = yaml.safe_load((ROOT / "examples/policies/default.yaml").read_text(encoding="utf-8"))
    data["superego"] = {**data["superego"], "enabled": False}
    return Instance(Policy.model_validate(data), instance_id="inst-1", jurisdiction="eu")


def _events(kind: str) -> list[FeedbackEvent]:
    if kind == "demonstration":
        return [Demonstration(prompt=f"please tell {w}", response=f"sure here {w}") for w in WORDS]
    return [Thumbs(prompt="please tell cake", response=f"sure here {w}", up=True) for w in WORDS]


@pytest.mark.parametrize("kind", ["thumbs", "demonstration"])
def test_each_kind_is_a_function_of_its_seed_and_leaves_the_callers_rng_alone(kind: str) -> None:
    """The same seed gives the same delta bit for bit, another seed another one, the stack
    is restored, dropout ends off, and torch's global RNG is as it was."""
    inst = _instance()
    slot = inst.slot_for()
    layer = policy_layer(inst.policy, slot)
    events = _events(kind)
    before = inst.stack.get_arrays(slot)
    torch.manual_seed(11)
    state = torch.random.get_rng_state()
    runs = [
        train_on_events(inst.stack, slot, layer, inst.tokenizer, events, seed=s, steps=3)
        for s in (5, 5, 6)
    ]
    assert torch.equal(torch.random.get_rng_state(), state)
    dropouts = [m for m in inst.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and not any(m.training for m in dropouts)
    assert all(np.array_equal(inst.stack.get_arrays(slot)[k], before[k]) for k in before)
    same, other = runs[1].delta, runs[2].delta
    assert all(np.array_equal(runs[0].delta[k], same[k]) for k in same)
    assert any(not np.array_equal(same[k], other[k]) for k in same)
    assert len(runs[0].losses) == 3


def test_the_kinds_keep_their_own_minibatch_salt_and_dropout() -> None:
    """Demonstrations draw minibatches from default_rng(seed) with dropout on; feedback
    events from default_rng([seed, 0x7A]) with dropout off (the gym's numbers rest on it)."""
    assert (SUPERVISED_SEEDING.salt, SUPERVISED_SEEDING.dropout) == ((), True)
    assert (PREFERENCE_SEEDING.salt, PREFERENCE_SEEDING.dropout) == ((0x7A,), False)


def test_a_batch_mixing_demonstrations_with_other_kinds_is_refused() -> None:
    """train_on_events names 'events' when demonstrations and other kinds share a batch."""
    inst = _instance()
    slot = inst.slot_for()
    mixed = [*_events("demonstration")[:2], *_events("thumbs")[:2]]
    with pytest.raises(InvalidFeedback, match="events"):
        train_on_events(
            inst.stack, slot, policy_layer(inst.policy, slot), inst.tokenizer, mixed, seed=1
        )
