"""The training reference's memo: exact (the same deltas and losses) and actually used."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from policy_helpers import default_data

from layerfed.clients import local_train
from layerfed.clients.local_train import FrozenView, MemoisedReference, train_on_events
from layerfed.governance.schema import Policy
from layerfed.layers import LayerStack, SlotId, slots_for_instance
from layerfed.simulation.feedback import feedback_events
from layerfed.simulation.tiny import build_tiny_model, build_tiny_tokenizer
from layerfed.simulation.world import situations_for

OWN = SlotId("individual", "i7")


def FROZEN_REFERENCE(model: torch.nn.Module) -> MemoisedReference:  # noqa: N802
    """The reference memoised per input batch (training now keeps rows: test_local_train_reference)."""
    return MemoisedReference(FrozenView(model))


KINDS = ("marks", "redo", "alternative", "preference", "contrast", "thumbs")
ONE_AT_A_TIME = {"marks", "redo", "alternative", "contrast"}
"""Kinds scored one event per forward pass (thumbs and preferences go in batches whose
make-up changes from step to step, so their reference inputs rarely repeat)."""


def _stack() -> LayerStack:
    policy = Policy.model_validate(default_data())
    stack = LayerStack(policy, build_tiny_model(0), build_tiny_tokenizer())
    slots = slots_for_instance(policy, OWN.key, "eu", ["g1"])
    stack.activate(slots)
    for i, slot in enumerate(slots):
        rng = np.random.default_rng([5, i])
        arrays = stack.get_arrays(slot)
        stack.set_arrays(
            slot, {k: rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in arrays.items()}
        )
    return stack


def _events(kind: str) -> list[Any]:
    tok = build_tiny_tokenizer()
    rng = np.random.default_rng(11)
    situations = situations_for("rater", None, 6, rng)
    tok_any: Any = tok
    return feedback_events(kind, situations, rng, lambda w: int(tok_any.convert_tokens_to_ids(w)))


def _train(kind: str, memo: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[int]]:
    hits: list[int] = []
    made = FROZEN_REFERENCE

    def reference(model: torch.nn.Module) -> torch.nn.Module:
        ref = made(model)
        if not memo:
            return ref.ref  # the bare frozen copy: every call runs the model
        hits.append(0)
        original = ref.forward

        def counted(**kwargs: Any) -> Any:
            out = original(**kwargs)
            hits[-1] = ref.hits
            return out

        ref.forward = counted  # type: ignore[method-assign]
        return ref

    monkeypatch.setattr(local_train, "frozen_reference", reference)
    stack = _stack()
    layer = stack.policy.layer("individual").model_copy(
        update={"local": stack.policy.layer("individual").local.model_copy(update={"steps": 6})}
    )
    result = train_on_events(stack, OWN, layer, build_tiny_tokenizer(), _events(kind), seed=4)
    return result, hits


@pytest.mark.parametrize("kind", KINDS)
def test_memoised_reference_trains_exactly_as_the_bare_one(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the memo, every feedback kind's delta and losses are bit-for-bit those without it,
    and an event scored alone on several local steps reuses the reference's first answer."""
    with_memo, hits = _train(kind, True, monkeypatch)
    without, _ = _train(kind, False, monkeypatch)
    assert with_memo.delta.keys() == without.delta.keys()
    for k in with_memo.delta:
        assert np.array_equal(with_memo.delta[k], without.delta[k]), k
    assert with_memo.losses == without.losses
    assert with_memo.norm > 0
    if kind in ONE_AT_A_TIME:
        assert sum(hits) > 0, "no reference call was answered from the memo"


def test_memo_keys_on_the_whole_input_and_drops_the_oldest() -> None:
    """Different ids or masks are different entries; the memo never grows past its bound,
    and calls with gradients on always run the model."""
    model = build_tiny_model(0)
    frozen: Any = copy.deepcopy(model)
    ref = MemoisedReference(frozen.eval(), max_entries=2)
    ids = torch.tensor([[1, 5, 6, 7]])
    ones = torch.ones_like(ids)
    masked = torch.tensor([[1, 1, 1, 0]])
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=ones).logits
        b = ref(input_ids=ids, attention_mask=masked).logits
        again = ref(input_ids=ids, attention_mask=ones).logits
        ref(input_ids=ids + 1, attention_mask=ones)
        direct = model(input_ids=ids, attention_mask=ones).logits
    assert again is a and ref.hits == 1
    assert not torch.equal(a[0, 3], b[0, 3])  # the mask changes what the last position sees
    assert torch.equal(a, direct)
    assert len(ref._memo) == 2
    with torch.enable_grad():
        out = ref(input_ids=ids, attention_mask=ones)
    assert ref.hits == 1 and torch.equal(out.logits, a)
