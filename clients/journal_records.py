"""The journal's tables and records: its SQLite schema, entries, batches and errors.

:class:`~layerfed.clients.journal.FeedbackJournal` keeps its rows in these tables and
hands out these frozen records; the ``layer`` and ``role`` columns route each event
to the layer it trains (docs/journal.md, *Routing*).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from layerfed.clients.events import FeedbackEvent, FieldError

__all__ = [
    "APPLICATION_ID",
    "LIVE",
    "QUARANTINE",
    "ROUTE_COLUMNS",
    "SCHEMA",
    "SCHEMA_VERSION",
    "TABLES",
    "Batch",
    "BatchState",
    "EntryStatus",
    "JournalEntry",
    "JournalError",
    "QuarantinedRow",
    "Route",
    "route_sql",
]

SCHEMA_VERSION = 1
APPLICATION_ID = 0x4C464A4C  # "LFJL": marks a file as a layerfed journal
LIVE = ("open", "signed")

EntryStatus = Literal["pending", "batched", "consumed"]
BatchState = Literal["open", "signed", "consumed", "released"]

SCHEMA = """
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    recorded_at REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'batched', 'consumed')),
    batch TEXT REFERENCES batches(id),
    CHECK ((status = 'pending') = (batch IS NULL))
);
CREATE INDEX events_pending ON events(seq) WHERE status = 'pending';
CREATE INDEX events_batch ON events(batch);
CREATE TABLE batches (
    n INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    slot TEXT NOT NULL,
    digest TEXT,
    state TEXT NOT NULL CHECK (state IN ('open', 'signed', 'consumed', 'released')),
    created_at REAL NOT NULL,
    closed_at REAL
);
CREATE UNIQUE INDEX batches_live_key ON batches(run_id, round, slot)
    WHERE state IN ('open', 'signed');
CREATE TABLE batch_events (
    batch TEXT NOT NULL REFERENCES batches(id),
    pos INTEGER NOT NULL,
    seq INTEGER NOT NULL REFERENCES events(seq),
    PRIMARY KEY (batch, pos)
);
CREATE TABLE batch_digests (
    batch TEXT NOT NULL REFERENCES batches(id),
    digest TEXT NOT NULL,
    signed_at REAL NOT NULL,
    PRIMARY KEY (batch, digest)
);
"""
TABLES = frozenset({"events", "batches", "batch_events", "batch_digests"})
QUARANTINE = """
CREATE TABLE IF NOT EXISTS quarantine (
    seq INTEGER PRIMARY KEY REFERENCES events(seq),
    reason TEXT NOT NULL,
    found_at REAL NOT NULL
)
"""
"""Rows whose stored body no longer parses: kept in ``events``, never trained (added
to older journals when opened; no schema version change, older code ignores it)."""
ROUTE_COLUMNS = ("role", "layer")
"""Columns of ``events`` naming the person's role and the layer the event trains (added
to older journals when opened, NULL for their rows; older code ignores them)."""


class JournalError(FieldError):
    """The journal file is unusable (corrupt, not a journal, newer schema) or a call breaks its rules."""


@dataclass(frozen=True)
class JournalEntry:
    """One journalled event; ``batch``/``run_id``/``round`` name the batch holding it, if any.

    ``layer`` is the layer the event trains and ``role`` the role it was given in (both
    ``None`` for rows journalled before events were routed).
    """

    seq: int
    event: FeedbackEvent
    recorded_at: float
    status: EntryStatus
    batch: str | None
    run_id: str | None
    round: int | None
    layer: str | None = None
    role: str | None = None


@dataclass(frozen=True)
class QuarantinedRow:
    """A journalled row whose stored body no longer parses, kept as stored, with why."""

    seq: int
    kind: str
    recorded_at: float
    status: EntryStatus
    reason: str
    body: str


@dataclass(frozen=True)
class Batch:
    """The events one training round of ``(run_id, round, slot)`` took, in seq order."""

    id: str
    run_id: str
    round: int
    slot: str
    seqs: tuple[int, ...]
    events: tuple[FeedbackEvent, ...]
    digest: str | None
    state: BatchState


Route = tuple[str | None, bool]
"""Which pending events a read takes: those of a layer (None: any), and unrouted rows too?"""


def route_sql(route: Route) -> tuple[str, tuple[Any, ...]]:
    """The SQL condition (on ``events e``) and arguments that select a route's events."""
    layer, unrouted = route
    if layer is None:
        return "", ()
    if unrouted:
        return " AND (e.layer = ? OR e.layer IS NULL)", (layer,)
    return " AND e.layer = ?", (layer,)
