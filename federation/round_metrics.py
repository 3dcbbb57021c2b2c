"""Per-round, per-layer metrics: typed counters folded from the stages' counts, then the dict.

:class:`LayerMetrics` holds one layer's counters; :meth:`LayerMetrics.as_dict`
gives exactly the dict ``metrics.json`` and the Flower metric records carry
(same keys, same order: a refusal reason or veto appears where it was first
counted). :class:`RoundTally` is the pipeline's accumulator; stages never see it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from layerfed.federation.events import Count
from layerfed.federation.round_context import RoundContext
from layerfed.layers.slots import SlotId, slots_for_instance

__all__ = ["LayerMetrics", "RoundTally", "mechanism_counts", "red_line_rates", "round_metrics"]


@dataclass
class LayerMetrics:
    """One layer's counters in one round (see docs/federation.md for each)."""

    sampled: int = 0
    accepted: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    dropouts: int = 0
    no_feedback: int = 0
    local_commits: int = 0
    vetoes: Counter[str] = field(default_factory=Counter)
    slots_committed: int = 0
    slots_skipped: int = 0
    norms: list[float] = field(default_factory=list)
    """Norms of the accepted replies (summarised as ``norm_mean`` and ``norm_max``)."""
    mechanisms: dict[str, float] = field(default_factory=dict)
    """How often each mechanism acted (``round_metrics``' ``mechanisms``, not in :meth:`as_dict`)."""

    def add(self, count: Count) -> None:
        """Move the counter ``count`` names."""
        c = count.counter
        if c == "refused":
            self.refused[count.key] += count.n
        elif c == "vetoes":
            self.vetoes[count.key] += count.n
        elif c == "norms":
            self.norms.append(count.norm)
        elif c == "mechanisms":
            self.mechanisms[count.key] = self.mechanisms.get(count.key, 0.0) + count.value
        else:
            setattr(self, c, getattr(self, c) + count.n)

    def as_dict(self) -> dict[str, Any]:
        """The layer's metrics as recorded (keys in their historical order)."""
        norms = self.norms
        return {
            "sampled": self.sampled,
            "accepted": self.accepted,
            "refused": dict(self.refused),
            "dropouts": self.dropouts,
            "no_feedback": self.no_feedback,
            "local_commits": self.local_commits,
            "vetoes": dict(self.vetoes),
            "slots_committed": self.slots_committed,
            "slots_skipped": self.slots_skipped,
            "norm_mean": float(np.mean(norms)) if norms else 0.0,
            "norm_max": float(np.max(norms)) if norms else 0.0,
        }


@dataclass
class RoundTally:
    """The pipeline's per-layer counters for one round (a layer appears once counted)."""

    layers: dict[str, LayerMetrics] = field(default_factory=dict)

    def add(self, counts: Iterable[Count]) -> None:
        """Fold ``counts`` in, in order."""
        for count in counts:
            self.layers.setdefault(count.layer, LayerMetrics()).add(count)

    def touch(self, layer: str) -> None:
        """Make ``layer`` appear in the metrics even if nothing of it is counted."""
        self.layers.setdefault(layer, LayerMetrics())


def round_metrics(ctx: RoundContext, tally: RoundTally) -> dict[str, Any]:
    """The round's metrics: counters per layer, probes on the committed global slots, then
    each red-line suite's rate on every committed shared composition (:func:`red_line_rates`)."""
    layers = {name: m.as_dict() for name, m in sorted(tally.layers.items())}
    globals_ = [SlotId(g.name, "global") for g in ctx.policy.layers if g.slot_key == "global"]
    composed = {s: ctx.state.current(s, ctx.stack.spec(s), ctx.round) for s in globals_}
    key = ctx.composition_key(globals_)
    probes = ctx.probes.rates([s.name for s in ctx.policy.probe_suites], composed, key)
    out = {"round": ctx.round, "layers": layers, "probes": probes}
    out["mechanisms"] = mechanism_counts(tally)
    if ctx.policy.red_lines.probes:
        out["red_lines"] = red_line_rates(ctx)
    return out


def mechanism_counts(tally: RoundTally) -> dict[str, dict[str, float]]:
    """Per layer: how often each mechanism acted this round.

    From the replies (:mod:`layerfed.wire.mechanisms`, summed over the instances' trainings,
    instance-only slots included): ``trainings``, ``superego_steps``,
    ``superego_interventions``, ``clipped_local``, ``protected``, ``protection_removed`` (a sum
    of per-update shares); from the server: ``norm_clipped`` (replies the norm cap clipped),
    ``norm_refused`` (replies it refused), ``gate_refused`` (candidates the red-line gate
    refused) and ``policy_vetoes`` (the policy's vetoes that fired). Every layer counted
    appears, with every server counter (0 when nothing acted).
    """
    out: dict[str, dict[str, float]] = {}
    for name, m in sorted(tally.layers.items()):
        gate = float(m.vetoes.get("red_line:reject", 0))
        counts = {
            "norm_clipped": 0.0,
            **m.mechanisms,
            "norm_refused": float(m.refused.get("norm_exceeded", 0)),
            "gate_refused": gate,
            "policy_vetoes": float(sum(m.vetoes.values())) - gate,
        }
        out[name] = dict(sorted(counts.items()))
    return out


def red_line_rates(ctx: RoundContext) -> list[dict[str, Any]]:
    """Each red-line suite's violation rate on each distinct shared-slot composition of the
    known instances (``ctx.profiles``; none known: the global slots), as committed now.

    One row per composition and suite: ``{"composition": [slot, ...], "suite", "rate",
    "max_violation_rate"}``; compositions are measured in one batch, cached by versions.
    """
    shared = {layer.name for layer in ctx.policy.layers if layer.slot_key != "instance"}
    seen: dict[tuple[SlotId, ...], list[SlotId]] = {}
    for jurisdiction, groups in sorted(ctx.profiles):
        slots = slots_for_instance(ctx.policy, "composition", jurisdiction, groups)
        kept = [s for s in slots if s.layer in shared]
        seen.setdefault(tuple(kept), kept)
    if not seen:
        globals_ = [SlotId(g.name, "global") for g in ctx.policy.layers if g.slot_key == "global"]
        seen[tuple(globals_)] = globals_
    probes = ctx.policy.red_lines.probes
    suites = list(dict.fromkeys(p.suite for p in probes))
    compositions = [
        ({s: ctx.state.current(s, ctx.stack.spec(s), ctx.round) for s in slots}, slots)
        for slots in seen.values()
    ]
    rates = ctx.probes.rates_many(
        suites, [(arrays, ctx.composition_key(slots)) for arrays, slots in compositions]
    )
    limit = {p.suite: p.max_violation_rate for p in probes}
    return [
        {
            "composition": [str(s) for s in slots],
            "suite": suite,
            "rate": measured[suite],
            "max_violation_rate": limit[suite],
        }
        for (_, slots), measured in zip(compositions, rates, strict=True)
        for suite in suites
    ]
