"""Batched per-event losses equal the one-event losses (values and gradients) on a real tiny GPT-2."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from layerfed.clients.batched_losses import event_losses
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
from layerfed.clients.local_train import MemoisedReference
from layerfed.clients.losses import event_loss

VOCAB = ["<pad>", "<eos>", *(f"w{i}" for i in range(62))]
BETA = 0.5
TOL = 1e-5


def tiny_tokenizer() -> Any:
    """A word-level fast tokenizer over ``w0 .. w61`` (id of ``wN`` is N + 2)."""
    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<pad>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="<pad>", eos_token="<eos>")


def tiny_model(seed: int = 0) -> GPT2LMHeadModel:
    """2 layers, 32 dims, vocabulary of 64, no dropout."""
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    return GPT2LMHeadModel(config).eval()


def perturbed(model: torch.nn.Module, seed: int = 1, scale: float = 0.05) -> torch.nn.Module:
    """A copy of ``model`` with noise on every weight, so policy and reference differ."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return other


TOK = tiny_tokenizer()
REF = tiny_model()
MODEL = perturbed(REF)

words = st.lists(st.integers(0, 61).map(lambda i: f"w{i}"), min_size=1, max_size=7)


def text(ws: list[str]) -> str:
    return " ".join(ws)


@st.composite
def events(draw: st.DrawFn) -> FeedbackEvent:
    """One event of any trainable kind, of any length up to 7 + 7 words."""
    kind = draw(
        st.sampled_from(["thumbs", "preference", "marks", "redo", "alternative", "contrast"])
    )
    prompt, response = draw(words), draw(words)
    if kind == "thumbs":
        return Thumbs(prompt=text(prompt), response=text(response), up=draw(st.booleans()))
    if kind == "preference":
        return Preference(
            prompt=text(prompt),
            chosen=text(response),
            rejected=text(draw(words.filter(lambda w: w != response))),
        )
    if kind == "marks":
        at = draw(st.integers(0, len(response) - 1))
        start = len(text(response[:at])) + (1 if at else 0)
        span = Span(
            start=start, end=start + len(response[at]), valence=draw(st.sampled_from([1, -1]))
        )
        return Marks(prompt=text(prompt), response=text(response), spans=(span,))
    if kind == "redo":
        shared = response[: draw(st.integers(0, len(response) - 1))]
        a, b = draw(st.lists(st.integers(0, 61), min_size=2, max_size=2, unique=True))
        original = [*shared, f"w{a}", *draw(words)]
        corrected = [*shared, f"w{b}", *draw(words)]
        return Redo(prompt=text(prompt), original=text(original), corrected=text(corrected))
    if kind == "alternative":
        at = draw(st.integers(0, len(response) - 1))
        sampled = int(response[at][1:]) + 2
        chosen = draw(st.integers(2, 63).filter(lambda t: t != sampled))
        return Alternative(
            prompt=text(prompt),
            response=text(response),
            position=at,
            chosen_token=chosen,
            candidates=(sampled, chosen),
        )
    return Contrast(
        positive_prompt=text(prompt),
        negative_prompt=text(draw(words.filter(lambda w: w != prompt))),
        behaviour=text(response),
    )


def _grads(model: torch.nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@settings(max_examples=25, deadline=None)
@given(st.lists(events(), min_size=1, max_size=6))
def test_batched_losses_equal_one_event_losses(batch: list[FeedbackEvent]) -> None:
    """Each batched loss equals its event's loss alone, and so does the gradient of their sum."""
    alone = torch.stack([event_loss(MODEL, REF, TOK, e, BETA) for e in batch])
    together = event_losses(MODEL, REF, TOK, batch, BETA)
    assert together.shape == alone.shape
    torch.testing.assert_close(together, alone, rtol=TOL, atol=TOL)
    want, got = _grads(MODEL, alone.sum()), _grads(MODEL, together.sum())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=TOL)


def test_one_event_batched_is_the_one_event_loss_bit_for_bit() -> None:
    """A batch of one event of each kind computes exactly the one-event loss."""
    kinds = [
        Thumbs(prompt="w1 w2", response="w3 w4", up=False),
        Preference(prompt="w1", chosen="w2 w3", rejected="w4"),
        Marks(prompt="w1 w2", response="w5 w6 w7", spans=(Span(start=3, end=5, valence=-1),)),
        Redo(prompt="w1", original="w2 w3 w4", corrected="w2 w9"),
        Alternative(prompt="w1", response="w2 w3", position=1, chosen_token=9, candidates=(5, 9)),
        Contrast(positive_prompt="w1 w2", negative_prompt="w1 w8", behaviour="w3"),
    ]
    for event in kinds:
        alone = event_loss(MODEL, REF, TOK, event, BETA)
        assert torch.equal(event_losses(MODEL, REF, TOK, [event], BETA)[0], alone), event.kind


def test_the_reference_scores_each_event_once_over_repeated_steps() -> None:
    """A memoised reference serves every later batch of the same events from its memo."""
    ref = MemoisedReference(REF)
    batch = [
        Contrast(positive_prompt="w1", negative_prompt="w2", behaviour="w3 w4"),
        Redo(prompt="w1", original="w2 w3", corrected="w5"),
        Marks(prompt="w1", response="w2", spans=(Span(start=0, end=2, valence=1),)),
    ]
    first = event_losses(MODEL, ref, TOK, batch, BETA)
    misses = len(ref._memo)
    again = event_losses(MODEL, ref, TOK, list(reversed(batch)), BETA)
    assert len(ref._memo) == misses == 3
    assert ref.hits == 3
    assert torch.equal(again, first.flip(0))


def test_bad_events_in_a_batch_are_refused_naming_the_field() -> None:
    """An out-of-range alternative position is refused as the one-event loss refuses it."""
    bad = Alternative(prompt="w1", response="w2", position=3, chosen_token=9, candidates=(5, 9))
    with pytest.raises(InvalidFeedback, match="position"):
        event_losses(MODEL, REF, TOK, [Thumbs(prompt="w1", response="w2", up=True), bad], BETA)
