"""The one local optimiser loop: every feedback kind, demonstrations included.

:func:`run_local_loop` trains one slot for a number of steps, each memory at its
own rate (Adam, one parameter group per memory), and returns the raw change of
its B matrices; the stack is left as it was. What differs between kinds is an
:class:`Objective`: the loss of a minibatch (given as indices into the kind's
examples) and what it measures before and after.

Seeding is one way for every kind: torch's RNG is forked and seeded with the
round's ``seed`` (so a run never disturbs the caller's RNG), and each step's
minibatch is drawn without replacement by ``numpy.random.default_rng([seed,
*salt])``. Two things stay per kind, because the gym's numbers depend on them
bit for bit (:class:`Seeding`):

- the ``salt`` of the minibatch generator: ``(0x7A,)`` for preference-style
  losses, ``()`` for demonstrations (their draws were always ``default_rng(seed)``,
  which is ``default_rng([seed])``);
- ``dropout``: demonstrations train in train mode (dropout on, drawn from the
  seeded torch RNG); preference-style losses keep the model as it is (eval,
  dropout off), since they compare the model with a frozen reference of itself
  and dropout on one side only would bias that comparison (as TRL's DPO does).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from layerfed.governance.schema import LayerPolicy
from layerfed.layers.arrays import Arrays
from layerfed.layers.slots import SlotId
from layerfed.layers.stack import LayerStack

__all__ = ["LoopOutcome", "Objective", "Seeding", "run_local_loop"]


@dataclass(frozen=True)
class Seeding:
    """What a kind's run draws from the round's seed besides torch's seeded RNG."""

    salt: tuple[int, ...]
    """Minibatches come from ``numpy.random.default_rng([seed, *salt])``."""
    dropout: bool
    """Train mode (dropout on) during the steps, eval mode after; False leaves the mode alone."""


class Objective(ABC):
    """What one feedback kind trains on: its seeding, its minibatch loss, its measurements."""

    seeding: Seeding

    def begin(self, model: torch.nn.Module) -> None:  # noqa: B027 (optional hook)
        """Before the first step, inside training (the optimiser made, the mode set)."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, take: Sequence[int]) -> Tensor:
        """The loss of the examples at indices ``take`` (one step's minibatch)."""

    def end(self, model: torch.nn.Module) -> None:  # noqa: B027 (optional hook)
        """After the last step, once training is over (the model back to composing every slot)."""

    def loss_range(self, losses: Sequence[float]) -> tuple[float, float]:
        """The loss reported as before and after training (default: first and last step's)."""
        return losses[0], losses[-1]


@dataclass(frozen=True)
class LoopOutcome:
    """The slot's arrays before training, its raw B change, and each step's loss."""

    before: Arrays
    delta: Arrays
    losses: tuple[float, ...]


def run_local_loop(
    stack: LayerStack,
    slot: SlotId,
    layer: LayerPolicy,
    objective: Objective,
    *,
    count: int,
    steps: int,
    seed: int,
) -> LoopOutcome:
    """Train ``slot`` for ``steps`` on minibatches of ``count`` examples; the stack is restored.

    Each step draws ``min(batch_size, count)`` distinct indices, takes the
    objective's loss, and steps Adam over the slot's memories (``lr`` times each
    memory's multiplier). The other slots are merged into the base while this
    one trains (one live adapter).
    """
    seeding = objective.seeding
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        before = stack.get_arrays(slot)
        rng = np.random.default_rng([seed, *seeding.salt])
        model = stack.model
        losses: list[float] = []
        with stack.training(slot):
            groups = [{"params": p, "lr": layer.local.lr * m} for p, m in stack.memory_lrs(slot)]
            optimizer = torch.optim.Adam(groups)
            if seeding.dropout:
                model.train()
            try:
                objective.begin(model)
                for _ in range(steps):
                    take = rng.choice(count, size=min(layer.local.batch_size, count), replace=False)
                    loss = objective.loss(model, [int(i) for i in take])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()  # type: ignore[no-untyped-call]
                    optimizer.step()
                    losses.append(float(loss.detach()))
            finally:
                if seeding.dropout:
                    model.eval()
        objective.end(model)
        after = stack.get_arrays(slot)
        delta = {name: (after[name] - before[name]).astype(np.float32) for name in before}
        stack.set_arrays(slot, before)
    return LoopOutcome(before, delta, tuple(losses))
