"""Server-side probes: red-line and near-miss rates of composed slots, candidate or committed."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from layerfed.governance.schema import Policy
from layerfed.layers.slots import SlotId
from layerfed.layers.stack import LayerStack
from layerfed.simulation.world import builtin_suite, probe_rate, probe_violations

__all__ = ["ProbeRunner"]

Arrays = dict[str, np.ndarray[Any, Any]]


class ProbeRunner:
    """Measures probe suites on base + global slots + one slot (candidate or committed)."""

    def __init__(self, policy: Policy, stack: LayerStack, tokenizer: Any) -> None:
        self.policy = policy
        self.stack = stack
        self.tokenizer = tokenizer
        self._suites: dict[str, list[tuple[str, str]]] = {}
        self._cache: dict[tuple[Any, ...], float] = {}

    def suite(self, name: str) -> list[tuple[str, str]]:
        """The prompts of a probe suite named in the policy."""
        if name not in self._suites:
            entry = next(s for s in self.policy.probe_suites if s.name == name)
            source = entry.source.removeprefix("builtin:")
            self._suites[name] = builtin_suite(source)
        return self._suites[name]

    @torch.no_grad()
    def rate(
        self, suite: str, slots: Mapping[SlotId, Arrays], key: tuple[Any, ...] | None = None
    ) -> float:
        """Violation rate on ``suite`` with exactly ``slots`` composed at these arrays.

        ``key`` names a committed composition (slot versions and round): results for
        the same key are reused, so unchanged slots are not measured again.
        """
        if key is not None and (suite, key) in self._cache:
            return self._cache[(suite, key)]
        result = self._measure(suite, slots)
        if key is not None:
            self._cache[(suite, key)] = result
        return result

    @torch.no_grad()
    def rates(
        self, suites: list[str], slots: Mapping[SlotId, Arrays], key: tuple[Any, ...]
    ) -> dict[str, float]:
        """Several suites on one committed composition, in one forward pass."""
        todo = [s for s in suites if (s, key) not in self._cache]
        if todo:
            self._compose(slots)
            prompts = [p for s in todo for p in self.suite(s)]
            wrong = probe_violations(self.stack.model, self.tokenizer, prompts).float()
            start = 0
            for name in todo:
                size = len(self.suite(name))
                self._cache[(name, key)] = float(wrong[start : start + size].mean())
                start += size
        return {s: self._cache[(s, key)] for s in suites}

    def _compose(self, slots: Mapping[SlotId, Arrays]) -> None:
        if slots:
            self.stack.activate(list(slots))
            for slot, arrays in slots.items():
                self.stack.set_arrays(slot, arrays)

    def _measure(self, suite: str, slots: Mapping[SlotId, Arrays]) -> float:
        self._compose(slots)
        return probe_rate(self.stack.model, self.tokenizer, self.suite(suite))

    def for_slot(
        self,
        slot: SlotId,
        committed: Callable[[SlotId], Arrays],
        globals_: list[SlotId],
        key: Callable[[list[SlotId]], tuple[Any, ...]],
    ) -> Callable[[str, Mapping[str, np.ndarray[Any, Any]] | None], float]:
        """``probe(suite, candidate)`` for the veto engine: candidate delta on top of committed."""

        def probe(suite: str, candidate: Mapping[str, np.ndarray[Any, Any]] | None) -> float:
            names = [g for g in globals_ if g != slot] + [slot]
            slots = {s: committed(s) for s in names}
            if candidate is None:
                return self.rate(suite, slots, key(names))
            slots[slot] = {k: v + candidate.get(k, 0) for k, v in slots[slot].items()}
            return self.rate(suite, slots)

        return probe
