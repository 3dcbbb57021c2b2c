"""Supervised training of one slot on demonstrations (weighted NLL on the response).

The simplest feedback: "after this prompt, say this". :func:`train_on_events`
(:mod:`layerfed.clients.local_train`) trains with :class:`SupervisedObjective` in
the one local loop (:mod:`layerfed.clients.local_loop`) when every event of a batch
is a :class:`~layerfed.clients.events.Demonstration`. The superego acts here as on
every other kind: on the steps its schedule picks, its reinforcement on red-line
probes joins the demonstrations' loss, so a burst of demonstrations that teaches a
red line away meets the same teacher as a burst of rewards (issue #23, item 4).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from layerfed.clients.encoding import encode_pair
from layerfed.clients.events import Demonstration
from layerfed.clients.local_loop import Objective, Seeding, run_local_loop
from layerfed.clients.superego import Superego
from layerfed.governance.schema import LayerPolicy
from layerfed.layers.arrays import Arrays
from layerfed.layers.slots import SlotId
from layerfed.layers.stack import LayerStack

__all__ = [
    "SUPERVISED_SEEDING",
    "SupervisedObjective",
    "SupervisedOutcome",
    "encode_demonstrations",
    "supervised_loss",
    "train_demonstrations",
]

SUPERVISED_SEEDING = Seeding(salt=(), dropout=True)
"""Demonstrations: minibatches from ``default_rng(seed)``; dropout on while training."""

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
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device)).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = ids[:, 1:]
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    w = batch["loss_weights"][:, 1:].to(device)
    return (nll * w).sum() / w.abs().sum().clamp_min(1e-8)


class SupervisedObjective(Objective):
    """Demonstrations: weighted NLL of each response; loss measured on all of them before and after.

    Seeded as demonstrations always were (:data:`SUPERVISED_SEEDING`): minibatches
    from ``default_rng(seed)`` and dropout on while training. With a ``superego``,
    each step consults its schedule and, when it intervenes, adds its loss (the
    student scored in the mode it trains in). Without one, the maths is unchanged
    bit for bit.
    """

    seeding = SUPERVISED_SEEDING

    def __init__(
        self, tokenizer: Any, demos: Sequence[Demonstration], superego: Superego | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.demos = list(demos)
        self.superego = superego
        self._full = encode_demonstrations(tokenizer, self.demos)
        self.loss_before = self.loss_after = float("nan")

    def begin(self, model: torch.nn.Module) -> None:
        """The loss on every demonstration before the first step (train mode, as it trains)."""
        with torch.no_grad():
            self.loss_before = float(supervised_loss(model, self._full))

    def loss(self, model: torch.nn.Module, take: Sequence[int]) -> torch.Tensor:
        """The weighted NLL of the demonstrations at ``take``, plus the superego's when it intervenes."""
        batch = encode_demonstrations(self.tokenizer, [self.demos[i] for i in take])
        loss = supervised_loss(model, batch)
        if self.superego is not None and self.superego.consult():
            loss = loss + self.superego.loss(model)
        return loss

    def end(self, model: torch.nn.Module) -> None:
        """The loss on every demonstration after training (eval mode, every slot composed)."""
        with torch.no_grad():
            self.loss_after = float(supervised_loss(model, self._full))

    def loss_range(self, losses: Sequence[float]) -> tuple[float, float]:
        """The loss on all demonstrations before and after training."""
        return self.loss_before, self.loss_after


def train_demonstrations(
    stack: LayerStack,
    slot: SlotId,
    layer: LayerPolicy,
    tokenizer: Any,
    demos: Sequence[Demonstration],
    *,
    seed: int,
    steps: int,
    superego: Superego | None = None,
) -> SupervisedOutcome:
    """Train ``slot`` on ``demos`` for ``steps`` (:func:`run_local_loop`); the stack is left as it was.

    A ``superego`` joins the steps its schedule picks (its counters record them).
    """
    objective = SupervisedObjective(tokenizer, demos, superego)
    outcome = run_local_loop(
        stack, slot, layer, objective, count=len(objective.demos), steps=steps, seed=seed
    )
    return outcome.delta, objective.loss_before, objective.loss_after
