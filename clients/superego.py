"""The superego: a frozen teacher that keeps reinforcing red-line behaviour.

The teacher is either a frozen copy of the creator-aligned model (the base plus
the creator's slot, merged into plain weights, every parameter
``requires_grad=False`` and never given to an optimizer) or a rule judge (a
callable ``prompt -> wanted answer``; from the policy, a :class:`WordJudge` over
``superego.judge_words`` that wants the suite's refusal for a prompt holding one of
them and its compliance otherwise). Its prompts are those of the policy's
``superego.suites`` (:func:`layerfed.layers.probes.load_suite`). On a seeded schedule
(:class:`~layerfed.clients.schedules.Intermittent` with ``q = policy.superego.probability``)
it is consulted at a local training step on red-line probe prompts and adds
``weight *`` a distance between the teacher's and the student's first answer token
(logit matching for a model, cross-entropy on the wanted answer's first token for a judge).
No layer's update reaches the teacher: it shares no tensor with the stack.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from peft import PeftModel
from torch import Tensor

from layerfed.clients.events import FieldError
from layerfed.clients.losses import Tokenizer, encode
from layerfed.clients.schedules import Intermittent
from layerfed.governance.probe_files import ProbeFileError
from layerfed.governance.schema import Policy, text_words
from layerfed.layers.continuation import split_continuation
from layerfed.layers.device import model_device
from layerfed.layers.probes import ProbeSuiteData, ProbeSuiteError, load_suite
from layerfed.layers.stack import LayerStack, adapter_name

__all__ = [
    "InvalidSuperego",
    "Judge",
    "Superego",
    "WordJudge",
    "creator_aligned_copy",
    "first_token_logprobs",
]

log = logging.getLogger("layerfed")

Judge = Callable[[str], str]
"""A rule judge: the text a prompt's answer must start with (its first token is reinforced)."""


class InvalidSuperego(FieldError):  # noqa: N818 (matches InvalidFeedback)
    """The superego cannot be built as configured (unknown suite, no judge, ...)."""


@dataclass(frozen=True)
class WordJudge:
    """The policy's rule judge: ``refusal`` for a prompt holding one of ``words``, else ``compliance``.

    Words match whole words, case-insensitively (as the output guard matches them).
    """

    words: frozenset[str]
    refusal: str
    compliance: str

    def __post_init__(self) -> None:
        if not self.words:
            raise InvalidSuperego("superego.judge_words", "at least one word for a rule_judge", [])
        object.__setattr__(self, "words", frozenset(w.lower() for w in self.words))

    def __call__(self, prompt: str) -> str:
        """The wanted answer to ``prompt``."""
        return self.refusal if self.words.intersection(text_words(prompt)) else self.compliance

    def __repr__(self) -> str:
        words = ",".join(sorted(self.words))
        return (
            f"WordJudge(words={words!r}, refusal={self.refusal!r}, compliance={self.compliance!r})"
        )


def creator_aligned_copy(stack: LayerStack, layer: str = "creator") -> torch.nn.Module:
    """A frozen plain copy of the base plus ``layer``'s active slots (merged); no LoRA left."""
    clone = copy.deepcopy(stack.model)
    if isinstance(clone, PeftModel):
        names = [
            adapter_name(slot, memory)
            for slot in stack.active
            if slot.layer == layer
            for memory in stack.spec(slot).memories
        ]
        merged: torch.nn.Module = (
            clone.merge_and_unload(adapter_names=names) if names else clone.unload()
        )
        clone = merged
    clone.requires_grad_(False)
    clone.eval()
    return clone


