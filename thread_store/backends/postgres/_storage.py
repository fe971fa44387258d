"""``PostgresStorage``: one store in a PostgreSQL schema, behind the storage ports.

Inside a process, index writes serialize on the index write lock (``fenced``). Every
store open for writing holds a share of the writers' lock (``_writers``), which
``rebuild_index`` takes exclusively.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg

from . import _schema
from ._async_reads import AsyncReads
from ._db import Database, PoolOptions, wait_for_locks_until
from ._writers import WritersLock, take_exclusive
from .history import History
from .index import Index
from ...errors import DiscardTimeout, InvalidArgument, StoreClosed, ThreadDiscarded, ThreadNotFound
from ...model import BehindThread, FailedThread, StoreReport
from ...storage import Capabilities, Lag

log = logging.getLogger("thread_store")
CAPABILITIES = Capabilities(reopen=True, read_only=True, durability_full=True, backup=False,
                            files=False, exclusive_rebuild=True, native_async_reads=True)
#: Seconds after a projection commit before housekeeping clears caught-up ``dirty_since``
#: marks: one statement then covers many commits.
HOUSEKEEPING_DELAY_S = 1.0
#: Pools of stores abandoned in a forked child: kept alive (never finalized), because
#: closing their connections would end the parent's sessions on the shared sockets.
_ABANDONED: list[Any] = []

_LAGGING = ("SELECT t.thread_id, t.head, m.projected_seq FROM {s}.threads t "
            "LEFT JOIN {s}.meta m ON m.thread_id = t.thread_id "
            "WHERE t.dirty_since IS NOT NULL AND t.discarded_us IS NULL "
            "AND (m.projected_seq IS NULL OR m.projected_seq <> t.head)")
_CLEAN = ("UPDATE {s}.threads t SET dirty_since = NULL FROM {s}.meta m "
          "WHERE m.thread_id = t.thread_id AND t.dirty_since IS NOT NULL "
          "AND m.projected_seq >= t.head")
_LOCK_THREAD = "SELECT discarded_us FROM {s}.threads WHERE thread_id = %s FOR UPDATE"
#: The threads behind, longest first, with the totals over all of them (window sums over
#: the rows the partial index on ``dirty_since`` finds): O(threads behind).
_BEHIND = ("SELECT thread_id, head, projected, since, count(*) OVER (), sum(head - projected) OVER () "
           "FROM (SELECT t.thread_id, t.head, coalesce(m.projected_seq, 0) AS projected, "
           "t.dirty_since AS since FROM {s}.threads t LEFT JOIN {s}.meta m "
           "ON m.thread_id = t.thread_id WHERE t.dirty_since IS NOT NULL "
           "AND t.discarded_us IS NULL) marked WHERE projected < head "
           "ORDER BY since, thread_id LIMIT %s")
_LIVE = "SELECT count(*) FROM {s}.threads WHERE discarded_us IS NULL"
_FAILED = "SELECT thread_id, error FROM {s}.failures ORDER BY thread_id LIMIT %s"
_VERSION = "SELECT value FROM {s}.store_meta WHERE key = 'version'"


def _nothing() -> None:
    """A read-only store's index takes no lock before writing (it never writes)."""


