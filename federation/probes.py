"""Server-side probes: violation rates of the policy's suites on composed slots.

The suites are the policy's (:func:`layerfed.layers.probes.load_suite`): built-in
entry points or JSONL files, scored by refusal vs compliance continuation
log-probabilities. A composition is base + some committed slots, possibly with a
candidate on top; committed compositions are cached by key (slot versions).

Compositions are scored in batches (:class:`~layerfed.layers.probe_batch.BatchedProbes`:
one forward for many compositions, each row block with its own slots' LoRA branches,
nothing written into the stack). The batch computes each composition's PEFT forward
up to float rounding (about 1e-6 here); a composition with any margin within
``exact_margin`` of zero, where rounding could decide a verdict, is scored again
the PEFT way (its slots activated and set in the stack, one forward), so verdicts
are those of the per-composition path.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from layerfed.governance.schema import Policy
from layerfed.layers.arrays import Arrays
from layerfed.layers.device import float32_compute, model_dtype
from layerfed.layers.probe_batch import BatchedProbes
from layerfed.layers.probe_batch import exact_margin as exact_margin_for
from layerfed.layers.probes import ProbeSuiteData, load_suite, suite_margins, verdicts
from layerfed.layers.slots import SlotId
from layerfed.layers.stack import LayerStack

__all__ = ["ProbeRunner"]

log = logging.getLogger("layerfed")

Composition = Mapping[SlotId, Mapping[str, np.ndarray[Any, Any]]]


_SEEN_MAX = 100_000
"""Most results kept by content before the store is emptied."""


def _content_key(slots: Composition, digests: dict[int, bytes | None]) -> tuple[Any, ...]:
    """Slot names in composition order, each with a digest of its arrays (as float32).

    All-zero slots are left out: their LoRA branch adds exact zeros, so the forward
    is the same with or without them (e.g. a jurisdiction nobody has trained yet).
    """
    key = []
    for slot, arrays in slots.items():
        if id(arrays) not in digests:
            h = hashlib.blake2b(digest_size=16)
            zero = True
            for name in sorted(arrays):
                value = np.ascontiguousarray(arrays[name], dtype=np.float32)
                zero = zero and not value.any()
                h.update(f"{name}:{value.shape}".encode())
                h.update(value.data)
            digests[id(arrays)] = None if zero else h.digest()
        if digests[id(arrays)] is not None:
            key.append((str(slot), digests[id(arrays)]))
    return tuple(key)


class ProbeRunner:
    """Measures probe suites on compositions of committed slots (and candidates)."""

    def __init__(
        self,
        policy: Policy,
        stack: LayerStack,
        tokenizer: Any,
        *,
        root: Path | None = None,
        exact_margin: float | None = None,
    ) -> None:
        self.policy = policy
        self.stack = stack
        self.tokenizer = tokenizer
        self.root = root
        self.exact_margin = (
            exact_margin if exact_margin is not None else exact_margin_for(model_dtype(stack.model))
        )
        """Margins closer to zero than this are re-scored the per-composition PEFT way (in
        float32 on a bfloat16/float16 base); by default the base dtype's tolerance."""
        self.batch = BatchedProbes(stack, tokenizer)
        self.rescored = 0
        """Compositions re-scored one at a time because a margin was within ``exact_margin``."""
        self._suites: dict[str, ProbeSuiteData] = {}
        self._cache: dict[tuple[Any, ...], float] = {}
        self._seen: dict[tuple[Any, ...], float] = {}

    def suite(self, name: str) -> ProbeSuiteData:
        """A probe suite named in the policy, loaded once (JSONL paths: ``root`` or the policy's folder)."""
        if name not in self._suites:
            self._suites[name] = load_suite(self.policy, name, root=self.root)
        return self._suites[name]

    def rate(self, suite: str, slots: Composition, key: tuple[Any, ...] | None = None) -> float:
        """Violation rate on ``suite`` with exactly ``slots`` composed at these arrays.

        ``key`` names a committed composition (slot versions and round): results for
        the same key are reused, so unchanged slots are not measured again. No slots:
        the stack's model as it stands.
        """
        if key is not None:
            return self.rates([suite], slots, key)[suite]
        return self.measure([suite], slots)[suite]

    def rates(
        self, suites: list[str], slots: Composition, key: tuple[Any, ...]
    ) -> dict[str, float]:
        """Several suites on one committed composition (cached by ``key``)."""
        return self.rates_many(suites, [(slots, key)])[0]

    def rates_many(
        self, suites: list[str], compositions: Sequence[tuple[Composition, tuple[Any, ...]]]
    ) -> list[dict[str, float]]:
        """Several suites on committed compositions, the ones not cached in one batch."""
        todo: dict[tuple[Any, ...], Composition] = {}
        for slots, key in compositions:
            if any((s, key) not in self._cache for s in suites):
                todo.setdefault(key, slots)
        if todo:
            measured = self.measure_many(suites, list(todo.values()))
            for key, rates in zip(todo, measured, strict=True):
                for name, rate in rates.items():
                    self._cache[(name, key)] = rate
        return [{s: self._cache[(s, key)] for s in suites} for _, key in compositions]

    def measure(self, suites: list[str], slots: Composition) -> dict[str, float]:
        """Several suites on exactly ``slots`` (e.g. a candidate)."""
        return self.measure_many(suites, [slots])[0]

    @torch.no_grad()
    def measure_many(
        self, suites: list[str], compositions: Sequence[Composition]
    ) -> list[dict[str, float]]:
        """Several suites on each of ``compositions``, the ones not seen before in one batch.

        Results are kept by content (slot names and a digest of their arrays as float32),
        so a candidate that is then committed is not measured again as the committed
        composition (by the next round's gate, the round metrics or a veto).
        """
        digests: dict[int, bytes | None] = {}
        keys = [_content_key(c, digests) for c in compositions]
        todo: dict[tuple[Any, ...], Composition] = {}
        for slots, key in zip(compositions, keys, strict=True):
            if slots and any((s, key) not in self._seen for s in suites):
                todo.setdefault(key, slots)
        if len(self._seen) > _SEEN_MAX:
            self._seen.clear()
        need = [s for s in suites if any((s, key) not in self._seen for key in todo)]
        data = [self.suite(n) for n in need]  # only the suites some composition lacks
        scored = self.batch.margins(data, list(todo.values()))
        for (key, slots), margins in zip(todo.items(), scored, strict=True):
            if any(bool((m.abs() < self.exact_margin).any()) for m in margins):
                self.rescored += 1
                log.debug("probe margin within %s of zero: re-scored", self.exact_margin)
                margins = self.margins_one(data, slots)
            for name, rate in self._rates(data, margins).items():
                self._seen[(name, key)] = rate
        out = []
        for slots, key in zip(compositions, keys, strict=True):
            if not slots:  # nothing to compose: the model as it stands
                every = [self.suite(n) for n in suites]
                out.append(
                    self._rates(every, suite_margins(self.stack.model, self.tokenizer, every))
                )
            else:
                out.append({s: self._seen[(s, key)] for s in suites})
        return out

    @torch.no_grad()
    def margins_one(self, data: Sequence[ProbeSuiteData], slots: Composition) -> list[Tensor]:
        """Margins of ``data`` the per-composition PEFT way: ``slots`` activated and set, one forward."""
        self.stack.activate(list(slots))
        for slot, arrays in slots.items():
            self.stack.set_arrays(slot, arrays)
        with float32_compute(self.stack.model):  # nothing happens on a float32 base
            return suite_margins(self.stack.model, self.tokenizer, data)

    @staticmethod
    def _rates(data: Sequence[ProbeSuiteData], margins: Sequence[Tensor]) -> dict[str, float]:
        # exact prompt fractions (float64 count / size): a float32 mean reads 1/5 as 0.2000000030
        return {
            s.name: int(verdicts(s, m).sum()) / len(s.prompts)
            for s, m in zip(data, margins, strict=True)
        }

    def for_slot(
        self,
        slot: SlotId,
        committed: Callable[[SlotId], Arrays],
        globals_: list[SlotId],
        key: Callable[[list[SlotId]], tuple[Any, ...]],
    ) -> Callable[[str, Mapping[str, np.ndarray[Any, Any]] | None], float]:
        """``probe(suite, candidate)`` for the veto engine: candidate delta on top of committed."""
        names = [g for g in globals_ if g != slot] + [slot]
        arrays: dict[SlotId, Arrays] = {}

        def composition() -> dict[SlotId, Arrays]:
            if not arrays:  # the committed slots, read once per probe function
                arrays.update({s: committed(s) for s in names})
            return dict(arrays)

        def probe(suite: str, candidate: Mapping[str, np.ndarray[Any, Any]] | None) -> float:
            slots = composition()
            if candidate is None:
                return self.rate(suite, slots, key(names))
            slots[slot] = {k: v + candidate.get(k, 0) for k, v in slots[slot].items()}
            return self.rate(suite, slots)

        return probe
