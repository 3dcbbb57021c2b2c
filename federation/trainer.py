"""Local training of one slot on supervised examples (the simplest loss an instance uses)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from layerfed.governance.schema import LayerPolicy
from layerfed.layers.slots import SlotId
from layerfed.layers.stack import LayerStack
from layerfed.simulation.world import Example

__all__ = ["TrainResult", "encode_examples", "train_slot"]


@dataclass(frozen=True)
class TrainResult:
    """The slot's update (after minus before, per B array) and what training saw."""

    delta: dict[str, np.ndarray[Any, Any]]
    num_examples: int
    loss_before: float
    loss_after: float


def encode_examples(tokenizer: Any, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """Token ids, attention mask, and per-token loss weights on the response only."""
    rows: list[list[int]] = []
    weights: list[list[float]] = []
    for ex in examples:
        prompt = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        response = tokenizer(" " + ex.response, add_special_tokens=False)["input_ids"]
        eos = int(tokenizer.eos_token_id)
        ids = [eos, *prompt, *response, eos]
        rows.append(ids)
        w = [0.0] * (1 + len(prompt)) + [ex.weight] * (len(response) + 1)
        weights.append(w)
    width = max(len(r) for r in rows)
    pad = int(tokenizer.pad_token_id)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    loss_w = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, (ids, w) in enumerate(zip(rows, weights, strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        loss_w[i, : len(w)] = torch.tensor(w)
    return {"input_ids": input_ids, "attention_mask": mask, "loss_weights": loss_w}


def _loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = batch["input_ids"][:, 1:]
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    w = batch["loss_weights"][:, 1:]
    return (nll * w).sum() / w.abs().sum().clamp_min(1e-8)


def train_slot(
    stack: LayerStack,
    slot: SlotId,
    layer: LayerPolicy,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    seed: int,
) -> TrainResult:
    """Train ``slot`` (all its memories, each at its own rate) for the layer's local steps.

    Deterministic for a seed: torch's RNG (dropout) is forked and seeded from it.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _train(stack, slot, layer, tokenizer, examples, seed)


def _train(
    stack: LayerStack,
    slot: SlotId,
    layer: LayerPolicy,
    tokenizer: Any,
    examples: Sequence[Example],
    seed: int,
) -> TrainResult:
    before = stack.get_arrays(slot)
    stack.set_trainable(slot)
    groups = [
        {"params": params, "lr": layer.local.lr * multiplier}
        for params, multiplier in stack.memory_lrs(slot)
    ]
    optimizer = torch.optim.Adam(groups)
    rng = np.random.default_rng(seed)
    model = stack.model
    model.train()
    full = encode_examples(tokenizer, examples)
    with torch.no_grad():
        loss_before = float(_loss(model, full))
    for _ in range(layer.local.steps):
        take = rng.choice(
            len(examples), size=min(layer.local.batch_size, len(examples)), replace=False
        )
        batch = encode_examples(tokenizer, [examples[int(i)] for i in take])
        optimizer.zero_grad(set_to_none=True)
        loss = _loss(model, batch)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    model.eval()
    with torch.no_grad():
        loss_after = float(_loss(model, full))
    after = stack.get_arrays(slot)
    delta = {name: (after[name] - before[name]).astype(np.float32) for name in before}
    stack.set_arrays(slot, before)
    return TrainResult(delta, len(examples), loss_before, loss_after)
