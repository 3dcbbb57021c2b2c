"""One loss per feedback kind, as pure torch functions over a causal LM.

Three levels, each built on the one before:

* maths on log-probabilities (:func:`dpo_losses`, :func:`kto_losses`, :func:`signed_losses`);
* token-id losses over a model and a frozen reference model (``*_loss``), which
  pack prompts and completions, score them and apply the maths;
* :func:`event_loss`, which tokenizes a :class:`~layerfed.clients.events.FeedbackEvent`
  with a Hugging Face tokenizer and dispatches on its kind.

A model is called as ``model(input_ids=..., attention_mask=...)`` and returns ``.logits``
``[batch, time, vocab]``; the reference model only ever runs under ``torch.no_grad()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from layerfed.clients.events import (
    Alternative,
    Contrast,
    FeedbackEvent,
    InvalidFeedback,
    Marks,
    Preference,
    Redo,
    Span,
    Thumbs,
)

__all__ = [
    "Ids",
    "Packed",
    "TokenSpan",
    "Tokenizer",
    "alternative_loss",
    "completion_logps",
    "contrast_loss",
    "dpo_loss",
    "dpo_losses",
    "encode",
    "event_loss",
    "kto_loss",
    "kto_losses",
    "marks_loss",
    "pack",
    "redo_loss",
    "redo_split",
    "sequence_logprobs",
    "signed_losses",
    "token_logprobs",
    "token_spans",
]

Ids = Sequence[int]


@dataclass(frozen=True)
class TokenSpan:
    """A half-open range ``[start, end)`` of response token indices with a valence of +1 or -1."""

    start: int
    end: int
    valence: int


@dataclass(frozen=True)
class Packed:
    """Right-padded rows of prompt + completion ids and which positions are completion."""

    input_ids: Tensor
    attention_mask: Tensor
    completion_mask: Tensor


def pack(prompts: Sequence[Ids], completions: Sequence[Ids], pad_id: int = 0) -> Packed:
    """Concatenate each prompt with its completion and right-pad the rows into one batch."""
    for field, seqs in (("prompt", prompts), ("response", completions)):
        if any(len(seq) == 0 for seq in seqs):
            raise InvalidFeedback(field, "text that encodes to at least one token", 0)
    rows = [list(p) + list(c) for p, c in zip(prompts, completions, strict=True)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    completion = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, prompt) in enumerate(zip(rows, prompts, strict=True)):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention[i, : len(row)] = 1
        completion[i, len(prompt) : len(row)] = 1
    return Packed(ids, attention, completion)


def token_logprobs(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """``out[b, t] = log p(input_ids[b, t + 1] | input_ids[b, : t + 1])``, shape ``[B, T - 1]``."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1, :]
    logps = torch.log_softmax(logits.float(), dim=-1)
    return torch.gather(logps, 2, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def completion_logps(model: torch.nn.Module, batch: Packed) -> Tensor:
    """Summed log-probability of each row's completion tokens, shape ``[B]``."""
    logps = token_logprobs(model, batch.input_ids, batch.attention_mask)
    return (logps * batch.completion_mask[:, 1:]).sum(dim=1)


def _policy_and_ref(
    model: torch.nn.Module, ref_model: torch.nn.Module, batch: Packed
) -> tuple[Tensor, Tensor]:
    """Completion log-probs under the policy (with grad) and the frozen reference (without)."""
    with torch.no_grad():
        ref = completion_logps(ref_model, batch)
    return completion_logps(model, batch), ref


# ---------------------------------------------------------------- maths on log-probs


def dpo_losses(
    chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float
) -> Tensor:
    """Per-pair DPO loss (Rafailov et al. 2023): ``-log sigmoid(β((πc - rc) - (πr - rr)))``."""
    return -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))


