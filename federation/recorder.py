"""The one writer of a round's audit records: every stage's events, in order.

Stages return :class:`~layerfed.federation.events.AuditEvent` values; only the
:class:`Recorder` turns them into :meth:`~layerfed.governance.audit.AuditLog.append`
calls. The approval gate is the one exception it allows, and it allows it by
lending the log (:meth:`Recorder.lend`): an ``approval_requested`` record must be
on disk while the server waits for holders to sign, not after.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, TypeVar

from layerfed.federation.events import AuditEvent, Events
from layerfed.governance.audit import AuditLog

__all__ = ["HasEvents", "Recorder"]


class HasEvents(Protocol):
    """A stage's result: it carries the audit events the stage produced."""

    @property
    def events(self) -> Events:
        """The events, in the order they happened."""
        ...


R = TypeVar("R", bound=HasEvents)


class Recorder:
    """Writes events to one :class:`AuditLog` in the order it is given them."""

    def __init__(self, audit: AuditLog) -> None:
        self._audit = audit
        self.written = 0
        """Records written through this recorder (the lent log's writes not counted)."""

    def record(self, events: Iterable[AuditEvent]) -> None:
        """Append each event as one audit record."""
        for e in events:
            self._audit.append(e.kind, **e.as_fields())
            self.written += 1

    def take(self, result: R) -> R:
        """Record ``result``'s events and hand ``result`` on (``result = recorder.take(stage(...))``)."""
        self.record(result.events)
        return result

    def lend(self) -> AuditLog:
        """The log itself, for the approval gate's records that must be written while it waits."""
        return self._audit
