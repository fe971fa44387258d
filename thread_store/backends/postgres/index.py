"""The projected rows in PostgreSQL: ``meta`` (one row per thread) and ``failures``.

A group commit is one statement, its own transaction with ``synchronous_commit=off``
(one round trip, however many rows; ``append_and_flush`` commits one): the rows are
derived data, and WAL order keeps a projection from outliving the items it folded. It
never locks a ``threads`` row against appends, so appends never wait on it. A row is inserted only for a live
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

from ._db import Database, lock_timeout_ms
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
_PLACEHOLDERS = ", ".join(f"%({c})s::{_TYPES.get(c, 'text')}" for c in _COLUMNS)
_WRITTEN = (*_COLUMNS, "inc")
#: Filters of ``live`` that set the statement's transaction's settings (see ``_COMMIT_ONE``).
_SETTINGS = ("AND set_config('synchronous_commit', 'off', true) IS NOT NULL "
             "AND set_config('lock_timeout', coalesce(%(lock_timeout)s::text, "
             "current_setting('lock_timeout')), true) IS NOT NULL ")
#: The guarded upsert: only the row's incarnation, never ``projected_seq`` backwards.
_UPSERT = ("ON CONFLICT (thread_id) DO UPDATE SET "
           + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS[1:])
           + " WHERE meta.incarnation = excluded.incarnation "
             "AND meta.projected_seq <= excluded.projected_seq")
#: One row's projection commit, in ONE statement (on an autocommit connection, its own
#: transaction): the guarded upsert, and the clear of the thread's recorded failure. It
#: returns the thread's live incarnation (NULL: removed), which tells the caller whether
#: the row was refused as ``gone``; a row is written only for a thread live at the row's
#: incarnation, and never moves ``projected_seq`` back. The settings are local to the
#: statement's transaction and set by the filter of ``live``, which every write of the
#: statement reads first: ``synchronous_commit`` is read when the transaction commits,
#: ``lock_timeout`` (NULL: the session's) before the upsert or the delete can wait on a
#: row lock of another session. ``live`` holds the thread's row ``FOR KEY SHARE``: an
#: append's head update (``FOR NO KEY UPDATE``) never waits for it, but a removal, which
#: locks the row ``FOR UPDATE`` before it deletes the ``meta`` row, does; and a projection
#: that waits for a removal re-reads the row once it commits, so it cannot insert a row
#: for a thread removed meanwhile (the statement's snapshot alone would still show it live).
_COMMIT_ONE = (
    "WITH live AS (SELECT t.incarnation FROM {s}.threads t "
    f"WHERE t.thread_id = %(thread_id)s AND t.discarded_us IS NULL {_SETTINGS}FOR KEY SHARE OF t), "
    f"up AS (INSERT INTO {{s}}.meta (incarnation, {', '.join(_COLUMNS)}) "
    f"SELECT live.incarnation, {_PLACEHOLDERS} FROM live WHERE live.incarnation = %(inc)s {_UPSERT}), "
    "cleared AS (DELETE FROM {s}.failures WHERE thread_id = %(thread_id)s AND generation <= %(projected_seq)s "
    "AND EXISTS (SELECT 1 FROM live WHERE live.incarnation = %(inc)s)) "
    "SELECT %(thread_id)s::text, (SELECT incarnation FROM live)")
#: Several rows' commit: ``_COMMIT_ONE`` over the rows' values, sent as one JSON array
#: of objects (one per row, keyed by column), in ONE statement too, the threads' rows
#: locked in thread id order (as the upsert takes the ``meta`` rows: commits of
#: overlapping groups in several processes wait for each other, never deadlock). Not a
#: transaction of ``_COMMIT_ONE`` per row: psycopg's pipeline mode, which ``executemany``
#: uses, polls the socket holding the GIL until the results come, and the process's
#: appends waited for it (py-spy). Not an array per column: psycopg dumps arrays in Python,
#: element by element, and that was a quarter of a projector's Python time with 8 writer
#: processes (``json.dumps`` is C). No raw NUL reaches the JSON text (which PostgreSQL's
#: text cannot hold): the text columns hold none (``_text_columns``), and the JSON texts
#: in the others escape it. Not this for one row: building the rows and planning the
#: joins cost ``append_and_flush`` about 70 µs.
_COMMIT_MANY = (
    "WITH v AS (SELECT * FROM json_to_recordset(%(rows)b::text::json) AS v("
    + ", ".join(f"{c} {_TYPES.get(c, 'bigint' if c == 'inc' else 'text')}" for c in _WRITTEN)
    + ")), "
    "live AS (SELECT t.thread_id, t.incarnation FROM {s}.threads t "
    f"WHERE t.thread_id IN (SELECT thread_id FROM v) AND t.discarded_us IS NULL {_SETTINGS}"
    "ORDER BY t.thread_id FOR KEY SHARE OF t), "
    f"up AS (INSERT INTO {{s}}.meta (incarnation, {', '.join(_COLUMNS)}) "
    f"SELECT live.incarnation, {', '.join(f'v.{c}' for c in _COLUMNS)} FROM v JOIN live "
    f"ON live.thread_id = v.thread_id AND live.incarnation = v.inc ORDER BY v.thread_id {_UPSERT}), "
    "cleared AS (DELETE FROM {s}.failures f USING v JOIN live ON live.thread_id = v.thread_id "
    "AND live.incarnation = v.inc WHERE f.thread_id = v.thread_id AND f.generation <= v.projected_seq) "
    "SELECT v.thread_id, live.incarnation FROM v LEFT JOIN live ON live.thread_id = v.thread_id")
_SELECT = f"SELECT {', '.join(_READ_COLUMNS)} FROM {{s}}.meta"
_CHECKPOINT = ("SELECT m.projected_seq, m.state, (SELECT error FROM {s}.failures "
               "WHERE thread_id = %(t)s) FROM (SELECT 1) one LEFT JOIN {s}.meta m "
               "ON m.thread_id = %(t)s")
_CHECKPOINTS = ("SELECT m.thread_id, m.projected_seq, m.state, f.error, m.incarnation FROM {s}.meta m "
                "LEFT JOIN {s}.failures f ON f.thread_id = m.thread_id "
                "WHERE m.thread_id = ANY(%b::text[])")
#: One thread's row (:func:`metadata_of`) and its checkpoint (:func:`checkpoint_of`): what
#: ``read`` and ``checkpoint`` ask, and the barriers' native reads too.
META_ROW = f"{_SELECT} WHERE thread_id = %(t)s"
CHECKPOINT_ROW = _CHECKPOINT
#: The columns :func:`metadata_of` reads, of the ``meta`` table aliased ``m``.
META_COLUMNS = ", ".join(f"m.{c}" for c in _READ_COLUMNS)
_RECORD_FAILURE = (
    "INSERT INTO {s}.failures (thread_id, generation, error) SELECT %(t)s, %(g)s, %(e)s "
    "WHERE NOT EXISTS (SELECT 1 FROM {s}.meta WHERE thread_id = %(t)s AND projected_seq >= %(g)s) "
    "ON CONFLICT (thread_id) DO UPDATE SET generation = excluded.generation, error = excluded.error")
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


def _params(row: RowWrite) -> dict[str, Any]:
    """The row's parameters of ``_COMMIT_ONE`` (but ``lock_timeout``)."""
    meta = row.meta
    times = [us_from_utc(v) if (v := getattr(meta, t)) is not None else None for t in _TIMES]
    times[2] = times[2] or 0  # recency_us orders the listing: never NULL
    usage = json.dumps(meta.token_usage) if meta.token_usage is not None else None
    texts, exact = _text_columns(meta)
    values = (meta.thread_id, *texts, usage, exact, *times, meta.item_count,
              meta.projected_seq, meta.archived_at is not None, bool(meta.preview), row.fold_state)
    return {**dict(zip(_COLUMNS, values)), "inc": row.incarnation}


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


