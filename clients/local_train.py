"""Local training of one slot on recorded feedback events, with superego reinforcement.

:func:`train_on_events` is what an instance runs: given a stack with the
instance's slots active, the slot to train, its layer policy and a seed, it takes
the layer's local steps in the one local loop (:mod:`layerfed.clients.local_loop`)
with an objective per kind: each event's loss from :mod:`layerfed.clients.losses`
against the model as it was before training (a view of the live weights, no
copy, each row scored once per call: :mod:`layerfed.clients.reference_rows`), plus
the superego's reinforcement on the steps its schedule picks
(:class:`PreferenceObjective`), or
the weighted NLL of demonstrations (:class:`~layerfed.clients.supervised.SupervisedObjective`),
which the superego joins the same way.
It clips the update to the layer's norm cap and returns the B deltas. The stack is
left as it was unless ``keep=True``. A run is a function of its seed.

:func:`check_event` runs every check that needs the tokenizer, so an instance can
refuse a bad event when it is recorded rather than when it is trained on.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from layerfed.clients.batched_losses import event_losses
from layerfed.clients.events import (
    Alternative,
    Demonstration,
    FeedbackEvent,
    InvalidFeedback,
    Marks,
    Preference,
    Redo,
    Thumbs,
)
from layerfed.clients.local_loop import Objective, Seeding, run_local_loop
from layerfed.clients.losses import (
    Tokenizer,
    dpo_loss,
    encode_pair,
    kto_loss,
    redo_split,
    token_spans,
)
from layerfed.clients.reference_rows import RowReference, reference_rows
from layerfed.clients.superego import Superego
from layerfed.clients.supervised import SupervisedObjective
from layerfed.governance.schema import LayerPolicy
from layerfed.layers.arrays import Arrays, clip_to_norm
from layerfed.layers.device import model_device
from layerfed.layers.probe_batch import eval_mode
from layerfed.layers.slots import SlotId
from layerfed.layers.stack import LayerStack

__all__ = [
    "PREFERENCE_SEEDING",
    "FrozenView",
    "MemoisedReference",
    "PreferenceObjective",
    "TrainResult",
    "check_event",
    "train_on_events",
]

log = logging.getLogger("layerfed")
PREFERENCE_SEEDING = Seeding(salt=(0x7A,), dropout=False)
"""Feedback events: minibatches from ``default_rng([seed, 0x7A])``; dropout off (eval mode)."""
_TEXT_PAIRS = {  # (prompt field, response field): each response encoded after its prompt
    "thumbs": (("prompt", "response"),),
    "preference": (("prompt", "chosen"), ("prompt", "rejected")),
    "marks": (("prompt", "response"),),
    "redo": (("prompt", "original"), ("prompt", "corrected")),
    "alternative": (("prompt", "response"),),
    "contrast": (("positive_prompt", "behaviour"), ("negative_prompt", "behaviour")),
    "demonstration": (("prompt", "response"),),
}


@dataclass(frozen=True)
class TrainResult:
    """The slot's clipped update (B after minus before) and what training saw."""

    slot: SlotId
    delta: Arrays
    num_events: int
    steps: int
    loss_first: float
    loss_last: float
    norm: float
    clipped: bool
    superego_steps: int = 0
    superego_interventions: int = 0
    losses: tuple[float, ...] = field(default=(), repr=False)

    def metrics(self) -> dict[str, float]:
        """Flat numeric metrics (for a Flower MetricRecord)."""
        return {
            "num_events": float(self.num_events),
            "steps": float(self.steps),
            "loss_first": self.loss_first,
            "loss_last": self.loss_last,
            "update_norm": self.norm,
            "clipped": float(self.clipped),
            "superego_steps": float(self.superego_steps),
            "superego_interventions": float(self.superego_interventions),
        }


def check_event(tokenizer: Tokenizer, event: FeedbackEvent, vocab_size: int) -> None:
    """Raise :class:`InvalidFeedback` (naming the field) if ``event`` cannot be trained on.

    Responses are encoded as training encodes them: after their prompt (``encode_pair``).
    """
    for prompt, name in _TEXT_PAIRS[event.kind]:
        encode_pair(tokenizer, getattr(event, prompt), getattr(event, name), name, prompt)
    if isinstance(event, Marks):
        token_spans(tokenizer, event.prompt, event.response, event.spans)
    elif isinstance(event, Redo):
        original = encode_pair(tokenizer, event.prompt, event.original, "original")[1]
        corrected = encode_pair(tokenizer, event.prompt, event.corrected, "corrected")[1]
        redo_split(original, corrected, event.first_wrong_token)
    elif isinstance(event, Alternative):
        _check_alternative(tokenizer, event, vocab_size)


