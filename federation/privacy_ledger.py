"""The server's privacy ledger: releases per DP slot (and instance), ε(δ), budgets.

Central DP spends one release per slot each round its noisy mean is computed
(``RoundReport.released``). Local DP spends one release per instance each time
it is sent a task for the slot (it noises and may send whatever happens next),
and a slot's ε is that of its most-used instance. Before a task goes out,
:meth:`PrivacyLedger.allows` refuses it when one more release would take the
slot (or the instance) past the layer's ``epsilon_budget``: the slot stops
training, audited as ``privacy_budget_exhausted``. After each round
:meth:`PrivacyLedger.finish_round` counts the round's releases and returns ε per
slot and per layer (:class:`PrivacyRound`: the checkpoint stage puts it in the
round's metrics and records its ``privacy_spent`` event). The counts travel in the round
metrics, so a resumed run continues from the last checkpoint exactly.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from layerfed.federation.events import Events, event
from layerfed.federation.server_state import ServerState
from layerfed.governance.audit import AuditLog
from layerfed.governance.audit_events import AuditKind
from layerfed.governance.privacy_accounting import DP_MODES, layer_epsilon
from layerfed.governance.schema import Policy, Privacy
from layerfed.layers.slots import SlotId

__all__ = ["PrivacyLedger", "PrivacyRound"]

log = logging.getLogger("layerfed")


@dataclass(frozen=True)
class PrivacyRound:
    """ε after one round: the metrics' ``privacy`` entry, ε per layer, the ``privacy_spent`` event."""

    summary: dict[str, Any]
    """``{"slots": ..., "layers": ..., "ledger": ...}`` as ``metrics.json`` holds it."""
    layers: dict[str, float | None]
    """Layer -> its largest slot ε (None: unbounded), in the order first seen."""
    events: Events = ()


class PrivacyLedger:
    """Releases and ε per DP slot; restores itself from the last checkpointed round."""

    def __init__(self, policy: Policy, state: ServerState) -> None:
        self.policy = policy
        self.central: dict[str, int] = defaultdict(int)
        self.local: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.exhausted: set[str] = set()
        last = state.metrics[-1] if state.metrics else {}
        saved = last.get("privacy", {}).get("ledger", {}) if isinstance(last, dict) else {}
        for slot, k in saved.get("central", {}).items():
            self.central[slot] = int(k)
        for slot, counts in saved.get("local", {}).items():
            for instance, k in counts.items():
                self.local[slot][instance] = int(k)

    def _privacy(self, layer: str) -> Privacy | None:
        privacy = self.policy.layer(layer).privacy
        return privacy if privacy is not None and privacy.mode in DP_MODES else None

    def releases(self, slot: SlotId, instance: str | None = None) -> int:
        """Releases so far of ``slot`` (central), or of ``instance`` in it (local: the most-used one)."""
        privacy = self._privacy(slot.layer)
        if privacy is None:
            return 0
        if privacy.mode == "central_dp":
            return self.central.get(str(slot), 0)
        counts = self.local.get(str(slot), {})
        if instance is not None:
            return counts.get(instance, 0)
        return max(counts.values(), default=0)

    def epsilon(self, slot: SlotId) -> float:
        """ε(δ) spent by ``slot`` so far (0 for layers without DP)."""
        privacy = self._privacy(slot.layer)
        return 0.0 if privacy is None else layer_epsilon(privacy, self.releases(slot))

    def allows(self, slot: SlotId, instance: str, round_: int, audit: AuditLog) -> bool:
        """Whether ``instance`` may train ``slot`` this round within the budget; counts a local release.

        A refusal is audited once per slot (and instance, for local DP) and run.
        """
        privacy = self._privacy(slot.layer)
        if privacy is None:
            return True
        local = privacy.mode == "local_dp"
        spent = self.releases(slot, instance if local else None)
        if privacy.epsilon_budget is not None:
            after = layer_epsilon(privacy, spent + 1)
            if after > privacy.epsilon_budget:
                key = f"{slot}|{instance}" if local else str(slot)
                if key not in self.exhausted:
                    self.exhausted.add(key)
                    log.info("slot %s stops training: epsilon %.3g > budget", slot, after)
                    audit.append(
                        AuditKind.PRIVACY_BUDGET_EXHAUSTED,
                        round=round_,
                        slot=str(slot),
                        instance=instance if local else "",
                        epsilon=_json(layer_epsilon(privacy, spent)),
                        next_epsilon=_json(after),
                        budget=privacy.epsilon_budget,
                        releases=spent,
                    )
                return False
        if local:
            self.local[str(slot)][instance] += 1
        return True

    def finish_round(
        self, round_: int, released: Sequence[str], sent: Sequence[SlotId]
    ) -> PrivacyRound:
        """Count this round's central ``released`` slots; ε per slot and layer, and its event."""
        for name in released:
            self.central[name] += 1
        slots: dict[str, dict[str, Any]] = {}
        layers: dict[str, float] = {}
        known = {*self.central, *self.local, *(str(s) for s in sent)}
        for name in sorted(known):
            slot = SlotId.parse(name)
            privacy = self._privacy(slot.layer)
            if privacy is None:
                continue
            eps = self.epsilon(slot)
            slots[name] = {
                "mode": privacy.mode,
                "releases": self.releases(slot),
                "epsilon": _json(eps),
                "delta": privacy.delta,
                "budget": privacy.epsilon_budget,
            }
            layers[slot.layer] = max(layers.get(slot.layer, 0.0), eps)
        ledger = {
            "central": dict(self.central),
            "local": {s: dict(c) for s, c in self.local.items()},
        }
        finite = {k: _json(v) for k, v in layers.items()}
        summary = {"slots": slots, "layers": finite, "ledger": ledger}
        events: Events = ()
        if slots:
            spent = event(
                AuditKind.PRIVACY_SPENT,
                round=round_,
                epsilon={k: v["epsilon"] for k, v in slots.items()},
                delta={k: v["delta"] for k, v in slots.items()},
            )
            events = (spent,)
        return PrivacyRound(summary, dict(finite), events)


def _json(epsilon: float) -> float | None:
    """ε as JSON: None stands for unbounded (a zero noise multiplier)."""
    return epsilon if math.isfinite(epsilon) else None
