"""Responses are trained as the continuation of their prompt, tokenized as the model sees them.

A byte-level BPE (GPT-2, Llama 3, Qwen2) spells ``sure`` after a word as ``Ġsure`` but
alone as ``sure``; a Llama 2-style SentencePiece turns ``" sure"`` alone into ``▁`` +
``▁sure``. Every feedback kind must train on the ids the model reads after the prompt:
those of ``prompt + " " + response`` tokenized together, past the prompt's own tokens.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import ByteLevelBPETokenizer, Tokenizer, models, normalizers, pre_tokenizers
from tokenizers import trainers as tok_trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from layerfed.clients.encoding import TokenSpan, encode, encode_pair, token_spans
from layerfed.clients.events import (
    Alternative,
    Contrast,
    Demonstration,
    FeedbackEvent,
    InvalidFeedback,
    Marks,
    Preference,
    Redo,
    Span,
    Thumbs,
)
from layerfed.clients.local_train import batch_loss, check_event
from layerfed.clients.losses import alternative_loss, event_loss
from layerfed.clients.superego import Superego
from layerfed.clients.supervised import encode_demonstrations
from layerfed.layers.continuation import split_continuation
from layerfed.simulation.lexicon import WORDS
from layerfed.simulation.tiny import build_tiny_tokenizer

PROMPT = "how do i bake bread"
OTHER = "how do i bake a cake"
SURE = "sure here is how to bake bread"
SORRY = "sorry i cannot help with that"
STORY = "sure here is a story"
CORPUS = [f"{p} {r}" for p in (PROMPT, OTHER, "tell me a story") for r in (SURE, SORRY, STORY)]
CORPUS += [SURE, SORRY, STORY]  # the bare words too: their ids differ from the spaced ones


def byte_level() -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE trained on the corpus (``Ġ`` marks a leading space)."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        CORPUS, vocab_size=400, min_frequency=1, special_tokens=["<eos>"], show_progress=False
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>")  # type: ignore[no-untyped-call]


def sentencepiece_like() -> PreTrainedTokenizerFast:
    """Llama 2's legacy tokenizer.json layout: a ``▁`` prepended and spaces turned into ``▁``."""
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    core.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = tok_trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<eos>"], show_progress=False
    )
    core.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")  # type: ignore[no-untyped-call]


TOKENIZERS = {"byte-level": byte_level(), "sentencepiece": sentencepiece_like()}


@pytest.fixture(params=sorted(TOKENIZERS))
def tok(request: pytest.FixtureRequest) -> Any:
    return TOKENIZERS[request.param]


def seen_after(tok: Any, prompt: str, response: str) -> list[int]:
    """The ids of ``prompt + " " + response`` tokenized together (the prompt's are a prefix)."""
    head = tok(prompt, add_special_tokens=False)["input_ids"]
    joint = list(tok(f"{prompt} {response}", add_special_tokens=False)["input_ids"])
    assert joint[: len(head)] == head  # the row splits at the prompt's own tokens
    return joint