def kto_losses(
    logps: Tensor,
    ref_logps: Tensor,
    up: Tensor,
    kl: Tensor | float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """Per-example KTO loss (Ethayarajh et al. 2024, eq. 7) around reference point ``kl``.

    Desirable: ``w_d (1 - sigmoid(β(r - z0)))``; undesirable: ``w_u (1 - sigmoid(β(z0 - r)))``,
    where ``r`` is the policy/reference log-ratio and ``z0 = kl`` carries no gradient.
    """
    z0 = torch.as_tensor(kl, dtype=logps.dtype).detach()
    ratio = logps - ref_logps
    good = desirable_weight * (1 - torch.sigmoid(beta * (ratio - z0)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratio)))
    return torch.where(up.bool(), good, bad)


def signed_losses(logratios: Tensor, valence: Tensor, beta: float) -> Tensor:
    """``-log sigmoid(v β r)``: push each log-ratio ``r`` up (``v = +1``) or down (``v = -1``)."""
    return -F.logsigmoid(valence.to(logratios.dtype) * beta * logratios)


# ---------------------------------------------------------------- token-id losses


def dpo_loss(
    model: torch.nn.Module,
    ref_model: torch.nn.Module,
    prompts: Sequence[Ids],
    chosen: Sequence[Ids],
    rejected: Sequence[Ids],
    beta: float = 0.1,
) -> Tensor:
    """Mean DPO loss over pairs; chosen and rejected rows go through one forward pass."""
    batch = pack([*prompts, *prompts], [*chosen, *rejected])
    logps, ref = _policy_and_ref(model, ref_model, batch)
    n = len(prompts)
    return dpo_losses(logps[:n], logps[n:], ref[:n], ref[n:], beta).mean()


