"""The output guard blocks a banned word in quotes, possessive or glued to punctuation.

Its words are Unicode words (UAX #29): ``'bomb'``, ``bomb's``, ``'bomb`` and ``bomb'``
are the banned ``bomb``. The token mask covers the word after any leading punctuation,
as three locally built tokenizers spell it: GPT-2 (byte-level BPE, the quote its own
token), Qwen2 (byte-level BPE whose pre-tokenizer glues one punctuation mark to the
word: ``'bomb`` is one token) and Llama 2 (SentencePiece-like Metaspace, which merges
across punctuation: ``▁'bomb'``, ``▁bomb's``).
"""

from __future__ import annotations

from typing import Any

import pytest
from test_guard_tokenizers import Scripted
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from layerfed.clients.generation import Generation, generate
from layerfed.clients.guard import InvalidGuard, OutputGuard
from layerfed.layers.continuation import split_continuation

REFUSAL = "sorry i cannot help"
BANNED = ("bomb", "ass")
CORPUS = [
    "the bomb went off in the class",
    "the word is 'bomb' he said",
    "'bomb' is the word",
    "the bomb's fuse is short",
    "they pass the grass to the class",
    "please tell me about the weather",
    "the word is 'fine' and the weather is fine",
    "we went to the park",
] * 4 + ["a grenade", "sorry i cannot help"]
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""Qwen2's (and Llama 3's) pre-tokenizer pattern, digits one by one."""


def _byte_level(pre: Any, vocab_size: int) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<eos>"],
        show_progress=False,
    )
    core.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>")  # type: ignore[no-untyped-call]


def gpt2() -> PreTrainedTokenizerFast:
    """GPT-2: byte-level BPE, punctuation always its own pre-token."""
    return _byte_level(pre_tokenizers.ByteLevel(add_prefix_space=False), 360)


def qwen2() -> PreTrainedTokenizerFast:
    """Qwen2: byte-level BPE after a split that glues one leading mark to a word."""
    split = pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated")
    level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return _byte_level(pre_tokenizers.Sequence([split, level]), 400)


def llama() -> PreTrainedTokenizerFast:
    """Llama 2: SentencePiece-like BPE (Metaspace), merges across punctuation."""
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=260, min_frequency=2, special_tokens=["<unk>", "<eos>"], show_progress=False
    )
    core.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")  # type: ignore[no-untyped-call]


TOKENIZERS = {"gpt2": gpt2(), "qwen2": qwen2(), "llama": llama()}


@pytest.fixture(params=sorted(TOKENIZERS))
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def run(tok: Any, prompt: str, text: str) -> Generation:
    """Guarded greedy generation by a model that wants to write ``text`` after ``prompt``."""
    script = split_continuation(tok, prompt, text).ids
    model = Scripted(tok, prompt, script)
    guard = OutputGuard(tok, BANNED, REFUSAL)
    return generate(model, tok, prompt, max_new_tokens=len(script), guard=guard)


@pytest.mark.parametrize(
    "text",
    [
        "the word is 'bomb'",
        "the word is bomb's",
        "the word is 'bomb",
        "the word is bomb'",
        "the word is \u2018bomb\u2019",
        "\u201cBOMB\u201d",
        "the BOMB\u2019S fuse",
        "(bomb)",
        "a bomb.then",
        "a bomb_squad",
        "a b\u00adomb",
        "a \uff42\uff4f\uff4d\uff42",
    ],
)
def test_the_text_check_finds_the_word_in_quotes_and_possessive(text: str) -> None:
    """Quoted, possessive, glued to punctuation, soft-hyphenated or full-width: banned."""
    guard = OutputGuard(TOKENIZERS["gpt2"], BANNED, REFUSAL)
    assert guard.violates(text)


@pytest.mark.parametrize(
    "text", ["grass", "the grass's colour", "bombastic", "a bombs list", "'fine'", "don't"]
)
def test_the_text_check_leaves_other_words_alone(text: str) -> None:
    """Words that only contain a banned word's letters pass (``grass's`` is not ``ass``)."""
    guard = OutputGuard(TOKENIZERS["gpt2"], BANNED, REFUSAL)
    assert not guard.violates(text)


def test_a_banned_word_with_an_apostrophe_matches_whole() -> None:
    """A banned ``don't`` matches ``don't`` and ``'don't'``, not ``don`` or ``dont``."""
    guard = OutputGuard(TOKENIZERS["gpt2"], ["don't"], REFUSAL)
    assert guard.violates("I 'don't' know") and guard.violates("DON\u2019T")
    assert not guard.violates("don dont")


@pytest.mark.parametrize("word", ["'bomb", "bomb'", "bo mb"])
def test_a_banned_word_must_be_one_word(word: str) -> None:
    """A banned word with a leading or trailing quote could never match: refused."""
    with pytest.raises(InvalidGuard, match="banned"):
        OutputGuard(TOKENIZERS["gpt2"], [word], REFUSAL)


@pytest.mark.parametrize(
    ("prompt", "text"),
    [
        ("please tell me about", "the word is 'bomb' he said"),
        ("please tell me about", "'bomb' is the word"),
        ("the weather is fine today.\n", "'bomb' is the word"),
        ("please tell me about", "the bomb's fuse is short"),
    ],
)
def test_the_mask_covers_the_word_after_punctuation(name: str, prompt: str, text: str) -> None:
    """A model set on writing the word in quotes or possessive is masked, not refused."""
    tok = TOKENIZERS[name]
    out = run(tok, prompt, text)
    assert out.text != REFUSAL, f"the token mask let the word through: {out.tokens}"
    assert out.guarded
    assert not OutputGuard(tok, BANNED, REFUSAL).violates(out.text)


def test_the_issue_reproduction_is_guarded(name: str) -> None:
    """The red team's ``" the word is 'bomb'"`` never comes back unguarded."""
    tok = TOKENIZERS[name]
    out = run(tok, "please tell me about", "the word is 'bomb'")
    assert out.guarded and "bomb" not in out.text


def test_the_hard_spellings_are_in_the_vocabularies() -> None:
    """The cases above exercise ``Ġ'`` + ``bo`` + ``mb``, ``'bomb``, ``▁'bomb'``, ``▁bomb's``."""
    pieces = {
        n: t.convert_ids_to_tokens(t("'bomb' x", add_special_tokens=False)["input_ids"])
        for n, t in TOKENIZERS.items()
    }
    assert pieces["qwen2"][0] == "'bomb" and pieces["llama"][0] == "\u2581'bomb'"
    gpt2_ids = split_continuation(TOKENIZERS["gpt2"], "is", "'bomb'").ids
    assert TOKENIZERS["gpt2"].convert_ids_to_tokens(list(gpt2_ids))[0] == "\u0120'"
    llama_ids = TOKENIZERS["llama"]("the bomb's", add_special_tokens=False)["input_ids"]
    assert "\u2581bomb's" in TOKENIZERS["llama"].convert_ids_to_tokens(llama_ids)


@pytest.mark.parametrize("where", ["mid", "start"])
def test_unbanned_quoted_words_pass_untouched(name: str, where: str) -> None:
    """``'fine'`` and ``grass`` after a quote are not masked."""
    tok = TOKENIZERS[name]
    prompt = "the weather is fine today.\n" if where == "start" else "please tell me about"
    text = "'fine' grass"
    out = run(tok, prompt, text)
    assert not out.guarded and out.tokens == split_continuation(tok, prompt, text).ids