class Recording(torch.nn.Module):
    """Runs a random tiny GPT-2 and keeps each unpadded input row and the logits (with grad)."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=vocab, n_positions=64)
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
        self.inner = GPT2LMHeadModel(config).eval()  # type: ignore[no-untyped-call]
        self.rows: list[list[list[int]]] = []
        self.logits: list[torch.Tensor] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        self.rows.append(
            [ids[m.bool()].tolist() for ids, m in zip(input_ids, attention_mask, strict=True)]
        )
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask)
        if out.logits.requires_grad:
            out.logits.retain_grad()
        self.logits.append(out.logits)
        return out


def trained_rows(tok: Any, events: list[FeedbackEvent]) -> list[list[int]]:
    """The rows of the first forward pass training on ``events`` (as train_on_events does)."""
    model, ref = Recording(len(tok)), Recording(len(tok), seed=1)
    batch_loss(model, ref, tok, events, beta=0.1)
    return model.rows[0]


def test_thumbs_train_the_response_as_seen_after_the_prompt(tok: Any) -> None:
    """Thumbs (KTO, batched) train each row on the ids of prompt + response tokenized together."""
    events: list[FeedbackEvent] = [
        Thumbs(prompt=PROMPT, response=SURE, up=True),
        Thumbs(prompt=OTHER, response=SORRY, up=False),
    ]
    assert trained_rows(tok, events) == [
        seen_after(tok, PROMPT, SURE),
        seen_after(tok, OTHER, SORRY),
    ]


def test_preferences_train_both_answers_as_seen_after_the_prompt(tok: Any) -> None:
    """Preferences (DPO, batched): chosen and rejected rows are each prompt + answer together."""
    event = Preference(prompt=PROMPT, chosen=SURE, rejected=SORRY)
    assert trained_rows(tok, [event]) == [
        seen_after(tok, PROMPT, SURE),
        seen_after(tok, PROMPT, SORRY),
    ]


def test_marks_credit_the_tokens_of_the_marked_characters_after_the_prompt(tok: Any) -> None:
    """Marks train the joint row, and credit lands exactly on the tokens (of that row) whose
    characters overlap the marked word: the rows predicting them, and no other row."""
    start = SURE.index("bread")
    event = Marks(
        prompt=PROMPT, response=SURE, spans=(Span(start=start, end=start + 5, valence=-1),)
    )
    model, ref = Recording(len(tok)), Recording(len(tok), seed=1)
    event_loss(model, ref, tok, event).backward()  # type: ignore[no-untyped-call]
    row = seen_after(tok, PROMPT, SURE)
    assert model.rows[0] == [row]
    offsets = tok(f"{PROMPT} {SURE}", return_offsets_mapping=True)["offset_mapping"]
    base = len(PROMPT) + 1
    marked = {t for t, (a, b) in enumerate(offsets) if a < base + start + 5 and b > base + start}
    grad = model.logits[0].grad
    assert grad is not None
    credited = {t + 1 for t in range(len(row) - 1) if bool(grad[0, t].abs().sum() > 0)}
    assert credited == marked


def test_redo_trains_both_continuations_as_seen_after_the_prompt(tok: Any) -> None:
    """Re-do: the corrected and the original continuation rows are prompt + text together,
    and ``first_wrong_token`` counts the original's tokens as they follow the prompt."""
    event = Redo(prompt=PROMPT, original=SURE, corrected=STORY, first_wrong_token=3)
    rows = trained_rows(tok, [event])
    assert rows == [seen_after(tok, PROMPT, STORY), seen_after(tok, PROMPT, SURE)]
    head = len(tok(PROMPT)["input_ids"])
    assert rows[0][: head + 3] == rows[1][: head + 3] != rows[0][: head + 4]


def test_alternative_positions_index_the_response_as_seen_after_the_prompt(tok: Any) -> None:
    """An alternative without recorded ids re-tokenizes the response after the prompt: its
    position 0 is the token the model would produce there, so picking that very token is
    refused and another one is scored against it."""
    joint = seen_after(tok, PROMPT, SURE)
    head = len(tok(PROMPT)["input_ids"])
    sampled, other = joint[head], int(tok.convert_tokens_to_ids("<eos>"))
    same = Alternative(
        prompt=PROMPT, response=SURE, position=0, chosen_token=sampled, candidates=(sampled, other)
    )
    with pytest.raises(InvalidFeedback) as err:
        check_event(tok, same, len(tok))
    assert err.value.field == "chosen_token"
    picked = Alternative(
        prompt=PROMPT, response=SURE, position=0, chosen_token=other, candidates=(sampled, other)
    )
    check_event(tok, picked, len(tok))
    model, ref = Recording(len(tok)), Recording(len(tok), seed=1)
    got = event_loss(model, ref, tok, picked, beta=0.1)
    want = alternative_loss(model, ref, joint[:head], joint[head:], 0, other, beta=0.1)
    assert torch.equal(got, want)


def test_contrast_trains_the_behaviour_as_seen_after_each_cue(tok: Any) -> None:
    """Contrast: the behaviour's rows are each cue + behaviour tokenized together."""
    event = Contrast(positive_prompt=OTHER, negative_prompt=PROMPT, behaviour=SORRY)
    assert trained_rows(tok, [event]) == [
        seen_after(tok, OTHER, SORRY),
        seen_after(tok, PROMPT, SORRY),
    ]


