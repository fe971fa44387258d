"""``index.db``'s tables: the ``threads`` columns, the row a :class:`ThreadMetadata` is
stored as, and the migrations that make and upgrade the file.

One row per thread holds its metadata and ``projected_seq``; covering indexes serve the
listings, and a contentless FTS5 trigram table over each thread's distinct searched texts,
kept up to date by triggers, serves search.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import sqlite_utils
from sqlite_utils.db import DescIndex

from . import _connections
from ...model import TEXT_FIELDS, ThreadMetadata, us_from_utc, utc_from_us

#: What ``list_threads(search=...)`` looks in.
SEARCHED = ("name", "title", "preview", "first_user_message")
TIMES = ("created_at", "updated_at", "recency_at", "archived_at")
COLUMNS = ("thread_id", *TEXT_FIELDS, "token_usage", *(f"{t[:-3]}_us" for t in TIMES),
           "item_count", "projected_seq", "is_archived", "has_preview", "state")


@functools.cache
def upsert(rows: int) -> str:
    """The statement writing ``rows`` rows (their :data:`COLUMNS`' values, row after row).

    Many rows in one statement, not one statement per row: within a transaction, each
    statement that fires the search triggers makes FTS5 write its pending terms out as a
    new segment (the statement's savepoint), which cost four times the rest of a row.
    """
    values = ", ".join([f"({', '.join('?' * len(COLUMNS))})"] * rows)
    return (f"INSERT INTO threads ({', '.join(COLUMNS)}) VALUES {values} "
            "ON CONFLICT(thread_id) DO UPDATE SET "
            + ", ".join(f"{c} = excluded.{c}" for c in COLUMNS[1:])
            # A row never moves back: a fold covering less than the stored one (another
            # process projected further meanwhile) leaves it as it is.
            + " WHERE excluded.projected_seq >= threads.projected_seq")


#: The columns :func:`row_to_metadata` reads, from ``threads``; add the WHERE clause.
SELECT = f"SELECT {', '.join(COLUMNS[:-3])} FROM threads"


def row_to_metadata(row: tuple[Any, ...]) -> ThreadMetadata:
    """A row read with :data:`SELECT`, as metadata."""
    values: dict[str, Any] = dict(zip(COLUMNS, row))
    usage = values["token_usage"]
    fields: dict[str, Any] = {c: values[c] for c in TEXT_FIELDS}
    fields.update({t: utc_from_us(values[f"{t[:-3]}_us"]) for t in TIMES})
    return ThreadMetadata(
        thread_id=values["thread_id"],
        token_usage=json.loads(usage) if usage is not None else None,
        item_count=values["item_count"],
        projected_seq=values["projected_seq"],
        **fields,
    )


def metadata_to_row(meta: ThreadMetadata, state: str) -> tuple[Any, ...]:
    """The :data:`COLUMNS` of ``meta``'s row, with its fold ``state`` (JSON)."""
    times = [us_from_utc(v) if (v := getattr(meta, t)) is not None else None for t in TIMES]
    usage = json.dumps(meta.token_usage) if meta.token_usage is not None else None
    return (meta.thread_id, *(getattr(meta, c) for c in TEXT_FIELDS), usage, *times,
            meta.item_count, meta.projected_seq, int(meta.archived_at is not None),
            int(bool(meta.preview)), state)


def _create_schema(db: sqlite_utils.Database) -> None:
    columns: dict[str, Any] = {"thread_id": str}
    columns.update({c: str for c in TEXT_FIELDS})
    columns["token_usage"] = str
    columns.update({f"{t[:-3]}_us": int for t in TIMES})
    columns.update({"item_count": int, "projected_seq": int, "is_archived": int,
                    "has_preview": int, "state": str})
    table = db["threads"]
    table.create(columns, pk="thread_id",  # type: ignore[union-attr]
                 not_null={"item_count", "projected_seq", "is_archived", "has_preview",
                           "recency_us", "state"})
    # The default listing, and include_empty=True; both walk the index in order.
    table.create_index(["is_archived", "has_preview", DescIndex("recency_us"),  # type: ignore[union-attr]
                        DescIndex("thread_id")], index_name="threads_listed")
    table.create_index(["is_archived", DescIndex("recency_us"), DescIndex("thread_id")],  # type: ignore[union-attr]
                       index_name="threads_all")
    _enable_search(db, ("title", "preview", "first_user_message"), tokenize=None)


def _enable_search(db: sqlite_utils.Database, columns: tuple[str, ...], tokenize: str | None) -> None:
    """An FTS5 table over ``columns`` of ``threads``, kept up to date by triggers."""
    db["threads"].enable_fts(list(columns), fts_version="FTS5", create_triggers=True,  # type: ignore[union-attr]
                             tokenize=tokenize)
    # sqlite-utils' update trigger re-indexes every row update; projections update a row
    # per batch but its searchable text rarely, so only re-index when that text changed
    # (this halves the cost of a projection write, measured in benchmarks/).
    changed = " OR ".join(f"old.{c} IS NOT new.{c}" for c in columns)
    old = ", ".join(f"old.{c}" for c in columns)
    new = ", ".join(f"new.{c}" for c in columns)
    db.execute("DROP TRIGGER threads_au")
    db.execute(
        f"CREATE TRIGGER threads_au AFTER UPDATE ON threads WHEN {changed} BEGIN "
        f"INSERT INTO threads_fts (threads_fts, rowid, {', '.join(columns)}) "
        f"VALUES ('delete', old.rowid, {old}); "
        f"INSERT INTO threads_fts (rowid, {', '.join(columns)}) VALUES (new.rowid, {new}); END")


def _add_epoch(db: sqlite_utils.Database) -> None:
    """Version 2: a counter of index transactions, acknowledged into history."""
    db.execute("CREATE TABLE index_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
    db.execute("INSERT INTO index_meta (key, value) VALUES ('epoch', 0)")


def _add_history_mark(db: sqlite_utils.Database) -> None:
    """Version 3: the highest history rowid the index may have folded (see ``index._BUMP``).

    Version 2 acknowledged every index transaction in history at once, so the epochs
    already cover what a version 2 file holds: a mark of 0 claims nothing more.
    """
    db.execute("INSERT INTO index_meta (key, value) VALUES ('history_mark', 0)")


def _search_substrings(db: sqlite_utils.Database) -> None:
    """Version 4: search matches substrings, and the user-set name, and lists filter by cwd.

    The ``unicode61`` tokenizer matched whole words only (``thr`` missed "three", and a
    CJK run was one token, so ``测试`` missed ``修复不稳定的测试``). A trigram table matches
    any substring of three characters or more, case-insensitively; shorter words are
    matched with LIKE in :meth:`Index.list`.
    """
    for trigger in ("threads_ai", "threads_ad", "threads_au"):
        db.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    db.execute("DROP TABLE IF EXISTS threads_fts")
    _enable_search(db, SEARCHED, tokenize="trigram case_sensitive 0")
    db["threads"].create_index(["is_archived", "cwd", DescIndex("recency_us"),  # type: ignore[union-attr]
                                DescIndex("thread_id")], index_name="threads_by_cwd", if_not_exists=True)


def _add_failures_and_rules(db: sqlite_utils.Database) -> None:
    """Version 5: projections that failed for good (``status().last_error`` from any
    process), and the identifier of the fold rules the rows were made with."""
    db.execute("CREATE TABLE IF NOT EXISTS failures (thread_id TEXT PRIMARY KEY, generation INTEGER NOT NULL, "
               "error TEXT NOT NULL) WITHOUT ROWID")
    db.execute("CREATE TABLE IF NOT EXISTS index_info (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    # A row written clears its thread's failure in its own statement: a probe of a small,
    # mostly empty table in SQLite's C, not one more statement per group commit.
    for event in ("INSERT", "UPDATE"):
        db.execute(f"CREATE TRIGGER IF NOT EXISTS threads_failure_{event.lower()} AFTER {event} "
                   "ON threads BEGIN DELETE FROM failures WHERE thread_id = new.thread_id "
                   "AND generation <= new.projected_seq; END")


#: What separates a thread's searched texts in its one ``threads_fts`` column. A search
#: word never holds whitespace (``ListQuery.words`` comes from ``str.split``), so no
#: trigram of a word spans two texts: a word matches the joined column exactly when it
#: is a substring of one of the texts.
_SEPARATOR = "char(10)"


def _searched_text(row: str) -> str:
    """SQL of the distinct non-empty :data:`SEARCHED` values of ``row`` (``old``/``new``),
    each after a separator: the text ``threads_fts`` indexes for that row."""
    parts = []
    for n, c in enumerate(SEARCHED):
        # coalesce: a NULL in NOT IN's list would make it NULL (false) for every value.
        seen = ", ".join(f"coalesce({row}.{p}, '')" for p in SEARCHED[:n])
        fresh = f" AND {row}.{c} NOT IN ({seen})" if seen else ""
        parts.append(f"CASE WHEN {row}.{c} <> ''{fresh} THEN {_SEPARATOR} || {row}.{c} ELSE '' END")
    return " || ".join(parts)


def _search_distinct_texts(db: sqlite_utils.Database) -> None:
    """Version 6: search indexes each distinct searched text of a thread once.

    A thread's title, preview and first user message are mostly the same text, which the
    table of version 4 (one column per field) indexed three times; inserting those
    trigrams was most of the cost of writing a row. One column now holds the distinct
    non-empty texts (see :data:`_SEPARATOR`); a search finds the same threads. The table
    is contentless (the triggers give it the text) and keeps no column sizes (nothing
    ranks by them).
    """
    for trigger in ("threads_ai", "threads_ad", "threads_au"):
        db.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    db.execute("DROP TABLE IF EXISTS threads_fts")
    db.execute("CREATE VIRTUAL TABLE threads_fts USING fts5(texts, content='', columnsize=0, "
               "tokenize='trigram case_sensitive 0')")
    insert = f"INSERT INTO threads_fts (rowid, texts) VALUES (new.rowid, {_searched_text('new')})"
    delete = ("INSERT INTO threads_fts (threads_fts, rowid, texts) "
              f"VALUES ('delete', old.rowid, {_searched_text('old')})")
    # Only re-indexed when a searched field changed: projections update a row per batch
    # but its searchable text rarely (this halves the cost of a projection write).
    changed = " OR ".join(f"old.{c} IS NOT new.{c}" for c in SEARCHED)
    db.execute(f"CREATE TRIGGER threads_ai AFTER INSERT ON threads BEGIN {insert}; END")
    db.execute(f"CREATE TRIGGER threads_ad AFTER DELETE ON threads BEGIN {delete}; END")
    db.execute(f"CREATE TRIGGER threads_au AFTER UPDATE ON threads WHEN {changed} BEGIN "
               f"{delete}; {insert}; END")
    db.execute(f"INSERT INTO threads_fts (rowid, texts) SELECT rowid, {_searched_text('new')} "
               "FROM threads new")


#: ``MIGRATIONS[n]`` takes index.db from schema version n to n + 1.
MIGRATIONS: list[_connections.Migration] = [_create_schema, _add_epoch, _add_history_mark,
                                            _search_substrings, _add_failures_and_rules,
                                            _search_distinct_texts]
SCHEMA_VERSION = len(MIGRATIONS)
