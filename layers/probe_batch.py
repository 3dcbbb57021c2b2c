"""Probe suites scored on many slot compositions in one batched forward pass.

A composition's LoRA branch on a module is, as PEFT runs it, ``base(x)`` plus
``B(A(x)) * scaling`` for each composed slot memory. Here the base model runs once
for a batch holding the probe rows (:mod:`layerfed.layers.probe_rows`) of many
compositions, with PEFT's adapters switched off for the call, and a forward hook
on each targeted module adds each row group's own composition's branch: one
adapter per composition whose A is the slots' A matrices stacked along the rank
(each slot's frozen A from its seed) and whose B is the slots' B matrices times
their scalings side by side, so one pair of batched matmuls serves every
composition. Nothing is written into the model: the stack's adapters, active
slots, trainable flags and modes are as they were afterwards.

Compositions that agree on every slot a decoder block's input depends on share
that input: the batch starts with one copy of the rows and is widened at each
decoder block to the distinct compositions of the blocks so far (e.g. 100
jurisdiction x group compositions whose group slot targets only the last block
run the earlier blocks 10 times, not 100). The output layer runs only on the
positions that predict a continuation token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import Tensor

from layerfed.layers.arrays import ArraysIn
from layerfed.layers.base import unwrap
from layerfed.layers.probe_rows import RowBlock, ScoreRows, score_rows
from layerfed.layers.probes import ProbeSuiteData
from layerfed.layers.redlines import check_update_names
from layerfed.layers.slots import SlotId, SlotSpec

__all__ = [
    "EXACT_MARGINS",
    "BatchedProbes",
    "RowBlock",
    "ScoreRows",
    "base_only",
    "eval_mode",
    "exact_margin",
    "score_rows",
]

EXACT_MARGINS = {torch.float32: 1e-4, torch.bfloat16: 0.25, torch.float16: 0.05}
"""How far (log-probability, refusal minus compliance) the batched margins may lie from
the per-composition PEFT ones, per base dtype: margins closer to zero than this are
re-scored (in float32). float32: the two sums differ in order only (measured < 1e-5);
bfloat16 (8-bit mantissa) and float16 (11-bit) round each activation, so their bounds
are those of the measured spread on the tiny and random 0.5B bases times a safety factor
(docs/deployment.md)."""


def exact_margin(dtype: torch.dtype) -> float:
    """The batched-vs-PEFT tolerance of a base in ``dtype`` (:data:`EXACT_MARGINS`)."""
    return EXACT_MARGINS.get(dtype, EXACT_MARGINS[torch.bfloat16])


Composition = Mapping[SlotId, ArraysIn]


@dataclass(frozen=True)
class _Term:
    """One composed slot memory on one module: its frozen A, its B times the scaling."""

    key: tuple[Any, ...]
    a: Tensor
    b: Tensor


Terms = dict[str, list[_Term]]
"""One composition: module -> its LoRA terms in PEFT's order."""


@dataclass(frozen=True)
class _Level:
    """Compositions grouped by the slots a decoder block and the ones below it see."""

    block: int | None
    """The decoder block the batch is widened at (None: before the model)."""
    modules: tuple[str, ...]
    group: tuple[int, ...]
    """Per composition, its group at this level."""
    parent: Tensor
    """Per group, its group at the level below (which copy of the rows it continues)."""
    reps: tuple[int, ...]
    """Per group, a composition in it."""