class PostgresStorage:
    """A store in one PostgreSQL schema (see the module doc)."""

    capabilities = CAPABILITIES
    path: Path | None = None

    def __init__(self, db: Database, *, read_only: bool, rules_id: str) -> None:
        """Use :meth:`open`."""
        self._db = db
        self.read_only = read_only
        self.description = f"{db.description} (schema {db.schema})"
        self._writers = None if read_only else WritersLock(
            db, on_retaken=lambda conn: _schema.check_rules(conn, db.schema, rules_id,
                                                            read_only=False, where=self.description))
        self.history = History(db)
        self.index = Index(db, before_write=self._writers.ensure if self._writers else _nothing)
        self._pid = os.getpid()
        self._housekept = float("-inf")

    @classmethod
    def open(cls, url: str, *, durability: str, read_only: bool, rules_id: str,
             schema: str = "thread_store", **pool: Any) -> PostgresStorage:
        """Connect, then create or migrate the store in ``schema`` (DESIGN §6).

        :param url: a ``postgresql://`` URL (libpq's URI syntax).
        :param pool: :class:`PoolOptions` fields.
        :raises InvalidArgument: a malformed URL, or other fold rules than the store's.
        :raises SchemaTooNew: a newer thread_store wrote the schema.
        :raises NotAThreadStore: the schema holds other tables (or, read-only, no store).
        :raises TransientStorageError: the server cannot be reached.
        """
        options = PoolOptions(**pool)
        db = Database(url, schema, durability=durability, read_only=read_only, options=options)
        storage = cls(db, read_only=read_only, rules_id=rules_id)
        try:
            db.open(options.connect_timeout)
            if storage._writers is not None:
                # Before the rules are checked: a rebuild cannot change them from here on.
                storage._writers.acquire()
            with db.connection("opening the store") as conn, conn.transaction():
                _schema.prepare(conn, schema, read_only=read_only, where=storage.description)
                _schema.check_rules(conn, schema, rules_id, read_only=read_only,
                                    where=storage.description)
        except BaseException:
            storage._release()
            raise
        return storage

    @staticmethod
    def drop_index(url: str, *, schema: str = "thread_store", **pool: Any) -> None:
        """Empty the index of the store (``rebuild_index``): every row and failure goes,
        every thread is marked behind, and the fold rules' id is forgotten, holding the
        writers' lock exclusively.

        :raises StoreLocked: stores are open for writing (the message names them).
        """
        options = PoolOptions(**pool)
        db = Database(url, schema, durability="full", read_only=False, options=options)
        try:
            db.open(options.connect_timeout)
            with db.connection("dropping the index") as conn, conn.transaction():
                take_exclusive(conn, db)
                _schema.prepare(conn, schema, read_only=False, where=db.description)
                conn.execute(db.q("LOCK TABLE {s}.meta, {s}.failures IN ACCESS EXCLUSIVE MODE"))
                conn.execute(db.q("TRUNCATE {s}.meta, {s}.failures"))
                conn.execute(db.q("DELETE FROM {s}.store_meta WHERE key = 'rules'"))
                conn.execute(db.q("UPDATE {s}.threads SET dirty_since = now() "
                                  "WHERE discarded_us IS NULL"))
        finally:
            db.pool.close(timeout=1.0)

    def async_reads(self) -> AsyncReads:
        """Native asyncio reads for an ``AsyncThreadStore``'s barriers, on a pool of their
        own (``_async_reads``)."""
        return AsyncReads(self._db)

    def lagging(self) -> list[Lag]:
        """Threads marked behind whose row is missing or not at their head: O(behind),
        by the partial index on ``dirty_since``."""
        with self._db.connection("finding threads behind") as conn:
            rows = conn.execute(self._db.q(_LAGGING)).fetchall()
        return [Lag(str(t), int(h), None if p is None else int(p)) for t, h, p in rows]

    def stale(self, older_than: float) -> list[Lag]:
        """Threads behind since more than ``older_than`` seconds (``dirty_since``)."""
        with self._db.connection("finding work left behind") as conn:
            rows = conn.execute(self._db.q(_LAGGING + " AND t.dirty_since <= now() - %s"),
                                (timedelta(seconds=older_than),)).fetchall()
        return [Lag(str(t), int(h), None if p is None else int(p)) for t, h, p in rows]

    def report(self, limit: int) -> StoreReport:
        """The threads behind (by the partial index on ``dirty_since``: O(behind)), the
        live threads and the failures, read in one read-only snapshot."""
        with self._db.connection("reporting the store") as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            version = conn.execute(self._db.q(_VERSION)).fetchone()
            live = conn.execute(self._db.q(_LIVE)).fetchone()
            # LIMIT 0 would lose the totals the window sums carry on every row.
            behind = conn.execute(self._db.q(_BEHIND), (max(limit, 1),)).fetchall()
            failed = conn.execute(self._db.q(_FAILED), (limit,)).fetchall()
        return StoreReport(
            schema_version={"postgres": int(version[0]) if version else 0},
            threads=int(live[0]) if live else 0,
            threads_behind=int(behind[0][4]) if behind else 0,
            items_behind=int(behind[0][5]) if behind else 0,
            oldest_behind_since=behind[0][3].astimezone(timezone.utc) if behind else None,
            behind=[BehindThread(str(t), int(h), int(p)) for t, h, p, *_ in behind[:limit]],
            failed=[FailedThread(str(t), str(e)) for t, e in failed])

    def remove_thread(self, thread_id: str, *, tombstone: bool,
                      deadline: float | None = None) -> None:
        """Remove the thread's row and history in one transaction that locks its
        ``threads`` row first (``Storage.remove_thread``); ``discard`` keeps that row as
        the tombstone. The lock waits at most until ``deadline``."""
        with self.index.write_lock:
            if self.index.fenced:
                raise StoreClosed(f"the store closed; thread {thread_id!r} was not removed")
            with self._db.connection("removing a thread") as conn, conn.transaction():
                if deadline is not None:
                    wait_for_locks_until(conn, deadline)
                try:
                    row = conn.execute(self._db.q(_LOCK_THREAD), (thread_id,)).fetchone()
                except psycopg.errors.LockNotAvailable as exc:
                    raise DiscardTimeout(
                        f"thread {thread_id!r} was not removed: another session held it past "
                        "the timeout; nothing changed, try again") from exc
                if row is None:
                    raise ThreadNotFound(f"thread {thread_id!r} does not exist")
                if row[0] is not None:
                    raise ThreadDiscarded(f"thread {thread_id!r} was discarded")
                for table in ("meta", "failures", "items", "append_keys"):
                    conn.execute(self._db.q(f"DELETE FROM {{s}}.{table} WHERE thread_id = %s"),
                                 (thread_id,))
                if tombstone:
                    conn.execute(self._db.q(
                        "UPDATE {s}.threads SET discarded_us = %s, dirty_since = NULL "
                        "WHERE thread_id = %s"), (time.time_ns() // 1000, thread_id))
                else:
                    conn.execute(self._db.q("DELETE FROM {s}.threads WHERE thread_id = %s"),
                                 (thread_id,))

    def housekeeping_due_at(self) -> float:
        """A moment after a projection commit not yet followed by housekeeping."""
        if self.read_only or self.index.last_write <= self._housekept:
            return float("inf")
        return self.index.last_write + HOUSEKEEPING_DELAY_S

    def housekeep(self) -> None:
        """Clear the ``dirty_since`` marks of threads whose row caught up (one statement,
        asynchronous commit: a mark left set only costs a look at the next open)."""
        started = time.monotonic()
        try:
            with self._db.connection("clearing caught-up marks") as conn, conn.transaction():
                conn.execute("SET LOCAL synchronous_commit = off")
                conn.execute(self._db.q(_CLEAN))
        except Exception as exc:  # noqa: BLE001 - housekeeping never raises (the port says so)
            log.warning("thread_store: housekeeping failed, will retry (%s)", exc)
            return
        self._housekept = started

    def backup(self, dest: Path) -> None:
        """Refused: a PostgreSQL store is copied with the server's own tools."""
        raise InvalidArgument(
            f"backup() copies embedded stores only; back up a PostgreSQL store with pg_dump "
            f"(e.g. pg_dump --schema={self._db.schema} DBNAME), or the server's own backups")

    def reject_writes(self) -> None:
        """Later history writes raise :class:`StoreClosed`."""
        self.history.reject_writes()

    def close(self) -> None:
        """Clear caught-up marks, then close the pool (its connections and workers)."""
        if os.getpid() != self._pid:
            self.abandon()
            return
        if not self.read_only:
            self.housekeep()
        self._release(timeout=5.0)

    def _release(self, timeout: float = 1.0) -> None:
        """Close the pool, then let go of the writers' lock: no write of this store
        follows the release."""
        try:
            self._db.pool.close(timeout=timeout)
        finally:
            if self._writers is not None:
                self._writers.release()

    def abandon(self) -> None:
        """In the process that opened it: close the pool without waiting. In a forked
        child: touch nothing (the sockets are the parent's), keep the pool from ever
        being finalized, and drop it."""
        if os.getpid() == self._pid:
            self._release(timeout=0.0)
        else:
            _ABANDONED.append(self._db.pool)
            if self._writers is not None:
                _ABANDONED.append(self._writers.abandon())

