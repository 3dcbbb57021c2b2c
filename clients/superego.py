"""The superego: a frozen teacher that keeps reinforcing red-line behaviour.

The teacher is either the creator-aligned model (the base plus the creator's
slots, nothing else) or a rule judge (a
callable ``prompt -> wanted answer``; from the policy, a :class:`WordJudge` over
``superego.judge_words`` that wants the suite's refusal for a prompt holding one of
them and its compliance otherwise). Its prompts are those of the policy's
``superego.suites`` (:func:`layerfed.layers.probes.load_suite`). On a seeded schedule
(:class:`~layerfed.clients.schedules.Intermittent` with ``q = policy.superego.probability``)
it is consulted at a local training step on red-line probe prompts and adds
``weight *`` a distance between the teacher's and the student's first answer token
(logit matching for a model, cross-entropy on the wanted answer's first token for a judge).
No layer's update reaches the teacher: its prompts are a fixed suite, so a model
teacher is kept as a frozen table of its first-token log-probabilities per probe
prompt (``[probes, vocab]`` float32, computed once without gradients when the
superego is built), never as a model. The instance holds one base: no copy for the
teacher, and the table shares no tensor with the stack.
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
from layerfed.layers.probe_batch import base_only, eval_mode
from layerfed.layers.probes import ProbeSuiteData, ProbeSuiteError, load_suite
from layerfed.layers.stack import LayerStack, adapter_name

__all__ = [
    "PROBE_BATCH",
    "InvalidSuperego",
    "Judge",
    "Superego",
    "WordJudge",
    "creator_aligned_copy",
    "creator_aligned_logprobs",
    "first_token_logprobs",
    "probe_logprobs",
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
    """A frozen plain copy of the base plus ``layer``'s active slots (merged); no LoRA left.

    A whole second base: the superego no longer keeps one (:func:`creator_aligned_logprobs`);
    this stays for checks that compare against a merged copy.
    """
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


def creator_aligned_logprobs(
    stack: LayerStack, tokenizer: Tokenizer, prompts: Sequence[str], layer: str = "creator"
) -> Tensor:
    """The creator-aligned model's first-token log-probs per prompt, ``[len(prompts), vocab]``.

    Computed on the stack's own base (no copy): only ``layer``'s active slots are composed
    for the call (the bare base when it has none), in eval mode and without gradients;
    then the stack composes what it composed before. The slots' LoRA runs unmerged, so a
    row can differ from a merged copy's in the last bits (float32 rounding of ``W x +
    B A x`` against ``(W + B A) x``).
    """
    previous = stack.active
    creator = [slot for slot in previous if slot.layer == layer]
    model = stack.model
    try:
        with eval_mode(model), torch.no_grad():
            if not previous or creator == previous:
                return probe_logprobs(model, tokenizer, prompts)
            if creator:
                stack.activate(creator)
                return probe_logprobs(model, tokenizer, prompts)
            with base_only(model):
                return probe_logprobs(model, tokenizer, prompts)
    finally:
        if creator and previous and creator != previous:
            stack.activate(previous)


PROBE_BATCH = 16
"""Prompts per forward pass when a teacher's table is built (right padding, masked)."""


