"""Checkpoint: the round's report in, its final metrics and the round's closing events out.

What the strategy did after a round, as one stage: the privacy ledger's ε
(:class:`~layerfed.federation.privacy_ledger.PrivacyRound`) joins the metrics
(``privacy``, and ``epsilon`` on each DP layer), then the round's wall time; the
events are ``privacy_spent`` (when any slot is under DP) and ``round_end``. The
pipeline records them and writes the signed checkpoint with the audit head.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from layerfed.federation.events import Events, event
from layerfed.federation.privacy_ledger import PrivacyRound
from layerfed.governance.audit_events import AuditKind

__all__ = ["CheckpointInput", "RoundClose", "close_round"]


@dataclass(frozen=True)
class CheckpointInput:
    """The round's metrics and committed slots, its ε, and its wall time."""

    round: int
    metrics: Mapping[str, Any]
    committed: tuple[str, ...]
    privacy: PrivacyRound
    wall_s: float


@dataclass(frozen=True)
class RoundClose:
    """The metrics to checkpoint and report, and the events that close the round."""

    metrics: dict[str, Any]
    events: Events


def close_round(given: CheckpointInput) -> RoundClose:
    """Final metrics (privacy, ε per layer, wall time) and the closing events, in order."""
    eps = given.privacy.layers
    layers = {
        name: {**stats, "epsilon": eps[name]} if name in eps else stats
        for name, stats in given.metrics.get("layers", {}).items()
    }
    metrics = dict(given.metrics)
    if "layers" in metrics:
        metrics["layers"] = layers
    metrics["privacy"] = given.privacy.summary
    metrics["wall_s"] = given.wall_s
    end = event(AuditKind.ROUND_END, round=given.round, committed=list(given.committed))
    return RoundClose(metrics, (*given.privacy.events, end))