def _unstorable(values: dict[str, Any]) -> str | None:
    """Why PostgreSQL would refuse a row (lone surrogates, integers out of ``bigint``),
    found before sending it; ``None`` when it is storable."""
    for name in _COLUMNS:
        value = values[name]
        if isinstance(value, str):
            try:
                value.encode()
            except UnicodeEncodeError:
                return f"the thread's {name} cannot be stored: it is not valid Unicode text"
        elif isinstance(value, int) and not isinstance(value, bool) and not -_BIGINT <= value < _BIGINT:
            return f"the thread's {name} ({value}) does not fit PostgreSQL's bigint"
    return None


def checkpoint_of(row: tuple[Any, ...] | None) -> Checkpoint:
    """The :class:`Checkpoint` in the answer to :data:`CHECKPOINT_ROW` (always one row)."""
    assert row is not None
    return Checkpoint(int(row[0] or 0), row[1], row[2])


def metadata_of(row: tuple[Any, ...] | None) -> ThreadMetadata | None:
    """The metadata in the answer to :data:`META_ROW` (``None``: the thread has no row)."""
    return _row_to_metadata(row) if row else None


def _like(word: str) -> str:
    """``%word%`` with LIKE's wildcards and escape character escaped."""
    return "%" + word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


class Index:
    """The metadata index of one store (``MetadataIndex``)."""

    def __init__(self, db: Database, *, before_write: Callable[[], None]) -> None:
        self._db = db
        #: Called under the write lock before each write: it keeps this store's share
        #: of the writers' lock (``_writers``), raising instead of writing if it cannot.
        self._before_write = before_write
        #: Held for every index write; ``fenced`` is set under it by close().
        self.write_lock = threading.Lock()
        self.fenced = False
        #: The connection of the running write, for fence() to cancel.
        self._active: psycopg.Connection[Any] | None = None
        #: When a commit last wrote rows (monotonic), for housekeeping.
        self.last_write = float("-inf")
        self._commit_one = db.q(_COMMIT_ONE)
        self._commit_many = db.q(_COMMIT_MANY)
        self._checkpoint = db.q(_CHECKPOINT)
        self._checkpoints = db.q(_CHECKPOINTS)
        self._meta_row = db.q(META_ROW)
        self._record = db.q(_RECORD_FAILURE)

    # -- writes ---------------------------------------------------------------------------

    def commit(self, rows: Sequence[RowWrite], *, position: int,
               may_write: Callable[[str], bool], deadline: float | None,
               between_rows: Callable[[], None] | None = None) -> CommitResult:
        """Write the rows in one transaction (``MetadataIndex.commit``): one statement, a
        round trip, however many rows. It waits with the GIL released, so ``between_rows``
        is not called."""
        del position, between_rows  # WAL order: nothing to detect (see History.position)
        wait = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        if not self.write_lock.acquire(timeout=wait):
            return CommitResult(CommitOutcome.BUSY)
        try:
            if self.fenced:
                return CommitResult(CommitOutcome.FENCED)
            self._before_write()
            refused = frozenset(r.meta.thread_id for r in rows if not may_write(r.meta.thread_id))
            errors: dict[str, ThreadStoreError] = {}
            live: list[dict[str, Any]] = []
            for row in rows:
                if row.meta.thread_id in refused:
                    continue
                values = _params(row)
                problem = _unstorable(values)
                if problem is None:
                    live.append(values)
                else:
                    errors[row.meta.thread_id] = StorageError(problem)
            if not live:
                return CommitResult(CommitOutcome.COMMITTED, errors, refused)
            # Rows are locked in thread id order in every process, so group commits of
            # overlapping threads in several processes wait for each other, never deadlock.
            live.sort(key=lambda values: str(values["thread_id"]))
            try:
                current = self._write(live, deadline, errors)
            except _Fenced:
                return CommitResult(CommitOutcome.FENCED)
            except _Busy:
                return CommitResult(CommitOutcome.BUSY)
            # Not live at the row's incarnation in the statement's snapshot: not written.
            gone = frozenset(v["thread_id"] for v in live
                             if v["thread_id"] not in errors and current[v["thread_id"]] != v["inc"])
            if any(v["thread_id"] not in gone and v["thread_id"] not in errors for v in live):
                self.last_write = time.monotonic()
            return CommitResult(CommitOutcome.COMMITTED, errors, refused, gone)
        finally:
            self.write_lock.release()

    def _write(self, live: list[dict[str, Any]], deadline: float | None,
               errors: dict[str, ThreadStoreError]) -> dict[str, int | None]:
        """Run the rows' statements; if the server refuses a row, again row by row under
        savepoints, so that row alone fails (into ``errors``). Returns each thread's live
        incarnation (``None``: removed)."""
        what = "the projection transaction failed (none of its rows were written)"
        timeout = None if deadline is None else max(0.001, deadline - time.monotonic())
        try:
            with self._db.pool.connection(timeout=timeout) as conn:
                self._active = conn
                try:
                    try:
                        return self._statements(conn, self._with_wait(live, deadline), None)
                    except psycopg.Error as exc:
                        if is_transient(exc) or self.fenced:
                            raise
                    return self._statements(conn, self._with_wait(live, deadline), errors)
                finally:
                    self._active = None
        except psycopg.Error as exc:
            if self.fenced:
                raise _Fenced() from exc
            if deadline is not None and isinstance(exc, psycopg.errors.LockNotAvailable):
                raise _Busy() from exc
            raise translate(exc, f"{what} at {self._db.description}",
                            secret=self._db.secret) from exc

    @staticmethod
    def _with_wait(live: list[dict[str, Any]], deadline: float | None) -> list[dict[str, Any]]:
        """The rows' parameters with the ``lock_timeout`` left until ``deadline``, worked
        out just before the statements run (after the wait for a pooled connection)."""
        wait = None if deadline is None else lock_timeout_ms(deadline)
        return [{**values, "lock_timeout": wait} for values in live]

    def _statements(self, conn: psycopg.Connection[Any], params: list[dict[str, Any]],
                    per_row: dict[str, ThreadStoreError] | None) -> dict[str, int | None]:
        """All rows: one statement, its own transaction (it sets what ``SET LOCAL`` would,
        see ``_COMMIT_ONE``). Row by row (``per_row``): one transaction, a savepoint and
        that statement per row, a refused row's error into ``per_row``."""
        if self.fenced:
            raise _Fenced()
        if per_row is None:
            return self._commit_group(conn, params)
        current: dict[str, int | None] = {}
        with conn.transaction():
            for values in params:
                thread_id = values["thread_id"]
                if self.fenced:
                    raise _Fenced()
                try:
                    with conn.transaction():  # a savepoint
                        current.update(self._commit_group(conn, [values]))
                except psycopg.Error as exc:
                    if is_transient(exc) or self.fenced:
                        raise
                    per_row[thread_id] = translate(
                        exc, "the thread's metadata row could not be stored in PostgreSQL")
                    per_row[thread_id].__cause__ = exc
            if self.fenced:  # close() gave up waiting for this transaction: write nothing
                raise _Fenced()
        return current

    def _commit_group(self, conn: psycopg.Connection[Any], params: list[dict[str, Any]]) -> dict[str, int | None]:
        """Run ``_COMMIT_ONE`` or ``_COMMIT_MANY`` for these rows: each thread's live incarnation."""
        if len(params) == 1:
            query, values = self._commit_one, params[0]
        else:
            query = self._commit_many
            values = {"rows": json.dumps(params, ensure_ascii=False),
                      "lock_timeout": params[0]["lock_timeout"]}
        return {str(t): None if inc is None else int(inc)
                for t, inc in conn.execute(query, values).fetchall()}

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
            return checkpoint_of(conn.execute(self._checkpoint, {"t": thread_id}).fetchone())

    def checkpoints(self, thread_ids: Sequence[str]) -> dict[str, Checkpoint]:
        """The checkpoints of those with a row, in one read (``MetadataIndex.checkpoints``)."""
        with self._db.connection("reading projection checkpoints") as conn:
            rows = conn.execute(self._checkpoints, (list(thread_ids),)).fetchall()
        return {str(t): Checkpoint(int(seq), state, error, int(inc)) for t, seq, state, error, inc in rows}

    def read(self, thread_id: str) -> ThreadMetadata | None:
        """The thread's projected metadata, or ``None`` without a row."""
        with self._db.connection("reading thread metadata") as conn:
            return metadata_of(conn.execute(self._meta_row, {"t": thread_id}).fetchone())

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
