"""Losses per feedback kind on a real tiny GPT-2, checked against TRL and by hand."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

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
from layerfed.clients.losses import (
    TokenSpan,
    dpo_loss,
    dpo_losses,
    encode,
    event_loss,
    kto_loss,
    kto_losses,
    marks_loss,
    pack,
    redo_split,
    sequence_logprobs,
    signed_losses,
    token_logprobs,
)

VOCAB = ["<pad>", "<eos>", *(f"w{i}" for i in range(62))]
BETA = 0.5


def tiny_tokenizer() -> Any:
    """A word-level fast tokenizer over ``w0 .. w61`` (id of ``wN`` is N + 2)."""
    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<pad>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="<pad>", eos_token="<eos>")


def tiny_model(seed: int = 0) -> GPT2LMHeadModel:
    """The test LM of the brief: 2 layers, 32 dims, vocabulary of 64, no dropout."""
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


class Recording(torch.nn.Module):
    """Runs the real model and keeps its logits with their gradient for inspection."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.logits: list[torch.Tensor] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask)
        out.logits.retain_grad()
        self.logits.append(out.logits)
        return out


@pytest.fixture
def tok() -> Any:
    return tiny_tokenizer()


def step_and_measure(
    event: FeedbackEvent, tok: Any, measure: Callable[[torch.nn.Module], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, Recording]:
    """One SGD step on the event's loss; ``measure`` before and after, and the recorded logits."""
    model, ref = tiny_model(), tiny_model()
    recording = Recording(model)
    with torch.no_grad():
        before = measure(model)
    loss = event_loss(recording, ref, tok, event, beta=BETA)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.05).step()
    with torch.no_grad():
        after = measure(model)
    return before, after, recording


def response_logps(
    tok: Any, prompt: str, response: str
) -> Callable[[torch.nn.Module], torch.Tensor]:
    """Measure: log-probs of each response token after ``prompt``."""

    def measure(model: torch.nn.Module) -> torch.Tensor:
        logps, mask = sequence_logprobs(model, tok, prompt, response)
        return logps[0][mask[0].bool()]

    return measure


def zero_rows(logits: torch.Tensor, rows: list[int]) -> bool:
    """Whether the gradient on the given logit rows (of batch row 0) is exactly zero."""
    assert logits.grad is not None
    return bool(torch.all(logits.grad[0, rows] == 0))


# ---------------------------------------------------------------- against TRL and by hand


def trl_inputs(prompts: list[list[int]], completions: list[list[int]]) -> dict[str, Any]:
    batch = pack(prompts, completions)
    return {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "completion_mask": batch.completion_mask,
    }


def test_dpo_matches_trl(tmp_path: Path) -> None:
    """dpo_loss equals TRL 1.16 DPOTrainer's sigmoid loss on the same token ids within 1e-6."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    ref = tiny_model()
    model = perturbed(ref)
    prompts, chosen, rejected = [[3, 4], [5, 6, 7]], [[8, 9, 10], [11]], [[12], [13, 14]]
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], beta=BETA, use_cpu=True, bf16=False)
    data = Dataset.from_dict({"prompt": ["w1"], "chosen": ["w2"], "rejected": ["w3"]})
    trainer = DPOTrainer(
        model=copy.deepcopy(model),
        ref_model=copy.deepcopy(ref),
        args=args,
        train_dataset=data,
        processing_class=tiny_tokenizer(),
    )
    inputs = trl_inputs([*prompts, *prompts], [*chosen, *rejected])
    expected = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    got = dpo_loss(model, ref, prompts, chosen, rejected, beta=BETA)
    assert abs(got.item() - expected.item()) < 1e-6
    assert abs(got.item() - math.log(2)) > 1e-3  # the check is not the trivial value


def test_kto_matches_trl(tmp_path: Path) -> None:
    """kto_loss, with TRL's mismatched-pair KL estimate, equals KTOTrainer's loss within 1e-6."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    ref = tiny_model()
    model = perturbed(ref, scale=0.2)
    prompts, responses = [[3, 4], [5, 6, 7], [8], [9, 10]], [[11, 12], [13], [14, 15, 16], [17]]
    up = [True, False, True, False]
    args = KTOConfig(
        output_dir=str(tmp_path),
        report_to=[],
        beta=BETA,
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=4,
    )
    data = Dataset.from_dict(
        {"prompt": ["w1"] * 2, "completion": ["w2"] * 2, "label": [True, False]}
    )
    trainer = KTOTrainer(
        model=copy.deepcopy(model),
        ref_model=copy.deepcopy(ref),
        args=args,
        train_dataset=data,
        processing_class=tiny_tokenizer(),
    )
    assert trainer.calculate_KL
    shifted = [responses[-1], *responses[:-1]]
    kl = trl_inputs(prompts, shifted)
    inputs = {**trl_inputs(prompts, responses), "label": torch.tensor(up)}
    inputs |= {f"KL_{k}": v for k, v in kl.items()}
    expected = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    got = kto_loss(model, ref, prompts, responses, up, beta=BETA)
    assert abs(got.item() - expected.item()) < 1e-6
    assert abs(got.item() - 0.5) > 1e-3


