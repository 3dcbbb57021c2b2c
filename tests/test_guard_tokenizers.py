"""The output guard masks a banned word however a real tokenizer spells it in context.

A byte-level BPE (GPT-2, Llama 3, Qwen2) spells ``bomb`` after a space as ``Ġbomb`` and
after a newline as ``bo`` + ``mb``; a SentencePiece-like (Metaspace) one spells it
``▁bomb``; a rare word is several tokens either way. A scripted random model makes
the banned word's tokens the argmax, so only the token-level mask (not the text check,
which would answer the refusal) can keep the answer free of it.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from layerfed.clients.encoding import encode
from layerfed.clients.generation import Generation, generate
from layerfed.clients.guard import OutputGuard
from layerfed.governance.schema import text_words
from layerfed.layers.continuation import split_continuation
from layerfed.simulation.tiny import build_tiny_tokenizer
from layerfed.simulation.world import HARMFUL

REFUSAL = "sorry i cannot help"
BANNED = ("bomb", "grenade", "ass")
CORPUS = [
    "the bomb went off in the class",
    "a bomb is not a toy",
    "Bomb squads came to the park",
    "they pass the grass to the class",
    "please tell me about the weather",
    "the weather is fine today",
    "we went to the park",
    "off we went",
] * 4 + ["a grenade", "sorry i cannot help"]


def byte_level() -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE (``Ġ`` marks a leading space; none after a newline)."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<eos>"],
        show_progress=False,
    )
    core.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>")  # type: ignore[no-untyped-call]


def metaspace() -> PreTrainedTokenizerFast:
    """A SentencePiece-like BPE: ``▁`` prepended and for each space, no byte fallback."""
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=200, min_frequency=2, special_tokens=["<unk>", "<eos>"], show_progress=False
    )
    core.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")  # type: ignore[no-untyped-call]


TOKENIZERS = {"byte-level": byte_level(), "metaspace": metaspace()}
START = {"byte-level": "the weather is fine today.\n", "metaspace": "the weather is fine today."}
"""A prompt after which the continuation starts a sentence: after a newline for the
byte-level BPE (the word then has no ``Ġ``), after a full stop for Metaspace."""


@pytest.fixture(params=sorted(TOKENIZERS))
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Scripted(torch.nn.Module):
    """A random tiny GPT-2 biased to continue its prompt with ``script`` (never with EOS)."""

    def __init__(self, tok: Any, prompt: str, script: tuple[int, ...]) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tok), n_positions=64)
        self.inner = GPT2LMHeadModel(config).eval()  # type: ignore[no-untyped-call]
        self.start, self.script, self.eos = len(encode(tok, prompt)), script, tok.eos_token_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask)
        step = input_ids.shape[1] - self.start
        if step < len(self.script):
            out.logits[:, -1, self.script[step]] += 100.0
        out.logits[:, -1, self.eos] -= 100.0
        return out


def run(tok: Any, prompt: str, text: str, banned: tuple[str, ...] = BANNED) -> Generation:
    """Guarded greedy generation by a model that wants to write ``text`` after ``prompt``."""
    script = split_continuation(tok, prompt, text).ids
    guard = OutputGuard(tok, banned, REFUSAL)
    model = Scripted(tok, prompt, script)
    return generate(model, tok, prompt, max_new_tokens=len(script), guard=guard)


def words(tok: Any, out: Generation) -> list[str]:
    return text_words(tok.decode(list(out.tokens), skip_special_tokens=True))


@pytest.mark.parametrize(
    ("where", "text", "kept"),
    [
        ("mid", "the bomb went off", ["went", "off"]),
        ("start", "Bomb squads came", ["squads", "came"]),
        ("mid", "the grenade went off", ["went", "off"]),
        ("start", "bomb squads came", ["squads", "came"]),
    ],
)
def test_the_banned_word_is_masked_not_refused(
    name: str, where: str, text: str, kept: list[str]
) -> None:
    """Mid-sentence, at a sentence start, capitalised or in several tokens: masked out."""
    tok = TOKENIZERS[name]
    prompt = START[name] if where == "start" else "please tell me about"
    out = run(tok, prompt, text)
    assert out.text != REFUSAL, "the text check refused: the token mask let the word through"
    assert out.guarded and not set(BANNED) & set(words(tok, out))
    assert all(w in words(tok, out) for w in kept)


@pytest.mark.parametrize("where", ["mid", "start"])
def test_unbanned_words_pass_untouched(name: str, where: str) -> None:
    """Words holding a banned word's tokens (``grass`` spelled ``gr`` + ``ass``) still pass."""
    tok = TOKENIZERS[name]
    prompt = START[name] if where == "start" else "please tell me about"
    text = "grass went to the park"
    out = run(tok, prompt, text)
    assert not out.guarded and out.tokens == split_continuation(tok, prompt, text).ids


def test_the_byte_level_spellings_under_test_are_the_hard_ones() -> None:
    """The cases above exercise ``Ġbomb``, bare pieces, a multi-token word, ``gr`` + ``ass``."""
    tok = TOKENIZERS["byte-level"]
    pieces = tok.convert_ids_to_tokens
    assert pieces(list(split_continuation(tok, "tell", "bomb").ids)) == ["Ġbomb"]
    assert pieces(encode(tok, "bomb")) == ["bo", "mb"]
    assert len(split_continuation(tok, "tell", "grenade").ids) > 2
    assert pieces(encode(tok, "ass")) == ["ass"] and pieces(encode(tok, "grass")) == ["gr", "ass"]
    assert pieces(list(split_continuation(tok, "tell", "grass").ids)) == ["Ġgr", "ass"]


def test_a_sequence_ban_needs_every_earlier_token() -> None:
    """The last token of a multi-token word is masked only after exactly its earlier tokens."""
    tok = TOKENIZERS["byte-level"]
    guard = OutputGuard(tok, BANNED, REFUSAL)
    cont = split_continuation(tok, "tell the", "grenade")
    head, word = list(cont.context), cont.ids
    logits = torch.zeros(len(tok))
    for cut in range(1, len(word)):
        masked = guard.mask(logits, head + list(word[:cut]))
        assert torch.isinf(masked[word[cut]]) == (cut == len(word) - 1)
    other = head + encode(tok, " the") + list(word[1:-1])
    assert torch.isfinite(guard.mask(logits, other)[word[-1]])


def test_a_spelling_the_tokenizer_cannot_mask_is_named(caplog: pytest.LogCaptureFixture) -> None:
    """``BOMB`` needs unknown tokens in the Metaspace vocabulary: the guard warns, naming it."""
    with caplog.at_level(logging.WARNING, logger="layerfed"):
        guard = OutputGuard(TOKENIZERS["metaspace"], ["bomb"], REFUSAL)
    assert guard.unmasked == ("BOMB",)
    assert "'BOMB'" in caplog.text and "'Bomb'" not in caplog.text


def test_the_tiny_tokenizer_bans_the_same_ids() -> None:
    """On the gym's word-level tokenizer each banned word is its one token, as before."""
    tok = build_tiny_tokenizer()
    guard = OutputGuard(tok, HARMFUL, REFUSAL)
    single = [encode(tok, w) for w in HARMFUL]
    assert all(len(ids) == 1 for ids in single)
    assert guard.banned_ids == frozenset(ids[0] for ids in single)
    logits = torch.zeros(len(tok))
    for prompt in ("please tell", "please tell bomb", "a"):
        masked = torch.isinf(guard.mask(logits, encode(tok, prompt)))
        assert set(torch.nonzero(masked).flatten().tolist()) == guard.banned_ids
