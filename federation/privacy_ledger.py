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
round's metrics and records its ``privacy_spent`` event).

Each release is recorded with the parameters it ran with
(:class:`~layerfed.governance.privacy_accounting.Release`: noise multiplier,
sampling rate, clip norm; steps counted per parameter set) and ε composes those
events, so a resumed run under a successor policy with other noise never
re-prices what was spent (ε never decreases). The ledger travels in the round
metrics, which the signed checkpoint holds. A checkpoint from before this
(release counts only) is priced at the smallest noise multiplier any policy the
state knows (the current one and every pinned one) gives the layer: the most
ε those releases could have cost.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from layerfed.federation.events import Events, event
from layerfed.federation.server_state import ServerState, StateError
from layerfed.governance.audit import AuditLog
from layerfed.governance.audit_events import AuditKind
from layerfed.governance.privacy_accounting import (
    DP_MODES,
    Release,
    composed_epsilon,
    current_release,
)
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
    """Releases (with their parameters) and ε per DP slot; restores itself from the last round."""

    def __init__(self, policy: Policy, state: ServerState) -> None:
        self.policy = policy
        self.central: dict[str, dict[Release, int]] = defaultdict(dict)
        self.local: dict[str, dict[str, dict[Release, int]]] = defaultdict(
            lambda: defaultdict(dict)
        )
        self.exhausted: set[str] = set()
        last = state.metrics[-1] if state.metrics else {}
        saved = last.get("privacy", {}).get("ledger", {}) if isinstance(last, dict) else {}
        events = saved.get("events")
        if isinstance(events, dict):
            for slot, items in events.get("central", {}).items():
                self.central[slot] = _read(items)
            for slot, per in events.get("local", {}).items():
                for instance, items in per.items():
                    self.local[slot][instance] = _read(items)
            return
        known = _known_policies(policy, state)
        for slot, k in saved.get("central", {}).items():
            self.central[slot] = {_conservative(known, slot): int(k)}
        for slot, counts in saved.get("local", {}).items():
            for instance, k in counts.items():
                self.local[slot][instance] = {_conservative(known, slot): int(k)}

    def _privacy(self, layer: str) -> Privacy | None:
        privacy = self.policy.layer(layer).privacy
        return privacy if privacy is not None and privacy.mode in DP_MODES else None

    def _spent(self, slot: SlotId, instance: str | None) -> list[dict[Release, int]]:
        """The releases that count for ``slot``: its central ones with each instance's local ones
        (only ``instance``'s when named), so a change of mode re-prices nothing either."""
        if self._privacy(slot.layer) is None:
            return []
        central = self.central.get(str(slot), {})
        per = self.local.get(str(slot), {})
        locals_ = [per.get(instance, {})] if instance is not None else list(per.values()) or [{}]
        return [_merged(central, local) for local in locals_]

    def releases(self, slot: SlotId, instance: str | None = None) -> int:
        """Releases so far of ``slot`` (central), or of ``instance`` in it (local: the most-used one)."""
        return max((sum(r.values()) for r in self._spent(slot, instance)), default=0)

    def epsilon(self, slot: SlotId, instance: str | None = None) -> float:
        """ε(δ) spent by ``slot`` so far, composed over the releases that happened (0 without DP).

        Local DP: the named instance's, or the most spent by any of the slot's instances.
        """
        privacy = self._privacy(slot.layer)
        if privacy is None:
            return 0.0
        return max(
            (composed_epsilon(r.items(), privacy.delta) for r in self._spent(slot, instance)),
            default=0.0,
        )

    def allows(self, slot: SlotId, instance: str, round_: int, audit: AuditLog) -> bool:
        """Whether ``instance`` may train ``slot`` this round within the budget; counts a local release.

        The next release is priced at the current policy's parameters, on top of every
        release recorded. A refusal is audited once per slot (and instance, for local DP) and run.
        """
        privacy = self._privacy(slot.layer)
        if privacy is None:
            return True
        local = privacy.mode == "local_dp"
        records = self._spent(slot, instance if local else None)
        spent = max(records, key=lambda r: composed_epsilon(r.items(), privacy.delta))
        now = current_release(privacy)
        if privacy.epsilon_budget is not None:
            after = composed_epsilon([*spent.items(), (now, 1)], privacy.delta)
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
                        epsilon=_json(composed_epsilon(spent.items(), privacy.delta)),
                        next_epsilon=_json(after),
                        budget=privacy.epsilon_budget,
                        releases=sum(spent.values()),
                    )
                return False
        if local:
            _add(self.local[str(slot)][instance], now)
        return True

    def finish_round(
        self, round_: int, released: Sequence[str], sent: Sequence[SlotId]
    ) -> PrivacyRound:
        """Record this round's central ``released`` slots; ε per slot and layer, and its event."""
        for name in released:
            privacy = self._privacy(SlotId.parse(name).layer)
            if privacy is not None:
                _add(self.central[name], current_release(privacy))
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
            "central": {s: sum(r.values()) for s, r in self.central.items()},
            "local": {s: {i: sum(r.values()) for i, r in c.items()} for s, c in self.local.items()},
            "events": {
                "central": {s: _write(r) for s, r in self.central.items()},
                "local": {s: {i: _write(r) for i, r in c.items()} for s, c in self.local.items()},
            },
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


def _merged(a: dict[Release, int], b: dict[Release, int]) -> dict[Release, int]:
    out = dict(a)
    for release, steps in b.items():
        out[release] = out.get(release, 0) + steps
    return out


def _add(record: dict[Release, int], release: Release) -> None:
    record[release] = record.get(release, 0) + 1


def _write(record: dict[Release, int]) -> list[dict[str, float | int]]:
    return [r.to_json(k) for r, k in sorted(record.items())]


def _read(items: Any) -> dict[Release, int]:
    if not isinstance(items, list):
        raise StateError(f"privacy ledger: expected a list of releases, got {type(items).__name__}")
    out: dict[Release, int] = {}
    for item in items:
        try:
            release, steps = Release.from_json(item)
        except (ValueError, AttributeError) as e:
            raise StateError(str(e)) from e
        out[release] = out.get(release, 0) + steps
    return out


def _known_policies(policy: Policy, state: ServerState) -> list[Policy]:
    """The current policy and every policy the state has pinned (each verified when pinned)."""
    known = [policy]
    folder = state.root / "policies"
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            known.append(Policy.model_validate_json(path.read_bytes()))
        except (OSError, ValueError) as e:
            log.warning("privacy ledger: cannot read pinned policy %s: %s", path, e)
    return known


def _conservative(known: list[Policy], slot: str) -> Release:
    """Releases recorded by count only: the least noise any known policy gave the layer."""
    layer = SlotId.parse(slot).layer
    candidates = []
    for policy in known:
        try:
            privacy = policy.layer(layer).privacy
        except KeyError:
            continue
        if privacy is not None and privacy.mode in DP_MODES:
            candidates.append(current_release(privacy))
    return min(candidates, default=Release(0.0))


def _json(epsilon: float) -> float | None:
    """ε as JSON: None stands for unbounded (a zero noise multiplier)."""
    return epsilon if math.isfinite(epsilon) else None
