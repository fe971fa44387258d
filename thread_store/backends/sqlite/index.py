"""The projected thread table: one row per thread, written with its ``projected_seq``.

The row and ``projected_seq`` are written in one statement, so the row always equals the
fold of the history up to that seq. Listing and search are in :mod:`._listing`; the
tables and their migrations are in :mod:`._index_schema`.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

from . import _connections, _filelock
from ._index_schema import MIGRATIONS, SCHEMA_VERSION, SELECT, metadata_to_row, row_to_metadata, upsert
from ._listing import list_page
from ...errors import StorageError, StoreClosed, ThreadStoreError
from ...model import Page, ThreadMetadata
from ...storage import (Checkpoint, CommitOutcome, CommitResult, Failure, ListQuery, RowWrite,
                        checkpoint_each, stop_writer)

log = logging.getLogger("thread_store")
#: The file lock of index writers, beside ``index.db``.
LOCK_FILE = "index.lock"
# Counts the transaction (the epoch) and raises the history mark, in the transaction of
# the rows: a history whose highest rowid is below the mark lost items the index folded.
_BUMP = ("UPDATE index_meta SET value = CASE key WHEN 'epoch' THEN value + 1 "
         "ELSE max(value, ?1) END WHERE key IN ('epoch', 'history_mark') RETURNING key, value")
_SET_MARK = "UPDATE index_meta SET value = ? WHERE key = 'history_mark'"
# A failure is recorded only while no row covers its generation: a success that won the
# race (in this process or another) is never overwritten by an older failure.
_RECORD_FAILURE = ("INSERT OR REPLACE INTO failures (thread_id, generation, error) "
                   "SELECT ?1, ?2, ?3 WHERE NOT EXISTS (SELECT 1 FROM threads "
                   "WHERE thread_id = ?1 AND projected_seq >= ?2)")
_RULES_KEY = "rules"
#: Rows per statement of a projection transaction (see ``upsert``): enough that the
#: FTS5 flush per statement is cheap per row, few enough that ``between_rows`` (the
#: worker stepping aside for appends) still comes every fraction of a millisecond.
_ROWS_PER_STATEMENT = 32


class HistoryLink(Protocol):
    """What the index tells the history about its writes (``History`` implements it)."""

    def acknowledge(self, projected: list[tuple[str, int]], epoch: int | None) -> None:
        """The index committed these ``(thread_id, seq)`` rows in transaction ``epoch``
        (remembered now, written to history later)."""

    def mark_behind(self, thread_ids: list[str], epoch: int | None = None) -> None:
        """Durably record that these threads' rows must be (re)written."""

    def incarnations(self, thread_ids: list[str]) -> dict[str, int]:
        """``{thread_id: incarnation}`` of the live threads among these."""


