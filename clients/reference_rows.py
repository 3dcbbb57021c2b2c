"""The losses' frozen reference, scored once per row for a whole training call.

The reference (the model as it was when a slot's training call began) cannot change
while the slot trains, so everything the losses ask of it is a function of the input
row alone. :class:`RowReference` keeps each row's logits for the call: :meth:`prime`
scores every row the events need (:func:`reference_rows`) before the first step, in
right-padded, masked batches (shortest rows first), and every later call of the reference, however
the minibatch orders or pads its rows, is assembled from those rows. The only rows not
known in advance are the mismatched pairs of TRL's KL estimate for thumbs; they are scored
the first time they are asked for (the missing rows of that call in one batch) and kept
too.

A row's logits from a batch of rows equal its one-row logits up to float rounding (the
batched matrix products may add in another order), so training on a
:class:`RowReference` matches training on the bare reference within rounding, not bit
for bit (``tests/test_local_train_reference.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from layerfed.clients.encoding import Tokenizer, encode_pair
from layerfed.clients.events import (
    Alternative,
    Contrast,
    FeedbackEvent,
    InvalidFeedback,
    Marks,
    Preference,
    Redo,
    Thumbs,
)
from layerfed.clients.losses import redo_split
from layerfed.layers.device import model_device

__all__ = ["RowReference", "reference_rows"]

Row = tuple[int, ...]


@dataclass(frozen=True)
class _Logits:
    logits: Tensor


def reference_rows(tokenizer: Tokenizer, event: FeedbackEvent) -> list[Row]:
    """The token rows the reference scores for ``event``'s loss (each response after its prompt)."""
    pair = encode_pair
    match event:
        case Thumbs() | Marks():
            prompt, response = pair(tokenizer, event.prompt, event.response)
            return [(*prompt, *response)]
        case Preference():
            prompt, good = pair(tokenizer, event.prompt, event.chosen, "chosen")
            bad = pair(tokenizer, event.prompt, event.rejected, "rejected")[1]
            return [(*prompt, *good), (*prompt, *bad)]
        case Redo():
            prompt, bad = pair(tokenizer, event.prompt, event.original, "original")
            good = pair(tokenizer, event.prompt, event.corrected, "corrected")[1]
            point = redo_split(bad, good, event.first_wrong_token)
            prefix = (*prompt, *bad[:point])
            return [(*prefix, *good[point:]), (*prefix, *bad[point:])]
        case Alternative():
            prompt, response = pair(tokenizer, event.prompt, event.response)
            ids = list(event.response_ids or response)
            return [(*prompt, *ids[: event.position])]
        case Contrast():
            pos, good = pair(tokenizer, event.positive_prompt, event.behaviour, "behaviour")
            neg, bad = pair(tokenizer, event.negative_prompt, event.behaviour, "behaviour")
            return [(*pos, *good), (*neg, *bad)]
    raise InvalidFeedback("kind", "a known feedback kind", getattr(event, "kind", event))


class RowReference(torch.nn.Module):
    """A frozen reference model answering from its logits per row, each row run once per call.

    ``ref`` must not change while this is in use (a training call's reference); rows are
    scored on ``device`` (default: ``ref``'s; a view without parameters of its own needs
    its model's). Only
    gradient-free calls with right-padded ``input_ids`` and ``attention_mask`` are served
    from the rows; anything else runs ``ref``. ``forwards`` and ``rows_run`` count what
    ``ref`` ran, ``hits`` the rows served from what was kept.
    """

    def __init__(
        self, ref: torch.nn.Module, chunk: int = 64, device: torch.device | None = None
    ) -> None:
        super().__init__()
        self.ref = ref
        self.chunk = chunk
        self.device = model_device(ref) if device is None else device
        self._rows: dict[Row, Tensor] = {}
        self.forwards = 0
        self.rows_run = 0
        self.hits = 0

    def prime(self, rows: Sequence[Row]) -> None:
        """Score every row not kept yet, shortest first, in right-padded batches of ``chunk`` rows."""
        missing = sorted((r for r in dict.fromkeys(rows) if r not in self._rows), key=len)
        device = self.device
        with torch.no_grad():
            for start in range(0, len(missing), self.chunk):
                group = missing[start : start + self.chunk]
                width = len(group[-1])
                ids = torch.zeros((len(group), width), dtype=torch.long)
                mask = torch.zeros((len(group), width), dtype=torch.long)
                for i, row in enumerate(group):
                    ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
                    mask[i, : len(row)] = 1
                out = self.ref(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                self.forwards += 1
                self.rows_run += len(group)
                for row, row_logits in zip(group, out.unbind(), strict=True):
                    self._rows[row] = row_logits[: len(row)]

    def forward(self, *, input_ids: Tensor, attention_mask: Tensor, **kwargs: Any) -> Any:
        """``ref(input_ids=..., attention_mask=...)``; its ``.logits`` assembled from the rows."""
        rows = _real_rows(input_ids, attention_mask)
        if kwargs or torch.is_grad_enabled() or rows is None:
            return self.ref(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        known = sum(row in self._rows for row in rows)
        self.prime(rows)
        self.hits += known
        first = self._rows[rows[0]]
        out = first.new_zeros((len(rows), input_ids.shape[1], first.shape[-1]))
        for i, row in enumerate(rows):
            out[i, : len(row)] = self._rows[row]
        return _Logits(out)


def _real_rows(input_ids: Tensor, attention_mask: Tensor) -> list[Row] | None:
    """Each row's real tokens, or None unless every mask row is ones then zeros (right padding)."""
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape or input_ids.shape[0] == 0:
        return None
    lengths = attention_mask.sum(dim=1).tolist()
    width = input_ids.shape[1]
    positions = torch.arange(width, device=attention_mask.device)
    expected = (positions.unsqueeze(0) < attention_mask.sum(dim=1, keepdim=True)).to(
        attention_mask.dtype
    )
    if not torch.equal(attention_mask, expected) or min(lengths) == 0:
        return None
    ids = input_ids.tolist()
    return [tuple(ids[i][: int(n)]) for i, n in enumerate(lengths)]