def _check_alternative(tokenizer: Tokenizer, event: Alternative, vocab_size: int) -> None:
    for i, token in enumerate(event.candidates):
        if token >= vocab_size:
            raise InvalidFeedback(f"candidates[{i}]", f"a token id < {vocab_size}", token)
    for i, token in enumerate(event.response_ids or ()):
        if token >= vocab_size:
            raise InvalidFeedback(f"response_ids[{i}]", f"a token id < {vocab_size}", token)
    response = list(event.response_ids or encode_pair(tokenizer, event.prompt, event.response)[1])
    if event.position >= len(response):
        expected = f"a token index < {len(response)} (the response's length in tokens)"
        raise InvalidFeedback("position", expected, event.position)
    if response[event.position] == event.chosen_token:
        raise InvalidFeedback(
            "chosen_token", "a token other than the sampled one", event.chosen_token
        )


@dataclass(frozen=True)
class _Logits:
    logits: Tensor


class MemoisedReference(torch.nn.Module):
    """A frozen reference model whose logits are kept per input during one training call.

    The reference never changes while a slot trains and dropout is off, so an event
    scored again on a later local step gets the very tensor computed on the first:
    exact, and one forward pass per distinct input instead of one per step. Only
    gradient-free calls with ``input_ids`` and ``attention_mask`` are kept (at most
    ``max_entries``, oldest dropped first); anything else runs the model.
    """

    def __init__(self, ref: torch.nn.Module, max_entries: int = 1024) -> None:
        super().__init__()
        self.ref = ref
        self.max_entries = max_entries
        self._memo: OrderedDict[bytes, Tensor] = OrderedDict()
        self.hits = 0

    def forward(self, *, input_ids: Tensor, attention_mask: Tensor, **kwargs: Any) -> Any:
        """``ref(input_ids=..., attention_mask=...)``; its ``.logits`` from the memo when seen."""
        if kwargs or torch.is_grad_enabled():
            return self.ref(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        key = b"|".join(
            [
                repr((tuple(input_ids.shape), input_ids.dtype, attention_mask.dtype)).encode(),
                input_ids.detach().cpu().numpy().tobytes(),
                attention_mask.detach().cpu().numpy().tobytes(),
            ]
        )
        logits = self._memo.get(key)
        if logits is None:
            logits = self.ref(input_ids=input_ids, attention_mask=attention_mask).logits
            self._memo[key] = logits
            if len(self._memo) > self.max_entries:
                self._memo.popitem(last=False)
        else:
            self.hits += 1
        return _Logits(logits)


class FrozenView(torch.nn.Module):
    """The model as it was when made, run on the live model's own weights (no copy).

    Only the parameters that may train (those with ``requires_grad`` now: the live
    adapter's B) are snapshotted; a call runs the live model through
    :func:`torch.func.functional_call` with those snapshots, in eval mode and without
    gradients. Nothing else changes while a slot trains, so the answer is bit for bit
    what a deep copy made at the same moment computes, for one adapter's B of memory
    instead of a second base.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self._live = (model,)  # a tuple: not registered, so eval()/to() never reach it
        self.snapshot = {
            name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad
        }

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``model(*args, **kwargs)`` with the snapshotted weights, eval mode, no gradients."""
        model = self._live[0]
        with eval_mode(model), torch.no_grad():
            return functional_call(model, self.snapshot, args, kwargs, strict=False)


def frozen_reference(model: torch.nn.Module) -> RowReference:
    """``model`` as it is now, with no gradients (the losses' reference), kept per row.

    No copy of the model is made (:class:`FrozenView`): the reference is valid while
    only the parameters that require gradients now change (a training call's slot).
    Each input row is run once per training call (:class:`RowReference`).
    """
    return RowReference(FrozenView(model), device=model_device(model))


def batch_loss(
    model: torch.nn.Module,
    ref: torch.nn.Module,
    tokenizer: Tokenizer,
    events: Sequence[FeedbackEvent],
    beta: float,
) -> Tensor:
    """Mean loss over ``events``; thumbs (KTO, TRL's KL estimate) and preferences batch up.

    The other kinds keep each event's own loss (:func:`~layerfed.clients.losses.event_loss`),
    computed for all events of a kind in one forward pass (:func:`event_losses`).
    """
    thumbs = [e for e in events if isinstance(e, Thumbs)]
    pairs = [e for e in events if isinstance(e, Preference)]
    rest = [e for e in events if not isinstance(e, Thumbs | Preference)]
    terms = list(event_losses(model, ref, tokenizer, rest, beta).unbind()) if rest else []
    enc = partial(encode_pair, tokenizer)  # each response as it follows its prompt
    if thumbs:
        prompts, responses = zip(*(enc(e.prompt, e.response) for e in thumbs), strict=True)
        kto = kto_loss(model, ref, prompts, responses, [e.up for e in thumbs], beta)
        terms.append(kto * len(thumbs))
    if pairs:
        prompts, chosen = zip(*(enc(e.prompt, e.chosen, "chosen") for e in pairs), strict=True)
        rejected = [enc(e.prompt, e.rejected, "rejected")[1] for e in pairs]
        dpo = dpo_loss(model, ref, prompts, chosen, rejected, beta)
        terms.append(dpo * len(pairs))
    return torch.stack(terms).sum() / len(events)


class PreferenceObjective(Objective):
    """Feedback events other than demonstrations: their losses against a frozen reference.

    The reference is the model as it is when training starts (inside the training
    merge), run on the live weights with the trained B as it was then: no copy of the
    base (:class:`FrozenView`), each event's rows scored on it once in :meth:`begin`
    (:class:`RowReference`); the superego's reinforcement joins the steps its schedule picks.
    Seeded as these kinds always were (:data:`PREFERENCE_SEEDING`).
    """

    seeding = PREFERENCE_SEEDING

    def __init__(
        self,
        tokenizer: Tokenizer,
        events: Sequence[FeedbackEvent],
        beta: float,
        superego: Superego | None,
    ) -> None:
        self.tokenizer = tokenizer
        self.events = list(events)
        self.beta = beta
        self.superego = superego
        self._ref: torch.nn.Module | None = None

    def begin(self, model: torch.nn.Module) -> None:
        """Snapshot the trained B as the reference and score every event's rows on it once.

        The other slots are merged: the same function. Every minibatch of the call then
        reads the reference's logits from those rows (:class:`RowReference`).
        """
        self._ref = frozen_reference(model)
        if isinstance(self._ref, RowReference):
            rows = [row for e in self.events for row in reference_rows(self.tokenizer, e)]
            self._ref.prime(rows)

    def loss(self, model: torch.nn.Module, take: Sequence[int]) -> Tensor:
        """The mean loss of the events at ``take``, plus the superego's when it intervenes."""
        assert self._ref is not None, "begin() makes the reference"
        chosen = [self.events[i] for i in take]
        loss = batch_loss(model, self._ref, self.tokenizer, chosen, self.beta)
        if self.superego is not None and self.superego.consult():
            loss = loss + self.superego.loss(model)
        return loss

    def end(self, model: torch.nn.Module) -> None:
        """Drop the reference (its snapshot of B and its rows' logits)."""
        self._ref = None


def train_on_events(
    stack: LayerStack,
    slot: SlotId,
    layer: LayerPolicy,
    tokenizer: Tokenizer,
    events: Sequence[FeedbackEvent],
    *,
    seed: int,
    steps: int | None = None,
    superego: Superego | None = None,
    beta: float = 0.1,
    keep: bool = False,
) -> TrainResult:
    """Train ``slot`` (every memory at its own rate) on ``events``; return its clipped delta.

    Demonstrations train supervised (:class:`SupervisedObjective`), the other kinds
    on their losses (:class:`PreferenceObjective`); a batch never mixes the two. The
    superego joins either on the steps its schedule picks. Both run the one loop of
    :mod:`layerfed.clients.local_loop`.
    """
    if not events:
        raise InvalidFeedback("events", "at least one recorded feedback event", 0)
    n_steps = layer.local.steps if steps is None else steps
    if n_steps < 1:
        raise InvalidFeedback("steps", "an integer >= 1", n_steps)
    demos = [e for e in events if isinstance(e, Demonstration)]
    if demos and len(demos) != len(events):
        raise InvalidFeedback(
            "events", "demonstrations alone or no demonstrations in one batch", "a mix"
        )
    ego = superego
    objective: Objective = (
        SupervisedObjective(tokenizer, demos, ego)
        if demos
        else PreferenceObjective(tokenizer, events, beta, ego)
    )
    asked = ego.consultations if ego is not None else 0
    done = ego.interventions if ego is not None else 0
    outcome = run_local_loop(
        stack, slot, layer, objective, count=len(events), steps=n_steps, seed=seed
    )
    clip = clip_to_norm(outcome.delta, layer.norm_cap)
    delta, before = clip.arrays, outcome.before
    if keep:
        stack.set_arrays(slot, {k: before[k] + delta[k] for k in before})
    what = "demonstrations" if demos else "events"
    log.info(
        "trained %s on %s %s: %s steps, norm %.4g", slot, len(events), what, n_steps, clip.norm
    )
    first, last = objective.loss_range(outcome.losses)
    return TrainResult(
        slot=slot,
        delta=delta,
        num_events=len(events),
        steps=n_steps,
        loss_first=first,
        loss_last=last,
        norm=clip.norm,
        clipped=clip.clipped,
        superego_steps=(ego.consultations - asked) if ego is not None else 0,
        superego_interventions=(ego.interventions - done) if ego is not None else 0,
        losses=outcome.losses,
    )
