"""Each event's loss, as :func:`~layerfed.clients.losses.event_loss` computes it alone, in batches.

:func:`event_losses` groups a minibatch's events by kind and scores each group's rows
under the trained model in one right-padded forward pass with an attention mask,
instead of one forward (and one backward graph) per event. The reference model still
scores each event's own rows exactly as the one-event losses do, so a
:class:`~layerfed.clients.reference_rows.RowReference` serves them from the rows it
scored once for the training call. Padding is masked and right-sided, so each row's
log-probabilities are its one-row values up to float rounding (the padded matrix products and the sum
over a wider row may add in another order); ``tests/test_batched_losses.py`` checks the
equality with hypothesis over event shapes.

The path every deployment trains on: :func:`~layerfed.clients.local_train.batch_loss`
scores marks, re-dos, alternatives and contrast pairs here (issue #25 item 8). It cuts
the client time of those kinds by half or more; the gym's numbers for those arms moved
by rounding, which Adam's normalised steps and the gates' thresholds grow over rounds
(docs/gym.md, Changelog and Running time). The one-event functions of :mod:`layerfed.clients.losses` remain the definitions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from layerfed.clients.encoding import Tokenizer, TokenSpan, encode_pair, token_spans
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
from layerfed.clients.losses import (
    Ids,
    check_spans,
    completion_logps,
    dpo_losses,
    kto_losses,
    pack,
    redo_split,
    signed_losses,
    token_logprobs,
)
from layerfed.layers.device import model_device

__all__ = [
    "alternative_losses",
    "contrast_losses",
    "event_losses",
    "marks_losses",
    "pair_losses",
    "thumbs_losses",
]


def _ref_completion_logps(
    ref_model: torch.nn.Module, prompts: Sequence[Ids], completions: Sequence[Ids], rows: int
) -> Tensor:
    """The reference's completion log-probs, one event's ``rows`` rows per pass (memo-friendly)."""
    with torch.no_grad():
        parts = [
            completion_logps(ref_model, pack(prompts[i : i + rows], completions[i : i + rows]))
            for i in range(0, len(prompts), rows)
        ]
    return torch.cat(parts)


def _right_padded(rows: Sequence[Ids]) -> tuple[Tensor, Tensor]:
    """Token ids right-padded with 0 into one batch, and the attention mask of the real tokens."""
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def pair_losses(
    model: torch.nn.Module,
    ref_model: torch.nn.Module,
    prompts: Sequence[Ids],
    chosen: Sequence[Ids],
    rejected: Sequence[Ids],
    beta: float = 0.1,
) -> Tensor:
    """Per-pair DPO losses (``[n]``) of :func:`~layerfed.clients.losses.dpo_loss` on one pair each.

    Every pair's two rows go through the model in one forward pass with all the others.
    """
    n = len(prompts)
    refs = _ref_completion_logps(
        ref_model,
        [p for p in prompts for _ in (0, 1)],
        [c for pair in zip(chosen, rejected, strict=True) for c in pair],
        2,
    )
    logps = completion_logps(model, pack([*prompts, *prompts], [*chosen, *rejected]))
    return dpo_losses(logps[:n], logps[n:], refs[0::2], refs[1::2], beta)


def thumbs_losses(
    model: torch.nn.Module,
    ref_model: torch.nn.Module,
    prompts: Sequence[Ids],
    responses: Sequence[Ids],
    up: Sequence[bool],
    beta: float = 0.1,
) -> Tensor:
    """Per-thumb KTO losses of :func:`~layerfed.clients.losses.kto_loss` on one thumb each.

    A thumb alone has no mismatched pair for TRL's KL estimate, so its reference point is 0.
    """
    refs = _ref_completion_logps(ref_model, prompts, responses, 1)
    logps = completion_logps(model, pack(prompts, responses))
    labels = torch.tensor(list(up), dtype=torch.bool)
    return kto_losses(logps, refs, labels, torch.zeros(()), beta)


def marks_losses(
    model: torch.nn.Module,
    ref_model: torch.nn.Module,
    prompts: Sequence[Ids],
    responses: Sequence[Ids],
    spans: Sequence[Sequence[TokenSpan]],
    beta: float = 0.1,
) -> Tensor:
    """Per-event :func:`~layerfed.clients.losses.marks_loss` (``[n]``), one forward for all."""
    for response, marked in zip(responses, spans, strict=True):
        check_spans(marked, len(response))
    batch = pack(prompts, responses)
    logps = token_logprobs(model, batch.input_ids, batch.attention_mask)
    out = []
    for i, (prompt, response, marked) in enumerate(zip(prompts, responses, spans, strict=True)):
        one = pack([prompt], [response])
        with torch.no_grad():
            ref = token_logprobs(ref_model, one.input_ids, one.attention_mask)[0]
        ratio = logps[i, : ref.shape[0]] - ref
        offset = len(prompt) - 1  # ratio[offset + j] scores response token j
        ratios = torch.stack([ratio[offset + s.start : offset + s.end].sum() for s in marked])
        valence = torch.tensor([s.valence for s in marked])
        out.append(signed_losses(ratios, valence, beta).mean())
    return torch.stack(out)


def alternative_losses(
    model: torch.nn.Module,
    ref_model: torch.nn.Module,
    prompts: Sequence[Ids],
    responses: Sequence[Ids],
    positions: Sequence[int],
    chosen_tokens: Sequence[int],
    beta: float = 0.1,
) -> Tensor:
    """Per-event :func:`~layerfed.clients.losses.alternative_loss` (``[n]``), one forward for all."""
    contexts, pairs = [], []
    for prompt, response, at, token in zip(
        prompts, responses, positions, chosen_tokens, strict=True
    ):
        if not 0 <= at < len(response):
            expected = f"a token index < {len(response)} (the response's length in tokens)"
            raise InvalidFeedback("position", expected, at)
        if response[at] == token:
            raise InvalidFeedback("chosen_token", "a token other than the sampled one", token)
        contexts.append([*prompt, *response[:at]])
        pairs.append([token, response[at]])
    device = model_device(model)
    befores = []
    with torch.no_grad():
        for context, pair in zip(contexts, pairs, strict=True):
            ids = torch.tensor([context], dtype=torch.long, device=device)
            logits = ref_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            befores.append(torch.log_softmax(logits, -1)[0, -1, pair].float().cpu())
    ids, mask = _right_padded(contexts)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    last = torch.tensor([len(c) - 1 for c in contexts], device=device)
    rows = logits[torch.arange(len(contexts), device=device), last]
    now = torch.log_softmax(rows.float(), -1)
    index = torch.tensor(pairs, device=device)
    now = torch.gather(now, 1, index).cpu()
    before = torch.stack(befores)
    return dpo_losses(now[:, 0], now[:, 1], before[:, 0], before[:, 1], beta)


def contrast_losses(
    model: torch.nn.Module,
    ref_model: torch.nn.Module,
    positive_prompts: Sequence[Ids],
    negative_prompts: Sequence[Ids],
    behaviours: Sequence[Ids],
    negative_behaviours: Sequence[Ids],
    beta: float = 0.1,
) -> Tensor:
    """Per-event :func:`~layerfed.clients.losses.contrast_loss` (``[n]``), one forward for all."""
    prompts = [p for pair in zip(positive_prompts, negative_prompts, strict=True) for p in pair]
    targets = [b for pair in zip(behaviours, negative_behaviours, strict=True) for b in pair]
    refs = _ref_completion_logps(ref_model, prompts, targets, 2)
    logps = completion_logps(model, pack(prompts, targets))
    ratios = (logps - refs).view(-1, 2)
    return signed_losses(ratios, torch.tensor([[1, -1]]), beta).mean(dim=1)


def event_losses(
    model: torch.nn.Module,
    ref_model: torch.nn.Module,
    tokenizer: Tokenizer,
    events: Sequence[FeedbackEvent],
    beta: float = 0.1,
) -> Tensor:
    """``[event_loss(e) for e in events]`` as one tensor, one forward pass per kind.

    Each response is encoded as it follows its prompt (:func:`encode_pair`), as
    :func:`~layerfed.clients.losses.event_loss` does.
    """
    groups: dict[type, list[int]] = {}
    for i, event in enumerate(events):
        if not isinstance(event, Thumbs | Preference | Marks | Redo | Alternative | Contrast):
            raise InvalidFeedback("kind", "a known feedback kind", getattr(event, "kind", event))
        groups.setdefault(type(event), []).append(i)
    out: list[Tensor | None] = [None] * len(events)
    for kind, where in groups.items():
        losses = _kind_losses(model, ref_model, tokenizer, [events[i] for i in where], beta, kind)
        for i, loss in zip(where, losses.unbind(), strict=True):
            out[i] = loss
    return torch.stack([loss for loss in out if loss is not None])


def _encoded(
    tokenizer: Tokenizer, events: Sequence[FeedbackEvent], prompt: str, response: str
) -> tuple[list[list[int]], list[list[int]]]:
    """Each event's ``prompt`` field and its ``response`` field encoded after it."""
    pairs = [
        encode_pair(tokenizer, getattr(e, prompt), getattr(e, response), response, prompt)
        for e in events
    ]
    return [p for p, _ in pairs], [r for _, r in pairs]


