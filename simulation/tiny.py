"""The built-in tiny causal LM: a 2-layer GPT-2 with a word-plus-character tokenizer.

Its hidden size is :data:`TINY_WIDTH` (64); ``width`` picks another (the ``tiny-wide``
base uses :data:`WIDE_WIDTH`, 256) with the same vocabulary, depth and heads.

Everything builds offline, in code, in well under a second. The tokenizer is a
WordPiece model whose vocabulary holds whole words (:data:`TINY_WORDS`) plus
single characters and their ``##`` continuations, so any lowercase text
encodes: known words as one token, other words character by character.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from layerfed.simulation.lexicon import WORDS

__all__ = [
    "SPECIAL_TOKENS",
    "TINY_CHARS",
    "TINY_WIDTH",
    "TINY_WORDS",
    "WIDE_WIDTH",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "tiny_config",
    "tiny_vocabulary",
]

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
"""Pad, end-of-sequence (also beginning) and unknown, in id order 0, 1, 2."""

TINY_CHARS = string.ascii_lowercase + string.digits + ".,!?'-:;"
"""Characters every word falls back to."""

TINY_WIDTH = 64
"""Hidden size of the ``tiny`` and ``tiny-untaught`` bases."""

WIDE_WIDTH = 256
"""Hidden size of the ``tiny-wide`` base (issue #23: room beside the red-line probes' span)."""

TINY_WORDS: tuple[str, ...] = WORDS
"""Whole words in the vocabulary: the world's lexicon (:mod:`layerfed.simulation.lexicon`)."""


def tiny_vocabulary() -> dict[str, int]:
    """Token -> id: specials, then :data:`TINY_WORDS`, characters and ``##`` continuations."""
    tokens = [*SPECIAL_TOKENS, *TINY_WORDS]
    tokens += [c for c in TINY_CHARS if c not in tokens]
    tokens += [f"##{c}" for c in TINY_CHARS]
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny model's tokenizer (lowercasing, WordPiece with character fallback)."""
    pad, eos, unk = SPECIAL_TOKENS
    core = Tokenizer(models.WordPiece(vocab=tiny_vocabulary(), unk_token=unk))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    core.decoder = decoders.WordPiece(prefix="##")
    tokenizer: PreTrainedTokenizerFast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=core, pad_token=pad, eos_token=eos, bos_token=eos, unk_token=unk
    )
    return tokenizer


def tiny_config(vocab_size: int | None = None, width: int = TINY_WIDTH) -> GPT2Config:
    """A 2-layer, 4-head GPT-2 config with ``width``-dim embeddings (default 64), an MLP
    of 4 x ``width`` and 128 positions; ``width`` must be a positive multiple of 4."""
    if width <= 0 or width % 4:
        raise ValueError(f"tiny_config width: expected a positive multiple of 4, got {width}")
    size = len(tiny_vocabulary()) if vocab_size is None else vocab_size
    return GPT2Config(
        vocab_size=size,
        n_positions=128,
        n_embd=width,
        n_layer=2,
        n_head=4,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )


def build_tiny_model(seed: int = 0, width: int = TINY_WIDTH) -> GPT2LMHeadModel:
    """A randomly initialised tiny GPT-2 of hidden size ``width`` in eval mode; the same
    seed and width give the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(tiny_config(width=width))
    model.eval()  # type: ignore[no-untyped-call]
    return model
