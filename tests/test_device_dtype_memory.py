"""One base per process: the losses' reference and the superego's teacher copy no model."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from test_reference_memo import KINDS, OWN, _events, _stack

from layerfed.clients import local_train
from layerfed.clients.local_train import train_on_events
from layerfed.clients.reference_rows import RowReference


def _deep_copy_reference(model: torch.nn.Module) -> RowReference:
    """The reference as it was made before: a frozen deep copy of the model."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    ref.eval()
    return RowReference(ref)


def _train(kind: str) -> Any:
    stack = _stack()
    policy_layer = stack.policy.layer("individual")
    layer = policy_layer.model_copy(
        update={"local": policy_layer.local.model_copy(update={"steps": 6})}
    )
    from layerfed.simulation.tiny import build_tiny_tokenizer

    return train_on_events(stack, OWN, layer, build_tiny_tokenizer(), _events(kind), seed=4)


@pytest.mark.parametrize("kind", KINDS)
def test_view_reference_trains_bit_for_bit_as_a_deep_copy(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every feedback kind's delta and losses with the no-copy reference equal a deep copy's."""
    view = _train(kind)
    monkeypatch.setattr(local_train, "frozen_reference", _deep_copy_reference)
    deep = _train(kind)
    assert view.delta.keys() == deep.delta.keys() and view.norm > 0
    for k in view.delta:
        assert np.array_equal(view.delta[k], deep.delta[k]), k
    assert view.losses == deep.losses