def _kind_losses(
    model: torch.nn.Module,
    ref_model: torch.nn.Module,
    tokenizer: Tokenizer,
    events: Sequence[FeedbackEvent],
    beta: float,
    kind: type,
) -> Tensor:
    """The losses of ``events``, all of type ``kind``."""
    args = (model, ref_model)
    if kind is Thumbs:
        prompts, responses = _encoded(tokenizer, events, "prompt", "response")
        up = [e.up for e in events if isinstance(e, Thumbs)]
        return thumbs_losses(*args, prompts, responses, up, beta)
    if kind is Preference:
        prompts, good = _encoded(tokenizer, events, "prompt", "chosen")
        bad = _encoded(tokenizer, events, "prompt", "rejected")[1]
        return pair_losses(*args, prompts, good, bad, beta)
    if kind is Marks:
        marks = [e for e in events if isinstance(e, Marks)]
        spans = [token_spans(tokenizer, e.prompt, e.response, e.spans) for e in marks]
        prompts, responses = _encoded(tokenizer, events, "prompt", "response")
        return marks_losses(*args, prompts, responses, spans, beta)
    if kind is Redo:
        return _redo_losses(model, ref_model, tokenizer, events, beta)
    if kind is Alternative:
        alts = [e for e in events if isinstance(e, Alternative)]
        prompts, encoded = _encoded(tokenizer, events, "prompt", "response")
        responses = [list(e.response_ids or r) for e, r in zip(alts, encoded, strict=True)]
        at, chosen = [e.position for e in alts], [e.chosen_token for e in alts]
        return alternative_losses(*args, prompts, responses, at, chosen, beta)
    positive, good = _encoded(tokenizer, events, "positive_prompt", "behaviour")
    negative, bad = _encoded(tokenizer, events, "negative_prompt", "behaviour")
    return contrast_losses(*args, positive, negative, good, bad, beta)


def _redo_losses(
    model: torch.nn.Module,
    ref_model: torch.nn.Module,
    tokenizer: Tokenizer,
    events: Sequence[FeedbackEvent],
    beta: float,
) -> Tensor:
    """Per-event :func:`~layerfed.clients.losses.redo_loss`: DPO after each shared prefix."""
    prefixes, good, bad = [], [], []
    for e in events:
        assert isinstance(e, Redo)
        prompt, original = encode_pair(tokenizer, e.prompt, e.original, "original")
        corrected = encode_pair(tokenizer, e.prompt, e.corrected, "corrected")[1]
        point = redo_split(original, corrected, e.first_wrong_token)
        prefixes.append([*prompt, *original[:point]])
        good.append(corrected[point:])
        bad.append(original[point:])
    return pair_losses(model, ref_model, prefixes, good, bad, beta)
