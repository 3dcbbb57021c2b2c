"""The durable feedback journal of a model instance (SQLite, WAL, ``synchronous=FULL``).

Every accepted feedback event is appended (committed and fsynced) before ``append``
returns. A training round takes a *batch* of pending events; the batch is *signed*
with the digest of the update that used it, then *consumed* once the update is known
to have reached the server, or *released* back to pending if it was refused or lost.
Events are stored as their JSON dump, so a new event kind needs no schema change.
See ``docs/journal.md`` for the state machine and what a crash at each point leaves.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, cast

from layerfed.clients.events import FeedbackEvent, InvalidFeedback, parse_event
from layerfed.clients.journal_batches import batch_state, close_batch, settle
from layerfed.clients.journal_records import (
    LIVE,
    Batch,
    JournalEntry,
    JournalError,
    QuarantinedRow,
    Route,
    route_sql,
)
from layerfed.clients.journal_schema import prepare_schema

__all__ = ["Batch", "FeedbackJournal", "JournalEntry", "JournalError", "QuarantinedRow"]

log = logging.getLogger("layerfed")


class FeedbackJournal:
    """An append-only journal of feedback events with batches for training rounds.

    One SQLite connection per journal, shared by threads under a lock; other
    processes may open the same file (WAL lets readers run while one writes).
    ``path=None`` keeps the journal in memory (tests, SDK use without disk).
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path: Path | None = None if path is None else Path(path)
        self._where = ":memory:" if self.path is None else str(self.path)
        self._lock = threading.RLock()
        if self.path is not None and not self.path.parent.is_dir():
            raise JournalError("file", "a path in an existing folder", self._where, self._where)
        with self._sqlite("open"):
            self._db = sqlite3.connect(
                self._where, isolation_level=None, check_same_thread=False, timeout=10.0
            )
        try:
            self._prepare()
        except BaseException:
            self._db.close()
            raise

    def _prepare(self) -> None:
        with self._sqlite("open"):
            mode = prepare_schema(self._db, self._error)
        self._bad: dict[int, str] = {}
        if self.path is not None and mode.lower() != "wal":
            raise self._error("journal_mode", "wal", mode)

    def _error(self, field: str, expected: str, got: object) -> JournalError:
        return JournalError(field, expected, got, self._where)

    @contextmanager
    def _sqlite(self, doing: str) -> Iterator[None]:
        """Turn any SQLite failure into a :class:`JournalError` naming the file."""
        try:
            yield
        except sqlite3.Error as e:
            raise self._error(doing, "a readable, writable journal", str(e)) from e

    @contextmanager
    def _write(self, doing: str) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``), committed and fsynced on success."""
        with self._lock, self._sqlite(doing):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def _read(self, doing: str) -> Iterator[sqlite3.Connection]:
        """One consistent read snapshot."""
        with self._lock, self._sqlite(doing):
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                self._db.execute("COMMIT")

    def _encode(self, event: FeedbackEvent, index: int) -> tuple[str, str]:
        dump = getattr(event, "model_dump", None)
        if dump is None:
            raise self._error(f"events[{index}]", "a feedback event", type(event).__name__)
        data = dump(mode="json")
        try:
            parse_event(data)
        except InvalidFeedback as e:
            raise self._error(f"events[{index}]", "an event that parses back", str(e)) from e
        return str(data["kind"]), json.dumps(data, sort_keys=True, separators=(",", ":"))

    def append(
        self, event: FeedbackEvent, *, layer: str | None = None, role: str | None = None
    ) -> int:
        """Journal one event durably (committed and fsynced); return its seq (1, 2, 3, ...).

        ``layer`` is the layer the event trains, ``role`` the role it was given in.
        """
        return self.append_many([event], layer=layer, role=role)[0]

    def append_many(
        self,
        events: Sequence[FeedbackEvent],
        *,
        layer: str | None = None,
        role: str | None = None,
    ) -> list[int]:
        """Journal several events in one transaction (one fsync); return their seqs in order.

        Every event is recorded as training ``layer``, given in ``role``.
        """
        rows = [self._encode(event, i) for i, event in enumerate(events)]
        now = time.time()
        seqs: list[int] = []
        with self._write("append") as db:
            for kind, body in rows:
                cursor = db.execute(
                    "INSERT INTO events(kind, body, recorded_at, role, layer) VALUES (?, ?, ?, ?, ?)",
                    (kind, body, now, role, layer),
                )
                seqs.append(cast(int, cursor.lastrowid))
        return seqs

    def _decode(self, seq: int, body: str) -> FeedbackEvent:
        where = f"{self._where}: seq {seq}"
        try:
            return parse_event(json.loads(body), where)
        except (ValueError, InvalidFeedback) as e:
            raise JournalError(f"seq {seq}", "a stored feedback event", str(e), where) from e

    def _try_decode(self, seq: int, body: str) -> FeedbackEvent | None:
        """The stored event, or ``None`` for a bad row (noted for quarantine, warned once)."""
        try:
            return self._decode(seq, body)
        except JournalError as e:
            if seq not in self._bad:
                log.warning("journal %s: quarantining seq %s: %s", self._where, seq, e)
            self._bad[seq] = str(e)
            return None

    def _trainable(self, db: sqlite3.Connection, cap: int, route: Route) -> list[int]:
        """Up to ``cap`` (``-1``: all) pending seqs that parse, oldest first; quarantines bad ones."""
        seqs: list[int] = []
        where, args = route_sql(route)
        rows = db.execute(
            "SELECT seq, body FROM events e WHERE status = 'pending'"
            f" AND seq NOT IN (SELECT seq FROM quarantine){where} ORDER BY seq",
            args,
        ).fetchall()
        for seq, body in rows:
            if 0 <= cap <= len(seqs):
                break
            if self._try_decode(seq, body) is not None:
                seqs.append(seq)
        self._persist_bad(db)
        return seqs

    def _persist_bad(self, db: sqlite3.Connection) -> None:
        """Record the bad rows found so far (inside a write transaction)."""
        db.executemany(
            "INSERT OR IGNORE INTO quarantine(seq, reason, found_at) VALUES (?, ?, ?)",
            [(seq, reason, time.time()) for seq, reason in sorted(self._bad.items())],
        )

    def quarantined(self) -> list[QuarantinedRow]:
        """Every row whose stored body no longer parses (checks them all), oldest first.

        Such rows stay in the journal as stored; ``pending``, ``entries``, ``batches``
        and ``open_batch`` leave them out, so the instance's other events still train.
        """
        with self._write("quarantined") as db:
            rows = db.execute(
                "SELECT seq, body FROM events WHERE seq NOT IN (SELECT seq FROM quarantine)"
            ).fetchall()
            for seq, body in rows:
                self._try_decode(seq, body)
            self._persist_bad(db)
            found = db.execute(
                "SELECT e.seq, e.kind, e.recorded_at, e.status, q.reason, e.body"
                " FROM quarantine q JOIN events e ON e.seq = q.seq ORDER BY e.seq"
            ).fetchall()
        return [QuarantinedRow(*row) for row in found]

    _ENTRY_SQL = (
        "SELECT e.seq, e.body, e.recorded_at, e.status, e.batch, b.run_id, b.round,"
        " e.layer, e.role FROM events e LEFT JOIN batches b ON b.id = e.batch"
    )

    def _entries(
        self, db: sqlite3.Connection, where: str, args: tuple[Any, ...]
    ) -> list[JournalEntry]:
        rows = db.execute(f"{self._ENTRY_SQL} {where}", args).fetchall()
        decoded = [(self._try_decode(row[0], row[1]), row) for row in rows]
        return [
            JournalEntry(seq, event, at, status, batch, run_id, rnd, layer, role)
            for event, (seq, _, at, status, batch, run_id, rnd, layer, role) in decoded
            if event is not None
        ]

    def pending(
        self,
        limit: int | None = None,
        *,
        layer: str | None = None,
        unrouted: bool = True,
    ) -> list[JournalEntry]:
        """Events neither consumed nor in a live batch, oldest first (at most ``limit``).

        ``layer``: only events that train it (and, when ``unrouted``, rows journalled
        before events were routed); ``None``: every pending event.
        """
        where, args = route_sql((layer, unrouted))
        with self._read("pending") as db:
            return self._entries(
                db,
                "WHERE e.status = 'pending' AND e.seq NOT IN (SELECT seq FROM quarantine)"
                f"{where} ORDER BY e.seq LIMIT ?",
                (*args, self._limit(limit)),
            )

    def entries(self) -> list[JournalEntry]:
        """Every journalled event, in seq order."""
        with self._read("entries") as db:
            return self._entries(db, "ORDER BY e.seq", ())

    def counts(self) -> dict[str, int]:
        """How many events are pending, batched and consumed."""
        with self._read("counts") as db:
            found = dict(db.execute("SELECT status, count(*) FROM events GROUP BY status"))
        return {status: int(found.get(status, 0)) for status in ("pending", "batched", "consumed")}

    def _batch(self, db: sqlite3.Connection, batch_id: str) -> Batch:
        row = db.execute(
            "SELECT id, run_id, round, slot, digest, state FROM batches WHERE id = ?", (batch_id,)
        ).fetchone()
        if row is None:
            raise self._error("batch", "the id of a batch in this journal", batch_id)
        members = db.execute(
            "SELECT e.seq, e.body FROM batch_events m JOIN events e ON e.seq = m.seq"
            " WHERE m.batch = ? ORDER BY m.pos",
            (batch_id,),
        ).fetchall()
        bid, run_id, rnd, slot, digest, state = row
        decoded = [(seq, self._try_decode(seq, body)) for seq, body in members]
        seqs = tuple(seq for seq, event in decoded if event is not None)
        events = tuple(event for _, event in decoded if event is not None)
        return Batch(bid, run_id, rnd, slot, seqs, events, digest, state)

    def batches(self) -> list[Batch]:
        """Every batch ever opened, oldest first."""
        with self._read("batches") as db:
            ids = [r[0] for r in db.execute("SELECT id FROM batches ORDER BY n")]
            return [self._batch(db, bid) for bid in ids]

    def _limit(self, limit: int | None) -> int:
        if limit is None:
            return -1
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise self._error("limit", "None or an int >= 0", limit)
        return limit

    def open_batch(
        self,
        run_id: str,
        round: int,
        slot: str,
        limit: int | None = None,
        *,
        layer: str | None = None,
        unrouted: bool = True,
    ) -> Batch:
        """Take up to ``limit`` pending events (oldest first) into a new open batch.

        ``layer``: only events that train it (and, when ``unrouted``, rows journalled
        before events were routed); ``None``: any pending event.
        Idempotent: if ``(run_id, round, slot)`` already has an open or signed batch,
        that batch is returned unchanged, so a replay trains the same events again.
        """
        cap = self._limit(limit)
        with self._write("open_batch") as db:
            live = db.execute(
                "SELECT id FROM batches WHERE run_id = ? AND round = ? AND slot = ?"
                " AND state IN ('open', 'signed')",
                (run_id, round, slot),
            ).fetchone()
            if live is not None:
                return self._batch(db, live[0])
            bid = uuid.uuid4().hex
            db.execute(
                "INSERT INTO batches(id, run_id, round, slot, state, created_at)"
                " VALUES (?, ?, ?, ?, 'open', ?)",
                (bid, run_id, round, slot, time.time()),
            )
            seqs = self._trainable(db, cap, (layer, unrouted))
            db.executemany(
                "INSERT INTO batch_events(batch, pos, seq) VALUES (?, ?, ?)",
                [(bid, pos, seq) for pos, seq in enumerate(seqs)],
            )
            db.executemany(
                "UPDATE events SET status = 'batched', batch = ? WHERE seq = ?",
                [(bid, seq) for seq in seqs],
            )
            batch = self._batch(db, bid)
        log.debug("journal %s: batch %s takes %s events", self._where, bid, len(seqs))
        return batch

    def sign_batch(self, batch_id: str, digest: str) -> None:
        """Record the digest of the signed update trained on the batch (before the reply leaves).

        A replayed round may sign again with a new digest; every digest is kept, and
        :meth:`reconcile` consumes the batch if any of them was accepted.
        """
        if not isinstance(digest, str) or not digest:
            raise self._error("digest", "a non-empty string", digest)
        with self._write("sign_batch") as db:
            state = batch_state(db, batch_id, self._error)
            if state not in LIVE:
                raise self._error(f"batch {batch_id}", "an open or signed batch", state)
            db.execute(
                "INSERT OR IGNORE INTO batch_digests(batch, digest, signed_at) VALUES (?, ?, ?)",
                (batch_id, digest, time.time()),
            )
            db.execute(
                "UPDATE batches SET digest = ?, state = 'signed' WHERE id = ?", (digest, batch_id)
            )

    def consume(self, batch_id: str) -> None:
        """Mark the batch's events consumed (update accepted or committed locally); idempotent."""
        with self._write("consume") as db:
            close_batch(db, batch_id, "consumed", self._error)

    def release(self, batch_id: str) -> None:
        """Return the batch's events to pending (update refused or never delivered); idempotent."""
        with self._write("release") as db:
            close_batch(db, batch_id, "released", self._error)

    def reconcile(
        self, run_id: str, accepted: Collection[str], before_round: int
    ) -> tuple[int, int]:
        """Settle live batches left by earlier rounds (e.g. after a crash).

        A live batch of ``run_id`` with ``round < before_round`` is consumed if one of
        its digests is in ``accepted``, else released. Live batches of other run ids are
        released (unless accepted): a new run never saw them. Returns
        ``(consumed_batches, released_batches)``.
        """
        with self._write("reconcile") as db:
            consumed, released = settle(db, run_id, frozenset(accepted), before_round, self._error)
        if consumed or released:
            log.info(
                "journal %s: reconciled run %s: %s batches consumed, %s released",
                self._where,
                run_id,
                consumed,
                released,
            )
        return consumed, released

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> FeedbackJournal:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FeedbackJournal({self._where!r})"
