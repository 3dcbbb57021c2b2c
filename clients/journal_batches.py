"""A journal batch's state changes, inside the caller's write transaction.

A batch is ``open`` when it takes events, ``signed`` once an update trained on it
leaves, then ``consumed`` (the update counted) or ``released`` (its events back to
pending). docs/journal.md draws the state machine.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Set
from typing import Literal

from layerfed.clients.journal_records import LIVE
from layerfed.clients.journal_schema import ErrorFactory

__all__ = ["batch_state", "close_batch", "settle"]


def batch_state(db: sqlite3.Connection, batch_id: str, error: ErrorFactory) -> str:
    """The state of ``batch_id``; ``error`` if the journal has no such batch."""
    row = db.execute("SELECT state FROM batches WHERE id = ?", (batch_id,)).fetchone()
    if row is None:
        raise error("batch", "the id of a batch in this journal", batch_id)
    return str(row[0])


def close_batch(
    db: sqlite3.Connection,
    batch_id: str,
    to: Literal["consumed", "released"],
    error: ErrorFactory,
) -> bool:
    """Move a live batch to ``to`` (its events consumed or back to pending).

    Returns False when it is there already (idempotent); ``error`` from another final state.
    """
    state = batch_state(db, batch_id, error)
    if state == to:
        return False
    if state not in LIVE:
        raise error(f"batch {batch_id}", f"an open or signed batch to mark {to}", state)
    db.execute(
        "UPDATE batches SET state = ?, closed_at = ? WHERE id = ?", (to, time.time(), batch_id)
    )
    if to == "consumed":
        db.execute("UPDATE events SET status = 'consumed' WHERE batch = ?", (batch_id,))
    else:
        db.execute(
            "UPDATE events SET status = 'pending', batch = NULL WHERE batch = ?", (batch_id,)
        )
    return True


def settle(
    db: sqlite3.Connection,
    run_id: str,
    accepted: Set[str],
    before_round: int,
    error: ErrorFactory,
) -> tuple[int, int]:
    """Consume or release the live batches earlier rounds left; return (consumed, released).

    A live batch of ``run_id`` from a round before ``before_round`` is consumed if one of
    its digests is in ``accepted``, else released; live batches of other runs likewise.
    """
    consumed = released = 0
    live = db.execute(
        "SELECT id, run_id, round FROM batches WHERE state IN ('open', 'signed') ORDER BY n"
    ).fetchall()
    for bid, batch_run, rnd in live:
        if batch_run == run_id and rnd >= before_round:
            continue
        digests = {
            r[0] for r in db.execute("SELECT digest FROM batch_digests WHERE batch = ?", (bid,))
        }
        if digests & accepted:
            consumed += close_batch(db, bid, "consumed", error)
        else:
            released += close_batch(db, bid, "released", error)
    return consumed, released