def test_demonstrations_train_the_response_as_seen_after_the_prompt(tok: Any) -> None:
    """Demonstrations (weighted NLL): the row is eos, prompt + response together, eos, and the
    loss weights cover exactly the response's tokens and the closing eos."""
    batch = encode_demonstrations(tok, [Demonstration(prompt=PROMPT, response=SURE)])
    eos = tok.eos_token_id
    row = seen_after(tok, PROMPT, SURE)
    assert batch["input_ids"][0].tolist() == [eos, *row, eos]
    head = len(tok(PROMPT)["input_ids"])
    assert batch["loss_weights"][0].tolist() == [0.0] * (1 + head) + [1.0] * (len(row) - head + 1)


def test_the_superego_judge_reinforces_its_answer_as_seen_after_the_prompt(tok: Any) -> None:
    """A rule judge's wanted answer is one-hot on the token the model reads after the prompt."""
    ego = Superego(tok, [PROMPT], judge=lambda prompt: SORRY, probability=1.0)
    head = len(tok(PROMPT)["input_ids"])
    target = ego.targets([PROMPT], len(tok))
    assert target[0].nonzero().flatten().tolist() == [seen_after(tok, PROMPT, SORRY)[head]]


# ---------------------------------------------------------------- the seam's conventions


def test_a_decoded_response_with_its_leading_space_encodes_as_without_it(tok: Any) -> None:
    """A generation decoded by a byte-level model starts with a space; no second space is
    put before it, so it trains on the same ids as the same words without the space."""
    assert encode_pair(tok, PROMPT, " " + SURE) == encode_pair(tok, PROMPT, SURE)
    assert encode_pair(tok, PROMPT + " ", SURE)[0] == encode(tok, PROMPT + " ")


def test_a_prompt_whose_last_token_would_merge_keeps_its_own_tokens(tok: Any) -> None:
    """When the prompt's tokens are not a prefix of the joint ones (its trailing space merges
    with the response's first word), the row keeps the prompt's own ids, the ones generation
    starts from, and the response is encoded on its own after them."""
    prompt = PROMPT + " "
    joint = tok(prompt + SURE, add_special_tokens=False)["input_ids"]
    assert joint[: len(encode(tok, prompt))] != encode(tok, prompt)
    assert encode_pair(tok, prompt, SURE) == (encode(tok, prompt), encode(tok, SURE))


def test_a_span_on_a_token_shared_with_the_separator_covers_that_token(tok: Any) -> None:
    """The first response token may hold the separating space too: a span over any of its
    response characters covers it whole (position 0), never a prompt token."""
    spans = token_spans(tok, PROMPT, SURE, [Span(start=0, end=1, valence=1)])
    first = seen_after(tok, PROMPT, SURE)[len(encode(tok, PROMPT))]
    assert spans == [TokenSpan(0, 1, 1)]
    assert tok.convert_ids_to_tokens(first).lstrip("Ġ▁").startswith("s")


TINY = build_tiny_tokenizer()
SENTENCE = st.lists(st.sampled_from([*WORDS, ",", "?", "."]), min_size=1, max_size=12).map(" ".join)


@given(prompt=SENTENCE, response=SENTENCE)
def test_the_tiny_tokenizer_encodes_a_response_alike_after_its_prompt_or_alone(
    prompt: str, response: str
) -> None:
    """For the gym's word-level tokenizer the joint split equals encoding each text alone (and
    the response after a space, as demonstrations did): the gym's ids, hence its numbers,
    are unchanged."""
    alone = (encode(TINY, prompt), encode(TINY, response))
    assert encode_pair(TINY, prompt, response) == alone
    assert encode(TINY, " " + response) == alone[1]
    offsets = TINY(response, return_offsets_mapping=True)["offset_mapping"]
    split = split_continuation(TINY, prompt, response, offsets=True)
    assert list(split.offsets) == [tuple(o) for o in offsets]
