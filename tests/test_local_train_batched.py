"""Training's minibatch loss scores per-event kinds in one forward pass: the one-event losses."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_local_train_reference import EVENTS, OWN, TOK
from test_reference_memo import _stack

from layerfed.clients.local_train import FrozenView, batch_loss
from layerfed.clients.losses import event_loss

TOL = 1e-5
"""Padded rows add in another order than one row alone: rounding only."""
PER_EVENT = ("marks", "redo", "alternative", "contrast")


def _grads(loss: torch.Tensor, params: list[Any]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kinds=st.lists(st.sampled_from(PER_EVENT), min_size=1, max_size=4, unique=True),
    picks=st.lists(st.integers(0, 1000), min_size=1, max_size=8),
)
def test_batch_loss_equals_the_mean_of_one_event_losses(kinds: list[str], picks: list[int]) -> None:
    """For any minibatch of marks, re-dos, alternatives and contrast pairs, batch_loss and its
    gradients equal the mean of each event's own event_loss within TOL."""
    pool = [e for kind in kinds for e in EVENTS[kind]]
    batch = [pool[i % len(pool)] for i in picks]
    stack = _stack()
    model = stack.model
    with stack.training(OWN):
        params = [p for p in model.parameters() if p.requires_grad]
        ref = FrozenView(model)
        batched = batch_loss(model, ref, TOK, batch, 0.1)
        alone = torch.stack([event_loss(model, ref, TOK, e, 0.1) for e in batch]).mean()
        new, old = _grads(batched, params), _grads(alone, params)
    assert abs(float(batched) - float(alone)) <= TOL * max(1.0, abs(float(alone)))
    for a, b in zip(old, new, strict=True):
        assert torch.allclose(a, b, atol=TOL, rtol=TOL)