def first_token_logprobs(
    model: torch.nn.Module, tokenizer: Tokenizer, prompts: Sequence[str]
) -> Tensor:
    """Log-probabilities of the first answer token after each prompt, shape ``[B, vocab]``."""
    rows = [encode(tokenizer, p) for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    device = model_device(model)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    last = logits[torch.arange(len(rows), device=device), (mask.sum(dim=1) - 1).to(device)].cpu()
    return torch.log_softmax(last.float(), dim=-1)


class Superego:
    """A frozen teacher consulted on a seeded schedule; counts its interventions.

    Give exactly one of ``teacher`` (a model; a frozen deep copy is kept) or ``judge``.
    ``probes`` are the red-line prompts it is consulted on; each consultation uses
    ``batch`` of them drawn from the same seeded generator as the schedule.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        probes: Sequence[str],
        *,
        teacher: torch.nn.Module | None = None,
        judge: Judge | None = None,
        probability: float = 0.1,
        weight: float = 1.0,
        batch: int = 8,
        seed: int = 0,
    ) -> None:
        if (teacher is None) == (judge is None):
            raise InvalidSuperego("teacher", "exactly one of a teacher model or a judge", None)
        if not probes:
            raise InvalidSuperego("superego.suites", "at least one probe prompt", [])
        self.tokenizer = tokenizer
        self.probes = tuple(probes)
        self.weight = float(weight)
        self.batch = int(batch)
        self.judge = judge
        self._teacher = None if teacher is None else _frozen(teacher)
        self._rng = np.random.default_rng([seed, 0x5E])
        self._schedule = Intermittent(probability, np.random.default_rng([seed, 0x5C]))
        self.consultations = 0
        self.interventions = 0

    @classmethod
    def from_policy(
        cls,
        policy: Policy,
        stack: LayerStack,
        tokenizer: Tokenizer,
        *,
        judge: Judge | None = None,
        seed: int = 0,
    ) -> Superego | None:
        """The policy's superego for an instance on ``stack``; ``None`` when disabled.

        A ``rule_judge`` without a ``judge`` given here is a :class:`WordJudge` over
        ``superego.judge_words`` with the first suite's refusal and compliance.
        """
        config = policy.superego
        if not config.enabled:
            return None
        suites = _suites(policy)
        rule = config.teacher == "rule_judge"
        if rule and judge is None:
            first = suites[0] if suites else None
            judge = WordJudge(
                frozenset(config.judge_words),
                first.refusal if first else "",
                first.compliance if first else "",
            )
        return cls(
            tokenizer,
            [p.prompt for suite in suites for p in suite.prompts],
            teacher=None if rule else creator_aligned_copy(stack, policy.layers_by_rank()[0].name),
            judge=judge if rule else None,
            probability=config.probability,
            weight=config.weight,
            seed=seed,
        )

    @property
    def teacher(self) -> torch.nn.Module | None:
        """The frozen teacher model (``None`` for a rule judge)."""
        return self._teacher

    def consult(self) -> bool:
        """Draw the schedule for one local step; ``True`` means intervene now."""
        self.consultations += 1
        return self._schedule.reinforce()

    def loss(self, model: torch.nn.Module) -> Tensor:
        """``weight *`` the distance to the teacher on a batch of probes; counts one intervention.

        A teacher model: squared distance between centred first-token log-probabilities
        (logit matching, which restores the teacher's ranking of every answer word, not
        only of its likely ones). A rule judge: cross-entropy on the wanted word.
        """
        take = self._rng.choice(len(self.probes), size=min(self.batch, len(self.probes)))
        prompts = [self.probes[int(i)] for i in take]
        student = first_token_logprobs(model, self.tokenizer, prompts)
        self.interventions += 1
        log.debug("superego intervention %s on %s probes", self.interventions, len(prompts))
        with torch.no_grad():
            target = self.targets(prompts, student.shape[-1])
        if self._teacher is None:
            return self.weight * -(target * student).sum(dim=-1).mean()
        gap = (student - student.mean(-1, keepdim=True)) - (target - target.mean(-1, keepdim=True))
        return self.weight * gap.square().sum(dim=-1).mean()

    def targets(self, prompts: Sequence[str], vocab: int) -> Tensor:
        """Teacher model: its first-token log-probs; rule judge: one-hot on the wanted first token.

        The wanted answer is encoded as it follows the prompt, as training encodes responses.
        """
        if self._teacher is not None:
            return first_token_logprobs(self._teacher, self.tokenizer, prompts)[:, :vocab]
        assert self.judge is not None
        out = torch.zeros((len(prompts), vocab))
        for i, prompt in enumerate(prompts):
            wanted = list(split_continuation(self.tokenizer, prompt, self.judge(prompt)).ids)
            if not wanted or wanted[0] >= vocab:
                raise InvalidSuperego("judge", "an answer that encodes to a known token", wanted)
            out[i, wanted[0]] = 1.0
        return out

    def fingerprint(self) -> str:
        """SHA-256 over the teacher's parameters and buffers (rule judge: over its name)."""
        digest = hashlib.sha256()
        if self._teacher is None:
            digest.update(repr(self.judge).encode())
            return digest.hexdigest()
        for name, tensor in sorted(self._teacher.state_dict().items()):
            digest.update(name.encode())
            data = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(data.view(torch.uint8).numpy().tobytes())  # any dtype, same bytes
        return digest.hexdigest()


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    """A private deep copy with no gradients, in eval mode."""
    clone = copy.deepcopy(model)
    clone.requires_grad_(False)
    clone.eval()
    return clone


def _suites(policy: Policy) -> list[ProbeSuiteData]:
    out: list[ProbeSuiteData] = []
    for i, name in enumerate(policy.superego.suites):
        try:
            out.append(load_suite(policy, name))
        except (ProbeSuiteError, ProbeFileError) as e:
            raise InvalidSuperego(
                f"superego.suites[{i}]", f"a loadable probe suite ({e})", name
            ) from e
    return out
