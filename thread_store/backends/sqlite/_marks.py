"""Which threads history holds as behind their projection: the marks, and the lazy
acknowledgements that clear them. A mixin of :class:`~.history.History`, on its writer
connection and under its locks.

A trigger adds a thread to the ``behind`` table in the transaction of the append itself;
an acknowledgement removes it once the index holds that head, so neither a power loss
nor another process can roll the record back or overwrite it.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, TypeVar

from . import _connections
from ._acks import SLICE, AckBatch
from ._history_schema import NOW_US
from ...errors import StoreClosed

T = TypeVar("T")
log = logging.getLogger("thread_store")
# Cleared only while the history holds nothing past the projected head: a newer append's
# mark (set in that append's transaction, serialized with this one) always survives.
_CLEAR = ("DELETE FROM behind WHERE thread_id = ?1"
          " AND NOT EXISTS (SELECT 1 FROM items WHERE thread_id = ?1 AND seq > ?2)")
_MARK = (f"INSERT OR IGNORE INTO behind (thread_id, since_us) SELECT thread_id, {NOW_US} "
         "FROM threads WHERE thread_id = ? AND discarded_us IS NULL")
# Acknowledgements only raise the epoch: with several writers they may arrive out of order.
_RAISE_EPOCH = ("INSERT INTO store_meta (key, value) VALUES ('index_epoch', ?1) ON CONFLICT(key) "
                "DO UPDATE SET value = max(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))")
# Recovery sets it exactly: after a rebuilt or rolled-back index it must go down too.
_SET_EPOCH = ("INSERT INTO store_meta (key, value) VALUES ('index_epoch', ?1) ON CONFLICT(key) "
              "DO UPDATE SET value = excluded.value")


@dataclass(frozen=True, slots=True)
class Marked:
    """A thread marked behind in history: its head, and since when (µs) it is marked."""

    thread_id: str
    head: int
    since_us: int


class BehindMarks:
    """The behind marks and acknowledgements of :class:`~.history.History`, which
    provides the attributes and the write path declared here."""

    lock: threading.Lock
    _conn: sqlite3.Connection
    _conn_closed: bool
    _full: bool
    _acks: AckBatch
    _readers: _connections.ConnectionPool

    if TYPE_CHECKING:  # History's write path: its file lock, and one translated transaction
        def _writers(self) -> AbstractContextManager[object]: ...

        def _write(self, body: Callable[[], T], what: str, *, txn: bool = True) -> T: ...

    def acknowledge(self, projected: list[tuple[str, int]], epoch: int | None) -> None:
        """The index committed these ``(thread_id, seq)`` heads (in index transaction ``epoch``).

        Only remembered in memory (:class:`~thread_store.backends.sqlite._acks.AckBatch`), so an index
        commit never waits for a history write; :meth:`write_acknowledgements` writes them.
        Called after the index COMMIT, so a mark never disappears before its row is
        written.
        """
        self._acks.add(projected, epoch)

    def acknowledgements_due_at(self) -> float:
        """When :meth:`write_acknowledgements` should run (monotonic; ``inf``: nothing to do)."""
        return self._acks.due_at()

    def write_acknowledgements(self) -> None:
        """Write one slice of the remembered acknowledgements, in one transaction (the
        worker calls it again while they are due; close, until none is left).

        Clears each thread's mark unless an append went past that seq, and raises the
        recorded index epoch, so open() can tell whether the index lost a tail. Nothing
        here needs to be durable at once (a lost acknowledgement only costs open() a
        check), so it never waits for an fsync, and a failure is only logged.
        """
        with self.lock:
            # Taken under the lock that removals hold, so a head taken here was not
            # forgotten by a removal (or a re-creation of its id) that came before.
            projected, epoch = self._acks.take(SLICE)
            if self._conn_closed or (not projected and epoch is None):
                return
            try:
                with self._writers():
                    self._relaxed(lambda: self._acknowledge(projected, epoch))
            except sqlite3.Error as exc:
                log.warning("thread_store: could not record projected heads in history (%s); "
                            "the next open checks those threads again", exc)

    def _acknowledge(self, projected: list[tuple[str, int]], epoch: int | None) -> None:
        if projected:
            self._conn.executemany(_CLEAR, projected)
        if epoch is not None:
            self._conn.execute(_RAISE_EPOCH, (epoch,))

    def mark_behind(self, thread_ids: list[str], epoch: int | None = None) -> None:
        """Durably mark threads as behind (and set the ``epoch``) in one transaction.

        Before an index row goes (discard, delete), and after open() compared every thread.
        Heads of these threads waiting to be acknowledged are forgotten: written later,
        they would clear the mark this writes (or, once a delete freed the id, the mark of
        the new thread that took it).
        """
        with self.lock:
            self._acks.forget(thread_ids)
            if self._conn_closed:
                raise StoreClosed("the thread store is closed; open it again")

            def write() -> None:
                self._conn.executemany(_MARK, [(t,) for t in thread_ids])
                if epoch is not None:
                    self._conn.execute(_SET_EPOCH, (epoch,))

            with self._writers():
                self._write(write, "marking threads behind")

    def behind_threads(self) -> list[Marked]:
        """The live threads marked behind, with their heads: O(marked threads).

        Marks are cleared lazily, so some of these may be caught up already.
        """
        rows = self._readers.fetchall(
            "history", "SELECT t.thread_id, (SELECT max(seq) FROM items i "
            "WHERE i.thread_id = t.thread_id), b.since_us FROM behind b "
            "JOIN threads t USING (thread_id) WHERE t.discarded_us IS NULL")
        return [Marked(thread_id, int(head or 0), since_us) for thread_id, head, since_us in rows]

    def _relaxed(self, body: Callable[[], None]) -> None:
        """Run ``body`` in a transaction that skips the fsync of ``durability="full"``."""
        if not self._full:
            _connections.in_transaction(self._conn, body)
            return
        self._conn.execute("PRAGMA synchronous = NORMAL")
        try:
            _connections.in_transaction(self._conn, body)
        finally:
            self._conn.execute("PRAGMA synchronous = FULL")
