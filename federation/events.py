"""What a pipeline stage reports: audit events (typed kinds) and metric counts.

A stage never writes the audit log or the round's metrics itself: it returns
:class:`AuditEvent` values (an :class:`~layerfed.governance.audit_events.AuditKind`
and its fields, in the order the record lists them) and :class:`Count` values
(which per-layer counter moves, by how much). The pipeline hands the events to
the one :class:`~layerfed.federation.recorder.Recorder` and the counts to
:class:`~layerfed.federation.round_metrics.RoundTally`, in the order they were produced.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from layerfed.governance.audit_events import AuditKind

__all__ = ["AuditEvent", "Count", "Counter", "Events", "event", "update_refused"]


@dataclass(frozen=True)
class AuditEvent:
    """One audit record to write: its kind and its fields (name, value) in record order."""

    kind: AuditKind
    fields: tuple[tuple[str, Any], ...]

    def as_fields(self) -> Mapping[str, Any]:
        """The fields as keyword arguments, in record order."""
        return dict(self.fields)


def event(kind: AuditKind, **fields: Any) -> AuditEvent:
    """An :class:`AuditEvent` of ``kind`` with ``fields`` in the order given."""
    return AuditEvent(kind, tuple(fields.items()))


def update_refused(
    round_: int, instance: str, layer: str, slot: str, reason: str, detail: str
) -> AuditEvent:
    """The ``update_refused`` record of one instance's reply (``detail`` cut to 500 characters)."""
    return event(
        AuditKind.UPDATE_REFUSED,
        round=round_,
        instance=instance,
        layer=layer,
        slot=slot,
        reason=reason,
        detail=detail[:500],
    )


Events: TypeAlias = tuple[AuditEvent, ...]
"""The audit events a stage produced, in order."""

Counter = Literal[
    "sampled",
    "accepted",
    "refused",
    "dropouts",
    "no_feedback",
    "local_commits",
    "vetoes",
    "slots_committed",
    "slots_skipped",
    "norms",
    "mechanisms",
]
"""A per-layer round metric a stage may move."""


@dataclass(frozen=True)
class Count:
    """``counter`` of ``layer`` moves by ``n`` (``key``: the refusal reason or veto:action;
    ``norm``: the accepted reply's norm for ``norms``; for ``mechanisms``, ``key`` names the
    mechanism counter and ``value`` is added to it)."""

    layer: str
    counter: Counter
    n: int = 1
    key: str = ""
    norm: float = 0.0
    value: float = 0.0
