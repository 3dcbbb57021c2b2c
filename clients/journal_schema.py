"""Opening a journal file: check it is a layerfed journal, create or upgrade its tables.

:class:`~layerfed.clients.journal.FeedbackJournal` calls :func:`prepare_schema` once per
connection; the tables themselves are declared in :mod:`layerfed.clients.journal_records`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from layerfed.clients.journal_records import (
    APPLICATION_ID,
    QUARANTINE,
    ROUTE_COLUMNS,
    SCHEMA,
    SCHEMA_VERSION,
    TABLES,
    JournalError,
)

__all__ = ["ErrorFactory", "prepare_schema"]

ErrorFactory = Callable[[str, str, object], JournalError]
"""Builds the journal's typed error from (field, expected, got)."""


def _tables(db: sqlite3.Connection) -> set[str]:
    return {r[0] for r in db.execute("SELECT name FROM sqlite_master")}


def prepare_schema(db: sqlite3.Connection, error: ErrorFactory) -> str:
    """Set the pragmas, create the tables of a new file, add missing columns; return the mode.

    Raises ``error(...)`` for a file of a newer schema, another SQLite database, or one
    missing a table. The returned string is SQLite's journal mode (``wal`` for a file).
    """
    app_id = db.execute("PRAGMA application_id").fetchone()[0]
    version = db.execute("PRAGMA user_version").fetchone()[0]
    tables = _tables(db)
    if version > SCHEMA_VERSION:
        raise error("schema version", f"<= {SCHEMA_VERSION} (upgrade layerfed)", version)
    if app_id != APPLICATION_ID and (tables or version):
        raise error("file", "a layerfed feedback journal", "another SQLite database")
    mode = str(db.execute("PRAGMA journal_mode=WAL").fetchone()[0])
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    db.execute("PRAGMA busy_timeout=10000")
    if not tables:
        db.execute("BEGIN IMMEDIATE")
        if not _tables(db):
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA application_id={APPLICATION_ID}")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.execute("COMMIT")
        tables = _tables(db)
    if TABLES - tables:
        raise error("tables", ", ".join(sorted(TABLES)), sorted(tables & TABLES))
    db.execute(QUARANTINE)
    columns = {r[1] for r in db.execute("PRAGMA table_info(events)")}
    for column in ROUTE_COLUMNS:
        if column not in columns:
            db.execute(f"ALTER TABLE events ADD COLUMN {column} TEXT")
    return mode