def test_losses_at_zero_log_ratio_match_hand_values() -> None:
    """With policy equal to reference: DPO is log 2, KTO is 1/2 per example, signed is log 2."""
    zero = torch.zeros(3)
    assert torch.allclose(dpo_losses(zero, zero, zero, zero, 0.3), torch.full((3,), math.log(2)))
    labels = torch.tensor([True, False, True])
    assert torch.allclose(kto_losses(zero, zero, labels, 0.0, 0.3), torch.full((3,), 0.5))
    valence = torch.tensor([1, -1, 1])
    assert torch.allclose(signed_losses(zero, valence, 2.0), torch.full((3,), math.log(2)))


finite = st.floats(-20, 20, allow_nan=False)


@given(finite, finite, finite, finite, finite, st.floats(0.01, 5))
@settings(max_examples=60, deadline=None)
def test_dpo_depends_only_on_the_margin(
    c: float, r: float, rc: float, rr: float, shift: float, beta: float
) -> None:
    """DPO is unchanged when one response's policy and reference log-probs move together."""
    t = torch.tensor
    base = dpo_losses(t(c), t(r), t(rc), t(rr), beta)
    moved = dpo_losses(t(c + shift), t(r), t(rc + shift), t(rr), beta)
    assert torch.allclose(base, moved, atol=1e-4)


@given(finite, finite, finite, st.booleans(), st.floats(0.01, 5))
@settings(max_examples=60, deadline=None)
def test_kto_is_bounded_and_monotone(
    logp: float, ref: float, kl: float, up: bool, beta: float
) -> None:
    """KTO lies in [0, 1] and falls as a liked response's log-ratio rises (rises if disliked)."""
    t = torch.tensor
    label = t([up])
    loss = kto_losses(t([logp]), t([ref]), label, abs(kl), beta)
    higher = kto_losses(t([logp + 1.0]), t([ref]), label, abs(kl), beta)
    assert 0 <= loss.item() <= 1
    assert (higher.item() <= loss.item()) if up else (higher.item() >= loss.item())


# ---------------------------------------------------------------- one test per kind


@pytest.mark.parametrize("up", [True, False])
def test_thumbs_moves_the_response_in_the_thumb_direction(tok: Any, up: bool) -> None:
    """A thumb raises (up) or lowers (down) the response's log-prob; prompt rows get no gradient."""
    event = Thumbs(prompt="w1 w2 w3", response="w4 w5", up=up)
    before, after, rec = step_and_measure(event, tok, response_logps(tok, "w1 w2 w3", "w4 w5"))
    assert (after.sum() > before.sum()) if up else (after.sum() < before.sum())
    assert zero_rows(rec.logits[0], [0, 1, 4])  # rows 2, 3 predict the response tokens


def test_preference_raises_chosen_and_lowers_rejected(tok: Any) -> None:
    """DPO on a preference: chosen's log-prob goes up, rejected's goes down."""
    event = Preference(prompt="w1 w2", chosen="w7 w8", rejected="w9 w10")

    def measure(model: torch.nn.Module) -> torch.Tensor:
        good = response_logps(tok, "w1 w2", "w7 w8")(model).sum()
        return torch.stack([good, response_logps(tok, "w1 w2", "w9 w10")(model).sum()])

    before, after, rec = step_and_measure(event, tok, measure)
    assert after[0] > before[0] and after[1] < before[1]
    assert zero_rows(rec.logits[0], [0, 3])


def test_marks_credit_lands_on_marked_spans_only(tok: Any) -> None:
    """Marked spans move in their valence's direction; unmarked rows get exactly zero gradient."""
    response = "w5 w6 w7 w8 w9"  # tokens at chars 0, 3, 6, 9, 12
    spans = (Span(start=3, end=5, valence=1), Span(start=9, end=11, valence=-1))
    event = Marks(prompt="w1 w2", response=response, spans=spans)
    before, after, rec = step_and_measure(event, tok, response_logps(tok, "w1 w2", response))
    assert after[1] > before[1] and after[3] < before[3]
    logits = rec.logits[0]
    assert zero_rows(logits, [0, 1, 3, 5, 6])  # row 1 + j predicts response token j
    assert logits.grad is not None and torch.all(logits.grad[0, [2, 4]].abs().sum(-1) > 0)


def test_redo_prefers_the_corrected_continuation_after_the_rewind_point(tok: Any) -> None:
    """Re-do: shared prefix rows get no gradient; corrected continuation up, original down."""
    event = Redo(prompt="w1 w2", original="w3 w4 w5 w6", corrected="w3 w4 w20 w21")

    def measure(model: torch.nn.Module) -> torch.Tensor:
        good = response_logps(tok, "w1 w2 w3 w4", "w20 w21")(model).sum()
        return torch.stack([good, response_logps(tok, "w1 w2 w3 w4", "w5 w6")(model).sum()])

    before, after, rec = step_and_measure(event, tok, measure)
    assert after[0] > before[0] and after[1] < before[1]
    assert zero_rows(rec.logits[0], [0, 1, 2, 5])  # only rows 3, 4 score the continuation


