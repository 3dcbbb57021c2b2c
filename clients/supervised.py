"""Supervised training of one slot on demonstrations (weighted NLL on the response).

The simplest feedback: "after this prompt, say this". :func:`train_on_events`
(:mod:`layerfed.clients.local_train`) uses it when every event of a batch is a
:class:`~layerfed.clients.events.Demonstration`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from layerfed.clients.encoding import encode_pair
from layerfed.clients.events import Demonstration
from layerfed.governance.schema import LayerPolicy
from layerfed.layers.arrays import Arrays
from layerfed.layers.slots import SlotId
from layerfed.layers.stack import LayerStack

__all__ = ["SupervisedOutcome", "encode_demonstrations", "train_demonstrations"]

SupervisedOutcome = tuple[Arrays, float, float]
"""The raw (unclipped) B delta, the loss before and the loss after training."""


def encode_demonstrations(
    tokenizer: Any, demos: Sequence[Demonstration]
) -> dict[str, torch.Tensor]:
    """Token ids, attention mask, and per-token loss weights on the response only.

    A row is ``eos, prompt, response, eos``, the response encoded as it follows the
    prompt (:func:`~layerfed.clients.encoding.encode_pair`).
    """
    rows: list[list[int]] = []
    weights: list[list[float]] = []
    eos = int(tokenizer.eos_token_id)
    for demo in demos:
        prompt, response = encode_pair(tokenizer, demo.prompt, demo.response)
        rows.append([eos, *prompt, *response, eos])
        weights.append([0.0] * (1 + len(prompt)) + [demo.weight] * (len(response) + 1))
    width = max(len(r) for r in rows)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    loss_w = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, (ids, w) in enumerate(zip(rows, weights, strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        loss_w[i, : len(w)] = torch.tensor(w)
    return {"input_ids": input_ids, "attention_mask": mask, "loss_weights": loss_w}


def supervised_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Weighted mean NLL of the response tokens (and the closing eos)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = batch["input_ids"][:, 1:]
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    w = batch["loss_weights"][:, 1:]
    return (nll * w).sum() / w.abs().sum().clamp_min(1e-8)


def train_demonstrations(
    stack: LayerStack,
    slot: SlotId,
    layer: LayerPolicy,
    tokenizer: Any,
    demos: Sequence[Demonstration],
    *,
    seed: int,
    steps: int,
) -> SupervisedOutcome:
    """Train ``slot`` (every memory at its own rate) for ``steps``; the stack is left as it was.

    Deterministic for a seed: torch's RNG (dropout) is forked and seeded from it.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        before = stack.get_arrays(slot)
        rng = np.random.default_rng(seed)
        model = stack.model
        full = encode_demonstrations(tokenizer, demos)
        # The other slots are merged into the base while this one trains (one live adapter).
        with stack.training(slot):
            groups = [{"params": p, "lr": layer.local.lr * m} for p, m in stack.memory_lrs(slot)]
            optimizer = torch.optim.Adam(groups)
            model.train()
            try:
                with torch.no_grad():
                    loss_before = float(supervised_loss(model, full))
                for _ in range(steps):
                    size = min(layer.local.batch_size, len(demos))
                    take = rng.choice(len(demos), size=size, replace=False)
                    batch = encode_demonstrations(tokenizer, [demos[int(i)] for i in take])
                    optimizer.zero_grad(set_to_none=True)
                    supervised_loss(model, batch).backward()  # type: ignore[no-untyped-call]
                    optimizer.step()
            finally:
                model.eval()
        with torch.no_grad():
            loss_after = float(supervised_loss(model, full))
        after = stack.get_arrays(slot)
        delta = {name: (after[name] - before[name]).astype(np.float32) for name in before}
        stack.set_arrays(slot, before)
        return delta, loss_before, loss_after
