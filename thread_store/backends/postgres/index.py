"""The projected rows in PostgreSQL: ``meta`` (one row per thread) and ``failures``.

A group commit is one transaction with ``synchronous_commit=off``: the rows are derived
data, and WAL order keeps a projection from outliving the items it folded. It never
locks a ``threads`` row, so appends never wait on it. A row is inserted only for a live
thread (it is selected from ``threads``), and an update never moves ``projected_seq``
backwards, so a late projection can neither resurrect a removed thread nor undo a newer
one. Inside this process, writes serialize on ``write_lock``, under which ``fenced``
(close) and ``may_write`` (removal) are checked.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable, Sequence

import psycopg

from ._db import Database, wait_for_locks_until
from ._errors import is_transient, translate
from ...errors import StorageError, ThreadStoreError
from ...model import TEXT_FIELDS, Page, ThreadMetadata, us_from_utc, utc_from_us
from ...storage import (Checkpoint, CommitOutcome, CommitResult, Failure, ListQuery, RowWrite,
                        encode_cursor, stop_writer)

log = logging.getLogger("thread_store")
_TIMES = ("created_at", "updated_at", "recency_at", "archived_at")
_COLUMNS = ("thread_id", *TEXT_FIELDS, "token_usage", "exact", *(f"{t[:-3]}_us" for t in _TIMES),
            "item_count", "projected_seq", "is_archived", "has_preview", "state")
_READ_COLUMNS = _COLUMNS[:-3]
_TYPES = {"item_count": "bigint", "projected_seq": "bigint", "is_archived": "boolean",
          "has_preview": "boolean", **{f"{t[:-3]}_us": "bigint" for t in _TIMES}}
#: Where ``projected_seq`` sits in a row's parameters.
_SEQ = _COLUMNS.index("projected_seq")
_PLACEHOLDERS = ", ".join("%s::" + _TYPES.get(c, "text") for c in _COLUMNS)
_UPSERT = (
    f"INSERT INTO {{s}}.meta (incarnation, {', '.join(_COLUMNS)}) "
    f"SELECT t.incarnation, {_PLACEHOLDERS} FROM {{s}}.threads t "
    "WHERE t.thread_id = %s AND t.incarnation = %s AND t.discarded_us IS NULL "
    "ON CONFLICT (thread_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS[1:])
    + " WHERE meta.incarnation = excluded.incarnation "
      "AND meta.projected_seq <= excluded.projected_seq")
_SELECT = f"SELECT {', '.join(_READ_COLUMNS)} FROM {{s}}.meta"
_CHECKPOINT = ("SELECT m.projected_seq, m.state, (SELECT error FROM {s}.failures "
               "WHERE thread_id = %(t)s) FROM (SELECT 1) one LEFT JOIN {s}.meta m "
               "ON m.thread_id = %(t)s")
_RECORD_FAILURE = (
    "INSERT INTO {s}.failures (thread_id, generation, error) SELECT %(t)s, %(g)s, %(e)s "
    "WHERE NOT EXISTS (SELECT 1 FROM {s}.meta WHERE thread_id = %(t)s AND projected_seq >= %(g)s) "
    "ON CONFLICT (thread_id) DO UPDATE SET generation = excluded.generation, error = excluded.error")
_CLEAR_FAILURE = "DELETE FROM {s}.failures WHERE thread_id = %s AND generation <= %s"
_BIGINT = 1 << 63


class _Fenced(Exception):
    """Raised inside a transaction to roll it back: close() fenced the index."""


class _Busy(Exception):
    """Another session held a row past the caller's deadline: nothing was written."""


def _row_to_metadata(row: Sequence[Any]) -> ThreadMetadata:
    values: dict[str, Any] = dict(zip(_READ_COLUMNS, row))
    usage = values["token_usage"]
    fields: dict[str, Any] = {c: values[c] for c in TEXT_FIELDS}
    if values["exact"] is not None:
        fields.update(json.loads(values["exact"]))
    fields.update({t: utc_from_us(values[f"{t[:-3]}_us"]) for t in _TIMES})
    return ThreadMetadata(thread_id=values["thread_id"],
                          token_usage=json.loads(usage) if usage is not None else None,
                          item_count=int(values["item_count"]),
                          projected_seq=int(values["projected_seq"]), **fields)