def test_alternative_prefers_the_picked_candidate_at_its_position_only(tok: Any) -> None:
    """Alternative: at the position, the picked token's log-prob rises and the sampled one falls."""
    ids = encode(tok, "w4 w5 w6")
    event = Alternative(
        prompt="w1 w2",
        response="w4 w5 w6",
        position=1,
        chosen_token=30,
        candidates=(ids[1], 30, 31),
    )

    def measure(model: torch.nn.Module) -> torch.Tensor:
        context = torch.tensor([encode(tok, "w1 w2 w4")])
        logps = torch.log_softmax(model(input_ids=context).logits[0, -1], -1)
        return logps[[30, ids[1]]]

    before, after, rec = step_and_measure(event, tok, measure)
    assert after[0] > before[0] and after[1] < before[1]
    assert zero_rows(rec.logits[0], [0, 1])  # the context is w1 w2 w4; row 2 is the position


def test_contrast_raises_behaviour_after_positive_cue_and_lowers_after_negative(tok: Any) -> None:
    """Contrast pair: one batch; behaviour log-prob up after the positive cue, down after the negative."""
    event = Contrast(positive_prompt="w1 w2 w3", negative_prompt="w1 w2 w40", behaviour="w9 w10")

    def measure(model: torch.nn.Module) -> torch.Tensor:
        pos = response_logps(tok, "w1 w2 w3", "w9 w10")(model).sum()
        return torch.stack([pos, response_logps(tok, "w1 w2 w40", "w9 w10")(model).sum()])

    before, after, rec = step_and_measure(event, tok, measure)
    assert len(rec.logits) == 1 and rec.logits[0].shape[0] == 2  # both cues in one batch
    assert after[0] > before[0] and after[1] < before[1]


# ---------------------------------------------------------------- tokenizer-time validation


def test_marks_span_without_a_token_names_the_span(tok: Any) -> None:
    """A character span that covers only whitespace names spans[i] in the error."""
    event = Marks(prompt="w1", response="w5  w6", spans=(Span(start=2, end=4, valence=1),))
    with pytest.raises(InvalidFeedback) as err:
        event_loss(tiny_model(), tiny_model(), tok, event)
    assert err.value.field == "spans[0]"


def test_marks_spans_sharing_a_token_are_rejected(tok: Any) -> None:
    """Two character spans inside one token are ambiguous and raise naming the second span."""
    spans = (Span(start=0, end=1, valence=1), Span(start=1, end=2, valence=-1))
    event = Marks(prompt="w1", response="w5 w6", spans=spans)
    with pytest.raises(InvalidFeedback, match=r"spans\[1\]"):
        event_loss(tiny_model(), tiny_model(), tok, event)


def test_alternative_position_beyond_the_response_is_rejected(tok: Any) -> None:
    """Without recorded ids, a position past the re-tokenized response raises naming position."""
    event = Alternative(
        prompt="w1", response="w5 w6", position=2, chosen_token=9, candidates=(9, 10)
    )
    with pytest.raises(InvalidFeedback) as err:
        event_loss(tiny_model(), tiny_model(), tok, event)
    assert err.value.field == "position"


@pytest.mark.parametrize(
    ("original", "corrected", "first_wrong", "field"),
    [
        ([1, 2, 3], [1, 9, 9], 2, "first_wrong_token"),  # token 1 already differs
        ([1, 2], [1, 2, 3], None, "first_wrong_token"),  # original has no wrong token
        ([1, 2, 3], [1, 2], 2, "corrected"),  # nothing to continue with
    ],
)
def test_redo_split_rejects_inconsistent_rewind_points(
    original: list[int], corrected: list[int], first_wrong: int | None, field: str
) -> None:
    """Rewind points that are not shared-prefix positions with two continuations name the field."""
    with pytest.raises(InvalidFeedback) as err:
        redo_split(original, corrected, first_wrong)
    assert err.value.field == field


def test_redo_split_defaults_to_first_differing_token() -> None:
    """Without an explicit index, the rewind point is the first token where the two differ."""
    assert redo_split([1, 2, 3, 4], [1, 2, 7]) == 2
    assert redo_split([1, 2, 3, 4], [1, 2, 7], first_wrong=1) == 1


def test_marks_loss_rejects_out_of_range_token_spans() -> None:
    """Token spans past the response raise InvalidFeedback naming the span."""
    model = tiny_model()
    with pytest.raises(InvalidFeedback, match=r"spans\[0\]"):
        marks_loss(model, model, [1, 2], [3, 4], [TokenSpan(1, 3, 1)])


def test_token_logprobs_are_normalised_log_probabilities() -> None:
    """token_logprobs is log p of the next token: negative, and exp sums to 1 over the vocabulary."""
    model = tiny_model()
    ids = torch.tensor([[3, 4, 5]])
    logps = token_logprobs(model, ids, torch.ones_like(ids))
    full = torch.log_softmax(model(input_ids=ids).logits[:, :-1], -1)
    assert torch.allclose(logps, full.gather(2, ids[:, 1:, None])[..., 0])
    assert torch.all(logps < 0)