def kto_loss(
    model: torch.nn.Module,
    ref_model: torch.nn.Module,
    prompts: Sequence[Ids],
    responses: Sequence[Ids],
    up: Sequence[bool],
    beta: float = 0.1,
    kl: float | None = None,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """Mean KTO loss over thumbs; ``kl=None`` estimates the reference point like TRL.

    The estimate pairs each prompt with the previous row's response (rotated by one),
    takes the mean policy/reference log-ratio without gradient, clamped at zero; a
    batch of one has no mismatched pair, so its reference point is 0.
    """
    batch = pack(prompts, responses)
    logps, ref = _policy_and_ref(model, ref_model, batch)
    z0 = _kto_reference_point(model, ref_model, prompts, responses) if kl is None else kl
    labels = torch.tensor(list(up), dtype=torch.bool)
    weights = (desirable_weight, undesirable_weight)
    return kto_losses(logps, ref, labels, z0, beta, *weights).mean()


def _kto_reference_point(
    model: torch.nn.Module,
    ref_model: torch.nn.Module,
    prompts: Sequence[Ids],
    responses: Sequence[Ids],
) -> Tensor:
    """TRL's KL estimate: mean log-ratio over (x_i, y_{i-1}) pairs, no gradient, at least 0."""
    if len(prompts) < 2:
        return torch.zeros(())
    shifted = [responses[-1], *responses[:-1]]
    with torch.no_grad():
        logps, ref = _policy_and_ref(model, ref_model, pack(prompts, shifted))
    return (logps - ref).mean().clamp(min=0)


def marks_loss(
    model: torch.nn.Module,
    ref_model: torch.nn.Module,
    prompt: Ids,
    response: Ids,
    spans: Sequence[TokenSpan],
    beta: float = 0.1,
) -> Tensor:
    """Mean over marked spans of ``-log sigmoid(v β (log π(span) - log π_ref(span)))``.

    Only the marked tokens' log-probs enter the loss, so the gradient with respect to
    the logits that predict unmarked tokens is exactly zero.
    """
    _check_spans(spans, len(response))
    batch = pack([prompt], [response])
    with torch.no_grad():
        ref = token_logprobs(ref_model, batch.input_ids, batch.attention_mask)[0]
    logps = token_logprobs(model, batch.input_ids, batch.attention_mask)[0]
    offset = len(prompt) - 1  # logps[offset + j] scores response token j
    ratios = torch.stack([(logps - ref)[offset + s.start : offset + s.end].sum() for s in spans])
    valence = torch.tensor([s.valence for s in spans])
    return signed_losses(ratios, valence, beta).mean()


def _check_spans(spans: Sequence[TokenSpan], n_tokens: int) -> None:
    """Raise :class:`InvalidFeedback` unless spans are in range, non-empty and disjoint."""
    if not spans:
        raise InvalidFeedback("spans", "at least one marked span", [])
    taken: set[int] = set()
    for i, span in enumerate(spans):
        if not 0 <= span.start < span.end <= n_tokens:
            expected = f"0 <= start < end <= {n_tokens} (response tokens)"
            raise InvalidFeedback(f"spans[{i}]", expected, (span.start, span.end))
        if span.valence not in (1, -1):
            raise InvalidFeedback(f"spans[{i}].valence", "1 or -1", span.valence)
        if taken & set(range(span.start, span.end)):
            raise InvalidFeedback(
                f"spans[{i}]", "spans that share no token", (span.start, span.end)
            )
        taken.update(range(span.start, span.end))


def redo_split(original: Ids, corrected: Ids, first_wrong: int | None = None) -> int:
    """The rewind point: the first differing token, or ``first_wrong`` once checked."""
    shared = 0
    while shared < min(len(original), len(corrected)) and original[shared] == corrected[shared]:
        shared += 1
    point = shared if first_wrong is None else first_wrong
    if point > shared:
        expected = f"an index <= {shared} (tokens before it must be shared with corrected)"
        raise InvalidFeedback("first_wrong_token", expected, point)
    if point >= len(original):
        expected = f"a token index < {len(original)} (the original must have a wrong token)"
        raise InvalidFeedback("first_wrong_token", expected, point)
    if point >= len(corrected):
        expected = f"a continuation longer than the {point} shared tokens"
        raise InvalidFeedback("corrected", expected, len(corrected))
    return point


def redo_loss(
    model: torch.nn.Module,
    ref_model: torch.nn.Module,
    prompt: Ids,
    original: Ids,
    corrected: Ids,
    first_wrong: int | None = None,
    beta: float = 0.1,
) -> Tensor:
    """Step-DPO-like: DPO on the two continuations after the shared prefix, nothing before."""
    point = redo_split(original, corrected, first_wrong)
    prefix = [*prompt, *original[:point]]
    return dpo_loss(model, ref_model, [prefix], [corrected[point:]], [original[point:]], beta)


def alternative_loss(
    model: torch.nn.Module,
    ref_model: torch.nn.Module,
    prompt: Ids,
    response: Ids,
    position: int,
    chosen_token: int,
    beta: float = 0.1,
) -> Tensor:
    """DPO between the chosen top-k token and the sampled one, at ``position`` only."""
    if not 0 <= position < len(response):
        expected = f"a token index < {len(response)} (the response's length in tokens)"
        raise InvalidFeedback("position", expected, position)
    sampled = response[position]
    if sampled == chosen_token:
        raise InvalidFeedback("chosen_token", "a token other than the sampled one", chosen_token)
    context = torch.tensor([[*prompt, *response[:position]]], dtype=torch.long)
    mask = torch.ones_like(context)
    pair = torch.tensor([chosen_token, sampled])
    with torch.no_grad():
        ref = torch.log_softmax(ref_model(input_ids=context, attention_mask=mask).logits, -1)
    logps = torch.log_softmax(model(input_ids=context, attention_mask=mask).logits.float(), -1)
    now, before = logps[0, -1, pair], ref[0, -1, pair].float()
    return dpo_losses(now[0], now[1], before[0], before[1], beta)


def contrast_loss(
    model: torch.nn.Module,
    ref_model: torch.nn.Module,
    positive_prompt: Ids,
    negative_prompt: Ids,
    behaviour: Ids,
    beta: float = 0.1,
) -> Tensor:
    """Raise log π(behaviour | positive cue), lower it after the negative cue, in one batch.

    Each side has its own anchored term, ``-log sigmoid(β r+) - log sigmoid(-β r-)``, averaged,
    so neither cue's target is met by moving only the other.
    """
    batch = pack([positive_prompt, negative_prompt], [behaviour, behaviour])
    logps, ref = _policy_and_ref(model, ref_model, batch)
    return signed_losses(logps - ref, torch.tensor([1, -1]), beta).mean()


# ---------------------------------------------------------------- text and events


class Tokenizer(Protocol):
    """The slice of a Hugging Face tokenizer the losses use (fast tokenizers for marks)."""

    def __call__(self, text: str, *, add_special_tokens: bool = ..., **kwargs: Any) -> Any:
        """Encode ``text``; the result maps ``"input_ids"`` (and offsets when asked)."""


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def sequence_logprobs(
    model: torch.nn.Module, tokenizer: Tokenizer, prompt: str, response: str
) -> tuple[Tensor, Tensor]:
    """Per-token log-probs of prompt + response, shape ``[1, T - 1]``, and the response mask."""
    batch = pack([encode(tokenizer, prompt)], [encode(tokenizer, response)])
    logps = token_logprobs(model, batch.input_ids, batch.attention_mask)
    return logps, batch.completion_mask[:, 1:]


def token_spans(tokenizer: Tokenizer, response: str, spans: Sequence[Span]) -> list[TokenSpan]:
    """Character spans as response token spans: a token belongs to every span it overlaps."""
    encoded = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [(int(a), int(b)) for a, b in encoded["offset_mapping"]]
    owner: dict[int, int] = {}
    out: list[TokenSpan] = []
    for i, span in enumerate(spans):
        hits = [t for t, (a, b) in enumerate(offsets) if a < b and a < span.end and b > span.start]
        if not hits:
            raise InvalidFeedback(f"spans[{i}]", "a span covering a token", (span.start, span.end))
        for t in hits:
            if t in owner:
                expected = f"spans that share no token (token {t} is also in spans[{owner[t]}])"
                raise InvalidFeedback(f"spans[{i}]", expected, (span.start, span.end))
            owner[t] = i
        out.append(TokenSpan(hits[0], hits[-1] + 1, span.valence))
    return out


def event_loss(
    model: torch.nn.Module,
    ref_model: torch.nn.Module,
    tokenizer: Tokenizer,
    event: FeedbackEvent,
    beta: float = 0.1,
) -> Tensor:
    """The loss of one feedback event on ``model``, dispatched on its kind."""
    enc = partial(encode, tokenizer)
    match event:
        case Thumbs():
            return kto_loss(
                model, ref_model, [enc(event.prompt)], [enc(event.response)], [event.up], beta
            )
        case Preference():
            prompt, good, bad = enc(event.prompt), enc(event.chosen), enc(event.rejected)
            return dpo_loss(model, ref_model, [prompt], [good], [bad], beta)
        case Marks():
            spans = token_spans(tokenizer, event.response, event.spans)
            prompt, response = enc(event.prompt), enc(event.response)
            return marks_loss(model, ref_model, prompt, response, spans, beta)
        case Redo():
            prompt, bad, good = enc(event.prompt), enc(event.original), enc(event.corrected)
            return redo_loss(model, ref_model, prompt, bad, good, event.first_wrong_token, beta)
        case Alternative():
            prompt, response = enc(event.prompt), list(event.response_ids or enc(event.response))
            at, token = event.position, event.chosen_token
            return alternative_loss(model, ref_model, prompt, response, at, token, beta)
        case Contrast():
            pos, neg = enc(event.positive_prompt), enc(event.negative_prompt)
            return contrast_loss(model, ref_model, pos, neg, enc(event.behaviour), beta)
    raise InvalidFeedback("kind", "a known feedback kind", getattr(event, "kind", event))