def _params(row: RowWrite) -> tuple[Any, ...]:
    meta = row.meta
    times = [us_from_utc(v) if (v := getattr(meta, t)) is not None else None for t in _TIMES]
    times[2] = times[2] or 0  # recency_us orders the listing: never NULL
    usage = json.dumps(meta.token_usage) if meta.token_usage is not None else None
    texts, exact = _text_columns(meta)
    return (meta.thread_id, *texts, usage, exact, *times,
            meta.item_count, meta.projected_seq, meta.archived_at is not None,
            bool(meta.preview), row.fold_state, meta.thread_id, row.incarnation)


def _text_columns(meta: ThreadMetadata) -> tuple[list[str | None], str | None]:
    """The text columns of the row, and its ``exact`` column.

    PostgreSQL text cannot hold NUL, which the fold may produce (the other backends store
    it). A value with NUL keeps its exact text in ``exact`` (ASCII-escaped JSON, read
    back over the columns), and its column holds what answers the same queries: in the
    searched fields, NUL becomes a newline (a search word never holds whitespace, nor
    spans a NUL, so the same words match); ``cwd`` becomes NULL (a ``cwd`` filter never
    holds NUL, so equals no such value).
    """
    texts: list[str | None] = [getattr(meta, c) for c in TEXT_FIELDS]
    held = {c: v for c, v in zip(TEXT_FIELDS, texts) if v is not None and "\x00" in v}
    if not held:
        return texts, None
    columns = [v if c not in held else None if c == "cwd" else held[c].replace("\x00", "\n")
               for c, v in zip(TEXT_FIELDS, texts)]
    return columns, json.dumps(held)


def _unstorable(values: tuple[Any, ...]) -> str | None:
    """Why PostgreSQL would refuse a row (lone surrogates, integers out of ``bigint``),
    found before sending it; ``None`` when it is storable."""
    for name, value in zip(_COLUMNS, values):
        if isinstance(value, str):
            try:
                value.encode()
            except UnicodeEncodeError:
                return f"the thread's {name} cannot be stored: it is not valid Unicode text"
        elif isinstance(value, int) and not isinstance(value, bool) and not -_BIGINT <= value < _BIGINT:
            return f"the thread's {name} ({value}) does not fit PostgreSQL's bigint"
    return None


def _like(word: str) -> str:
    """``%word%`` with LIKE's wildcards and escape character escaped."""
    return "%" + word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


