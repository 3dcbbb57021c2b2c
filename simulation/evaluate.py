"""Per-instance evaluation of a run after each round, from the run's own state on disk.

:class:`RunEvaluator` is an ``on_round`` hook: after the server checkpoints round
``r`` it composes each evaluated instance's model exactly as that instance runs it
(committed shared slots, decayed lazily, plus the instance's own slots from its
disk) and scores it (:mod:`layerfed.simulation.metrics`). The series it keeps is
written as ``OUT/gym.json``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from layerfed.federation.server_state import ServerState
from layerfed.layers.arrays import Arrays
from layerfed.layers.base import load_base
from layerfed.layers.instance_disk import InstanceDisk
from layerfed.layers.memory import decay_arrays
from layerfed.layers.slots import SlotId, slots_for_instance
from layerfed.layers.stack import LayerStack
from layerfed.simulation.feedback import attack_size
from layerfed.simulation.lexicon import DANGEROUS, HARM_VERBS
from layerfed.simulation.metrics import leakage, satisfaction
from layerfed.simulation.scenario import InstanceSpec, Scenario
from layerfed.simulation.scoring import Scores, eval_suite, prepare, score
from layerfed.simulation.settings import SimSettings
from layerfed.simulation.summaries import MECHANISM_COUNTERS

__all__ = [
    "ADVERSARIES",
    "GUARD_WORDS",
    "GYM_FILE",
    "RunEvaluator",
    "pin_torch",
    "wanted_style",
]

log = logging.getLogger("layerfed")
GYM_FILE = "gym.json"
ADVERSARIES = ("turkey", "drip")
GUARD_WORDS = frozenset([*DANGEROUS, *HARM_VERBS])
"""Words an output guard bans in the ``*_guarded`` metrics: dangerous objects, harming verbs."""


def wanted_style(spec: InstanceSpec, scenario: Scenario) -> str | None:
    """The style an instance's user wants: their own, else their first group's, else none."""
    if spec.user.style is not None and spec.user.kind == "stylist":
        return spec.user.style
    for group in spec.groups:
        if group in scenario.group_styles:
            return scenario.group_styles[group]
    return None


class RunEvaluator:
    """Scores every (or every k-th) instance's composition after each round."""

    def __init__(self, settings: SimSettings, max_instances: int = 16) -> None:
        pin_torch()
        self.settings = settings.resolved()
        self.policy = self.settings.load_policy()
        self.scenario = self.settings.load_scenario()
        roster = self.scenario.roster
        step = max(1, -(-len(roster) // max_instances))
        self.instances = [roster[i] for i in range(0, len(roster), step)]
        model, self.tokenizer = load_base(self.policy.base_model)
        self.stack = LayerStack(self.policy, model, self.tokenizer, root_seed=self.settings.seed)
        self.suite = prepare(self.tokenizer, eval_suite())
        self.base = score(self.stack.model, self.tokenizer, self.suite)
        self.series: list[dict[str, Any]] = self._earlier() if self.settings.resume else []
        self._guarded = _guarded_masks(self.suite.suite)
        self._pending = _no_counts()
        self.seconds = 0.0
        """CPU seconds this process spent scoring (the evaluator's share of a run)."""

    def _earlier(self) -> list[dict[str, Any]]:
        """The series an interrupted run wrote before (a resumed run continues it)."""
        path = self.settings.out_dir / GYM_FILE
        if not path.exists():
            return []
        rows: list[dict[str, Any]] = json.loads(path.read_text()).get("rounds", [])
        return rows

    def on_round(self, metrics: dict[str, Any]) -> None:
        """The ``on_round`` hook: evaluate the round just checkpointed (every k-th round).

        Between scored rounds (``Scenario.evaluate_every``) the round's veto and refusal
        counts are carried into the next scored row, as are its attacks and events.
        """
        round_ = int(metrics["round"])
        for key in ("vetoes", "refused"):
            self._pending[key] += sum(sum(s[key].values()) for s in metrics["layers"].values())
        for counts in metrics.get("mechanisms", {}).values():
            for key in MECHANISM_COUNTERS:
                self._pending[key] += counts.get(key, 0)
        if not self.scenario.evaluated(round_):
            return
        started = time.thread_time()
        with torch.random.fork_rng(devices=[]):
            row = self.evaluate(round_, metrics)
        row.update(_row_counts(self._pending))
        self._pending = _no_counts()
        self.series = [r for r in self.series if int(r["round"]) < round_] + [row]
        self.write()
        self.seconds += time.thread_time() - started

    def evaluate(self, round_: int, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        """Scores of every evaluated instance at ``round_`` and their summary.

        ``attacks`` and ``events`` count every round since the previous scored row.
        """
        state = ServerState(self.settings.out_dir, self.policy, self.settings.run_id)
        state.load()
        cache: dict[tuple[str, ...], Scores] = {}
        scores = {spec.id: self._score(spec, state, round_, cache) for spec in self.instances}
        row = self.summarise(round_, scores)
        since = max([int(r["round"]) for r in self.series if int(r["round"]) < round_] or [0])
        row["attacks"] = sum(self._attacks(r) for r in range(since + 1, round_ + 1))
        row["events"] = sum(self._events(r) for r in range(since + 1, round_ + 1))
        if metrics is not None:
            row["vetoes"] = sum(sum(s["vetoes"].values()) for s in metrics["layers"].values())
            row["refused"] = sum(sum(s["refused"].values()) for s in metrics["layers"].values())
            for layer, eps in metrics.get("privacy", {}).get("layers", {}).items():
                row[f"epsilon_{layer}"] = float("nan") if eps is None else float(eps)
        return row

    def summarise(self, round_: int, scores: dict[str, Scores]) -> dict[str, Any]:
        """Means over instances, satisfaction per individual and per group, and leakage."""
        wanted = {s.id: wanted_style(s, self.scenario) for s in self.instances}
        personal = {
            s.id: s.user.style for s in self.instances if s.user.kind == "stylist" and s.user.style
        }
        per_instance = {i: satisfaction(scores[i], w) for i, w in wanted.items() if w}
        groups: dict[str, list[float]] = {}
        for spec in self.instances:
            if spec.id in per_instance:
                for g in spec.groups:
                    groups.setdefault(g, []).append(per_instance[spec.id])
        shared = {
            s.id: {
                self.scenario.group_styles[g] for g in s.groups if g in self.scenario.group_styles
            }
            for s in self.instances
        }
        adversaries = [s.id for s in self.instances if s.user.kind in ADVERSARIES]
        guarded = {i: self._guard(v) for i, v in scores.items()}
        return {
            "round": round_,
            "violation": _mean([v.violation for v in scores.values()]),
            "false_refusal": _mean([v.false_refusal for v in scores.values()]),
            "error": _mean([(v.violation + v.false_refusal) / 2 for v in scores.values()]),
            "capability": _mean([v.capability for v in scores.values()]),
            "margin": _mean([v.margin for v in scores.values()]),
            "near_margin": _mean([v.near_margin for v in scores.values()]),
            "violation_adversary": _mean([scores[i].violation for i in adversaries]),
            "violation_adversary_guarded": _mean([guarded[i][0] for i in adversaries]),
            "false_refusal_guarded": _mean([g[1] for g in guarded.values()]),
            "false_refusal_kinds": _mean_dicts([v.false_refusal_kinds for v in scores.values()]),
            "pref_individual": _mean([per_instance[i] for i in personal if i in per_instance]),
            "pref_individual_prob": _mean(
                [scores[i].style_prob.get(w, float("nan")) for i, w in personal.items()]
            ),
            "pref_all": _mean(list(per_instance.values())),
            "pref_group": {g: _mean(v) for g, v in sorted(groups.items())},
            "leakage": leakage(personal, scores, self.base, shared),
            "instances": {i: round(per_instance.get(i, float("nan")), 4) for i in scores},
            "violation_by_instance": {i: v.violation for i, v in scores.items()},
        }

    def _guard(self, scores: Scores) -> tuple[float, float]:
        """Violation and false-refusal rates if an output guard banned :data:`GUARD_WORDS`."""
        red, near = self._guarded
        decisions = scores.decisions
        if decisions is None:
            return float("nan"), float("nan")
        complies_red, refuses_near = decisions
        violation = float(np.mean(complies_red & ~red))
        false_refusal = float(np.mean(refuses_near | near))
        return violation, false_refusal

    def _score(
        self,
        spec: InstanceSpec,
        state: ServerState,
        round_: int,
        cache: dict[tuple[str, ...], Scores],
    ) -> Scores:
        slots = slots_for_instance(self.policy, spec.id, spec.jurisdiction, spec.groups)
        own = self._own(spec.id, round_)
        if not own:  # compositions of shared slots only are the same for every such instance
            key = tuple(sorted(str(s) for s in slots))
            if key not in cache:
                cache[key] = self._compose_and_score(slots, {}, state, round_)
            return cache[key]
        return self._compose_and_score(slots, own, state, round_)

    def _compose_and_score(
        self, slots: list[SlotId], own: Arrays, state: ServerState, round_: int
    ) -> Scores:
        arrays: dict[SlotId, Arrays] = {}
        for slot in slots:
            layer = self.policy.layer(slot.layer)
            if layer.updates_leave_instance:
                arrays[slot] = state.current(slot, self.stack.spec(slot), round_)
            else:
                arrays[slot] = {k: v for k, v in own.items() if k.startswith(f"{slot}/")}
        live = {s: a for s, a in arrays.items() if a and any(x.any() for x in a.values())}
        if not live:
            return score(self.stack.model, self.tokenizer, self.suite)
        self.stack.activate(list(live))
        for slot, a in live.items():
            self.stack.set_arrays(slot, a)
        result = score(self.stack.model, self.tokenizer, self.suite)
        mine = [s for s in live if self.policy.layer(s.layer).slot_key == "instance"]
        if mine:
            shared = [s for s in live if s not in mine]
            top = self.policy.layers_by_rank()[0]
            self.stack.activate(shared or [SlotId(top.name, "global")])
            for slot in mine:
                self.stack.evict(slot, recycle=True)
        return result

    def _own(self, instance_id: str, round_: int) -> Arrays:
        disk = InstanceDisk(self.settings.out_dir / "state" / "instances" / instance_id)
        saved = disk.load_before(round_ + 1)
        if saved is None:
            return {}
        saved_round, arrays = saved
        out: Arrays = {}
        for layer in self.policy.layers:
            part = {k: v for k, v in arrays.items() if k.startswith(f"{layer.name}/")}
            if part:
                out.update(decay_arrays(part, layer, rounds=round_ - saved_round))
        return out

    def _attacks(self, round_: int) -> int:
        total = 0
        for i, spec in enumerate(self.scenario.roster):
            if spec.user.kind in ("turkey", "drip") and spec.user.active(round_):
                rng = np.random.default_rng([self.settings.seed, round_, i, 29])
                total += attack_size(spec.user, round_, rng)
        return total

    def _events(self, round_: int) -> int:
        """Feedback opportunities offered this round by non-adversarial users (an upper bound)."""
        return sum(
            spec.user.examples
            for spec in self.scenario.roster
            if spec.user.kind not in ("turkey", "drip", "silent") and spec.user.active(round_)
        )

    def write(self, path: Path | None = None) -> Path:
        """Write the series as JSON (default ``OUT/gym.json``)."""
        target = path or self.settings.out_dir / GYM_FILE
        base = {k: v for k, v in self.base.to_dict().items()}
        record = {
            "run_id": self.settings.run_id,
            "policy": self.policy.name,
            "base_model": self.policy.base_model.builtin or str(self.policy.base_model.path),
            "base": base,
            "rounds": self.series,
        }
        target.write_text(json.dumps(record))
        return target


def _no_counts() -> dict[str, float]:
    return {"vetoes": 0, "refused": 0, **dict.fromkeys(MECHANISM_COUNTERS, 0.0)}


def _row_counts(pending: dict[str, float]) -> dict[str, float]:
    """The pending sums as a row records them (``protection_removed`` as a mean share)."""
    row = dict(pending)
    protected = pending["protected"]
    row["protection_removed"] = pending["protection_removed"] / protected if protected else 0.0
    return row


def pin_torch() -> None:
    """One thread and deterministic kernels: the same seed scores the same on any machine."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _mean_dicts(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for r in rows for k in r})
    return {k: _mean([r[k] for r in rows if k in r]) for k in keys}


def _guarded_masks(suite: Any) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Per red-line and near-miss prompt: whether its compliant answer holds a banned word."""

    def banned(prompt: str) -> bool:
        return bool(GUARD_WORDS.intersection(prompt.split()))

    red = np.array([banned(p) for p in suite.red_line])
    near = np.array([banned(p) for p in suite.near])
    return red, near
