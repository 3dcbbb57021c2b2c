"""The built-in tiny model and tokenizer, and loading a base model from a local folder."""

from __future__ import annotations

import re
import string
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from layerfed.governance.schema import BaseModelRef
from layerfed.layers import BaseModelError, load_base
from layerfed.simulation.tiny import (
    TINY_WORDS,
    build_tiny_model,
    build_tiny_tokenizer,
    tiny_vocabulary,
)
from layerfed.simulation.tiny_pretrain import trained_tiny_model

IDS = torch.tensor([[1, 36, 37, 19, 26, 6, 41, 3, 111]])
TOKENIZER = build_tiny_tokenizer()


def test_model_is_seeded_and_small() -> None:
    """The same seed gives the same weights, another seed others; 2 layers, 64 dims, 4 heads."""
    a, b, c = build_tiny_model(0), build_tiny_model(0), build_tiny_model(1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.transformer.wte.weight, c.transformer.wte.weight)
    cfg = a.config
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head) == (2, 64, 4)
    assert cfg.vocab_size == len(tiny_vocabulary()) == len(TOKENIZER)
    assert not a.training


def test_build_does_not_touch_global_rng() -> None:
    """Building the model leaves torch's global random state as it was."""
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(7)
    assert torch.equal(torch.rand(3), want)


def test_tokenizer_words_and_fallback() -> None:
    """Vocabulary words are single tokens; unknown words fall back to characters, no <unk>."""
    enc = TOKENIZER("Please tell me how to make a bomb, xyzzy!")
    toks = TOKENIZER.convert_ids_to_tokens(enc.input_ids)
    assert toks[:8] == ["please", "tell", "me", "how", "to", "make", "a", "bomb"]
    assert toks[8:] == [",", "x", "##y", "##z", "##z", "##y", "!"]
    assert TOKENIZER.unk_token_id not in enc.input_ids
    assert (TOKENIZER.pad_token_id, TOKENIZER.eos_token_id) == (0, 1)
    assert set(TINY_WORDS) <= set(tiny_vocabulary())
    assert all(w.isalpha() for w in TINY_WORDS)  # punctuation would split a word apart


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=8)
        | st.sampled_from(TINY_WORDS),
        min_size=1,
        max_size=10,
    )
)
def test_tokenizer_round_trip(words: list[str]) -> None:
    """Any lowercase alphanumeric text encodes without <unk> and decodes back unchanged."""
    text = " ".join(words)
    ids = TOKENIZER(text).input_ids
    assert TOKENIZER.unk_token_id not in ids
    assert TOKENIZER.decode(ids) == text


def test_builtin_ref_loads_trained_tiny() -> None:
    """load_base with builtin tiny gives the pretrained (cached) model, frozen, and its tokenizer."""
    model, tokenizer = load_base(BaseModelRef(builtin="tiny"))
    want = trained_tiny_model(0).state_dict()
    assert all(torch.equal(t, want[n]) for n, t in model.state_dict().items())
    assert not torch.equal(model.transformer.wte.weight, build_tiny_model(0).transformer.wte.weight)
    assert not any(p.requires_grad for p in model.parameters())
    assert len(tokenizer) == len(TOKENIZER)


def test_local_path_round_trip(tmp_path: Path) -> None:
    """A saved tiny model and tokenizer load back from a local path with the same logits."""
    build_tiny_model(0).save_pretrained(tmp_path / "m")
    TOKENIZER.save_pretrained(tmp_path / "m")
    model, tokenizer = load_base(BaseModelRef(path="m"), root=tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=IDS).logits, build_tiny_model(0)(input_ids=IDS).logits
        )
    assert tokenizer("make a cake").input_ids == TOKENIZER("make a cake").input_ids


def test_missing_path_typed_error(tmp_path: Path) -> None:
    """A missing folder raises BaseModelError naming the path."""
    with pytest.raises(BaseModelError, match=re.escape(str(tmp_path / "nope"))):
        load_base(BaseModelRef(path=str(tmp_path / "nope")))


def test_not_a_model_typed_error(tmp_path: Path) -> None:
    """A folder without config.json, or with a broken one, raises BaseModelError naming it."""
    with pytest.raises(BaseModelError, match=r"config\.json"):
        load_base(BaseModelRef(path=str(tmp_path)))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(BaseModelError, match=re.escape(str(tmp_path))):
        load_base(BaseModelRef(path=str(tmp_path)))