class Index:
    """The metadata index of one store (``MetadataIndex``)."""

    def __init__(self, db: Database, incarnations: Callable[[list[str]], dict[str, int]], *,
                 before_write: Callable[[], None]) -> None:
        self._db = db
        #: ``history.incarnations``: which rows' threads are still live as folded.
        self._incarnations = incarnations
        #: Called under the write lock before each write: it keeps this store's share
        #: of the writers' lock (``_writers``), raising instead of writing if it cannot.
        self._before_write = before_write
        #: Held for every index write; ``fenced`` is set under it by close().
        self.write_lock = threading.Lock()
        self.fenced = False
        #: The connection of the running write transaction, for fence() to cancel.
        self._active: psycopg.Connection[Any] | None = None
        #: When a commit last wrote rows (monotonic), for housekeeping.
        self.last_write = float("-inf")
        self._upsert = db.q(_UPSERT)
        self._checkpoint = db.q(_CHECKPOINT)
        self._record = db.q(_RECORD_FAILURE)
        self._clear = db.q(_CLEAR_FAILURE)
        self._has_failures = db.q("SELECT 1 FROM {s}.failures LIMIT 1")

    # -- writes ---------------------------------------------------------------------------

    def commit(self, rows: Sequence[RowWrite], *, position: int,
               may_write: Callable[[str], bool], deadline: float | None) -> CommitResult:
        """Write the rows in one transaction (``MetadataIndex.commit``)."""
        del position  # WAL order: nothing to detect (see History.position)
        wait = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        if not self.write_lock.acquire(timeout=wait):
            return CommitResult(CommitOutcome.BUSY)
        try:
            if self.fenced:
                return CommitResult(CommitOutcome.FENCED)
            self._before_write()
            refused = frozenset(r.meta.thread_id for r in rows if not may_write(r.meta.thread_id))
            current = self._incarnations([r.meta.thread_id for r in rows])
            # The upsert checks it again in its own statement, against a racing removal.
            gone = frozenset(r.meta.thread_id for r in rows if r.meta.thread_id not in refused
                             and current.get(r.meta.thread_id) != r.incarnation)
            errors: dict[str, ThreadStoreError] = {}
            live: list[tuple[str, tuple[Any, ...]]] = []
            for row in rows:
                if row.meta.thread_id in refused or row.meta.thread_id in gone:
                    continue
                values = _params(row)
                problem = _unstorable(values)
                if problem is None:
                    live.append((row.meta.thread_id, values))
                else:
                    errors[row.meta.thread_id] = StorageError(problem)
            if not live:
                return CommitResult(CommitOutcome.COMMITTED, errors, refused, gone)
            # Rows are locked in thread id order in every process, so group commits of
            # overlapping threads in several processes wait for each other, never deadlock.
            live.sort(key=lambda entry: entry[0])
            try:
                errors.update(self._write(live, deadline))
            except _Fenced:
                return CommitResult(CommitOutcome.FENCED)
            except _Busy:
                return CommitResult(CommitOutcome.BUSY)
            self.last_write = time.monotonic()
            return CommitResult(CommitOutcome.COMMITTED, errors, refused, gone)
        finally:
            self.write_lock.release()

    def _write(self, live: list[tuple[str, tuple[Any, ...]]],
               deadline: float | None) -> dict[str, ThreadStoreError]:
        """One transaction of upserts; if the server refuses a row, again row by row
        under savepoints, so that row alone fails."""
        what = "the projection transaction failed (none of its rows were written)"
        timeout = None if deadline is None else max(0.001, deadline - time.monotonic())
        try:
            with self._db.pool.connection(timeout=timeout) as conn:
                self._active = conn
                try:
                    try:
                        self._transaction(conn, live, None, deadline)
                        return {}
                    except psycopg.Error as exc:
                        if is_transient(exc) or self.fenced:
                            raise
                    errors: dict[str, ThreadStoreError] = {}
                    self._transaction(conn, live, errors, deadline)
                    return errors
                finally:
                    self._active = None
        except psycopg.Error as exc:
            if self.fenced:
                raise _Fenced() from exc
            if deadline is not None and isinstance(exc, psycopg.errors.LockNotAvailable):
                raise _Busy() from exc
            raise translate(exc, f"{what} at {self._db.description}",
                            secret=self._db.secret) from exc

    def _transaction(self, conn: psycopg.Connection[Any], live: list[tuple[str, tuple[Any, ...]]],
                     per_row: dict[str, ThreadStoreError] | None, deadline: float | None) -> None:
        with conn.transaction():
            conn.execute("SET LOCAL synchronous_commit = off")
            if deadline is not None:
                # A barrier running its own attempt never waits for another session's
                # row lock past its deadline: it hands the work to the worker (BUSY).
                wait_for_locks_until(conn, deadline)
            if per_row is None:
                with conn.cursor() as cur:
                    cur.executemany(self._upsert, [v for _, v in live])
            else:
                for thread_id, values in live:
                    if self.fenced:
                        raise _Fenced()
                    try:
                        with conn.transaction():  # a savepoint
                            conn.execute(self._upsert, values)
                    except psycopg.Error as exc:
                        if is_transient(exc) or self.fenced:
                            raise
                        per_row[thread_id] = translate(
                            exc, "the thread's metadata row could not be stored in PostgreSQL")
                        per_row[thread_id].__cause__ = exc
            written = [(t, v[_SEQ]) for t, v in live if per_row is None or t not in per_row]
            if written and conn.execute(self._has_failures).fetchone():
                with conn.cursor() as cur:
                    cur.executemany(self._clear, written)
            if self.fenced:  # close() gave up waiting for this transaction: write nothing
                raise _Fenced()

    def record_failures(self, failures: Sequence[Failure]) -> None:
        """Record projections that failed for good (``MetadataIndex.record_failures``)."""
        if not failures:
            return
        params = [{"t": f.thread_id, "g": f.generation, "e": f.error.replace("\x00", "\\0")}
                  for f in failures]
        try:
            with self.write_lock:
                if self.fenced:
                    return
                with self._db.connection("recording failed projections") as conn, \
                        conn.transaction(), conn.cursor() as cur:
                    cur.executemany(self._record, params)
        except (ThreadStoreError, UnicodeError) as exc:
            log.warning("thread_store: could not record failed projections (%s)", exc)

    def fence(self, timeout: float) -> bool:
        """Stop every write of this process (close): set ``fenced``, cancel the running
        transaction's statement, and wait up to ``timeout`` for the writer to let go."""
        self.fenced = True
        return stop_writer(self.write_lock, self._cancel_active, timeout)

    def _cancel_active(self, left: float) -> bool:
        """Cancel the running write transaction's statement, if any (for fence)."""
        active = self._active
        if active is not None:
            try:
                active.cancel_safe(timeout=max(0.01, min(1.0, left)))
            except psycopg.Error:
                pass  # it ended meanwhile, or the connection is gone: nothing to stop
        return True

    # -- reads ----------------------------------------------------------------------------

    def checkpoint(self, thread_id: str) -> Checkpoint:
        """Where the thread's projection stands (``MetadataIndex.checkpoint``)."""
        with self._db.connection("reading a projection checkpoint") as conn:
            row = conn.execute(self._checkpoint, {"t": thread_id}).fetchone()
        assert row is not None
        return Checkpoint(int(row[0] or 0), row[1], row[2])

    def read(self, thread_id: str) -> ThreadMetadata | None:
        """The thread's projected metadata, or ``None`` without a row."""
        with self._db.connection("reading thread metadata") as conn:
            row = conn.execute(self._db.q(f"{_SELECT} WHERE thread_id = %s"), (thread_id,)).fetchone()
        return _row_to_metadata(row) if row else None

    def list(self, query: ListQuery) -> Page:
        """One page, newest recency first, by keyset pagination.

        Each search word is a case-insensitive substring (ANDed) of the name, title,
        preview or first user message, matched with ILIKE on one generated column: the
        trigram index serves words of three characters or more.
        """
        where = ["is_archived = %s"]
        params: list[Any] = [query.archived]
        if not query.include_empty:
            where.append("has_preview")
        if query.cwd is not None:
            where.append("md5(cwd) = md5(%s) AND cwd = %s")  # the index holds md5(cwd)
            params.extend((query.cwd, query.cwd))
        for word in query.words:
            where.append("search ILIKE %s ESCAPE '\\'")
            params.append(_like(word))
        if query.after is not None:
            where.append("(recency_us, thread_id) < (%s, %s)")
            params.extend(query.after)
        text = (f"{_SELECT} WHERE {' AND '.join(where)} "
                "ORDER BY recency_us DESC, thread_id DESC LIMIT %s")
        with self._db.connection("listing threads") as conn:
            rows = conn.execute(self._db.q(text), (*params, query.limit + 1)).fetchall()
        threads = [_row_to_metadata(r) for r in rows[:query.limit]]
        next_cursor = None
        if len(rows) > query.limit:
            last = threads[-1]
            recency = us_from_utc(last.recency_at) if last.recency_at is not None else 0
            next_cursor = encode_cursor(query, recency, last.thread_id)
        return Page(threads=threads, next_cursor=next_cursor)