class Index:
    """The metadata index of one store (``index.db``)."""

    def __init__(self, path: Path, *, durability: str, read_only: bool = False,
                 busy_timeout_ms: int = 100) -> None:
        self.path = path
        if not read_only:
            _connections.create_private_file(path)
        # A short busy timeout: another process holding the lock becomes a transient
        # error that the projector retries with backoff, and close() stays on time.
        self._conn = _connections.connect(path, durability=durability, read_only=read_only,
                                     busy_timeout_ms=busy_timeout_ms, schema_version=SCHEMA_VERSION)
        self.fresh = _connections.migrate(self._conn, path, MIGRATIONS, read_only=read_only) == 0
        # A read-only store follows a rebuild of the index by the writer (a new file).
        self._readers = _connections.ConnectionPool(
            lambda: _connections.connect(path, durability=durability, read_only=read_only),
            follows=path if read_only else None)
        #: Held for every index write in this process; ``fenced`` is set under it by
        #: close(). Inside it, :meth:`exclusive` takes the file lock all processes share.
        self.write_lock = threading.Lock()
        self._file_lock = None if read_only else _filelock.FileLock(path.with_name(LOCK_FILE))
        #: The writer's history, told of every index transaction (None: read-only).
        self.history: HistoryLink | None = None
        self.fenced = False

    # -- writes ---------------------------------------------------------------------------

    def commit(self, rows: Sequence[RowWrite], *, position: int,
               may_write: Callable[[str], bool], deadline: float | None,
               between_rows: Callable[[], None] | None = None) -> CommitResult:
        """Write the rows in one transaction under the write lock (``MetadataIndex.commit``).

        A group commit can hold the lock for long; a caller with a ``deadline`` does not
        wait for it past the deadline (``BUSY``). ``may_write`` is asked under the lock,
        which a removal holds to delete the row: no row is written back once it began.
        ``between_rows()`` runs before each statement of rows but the first, in the
        transaction.
        """
        with self.exclusive(deadline) as held:
            if self.fenced:
                return CommitResult(CommitOutcome.FENCED)
            if not held:
                return CommitResult(CommitOutcome.BUSY)
            refused = frozenset(r.meta.thread_id for r in rows if not may_write(r.meta.thread_id))
            gone = self._gone([r for r in rows if r.meta.thread_id not in refused])
            live = [r for r in rows if r.meta.thread_id not in refused and r.meta.thread_id not in gone]
            if not live:
                return CommitResult(CommitOutcome.COMMITTED, refused=refused, gone=gone)
            try:
                errors = self._write_rows(live, position, between_rows)
            except StoreClosed:
                return CommitResult(CommitOutcome.FENCED)
        return CommitResult(CommitOutcome.COMMITTED, errors, refused, gone)

    @contextmanager
    def exclusive(self, deadline: float | None = None, *,
                  await_this_process: bool = False) -> Iterator[bool]:
        """Hold the index for writing: this process's ``write_lock``, then the file lock
        every writing process takes (a waiter is woken the moment the holder lets go).

        Yields ``False`` (holding nothing) if ``deadline`` (monotonic) passed first, or
        the index was fenced while it waited. With ``await_this_process`` the deadline
        bounds only the wait for other processes (a removal waits for this process's own
        group commit, which it fences, whatever its timeout). An interrupt (Ctrl-C in a
        caller) after an acquire still releases both.
        """
        wait = -1.0
        if deadline is not None and not await_this_process:
            wait = max(0.0, deadline - time.monotonic())
        if not self.write_lock.acquire(timeout=wait):
            yield False
            return
        try:
            assert self._file_lock is not None, "a read-only index never writes"
            held = self._file_lock.acquire(deadline=deadline, cancelled=lambda: self.fenced)
            try:
                yield held is not None
            finally:
                if held is not None:
                    held.release()
        finally:
            self.write_lock.release()

    def _gone(self, rows: list[RowWrite]) -> frozenset[str]:
        """Rows whose thread is no longer live at the row's incarnation (write lock held:
        a removal deletes the row and the history under it, so none can interleave)."""
        if self.history is None or not rows:
            return frozenset()
        live = self.history.incarnations([r.meta.thread_id for r in rows])
        return frozenset(r.meta.thread_id for r in rows if live.get(r.meta.thread_id) != r.incarnation)

    def _write_rows(self, rows: list[RowWrite], history_mark: int,
                    between_rows: Callable[[], None] | None = None) -> dict[str, ThreadStoreError]:
        """Upsert rows in one transaction; return per-thread errors of rows that failed.

        A failing statement has no effect in SQLite, so one bad row does not undo the
        others. A failing COMMIT raises and writes nothing. The committed heads then go
        to the history's acknowledgement batch, in memory: no history write here.

        :param history_mark: the history's highest items rowid, read before the rows were
            folded (:meth:`History.high_water`), so at least that of every item they hold.
        """
        errors: dict[str, BaseException] = {}
        stored: dict[str, ThreadStoreError] = {}
        bad = (sqlite3.Error, ValueError, TypeError, OverflowError)
        closed = "the store closed during this projection transaction"

        def body() -> None:
            try:
                for start in range(0, len(rows), _ROWS_PER_STATEMENT):
                    if start and between_rows is not None:
                        between_rows()
                    # Checked for every statement, so a long group commit stops soon
                    # after close().
                    if self.fenced:
                        raise StoreClosed(closed)
                    chunk = rows[start:start + _ROWS_PER_STATEMENT]
                    self._conn.execute(upsert(len(chunk)), [
                        value for r in chunk for value in metadata_to_row(r.meta, r.fold_state)])
                return
            except bad as exc:
                if _connections.is_transient(exc) or self.fenced:
                    raise
            # Find the bad rows one by one; re-applying an upsert that went in is harmless.
            for row in rows:
                try:
                    self._conn.execute(upsert(1), metadata_to_row(row.meta, row.fold_state))
                except bad as exc:
                    if _connections.is_transient(exc) or self.fenced:
                        raise
                    errors[row.meta.thread_id] = exc

        def fenced_body() -> int:
            try:
                body()
            except sqlite3.Error as exc:
                if self.fenced:  # interrupted by close() (see fence)
                    raise StoreClosed(closed) from exc
                raise
            epoch = self._bump(history_mark)
            if self.fenced:  # close() gave up waiting for this transaction: write nothing
                raise StoreClosed(closed)
            return epoch

        try:
            epoch = _connections.in_transaction(self._conn, fenced_body)
        except sqlite3.Error as exc:
            raise _connections.translate(exc, "the projection transaction failed in SQLite "
                                         "(none of its rows were written)") from exc
        for thread_id, error in errors.items():
            stored[thread_id] = _unstorable(error)
        if self.history is not None:
            self.history.acknowledge([(r.meta.thread_id, r.meta.projected_seq) for r in rows
                                      if r.meta.thread_id not in errors], epoch)
        return stored

    def record_failures(self, failures: Sequence[Failure]) -> None:
        """Record projections that failed for good (``MetadataIndex.record_failures``)."""
        if not failures:
            return
        params = [(f.thread_id, f.generation, f.error) for f in failures]
        try:
            with self.exclusive() as held:
                if not held or self.fenced:
                    return
                _connections.in_transaction(
                    self._conn, lambda: self._conn.executemany(_RECORD_FAILURE, params))
        except sqlite3.Error as exc:
            log.warning("thread_store: could not record failed projections (%s)", exc)

    def rules_id(self) -> str | None:
        """The identifier of the fold rules this index was projected with, if recorded."""
        row = self._readers.fetchone("the index", "SELECT value FROM index_info WHERE key = ?",
                                     (_RULES_KEY,))
        return str(row[0]) if row else None

    def set_rules_id(self, rules_id: str) -> None:
        """Record the fold rules' identifier (a new or rebuilt index)."""
        try:
            with self.exclusive():
                self._conn.execute("INSERT OR REPLACE INTO index_info (key, value) VALUES (?, ?)",
                                   (_RULES_KEY, rules_id))
        except sqlite3.Error as exc:
            raise _connections.storage_error(exc, "recording the fold rules") from exc

    def fence(self, timeout: float) -> bool:
        """Make the writer write nothing more (close): set ``fenced``, stop its statement.

        A running transaction checks ``fenced`` for every row and before COMMIT, and
        ``interrupt()`` (safe from any thread) cuts its current statement short, so it
        rolls back within milliseconds. Returns whether the writer let go of the write
        lock within ``timeout`` seconds.
        """
        self.fenced = True
        return stop_writer(self.write_lock, self._interrupt, timeout)

    def _interrupt(self, left: float) -> bool:
        """Cut the writer's running statement short (safe from any thread); ``False`` once
        the connection is closed already."""
        try:
            self._conn.interrupt()
        except sqlite3.Error:
            return False
        return True

    def delete_row(self, thread_id: str) -> None:
        """Remove a thread's row (discard, delete); the caller holds :meth:`exclusive`."""
        self.delete_rows([thread_id])

    def delete_rows(self, thread_ids: list[str]) -> None:
        """Remove rows (discard, delete, orphans found at open) in one transaction.

        The threads are first marked behind in history: if the history removal that
        follows never happens (a crash), the next open re-projects them whole.
        """
        if not thread_ids:
            return
        if self.history is not None:
            self.history.mark_behind(thread_ids)

        def body() -> int:
            for table in ("threads", "failures"):
                self._conn.executemany(f"DELETE FROM {table} WHERE thread_id = ?",
                                       [(t,) for t in thread_ids])
            return self._bump(0)

        try:
            epoch = _connections.in_transaction(self._conn, body)
        except sqlite3.Error as exc:
            raise _connections.storage_error(exc, "removing the thread's index row") from exc
        if self.history is not None:
            self.history.acknowledge([], epoch)

    def reset_history_mark(self, history_mark: int) -> None:
        """Set the mark exactly, once open() compared every thread with history (which
        may have lost the items the old mark counted); the caller holds :meth:`exclusive`."""

        def body() -> None:
            self._conn.execute(_SET_MARK, (history_mark,))
            self._bump(0)

        try:
            _connections.in_transaction(self._conn, body)
        except sqlite3.Error as exc:
            raise _connections.storage_error(exc, "resetting the index's history mark") from exc

    def epoch(self) -> int:
        """How many transactions the index has committed (open compares it with history's)."""
        return self._meta("epoch")

    def history_mark(self) -> int:
        """The highest history rowid that a committed row may have folded."""
        return self._meta("history_mark")

    def _meta(self, key: str) -> int:
        row = self._readers.fetchone("the index", "SELECT value FROM index_meta WHERE key = ?",
                                     (key,))
        return int(row[0]) if row else 0

    def _bump(self, history_mark: int) -> int:
        """Count this transaction and raise the history mark, in it, so both commit with
        the rows; returns the new epoch."""
        values = dict(self._conn.execute(_BUMP, (history_mark,)).fetchall())
        return int(values["epoch"])

    def checkpoint(self, thread_id: str) -> Checkpoint:
        """Where the thread's projection stands (``MetadataIndex.checkpoint``)."""
        row = self._readers.fetchone(
            "the index", "SELECT t.projected_seq, t.state, (SELECT error FROM failures f "
            "WHERE f.thread_id = ?1) FROM (SELECT ?1 AS thread_id) q "
            "LEFT JOIN threads t USING (thread_id)", (thread_id,))
        return Checkpoint(int(row[0] or 0), row[1], row[2])

    def checkpoints(self, thread_ids: Sequence[str]) -> dict[str, Checkpoint]:
        """:meth:`checkpoint` of those with a row (``MetadataIndex.checkpoints``): reads
        of the local file, no round trips to save."""
        return checkpoint_each(self.checkpoint, thread_ids)

    def projected_of(self, thread_ids: list[str]) -> dict[str, int]:
        """``projected_seq`` of those of ``thread_ids`` that have a row."""
        return dict(self._readers.fetch_in(
            "the index", "SELECT thread_id, projected_seq FROM threads WHERE thread_id IN ({keys})",
            thread_ids))

    def failures(self, limit: int) -> list[tuple[str, str]]:
        """``(thread_id, error)`` of up to ``limit`` recorded failures, by thread id."""
        rows: list[tuple[str, str]] = self._readers.fetchall(
            "the index", "SELECT thread_id, error FROM failures ORDER BY thread_id LIMIT ?",
            (limit,))
        return rows

    def schema_version(self) -> int:
        """The file's schema version."""
        return int(self._readers.fetchone("the index", "PRAGMA user_version")[0])

    def projected_seqs(self) -> dict[str, int]:
        """Every row's ``projected_seq`` (crash recovery)."""
        return dict(self._readers.fetchall("the index", "SELECT thread_id, projected_seq FROM threads"))

    def read(self, thread_id: str) -> ThreadMetadata | None:
        """Return a thread's projected metadata, or ``None`` without a row."""
        row = self._readers.fetchone("the index", f"{SELECT} WHERE thread_id = ?", (thread_id,))
        return row_to_metadata(row) if row else None

    def list(self, query: ListQuery) -> Page:
        """Return one page, newest recency first, by keyset pagination.

        Each search word is a case-insensitive substring (ANDed) of the name, title,
        preview or first user message: the trigram table from three characters, LIKE
        below (case-insensitive for ASCII only).
        """
        return list_page(self._readers, query)

    def backup_to(self, dest: Path) -> None:
        """Copy this file, as one consistent snapshot, into the new file ``dest``."""
        self._readers.backup_to(dest)

    def close(self) -> None:
        """Close every connection; the writer once no transaction is running on it."""
        self._readers.close()
        with self.write_lock:  # a fenced worker may still be in its (bounded) transaction
            self._conn.close()
            if self._file_lock is not None:
                self._file_lock.close()


def _unstorable(error: BaseException) -> StorageError:
    """A row the index refused (a value SQLite cannot bind or store), with its cause."""
    translated = _connections.translate(error, "the thread's metadata row could not be stored in SQLite")
    translated.__cause__ = error
    return translated