class BatchedProbes:
    """Scores suites on many compositions of a :class:`~layerfed.layers.stack.LayerStack`.

    ``max_tokens`` bounds the tokens of one forward pass (compositions are chunked; by
    default about 256 MiB of float32 activations per layer at four times the hidden size).
    """

    def __init__(self, stack: Any, tokenizer: Any, *, max_tokens: int | None = None) -> None:
        self.stack = stack
        self.tokenizer = tokenizer
        hidden = getattr(getattr(unwrap(stack.model), "config", None), "hidden_size", 1024)
        self.max_tokens = max_tokens or (1 << 26) // (4 * int(hidden))
        self.split_from = 8192
        """Tokens of a batch above which rows are split by length (less padding)."""
        self.share_blocks = True
        """Share decoder-block inputs between compositions that agree below them."""
        self._a: dict[tuple[SlotId, int], dict[str, Tensor]] = {}
        self._specs: dict[SlotId, SlotSpec] = {}

    @torch.no_grad()
    def margins(
        self, suites: Sequence[ProbeSuiteData], compositions: Sequence[Composition]
    ) -> list[list[Tensor]]:
        """Per composition, per suite: refusal-minus-compliance log-probability per prompt."""
        if not compositions:
            return []
        n = len(compositions)
        plan = score_rows(self.tokenizer, suites, 1)
        if n * sum(len(b.rows) * b.width for b in plan.blocks) > self.split_from:
            plan = score_rows(self.tokenizer, suites)  # less padding, a few more passes
        terms = self._terms(compositions)
        scores = torch.zeros(n, plan.pairs, dtype=torch.float32)
        for block in plan.blocks:
            step = max(1, self.max_tokens // (len(block.rows) * block.width))
            for i in range(0, n, step):
                scores[i : i + step] += self._forward(block, terms[i : i + step], plan.pairs)
        diff = scores[:, 0::2] - scores[:, 1::2]
        return [list(torch.split(row, list(plan.sizes))) for row in diff]

    # -- compositions ---------------------------------------------------------------

    def _terms(self, compositions: Sequence[Composition]) -> list[Terms]:
        """Per composition: module -> its LoRA terms (arrays checked once per object)."""
        made: dict[tuple[Any, ...], _Term] = {}
        checked: set[tuple[SlotId, int]] = set()
        out = []
        for composition in compositions:
            modules: Terms = {}
            for slot, arrays in composition.items():
                spec = self._spec(slot)
                if (slot, id(arrays)) not in checked:
                    check_update_names(self.stack.policy, arrays)
                    spec.check(arrays)
                    checked.add((slot, id(arrays)))
                a = self._a_matrices(spec)
                for memory in spec.memories:
                    for t in spec.targets:
                        key = (slot, id(arrays), memory, t.module)
                        if key not in made:
                            b = np.asarray(arrays[spec.array_name(memory, t.module)], np.float32)
                            made[key] = _Term(key, a[t.module], torch.from_numpy(b) * spec.scaling)
                        modules.setdefault(t.module, []).append(made[key])
            out.append(modules)
        return out

    def _spec(self, slot: SlotId) -> SlotSpec:
        """The stack's spec of ``slot``, kept (a slot not in the stack is computed per call)."""
        if slot not in self._specs:
            self._specs[slot] = self.stack.spec(slot)
        return self._specs[slot]

    def _a_matrices(self, spec: SlotSpec) -> dict[str, Tensor]:
        key = (spec.slot, spec.a_seed)
        if key not in self._a:
            self._a[key] = {m: torch.from_numpy(a) for m, a in spec.a_matrices().items()}
        return self._a[key]

    def _levels(
        self, inner: torch.nn.Module, terms: list[Terms]
    ) -> tuple[list[_Level], torch.nn.ModuleList | None]:
        """Where the batch widens: one level per decoder block with targeted modules."""
        modules = sorted({m for composition in terms for m in composition})
        found = _decoder_blocks(inner, modules) if self.share_blocks else None
        depth = found[1] if found is not None else dict.fromkeys(modules)
        levels: list[_Level] = []
        below: tuple[int, ...] = (0,) * len(terms)
        blocks = sorted({d for d in depth.values() if d is not None}) or [None]
        for block in blocks:
            mods = tuple(m for m in modules if depth[m] == block)
            sig = [
                (below[c], tuple(t.key for m in mods for t in composition.get(m, [])))
                for c, composition in enumerate(terms)
            ]
            index: dict[Any, int] = {}
            group = tuple(index.setdefault(s, len(index)) for s in sig)
            reps = tuple(group.index(g) for g in range(len(index)))
            parent = torch.tensor([below[r] for r in reps], dtype=torch.long)
            levels.append(_Level(block, mods, group, parent, reps))
            below = group
        return levels, found[0] if found is not None else None

    # -- forward --------------------------------------------------------------------

    def _forward(self, block: RowBlock, terms: list[Terms], pairs: int) -> Tensor:
        """Pair scores ``[len(terms), pairs]`` of one row block for a chunk of compositions."""
        model = self.stack.model
        inner = unwrap(model)
        device = next(model.parameters()).device
        n, rows, width = len(terms), len(block.rows), block.width
        levels, blocks = self._levels(inner, terms)
        pad = getattr(self.tokenizer, "pad_token_id", None)
        ids = torch.full((rows, width), int(pad) if pad is not None else 0, dtype=torch.long)
        mask = torch.zeros((rows, width), dtype=torch.long)
        for i, row in enumerate(block.rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        copies = 1
        if levels[0].block is None:  # no decoder blocks found: every group from the start
            copies = len(levels[0].reps)
            ids, mask = ids.repeat(copies, 1), mask.repeat(copies, 1)
        t = block.targets
        final = torch.tensor(levels[-1].group).repeat_interleave(len(t))
        flat = (t[:, 0].repeat(n) + final * rows) * width + t[:, 1].repeat(n)
        with ExitStack() as stack:
            stack.enter_context(eval_mode(model))
            stack.enter_context(base_only(model))
            named = dict(inner.named_modules())
            for level in levels:
                for name in level.modules:
                    a, b = _stacked(name, [terms[r] for r in level.reps])
                    hook = _adder(a.to(device), b.to(device), rows * width)
                    stack.callback(named[name].register_forward_hook(hook).remove)
            if blocks is not None and len(levels[-1].reps) > 1:
                at = {lv.block: lv for lv in levels}
                groups = 1
                for i, module in enumerate(blocks):
                    here = at.get(i)
                    groups = len(here.reps) if here is not None else groups
                    parent = here.parent.to(device) if here is not None else None
                    widen = _widener(parent, groups, rows)
                    stack.callback(module.register_forward_pre_hook(widen, with_kwargs=True).remove)
            picked = stack.enter_context(_select(inner, flat.to(device)))
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        sel = picked[0] if picked else logits.reshape(-1, logits.shape[-1])[flat]
        sel = sel.reshape(-1, sel.shape[-1]).float()
        tokens = t[:, 2].repeat(n).to(device)
        logp = torch.gather(sel, 1, tokens.unsqueeze(1)).squeeze(1) - torch.logsumexp(sel, -1)
        composition = torch.arange(n).repeat_interleave(len(t))
        out = torch.zeros(n * pairs, dtype=torch.float32)
        out.index_add_(0, t[:, 3].repeat(n) + composition * pairs, logp.cpu().float())
        return out.reshape(n, pairs)


def _decoder_blocks(
    inner: torch.nn.Module, modules: Sequence[str]
) -> tuple[torch.nn.ModuleList, dict[str, int | None]] | None:
    """The decoder block list holding every module in ``modules`` and each one's block."""
    for name, found in inner.named_modules():
        if not isinstance(found, torch.nn.ModuleList) or not len(found):
            continue
        prefix = f"{name}." if name else ""
        depth: dict[str, int | None] = {}
        for m in modules:
            head = m[len(prefix) :].split(".", 1)[0] if m.startswith(prefix) else ""
            if head.isdigit() and int(head) < len(found):
                depth[m] = int(head)
        if len(depth) == len(modules):
            return found, depth
    return None


def _widener(parent: Tensor | None, groups: int, rows: int) -> Callable[..., Any]:
    """A block's pre-hook: the hidden states widened to ``groups`` copies of the rows.

    ``parent`` (at a block that widens the batch) names, per group, the copy of the
    rows it continues; other batch-sized inputs (the attention mask) are built by the
    model for one copy and are repeated.
    """

    def repeat(value: Any) -> Any:
        if isinstance(value, Tensor) and value.ndim >= 2 and value.shape[0] == rows:
            return value.unsqueeze(0).expand(groups, *value.shape).reshape(-1, *value.shape[1:])
        if isinstance(value, tuple):
            return tuple(repeat(v) for v in value)
        return value

    def widen(hidden: Tensor) -> Tensor:
        if parent is None:
            return hidden
        shaped = hidden.reshape(hidden.shape[0] // rows, rows, *hidden.shape[1:])[parent]
        return shaped.reshape(groups * rows, *hidden.shape[1:])

    def hook(
        _module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if args:
            new_args = (widen(args[0]), *(repeat(a) for a in args[1:]))
            return new_args, {k: repeat(v) for k, v in kwargs.items()}
        new = {k: repeat(v) for k, v in kwargs.items() if k != "hidden_states"}
        return args, {**new, "hidden_states": widen(kwargs["hidden_states"])}

    return hook


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Every module in eval mode for the call, then each in its mode as before."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextmanager
def base_only(model: torch.nn.Module) -> Iterator[None]:
    """PEFT's LoRA layers run their base layer only; adapters and ``requires_grad`` restored."""
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not isinstance(model, PeftModel) or not layers or all(m.disable_adapters for m in layers):
        yield
        return
    grads = [(p, p.requires_grad) for p in model.parameters()]
    tuner: Any = model.base_model
    tuner.disable_adapter_layers()
    try:
        yield
    finally:
        tuner.enable_adapter_layers()
        for p, flag in grads:
            p.requires_grad_(flag)


@contextmanager
def _select(inner: torch.nn.Module, flat: Tensor) -> Iterator[list[Tensor]]:
    """The output layer sees only the hidden states at ``flat`` (batch x position) indices."""
    getter = getattr(inner, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    seen: list[Tensor] = []
    if not isinstance(head, torch.nn.Module):
        yield seen
        return

    def pre(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        chosen = hidden.reshape(-1, hidden.shape[-1])[flat].unsqueeze(0)
        return (chosen, *args[1:])

    def post(_module: torch.nn.Module, _args: tuple[Any, ...], output: Tensor) -> None:
        seen.append(output)

    handles = [head.register_forward_pre_hook(pre), head.register_forward_hook(post)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _stacked(module: str, terms: list[Terms]) -> tuple[Tensor, Tensor]:
    """``A^T`` as ``[n, in, R]`` and ``(scaling B)^T`` as ``[n, R, out]`` for one module.

    A composition's terms on a module are one adapter: the A matrices stacked along the
    rank, the scaled B matrices side by side (zero-padded to the largest rank, which
    adds exact zeros).
    """
    lists = [composition.get(module, []) for composition in terms]
    some = next(t for ts in lists for t in ts)
    rank = max(sum(t.a.shape[0] for t in ts) for ts in lists)
    a = torch.zeros(len(terms), some.a.shape[1], rank, dtype=some.a.dtype)
    b = torch.zeros(len(terms), rank, some.b.shape[0], dtype=some.b.dtype)
    for c, ts in enumerate(lists):
        at = 0
        for t in ts:
            r = t.a.shape[0]
            a[c, :, at : at + r] = t.a.T
            b[c, at : at + r, :] = t.b.T
            at += r
    return a, b


def _adder(a: Tensor, b: Tensor, block: int) -> Callable[..., Tensor]:
    """A forward hook adding group ``g``'s adapter to rows ``g * block ...`` of the output."""

    def hook(_module: torch.nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        x = args[0]
        groups = a.shape[0]
        xs = x.reshape(groups, block, x.shape[-1]).to(a.dtype)
        result = output.reshape(groups, block, output.shape[-1])
        if result.dtype == a.dtype:
            result.baddbmm_(torch.bmm(xs, a), b.to(result.dtype))
        else:  # a narrow base: the branch in float32, added in the base's dtype, as PEFT does
            result.add_(torch.bmm(torch.bmm(xs, a), b).to(result.dtype))
        return output

    return hook
