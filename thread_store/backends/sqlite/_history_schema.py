"""``history.db``'s tables and the migrations that make and upgrade the file.

``threads`` holds each thread's creation time, random ``incarnation`` and tombstone,
``items`` the log (with each traced append's ``traceparent`` on its last item), and
``store_meta`` the acknowledged index epoch; ``behind`` records the threads whose
projection is behind (set by a trigger on ``items``), and ``idempotency`` the keys of
appends.
"""

from __future__ import annotations

import sqlite_utils

from . import _connections

#: SQL for the time now, in microseconds since the epoch (``behind.since_us``).
NOW_US = "CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER)"


def _create_schema(db: sqlite_utils.Database) -> None:
    db["threads"].create(  # type: ignore[union-attr]
        {"thread_id": str, "created_us": int, "discarded_us": int},
        pk="thread_id", not_null={"created_us"},
    )
    db["items"].create(  # type: ignore[union-attr]
        {"id": int, "thread_id": str, "seq": int, "ts_us": int, "item": str},
        pk="id", not_null={"thread_id", "seq", "ts_us", "item"},
    )
    db["items"].create_index(["thread_id", "seq"], unique=True)  # type: ignore[union-attr]
    db["store_meta"].create({"key": str, "value": str}, pk="key")  # type: ignore[union-attr]


def _add_behind_record(db: sqlite_utils.Database) -> None:
    """Version 2: the per-thread record of being behind replaces the session marker.

    Existing threads start unmarked; the missing ``index_epoch`` then makes the first open
    compare every thread once (and mark the ones behind).
    """
    # Only threads behind have a row, so open() reads O(threads behind). A table of its
    # own, not a column of ``threads``: small and hot, so marking a thread writes one
    # page where a column and its partial index write two (measured on the append that
    # sets the mark: +7 µs p50, against +14 µs for the column; +0 µs when already set).
    db.execute("CREATE TABLE behind (thread_id TEXT PRIMARY KEY, since_us INTEGER NOT NULL) "
               "WITHOUT ROWID")
    # In the append's own statement: an autocommit INSERT stays one transaction. While
    # the mark is already set it is a lookup without a write.
    db.execute("CREATE TRIGGER items_behind AFTER INSERT ON items BEGIN "
               f"INSERT OR IGNORE INTO behind (thread_id, since_us) VALUES (new.thread_id, {NOW_US}); "
               "END")
    db.execute("DELETE FROM store_meta WHERE key = 'session'")


def _add_idempotency_keys(db: sqlite_utils.Database) -> None:
    """Version 3: idempotency keys of appends, kept as long as their thread."""
    db.execute("CREATE TABLE IF NOT EXISTS idempotency (thread_id TEXT NOT NULL, key TEXT NOT NULL, "
               "digest TEXT NOT NULL, generation INTEGER NOT NULL, "
               "PRIMARY KEY (thread_id, key)) WITHOUT ROWID")


def _add_incarnations(db: sqlite_utils.Database) -> None:
    """Version 4: each creation of an id gets a random incarnation, so a fold of a thread
    deleted meanwhile (in any process) is never stored as the row of its successor."""
    if "incarnation" not in db["threads"].columns_dict:
        db.execute("ALTER TABLE threads ADD COLUMN incarnation INTEGER")
    db.execute("UPDATE threads SET incarnation = abs(random()) WHERE incarnation IS NULL")


def _add_trace_contexts(db: sqlite_utils.Database) -> None:
    """Version 5: an append's W3C ``traceparent``, on its last item, so a projection in
    another process joins the append's trace. NULL for untraced appends and older items:
    adding a nullable column rewrites no row."""
    if "trace" not in db["items"].columns_dict:
        db.execute("ALTER TABLE items ADD COLUMN trace TEXT")


#: ``MIGRATIONS[n]`` takes history.db from schema version n to n + 1.
MIGRATIONS: list[_connections.Migration] = [_create_schema, _add_behind_record,
                                            _add_idempotency_keys, _add_incarnations,
                                            _add_trace_contexts]
SCHEMA_VERSION = len(MIGRATIONS)
