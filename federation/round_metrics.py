"""Per-round, per-layer metrics: counters while replies are processed, then the summary."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from layerfed.federation.probes import ProbeRunner
from layerfed.federation.round_context import RoundContext
from layerfed.layers.slots import SlotId

__all__ = ["finish_metrics", "layer_metrics"]


def layer_metrics() -> dict[str, Any]:
    """Fresh counters for one layer in one round."""
    return {
        "sampled": 0,
        "accepted": 0,
        "refused": Counter(),
        "dropouts": 0,
        "no_feedback": 0,
        "local_commits": 0,
        "vetoes": Counter(),
        "slots_committed": 0,
        "slots_skipped": 0,
        "norms": [],
    }


def finish_metrics(
    ctx: RoundContext, by_layer: dict[str, dict[str, Any]], runner: ProbeRunner
) -> dict[str, Any]:
    """The round's metrics: counters per layer, norms summarised, probes on the global slots."""
    layers: dict[str, Any] = {}
    for name, stats in sorted(by_layer.items()):
        norms = stats.pop("norms")
        stats["norm_mean"] = float(np.mean(norms)) if norms else 0.0
        stats["norm_max"] = float(np.max(norms)) if norms else 0.0
        stats["refused"] = dict(stats["refused"])
        stats["vetoes"] = dict(stats["vetoes"])
        layers[name] = stats
    globals_ = [SlotId(g.name, "global") for g in ctx.policy.layers if g.slot_key == "global"]
    composed = {s: ctx.state.current(s, ctx.stack.spec(s), ctx.round) for s in globals_}
    key = ctx.composition_key(globals_)
    probes = runner.rates([s.name for s in ctx.policy.probe_suites], composed, key)
    return {"round": ctx.round, "layers": layers, "probes": probes}
