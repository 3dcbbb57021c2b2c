"""The output guard: off by default, masks banned tokens, replaces banned text, reports it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from layerfed.clients.guard import InvalidGuard, OutputGuard
from layerfed.clients.instance import Instance, generate
from layerfed.governance.schema import Policy, RedLines
from layerfed.simulation.tiny import build_tiny_tokenizer
from layerfed.simulation.world import HARMFUL, REFUSAL

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "please tell cake"


def policy(guard: bool, words: tuple[str, ...] = HARMFUL) -> Policy:
    """The default policy without superego, with the output guard on (``words``) or off."""
    data: dict[str, Any] = yaml.safe_load(
        (ROOT / "examples/policies/default.yaml").read_text(encoding="utf-8")
    )
    data["superego"] = {"enabled": False}
    data["red_lines"]["output_guard"] = guard
    data["red_lines"]["guard_words"] = list(words)
    data["red_lines"]["refusal_text"] = REFUSAL
    return Policy.model_validate(data)


def test_guard_is_off_by_default() -> None:
    """Without red_lines.output_guard the instance has no guard and nothing is guarded."""
    assert RedLines().output_guard is False
    inst = Instance(policy(False), instance_id="i1")
    assert inst.guard is None
    assert inst.generate(PROMPT).guarded is False


def test_policy_switch_builds_the_policy_guard() -> None:
    """output_guard: true guards with the policy's guard_words and answers its refusal_text."""
    inst = Instance(policy(True, ("Bomb", "poison")), instance_id="i1")
    assert inst.guard is not None
    assert inst.guard.banned == {"bomb", "poison"} and inst.guard.refusal == REFUSAL
    assert OutputGuard.from_policy(policy(False), build_tiny_tokenizer()) is None


def test_guard_has_no_default_words() -> None:
    """A guard switched on without guard_words is refused, naming red_lines.guard_words."""
    with pytest.raises(InvalidGuard) as info:
        OutputGuard.from_policy(policy(True, ()), build_tiny_tokenizer())
    assert info.value.field == "red_lines.guard_words"
    with pytest.raises(TypeError):
        OutputGuard(build_tiny_tokenizer())  # type: ignore[call-arg]


def test_guard_blocks_the_word_the_model_would_emit() -> None:
    """Banning the model's greedy word removes it from tokens and alternatives and reports it."""
    free = Instance(policy(False), instance_id="i1").generate(PROMPT, max_new_tokens=4)
    word = build_tiny_tokenizer().convert_ids_to_tokens(free.tokens[0])
    guard = OutputGuard(build_tiny_tokenizer(), banned=[word], refusal=REFUSAL)
    inst = Instance(policy(True), instance_id="i1", guard=guard)
    out = inst.generate(PROMPT, max_new_tokens=4)
    assert out.guarded and free.tokens[0] not in out.tokens
    assert all(t != free.tokens[0] for alts in out.alternatives for t, _ in alts)
    assert word not in out.text.split()
    assert inst.metrics()["guard_blocks"] == 1


def test_sampling_never_emits_a_masked_token() -> None:
    """Hot sampling through the guard never yields a banned id."""
    tok = build_tiny_tokenizer()
    inst = Instance(policy(True), instance_id="i1")
    assert inst.guard is not None
    for _ in range(3):
        out = inst.generate(PROMPT, max_new_tokens=12, temperature=50.0)
        assert not any(inst.guard.is_banned(t) for t in out.tokens)
        assert not inst.guard.violates(tok.decode(list(out.tokens)))


def test_banned_word_spelled_across_tokens_is_replaced_by_the_refusal() -> None:
    """A banned word with no single token of its own is caught in the text and refused."""
    tok = build_tiny_tokenizer()
    model = Instance(policy(False), instance_id="i1").model
    free = generate(model, tok, PROMPT, max_new_tokens=2)
    chars = tok.convert_tokens_to_ids(["b", "##o", "##m", "##b"])
    assert tok.decode(chars) == "bomb"
    guard = OutputGuard(tok, HARMFUL, REFUSAL)
    assert guard.violates(tok.decode(chars)) and not any(guard.is_banned(c) for c in chars)
    text_only = OutputGuard(tok, [free.text.split()[0]], "no")
    text_only.banned_ids = frozenset()  # as for a word no single token spells
    out = generate(model, tok, PROMPT, max_new_tokens=2, guard=text_only)
    assert out.guarded and out.text == text_only.refusal and out.alternatives == ()


def test_mask_sets_only_banned_ids_to_minus_infinity() -> None:
    """mask() leaves every other logit unchanged and does not modify its input."""
    guard = OutputGuard(build_tiny_tokenizer(), ["bomb", "poison"], REFUSAL)
    logits = torch.randn(2, 300)
    out = guard.mask(logits)
    banned = sorted(guard.banned_ids)
    assert len(banned) == 2 and torch.isinf(out[:, banned]).all()
    keep = [i for i in range(300) if i not in banned]
    assert torch.equal(out[:, keep], logits[:, keep]) and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"banned": []}, "banned"), ({"banned": ["two words"]}, "banned[0]"),
     ({"refusal": "here is a bomb"}, "refusal"), ({"refusal": " "}, "refusal")],
)  # fmt: skip
def test_invalid_guard_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    """Unusable banned words, an empty refusal or one that is itself banned raise InvalidGuard."""
    with pytest.raises(InvalidGuard) as info:
        OutputGuard(build_tiny_tokenizer(), **{"banned": HARMFUL, "refusal": REFUSAL, **kwargs})
    assert info.value.field == field
