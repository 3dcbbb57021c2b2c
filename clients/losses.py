"""One loss per feedback kind, as pure torch functions over a causal LM.

Three levels, each built on the one before:

* maths on log-probabilities (:func:`dpo_losses`, :func:`kto_losses`, :func:`signed_losses`);
* token-id losses over a model and a frozen reference model (``*_loss``), which
  pack prompts and completions, score them and apply the maths;
* :func:`event_loss`, which tokenizes a :class:`~layerfed.clients.events.FeedbackEvent`
  with a Hugging Face tokenizer, each response as it follows its prompt
  (:mod:`layerfed.clients.encoding`), and dispatches on its kind.

Response token positions (spans, rewind points, an alternative's position) index the
response's continuation tokens: 0 is the first token after the prompt's.

A model is called as ``model(input_ids=..., attention_mask=...)`` and returns ``.logits``
``[batch, time, vocab]``; the reference model only ever runs under ``torch.no_grad()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from layerfed.clients.encoding import Tokenizer, TokenSpan, encode, encode_pair, token_spans
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
from layerfed.layers.device import model_device

__all__ = [
    "Ids",
    "Packed",
    "TokenSpan",
    "Tokenizer",
    "alternative_loss",
    "check_spans",
    "completion_logps",
    "contrast_loss",
    "dpo_loss",
    "dpo_losses",
    "encode",
    "encode_pair",
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
    device = model_device(model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1, :]
    logps = torch.log_softmax(logits.float(), dim=-1)
    return torch.gather(logps, 2, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1).cpu()


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
    check_spans(spans, len(response))
    batch = pack([prompt], [response])
    with torch.no_grad():
        ref = token_logprobs(ref_model, batch.input_ids, batch.attention_mask)[0]
    logps = token_logprobs(model, batch.input_ids, batch.attention_mask)[0]
    offset = len(prompt) - 1  # logps[offset + j] scores response token j
    ratios = torch.stack([(logps - ref)[offset + s.start : offset + s.end].sum() for s in spans])
    valence = torch.tensor([s.valence for s in spans])
    return signed_losses(ratios, valence, beta).mean()


def check_spans(spans: Sequence[TokenSpan], n_tokens: int) -> None:
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
    """The rewind point: the first differing token, or ``first_wrong`` once checked.

    ``original`` and ``corrected`` are continuation ids after the same prompt; the point
    indexes them.
    """
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
    """DPO between the chosen top-k token and the sampled one, at ``position`` only.

    ``position`` indexes ``response`` (the continuation ids after ``prompt``).
    """
    if not 0 <= position < len(response):
        expected = f"a token index < {len(response)} (the response's length in tokens)"
        raise InvalidFeedback("position", expected, position)
    sampled = response[position]
    if sampled == chosen_token:
        raise InvalidFeedback("chosen_token", "a token other than the sampled one", chosen_token)
    device = model_device(model)
    context = torch.tensor([[*prompt, *response[:position]]], dtype=torch.long, device=device)
    mask = torch.ones_like(context)
    pair = torch.tensor([chosen_token, sampled], device=device)
    with torch.no_grad():
        ref = torch.log_softmax(ref_model(input_ids=context, attention_mask=mask).logits, -1)
    logps = torch.log_softmax(model(input_ids=context, attention_mask=mask).logits.float(), -1)
    now, before = logps[0, -1, pair].cpu(), ref[0, -1, pair].float().cpu()
    return dpo_losses(now[0], now[1], before[0], before[1], beta)


def contrast_loss(
    model: torch.nn.Module,
    ref_model: torch.nn.Module,
    positive_prompt: Ids,
    negative_prompt: Ids,
    behaviour: Ids,
    beta: float = 0.1,
    *,
    negative_behaviour: Ids | None = None,
) -> Tensor:
    """Raise log π(behaviour | positive cue), lower it after the negative cue, in one batch.

    Each side has its own anchored term, ``-log sigmoid(β r+) - log sigmoid(-β r-)``, averaged,
    so neither cue's target is met by moving only the other. ``negative_behaviour`` is the
    behaviour's ids after the negative cue when they differ (default: ``behaviour``).
    """
    after = behaviour if negative_behaviour is None else negative_behaviour
    batch = pack([positive_prompt, negative_prompt], [behaviour, after])
    logps, ref = _policy_and_ref(model, ref_model, batch)
    return signed_losses(logps - ref, torch.tensor([1, -1]), beta).mean()


# ---------------------------------------------------------------- text and events


def sequence_logprobs(
    model: torch.nn.Module, tokenizer: Tokenizer, prompt: str, response: str
) -> tuple[Tensor, Tensor]:
    """Per-token log-probs of prompt + response, shape ``[1, T - 1]``, and the response mask.

    The response is encoded as it follows the prompt (:func:`encode_pair`), as training does.
    """
    prompt_ids, response_ids = encode_pair(tokenizer, prompt, response)
    batch = pack([prompt_ids], [response_ids])
    logps = token_logprobs(model, batch.input_ids, batch.attention_mask)
    return logps, batch.completion_mask[:, 1:]


def event_loss(
    model: torch.nn.Module,
    ref_model: torch.nn.Module,
    tokenizer: Tokenizer,
    event: FeedbackEvent,
    beta: float = 0.1,
) -> Tensor:
    """The loss of one feedback event on ``model``, dispatched on its kind.

    Each response is encoded as it follows its prompt (:func:`encode_pair`).
    """
    match event:
        case Thumbs():
            prompt, response = encode_pair(tokenizer, event.prompt, event.response)
            return kto_loss(model, ref_model, [prompt], [response], [event.up], beta)
        case Preference():
            prompt, good = encode_pair(tokenizer, event.prompt, event.chosen, "chosen")
            bad = encode_pair(tokenizer, event.prompt, event.rejected, "rejected")[1]
            return dpo_loss(model, ref_model, [prompt], [good], [bad], beta)
        case Marks():
            spans = token_spans(tokenizer, event.prompt, event.response, event.spans)
            prompt, response = encode_pair(tokenizer, event.prompt, event.response)
            return marks_loss(model, ref_model, prompt, response, spans, beta)
        case Redo():
            prompt, bad = encode_pair(tokenizer, event.prompt, event.original, "original")
            good = encode_pair(tokenizer, event.prompt, event.corrected, "corrected")[1]
            return redo_loss(model, ref_model, prompt, bad, good, event.first_wrong_token, beta)
        case Alternative():
            prompt, response = encode_pair(tokenizer, event.prompt, event.response)
            at, token = event.position, event.chosen_token
            ids = list(event.response_ids or response)
            return alternative_loss(model, ref_model, prompt, ids, at, token, beta)
        case Contrast():
            cues = ("positive_prompt", "negative_prompt")
            (pos, good), (neg, bad) = (
                encode_pair(tokenizer, getattr(event, cue), event.behaviour, "behaviour", cue)
                for cue in cues
            )
            return contrast_loss(model, ref_model, pos, neg, good, beta, negative_behaviour=bad)
    raise InvalidFeedback("kind", "a known feedback kind", getattr(event, "kind", event))
