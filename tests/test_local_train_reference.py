"""The losses' reference scored once per row per training call: same training within rounding."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_reference_memo import KINDS, OWN, _events, _stack

from layerfed.clients import local_train
from layerfed.clients.local_train import FrozenView, batch_loss, train_on_events
from layerfed.clients.reference_rows import RowReference, reference_rows
from layerfed.simulation.tiny import build_tiny_model, build_tiny_tokenizer

TOK = build_tiny_tokenizer()
LOSS_TOL = 1e-5
"""Loss and gradient of one minibatch: a row's logits batched vs alone differ by rounding."""
DELTA_TOL = 1e-4
"""A training call's delta after 6 Adam steps (absolute, on entries of about 1e-2)."""
EVENTS = {kind: _events(kind) for kind in KINDS}


class _Counted(torch.nn.Module):
    """A reference that counts how often each real input row goes through the model."""

    def __init__(self, ref: torch.nn.Module) -> None:
        super().__init__()
        self.ref = ref
        self.rows: Counter[tuple[int, ...]] = Counter()

    def forward(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        """Run ``ref``, counting each row's unmasked tokens."""
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            self.rows[tuple(i for i, m in zip(ids, mask, strict=True) if m)] += 1
        return self.ref(input_ids=input_ids, attention_mask=attention_mask)


def _layer(stack: Any, steps: int) -> Any:
    layer = stack.policy.layer("individual")
    return layer.model_copy(update={"local": layer.local.model_copy(update={"steps": steps})})


def _loss_and_grads(
    model: torch.nn.Module, ref: torch.nn.Module, events: list[Any], params: list[Any]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss = batch_loss(model, ref, TOK, events, 0.1)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), [
        torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)
    ]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=3, unique=True),
    picks=st.lists(st.integers(0, 1000), min_size=1, max_size=8),
)
def test_row_reference_losses_and_gradients_equal_the_bare_reference(
    kinds: list[str], picks: list[int]
) -> None:
    """For any minibatch of events of any kinds, the loss and its gradients against the rows
    kept by the primed reference equal those against the bare reference within LOSS_TOL."""
    pool = [e for kind in kinds for e in EVENTS[kind]]
    batch = [pool[i % len(pool)] for i in picks]
    stack = _stack()
    model = stack.model
    with stack.training(OWN):
        params = [p for p in model.parameters() if p.requires_grad]
        bare = FrozenView(model)
        rows = RowReference(FrozenView(model))
        rows.prime([r for e in pool for r in reference_rows(TOK, e)])
        old, old_grads = _loss_and_grads(model, bare, batch, params)
        new, new_grads = _loss_and_grads(model, rows, batch, params)
    assert abs(float(old) - float(new)) <= LOSS_TOL * max(1.0, abs(float(old)))
    for a, b in zip(old_grads, new_grads, strict=True):
        assert torch.allclose(a, b, atol=LOSS_TOL, rtol=LOSS_TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_training_on_the_row_reference_matches_the_bare_reference(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A training call's delta and losses with each row scored once equal the old path
    (a bare reference run on every minibatch) within DELTA_TOL and LOSS_TOL."""
    stack = _stack()
    new = train_on_events(stack, OWN, _layer(stack, 6), TOK, EVENTS[kind], seed=4)
    monkeypatch.setattr(local_train, "frozen_reference", FrozenView)
    stack = _stack()
    old = train_on_events(stack, OWN, _layer(stack, 6), TOK, EVENTS[kind], seed=4)
    assert new.delta.keys() == old.delta.keys() and new.norm > 0
    for k in new.delta:
        np.testing.assert_allclose(new.delta[k], old.delta[k], atol=DELTA_TOL, rtol=0)
    np.testing.assert_allclose(new.losses, old.losses, atol=LOSS_TOL, rtol=LOSS_TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_the_reference_runs_each_row_once_per_training_call(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over a whole training call (8 steps), every row the events need goes through the
    reference model exactly once, and no row (thumbs' KL pairs included) more than once."""
    made: list[_Counted] = []

    def counted(model: torch.nn.Module) -> RowReference:
        made.append(_Counted(FrozenView(model)))
        return RowReference(made[-1])

    monkeypatch.setattr(local_train, "frozen_reference", counted)
    stack = _stack()
    events = EVENTS[kind]
    train_on_events(stack, OWN, _layer(stack, 8), TOK, events, seed=4)
    assert len(made) == 1
    rows = made[0].rows
    needed = {r for e in events for r in reference_rows(TOK, e)}
    assert needed <= set(rows), "a row the events need was never scored"
    assert max(rows.values()) == 1, rows.most_common(1)
    if kind != "thumbs":  # only TRL's KL estimate asks for rows not known in advance
        assert set(rows) == needed


def test_the_reference_scores_rows_on_the_trained_models_device() -> None:
    """The view has no parameters of its own, so the rows go to the live model's device."""
    model = build_tiny_model(0).to("meta")
    assert local_train.frozen_reference(model).device == torch.device("meta")
