"""The veto engine: higher layers' rules over a lower layer's candidate slot update.

Only vetoes whose ``applies_to`` names the slot's layer apply. Cheap
conditions run first (scope, norm, quorum); clips they order are applied to the
candidate, and probe regressions are then measured on what would be committed.
Probe vetoes are skipped once a cheaper veto has rejected the update. The
decision is the strongest action hit: reject beats hold beats clip beats
accept. A clip on a scope condition zeroes the out-of-scope arrays; a clip on a
norm condition scales the update to ``max_norm``; a clip cannot repair a probe
regression or a missing quorum, so there it holds the update.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from layerfed.governance.schema import (
    NormCondition,
    Policy,
    ProbeRegressionCondition,
    QuorumCondition,
    ScopeCondition,
    Veto,
)
from layerfed.layers.arrays import ArraysIn, global_norm, scale

__all__ = [
    "RATE_TOLERANCE",
    "Action",
    "InScope",
    "Probe",
    "ProbeBaselines",
    "VetoDecision",
    "VetoHit",
    "check_slot",
]

log = logging.getLogger("layerfed")

Action = Literal["accept", "reject", "clip", "hold"]
InScope = Callable[[str, str], bool]
"""``in_scope(layer_name, array_name)``: whether the layer may change that array."""
Probe = Callable[[str, ArraysIn | None], float]
"""``probe(suite, candidate)``: violation rate on ``suite`` with ``candidate`` applied (None: as is)."""

_RANK: dict[Action, int] = {"accept": 0, "clip": 1, "hold": 2, "reject": 3}
RATE_TOLERANCE = 1e-9
"""Slack on probe-rate comparisons: rates are prompt fractions, so ``0.8 - 0.6`` (one prompt
of five) must not read as more than ``0.2``; far below one prompt of any real suite."""


@dataclass(frozen=True)
class VetoHit:
    """One veto that fired: its name, holder, why, and the action it took."""

    veto_name: str
    holder: str
    reason: str
    action: Action = "reject"


@dataclass(frozen=True)
class VetoDecision:
    """What happens to a slot's candidate update; ``arrays`` are after any clips."""

    action: Action
    arrays: dict[str, NDArray[Any]]
    hits: tuple[VetoHit, ...] = ()

    @property
    def commit(self) -> bool:
        """Whether the (possibly clipped) update may be committed now."""
        return self.action in ("accept", "clip")


@dataclass
class ProbeBaselines:
    """Probe results on the committed state, measured once per suite.

    Share one instance across the slots of a round to measure each baseline once.
    """

    probe: Probe
    _seen: dict[str, float] = field(default_factory=dict)

    def get(self, suite: str) -> float:
        """The violation rate on ``suite`` with no candidate applied."""
        if suite not in self._seen:
            self._seen[suite] = float(self.probe(suite, None))
        return self._seen[suite]


@dataclass
class _State:
    arrays: dict[str, NDArray[Any]]
    hits: list[VetoHit] = field(default_factory=list)

    def hit(self, veto: Veto, reason: str, action: Action | None = None) -> None:
        taken: Action = veto.action if action is None else action
        self.hits.append(VetoHit(veto.name, veto.holder, reason, taken))

    @property
    def action(self) -> Action:
        return max((h.action for h in self.hits), key=_RANK.__getitem__, default="accept")


def check_slot(
    policy: Policy,
    layer: str,
    candidate: ArraysIn,
    *,
    in_scope: InScope,
    probe: Probe,
    approvals: set[str],
    baselines: ProbeBaselines | None = None,
) -> VetoDecision:
    """Run every veto that applies to ``layer`` over one slot's ``candidate`` delta."""
    vetoes = [v for v in policy.vetoes if layer in v.applies_to]
    state = _State(dict(candidate))
    for veto in vetoes:
        if not isinstance(veto.condition, ProbeRegressionCondition):
            _check_cheap(veto, policy, layer, state, in_scope, approvals)
    cache = ProbeBaselines(probe) if baselines is None else baselines
    for veto in vetoes:
        if isinstance(veto.condition, ProbeRegressionCondition) and state.action != "reject":
            _check_probe(veto, veto.condition, state, probe, cache)
    for h in state.hits:
        log.info(
            "veto %s (%s) on layer %s: %s -> %s", h.veto_name, h.holder, layer, h.reason, h.action
        )
    return VetoDecision(state.action, state.arrays, tuple(state.hits))


def _check_cheap(
    veto: Veto,
    policy: Policy,
    layer: str,
    state: _State,
    in_scope: InScope,
    approvals: set[str],
) -> None:
    cond = veto.condition
    if isinstance(cond, ScopeCondition):
        _check_scope(veto, layer, state, in_scope)
    elif isinstance(cond, NormCondition):
        _check_norm(veto, cond, state)
    elif isinstance(cond, QuorumCondition):
        _check_quorum(veto, cond, policy, state, approvals)


def _check_scope(veto: Veto, layer: str, state: _State, in_scope: InScope) -> None:
    outside = sorted(n for n in state.arrays if not in_scope(layer, n))
    if not outside:
        return
    reason = f"arrays outside layer {layer!r} scope: {outside}"
    state.hit(veto, reason)
    if veto.action == "clip":
        for name in outside:
            state.arrays[name] = np.zeros_like(state.arrays[name])


def _check_norm(veto: Veto, cond: NormCondition, state: _State) -> None:
    norm = global_norm(state.arrays)
    if norm <= cond.max_norm:
        return
    state.hit(veto, f"update norm: expected at most {cond.max_norm:g}, got {norm:g}")
    if veto.action == "clip":
        state.arrays = scale(state.arrays, cond.max_norm / norm)


def _check_quorum(
    veto: Veto, cond: QuorumCondition, policy: Policy, state: _State, approvals: set[str]
) -> None:
    holders = {p.name for p in policy.principals if p.layer == veto.holder}
    count = len(holders & approvals)
    if count >= cond.min_signatures:
        return
    reason = f"approvals by {veto.holder!r}: expected at least {cond.min_signatures}, got {count}"
    state.hit(veto, reason, "hold" if veto.action == "clip" else veto.action)


def _check_probe(
    veto: Veto,
    cond: ProbeRegressionCondition,
    state: _State,
    probe: Probe,
    baselines: ProbeBaselines,
) -> None:
    before = baselines.get(cond.suite)
    after = float(probe(cond.suite, state.arrays))
    regression = after - before
    action: Action = "hold" if veto.action == "clip" else veto.action
    if not (math.isfinite(before) and math.isfinite(after)):
        state.hit(
            veto, f"probe {cond.suite!r}: expected finite rates, got {before}, {after}", action
        )
    elif regression > cond.max_regression + RATE_TOLERANCE:
        reason = (
            f"probe {cond.suite!r} regression: expected at most {cond.max_regression:g}, "
            f"got {regression:g} ({before:g} -> {after:g})"
        )
        state.hit(veto, reason, action)