def probe_logprobs(model: torch.nn.Module, tokenizer: Tokenizer, prompts: Sequence[str]) -> Tensor:
    """``first_token_logprobs`` of ``prompts`` in fixed batches of :data:`PROBE_BATCH`, in
    order, stacked; no gradients. Padding is on the right and masked, so each row is its
    prompt's own (a causal model never attends to the pads after the last real token); the
    same prompts give the same bits, and a model's weights are read once per batch, not
    once per prompt."""
    with torch.no_grad():
        rows = [
            first_token_logprobs(model, tokenizer, prompts[i : i + PROBE_BATCH])
            for i in range(0, len(prompts), PROBE_BATCH)
        ]
    return torch.cat(rows).contiguous()


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

    Give exactly one of ``teacher`` (a model: its first-token log-probs on ``probes``
    are computed now and kept as a frozen table; the model itself is not kept),
    ``teacher_logprobs`` (that table, ``[len(probes), vocab]``, already computed) or
    ``judge``. ``probes`` are the red-line prompts it is consulted on; each
    consultation uses ``batch`` of them drawn from the same seeded generator as the
    schedule.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        probes: Sequence[str],
        *,
        teacher: torch.nn.Module | None = None,
        judge: Judge | None = None,
        teacher_logprobs: Tensor | None = None,
        probability: float = 0.1,
        weight: float = 1.0,
        batch: int = 8,
        seed: int = 0,
    ) -> None:
        given = [x is not None for x in (teacher, judge, teacher_logprobs)]
        if sum(given) != 1:
            expected = "exactly one of a teacher model, its log-prob table or a judge"
            raise InvalidSuperego("teacher", expected, f"{sum(given)} given")
        if not probes:
            raise InvalidSuperego("superego.suites", "at least one probe prompt", [])
        self.tokenizer = tokenizer
        self.probes = tuple(probes)
        self.weight = float(weight)
        self.batch = int(batch)
        self.judge = judge
        if teacher is not None:
            teacher_logprobs = _frozen_logprobs(teacher, tokenizer, self.probes)
        self._table = None if teacher_logprobs is None else _checked(teacher_logprobs, probes)
        self._row = {prompt: i for i, prompt in enumerate(self.probes)}
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
        probes = [p.prompt for suite in suites for p in suite.prompts]
        if not probes:
            raise InvalidSuperego("superego.suites", "at least one probe prompt", [])
        creator = policy.layers_by_rank()[0].name
        return cls(
            tokenizer,
            probes,
            teacher_logprobs=(
                None if rule else creator_aligned_logprobs(stack, tokenizer, probes, creator)
            ),
            judge=judge if rule else None,
            probability=config.probability,
            weight=config.weight,
            seed=seed,
        )

    @property
    def teacher(self) -> Tensor | None:
        """The frozen teacher: first-token log-probs per probe, ``[probes, vocab]`` (judge: None).

        A copy: nothing done to it reaches the teacher.
        """
        return None if self._table is None else self._table.clone()

    def consult(self) -> bool:
        """Draw the schedule for one local step; ``True`` means intervene now."""
        self.consultations += 1
        return self._schedule.reinforce()

    def loss(self, model: torch.nn.Module) -> Tensor:
        """``weight *`` the distance to the teacher on a batch of probes; counts one intervention.

        A teacher model: squared distance between centred first-token log-probabilities
        (logit matching, which restores the teacher's ranking of every answer word, not
        only of its likely ones). A rule judge: cross-entropy on the wanted word. The
        student is scored in the model's current mode: with dropout off (feedback events) a
        student equal to its teacher gets no gradient, in float32 and bfloat16; with dropout
        on (demonstrations) the gap also holds dropout's noise.
        """
        take = self._rng.choice(len(self.probes), size=min(self.batch, len(self.probes)))
        prompts = [self.probes[int(i)] for i in take]
        student = first_token_logprobs(model, self.tokenizer, prompts)
        self.interventions += 1
        log.debug("superego intervention %s on %s probes", self.interventions, len(prompts))
        with torch.no_grad():
            target = self.targets(prompts, student.shape[-1])
        if self._table is None:
            return self.weight * -(target * student).sum(dim=-1).mean()
        gap = (student - student.mean(-1, keepdim=True)) - (target - target.mean(-1, keepdim=True))
        return self.weight * gap.square().sum(dim=-1).mean()

    def targets(self, prompts: Sequence[str], vocab: int) -> Tensor:
        """Teacher model: its first-token log-probs; rule judge: one-hot on the wanted first token.

        A teacher's rows come from its table (a prompt outside the probes is an
        :class:`InvalidSuperego`). The wanted answer is encoded as it follows the prompt,
        as training encodes responses.
        """
        if self._table is not None:
            rows = []
            for prompt in prompts:
                if prompt not in self._row:
                    raise InvalidSuperego("prompts", "one of the superego's probe prompts", prompt)
                rows.append(self._row[prompt])
            return self._table[torch.tensor(rows, dtype=torch.long), :vocab]
        assert self.judge is not None
        out = torch.zeros((len(prompts), vocab))
        for i, prompt in enumerate(prompts):
            wanted = list(split_continuation(self.tokenizer, prompt, self.judge(prompt)).ids)
            if not wanted or wanted[0] >= vocab:
                raise InvalidSuperego("judge", "an answer that encodes to a known token", wanted)
            out[i, wanted[0]] = 1.0
        return out

    def fingerprint(self) -> str:
        """SHA-256 over the probes and the teacher's table (rule judge: over its name)."""
        digest = hashlib.sha256()
        if self._table is None:
            digest.update(repr(self.judge).encode())
            return digest.hexdigest()
        for prompt in self.probes:
            digest.update(prompt.encode() + b"\0")
        digest.update(repr(tuple(self._table.shape)).encode())
        digest.update(self._table.numpy().tobytes())
        return digest.hexdigest()


def _frozen_logprobs(model: torch.nn.Module, tokenizer: Tokenizer, probes: Sequence[str]) -> Tensor:
    """A teacher model's table, computed in eval mode (each module's mode restored after)."""
    with eval_mode(model):
        return probe_logprobs(model, tokenizer, probes)


def _checked(table: Tensor, probes: Sequence[str]) -> Tensor:
    """A private float32 CPU copy of ``table`` if it has one row per probe."""
    if table.dim() != 2 or table.shape[0] != len(probes):
        expected = f"a [{len(probes)}, vocab] table (one row per probe)"
        raise InvalidSuperego("teacher_logprobs", expected, tuple(table.shape))
    return table.detach().to("cpu", torch.float32).clone().contiguous()


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
