"""The durable, append-only item log: one SQLite file, ``seq`` allocation and paging.

Writers serialize on an in-process lock, never on SQLite's busy handler, and concurrent
appends commit in groups (:mod:`._appends`). The head (last ``seq``) of every thread
touched is cached, so an append alone is one INSERT and a COMMIT. Tombstones of
discarded threads live here too, because history is the truth.

History is also the durable record of which threads are behind their projection: a
trigger adds the thread to the ``behind`` table in the transaction of the append itself,
and acknowledgements remove it once the index holds that head (see
:meth:`History.acknowledge`, in :mod:`._marks`), so neither a power loss nor another
process can roll the record back or overwrite it. Acknowledgements are lazy: batched in
memory and written about once per second by the projector's worker, never on an append's
or a barrier's path; so are the WAL checkpoints (:mod:`._checkpoints`). The tables and
their migrations are in :mod:`._history_schema`.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

from . import _connections
from ._filelock import ProcessLock
from ._acks import AckBatch
from ._checkpoints import SAFETY_NET_PAGES, Checkpoints
from ._appends import CLOSED, INSERT, GroupAppends
from ._marks import BehindMarks
from ._history_schema import MIGRATIONS, SCHEMA_VERSION
from .._lru import LRU
from ...errors import StoreClosed, ThreadDiscarded, ThreadExists, ThreadNotFound
from ...model import EncodedItem
from ...storage import LazyPages, StoredPage, StoredRow, StoredTraces

_RANGE = ("SELECT seq, ts_us, item FROM items WHERE thread_id = ? AND seq > ? AND seq <= ? "
          "ORDER BY seq LIMIT ?")
# The window counts every traced append in the range before LIMIT cuts: one read.
_TRACES = ("SELECT trace, count(*) OVER () FROM items WHERE thread_id = ? AND seq > ? "
           "AND seq <= ? AND trace IS NOT NULL ORDER BY seq LIMIT ?")
T = TypeVar("T")
#: How many heads and incarnations a writer caches, the most recently used (bounded
#: memory: a miss costs one indexed read).
HEADS_CACHED = INCARNATIONS_CACHED = 16_384
#: The file lock of history writers, beside ``history.db``.
LOCK_FILE = "history.lock"
EPOCH_KEY = "index_epoch"
_LIVE_HEAD = ("SELECT (SELECT max(seq) FROM items WHERE thread_id = ?1) FROM threads "
              "WHERE thread_id = ?1 AND discarded_us IS NULL")
_HEADS = ("SELECT t.thread_id, (SELECT max(seq) FROM items i WHERE i.thread_id = t.thread_id) "
          "FROM threads t WHERE t.discarded_us IS NULL")
class History(BehindMarks, GroupAppends):
    """The history log of one store (``history.db``)."""

    def __init__(self, path: Path, *, durability: str, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        if not read_only:
            _connections.create_private_file(path)
        self._conn = _connections.connect(path, durability=durability, read_only=read_only,
                                     schema_version=SCHEMA_VERSION)
        _connections.migrate(self._conn, path, MIGRATIONS, read_only=read_only)
        if not read_only:  # the worker checkpoints (see _checkpoints)
            self._conn.execute(f"PRAGMA wal_autocheckpoint = {SAFETY_NET_PAGES}")
        self._readers = _connections.ConnectionPool(
            lambda: _connections.connect(path, durability=durability, read_only=read_only))
        self._full = durability == "full"
        self.lock = threading.Lock()
        self._heads: LRU[str, int] = LRU(HEADS_CACHED)
        self._incarnations: LRU[str, int] = LRU(INCARNATIONS_CACHED)  # of live threads
        #: Removals this process began: incarnations read without the lock are cached only
        #: if none began meanwhile (one of them may be the removed thread's).
        self._removals = 0
        self._closed = False  # writes rejected (close began)
        self._conn_closed = False
        self._acks = AckBatch()
        self._start_appends()
        #: WAL checkpoints, which the projector's worker runs (never an append).
        self.checkpoints = Checkpoints(self._readers)
        #: The highest items rowid committed: read at open, raised by this process's own
        #: appends, and read again whenever another process wrote, so it bounds every
        #: item a projection can fold (see also ``rowid_bound``).
        self.last_rowid = 0 if read_only else self._top_rowid()
        #: Every writing process of the store writes under this file lock; when another
        #: process wrote since this one last looked, the cached heads are forgotten.
        self._process_lock = (None if read_only else
                              ProcessLock(path.with_name(LOCK_FILE), self._others_wrote))

    # -- writes ---------------------------------------------------------------------------

    def create(self, thread_id: str, *, created_us: int, first: EncodedItem | None) -> None:
        """Create a thread, optionally with its first item; raise if the id is taken."""
        with self.lock, self._writers():
            self._check_open()
            row = self._tombstone(thread_id)
            if row is not None:
                if row[0] is not None:
                    raise ThreadDiscarded(f"thread {thread_id!r} was discarded; its id cannot be reused")
                raise ThreadExists(f"thread {thread_id!r} already exists; pick another id or omit it")

            def write() -> int | None:
                # Behind from birth: even an empty thread owes the index its row.
                self._conn.execute("INSERT INTO threads (thread_id, created_us, incarnation) "
                                   "VALUES (?, ?, abs(random()))",
                                   (thread_id, created_us))
                self._conn.execute("INSERT OR REPLACE INTO behind (thread_id, since_us) "
                                   "VALUES (?, ?)", (thread_id, created_us))
                if first is None:
                    return None
                return self._conn.execute(INSERT, (thread_id, 1, first.ts_us, first.text)).lastrowid

            self.rowid_bound = self.last_rowid + 1  # as an append's (see GroupAppends)
            try:
                self._raise_last_rowid(self._write(write, "create_thread"))
            finally:
                self.rowid_bound = 0
            self._heads[thread_id] = 1 if first is not None else 0

    def remove(self, thread_id: str, *, tombstone: bool) -> None:
        """Delete a thread's items; keep a tombstone (discard) or forget the id (delete)."""
        with self.lock, self._writers():
            self._check_open()
            self._check_row(thread_id, self._tombstone(thread_id))  # another process's removal
            # Before the commit: a lock-free head() or incarnations() must not answer from
            # the cache for a thread being removed, nor cache what it read before the commit.
            self._removals += 1
            self._heads.pop(thread_id, None)
            self._incarnations.pop(thread_id, None)

            def write() -> None:
                self._keep_high_water(thread_id)
                self._conn.execute("DELETE FROM items WHERE thread_id = ?", (thread_id,))
                self._conn.execute("DELETE FROM behind WHERE thread_id = ?", (thread_id,))
                self._conn.execute("DELETE FROM idempotency WHERE thread_id = ?", (thread_id,))
                if tombstone:
                    self._conn.execute(
                        "UPDATE threads SET discarded_us = CAST(strftime('%s','now') AS INTEGER)"
                        " * 1000000 WHERE thread_id = ?", (thread_id,))
                else:
                    self._conn.execute("DELETE FROM threads WHERE thread_id = ?", (thread_id,))

            self._write(write, "discard" if tombstone else "delete_thread")

    def backup_to(self, dest: Path) -> None:
        """Copy this file, as one consistent snapshot, into the new file ``dest``."""
        self._readers.backup_to(dest)

    def close(self) -> None:
        """Write the acknowledgements still in memory, refuse further writes, and close
        every connection."""
        while self._acks:
            self.write_acknowledgements()
        with self.lock:
            self._closed = self._conn_closed = True
            self._conn.close()
            if self._process_lock is not None:
                self._process_lock.close()
        self._readers.close()

    def reject_writes(self) -> None:
        """Make every later write raise :class:`StoreClosed` (the first step of close)."""
        with self.lock:
            self._closed = True

    # -- reads ----------------------------------------------------------------------------

    def index_epoch(self) -> int | None:
        """The last index epoch acknowledged here; ``None`` before any (or an old file)."""
        row = self._readers.fetchone("history", "SELECT value FROM store_meta WHERE key = ?",
                                     (EPOCH_KEY,))
        return int(row[0]) if row else None

    def high_water(self) -> int:
        """The highest items rowid in the file: an index that folded an item past it saw
        a tail of history that is gone (see :func:`thread_store.backends.sqlite._files.recover`)."""
        row = self._readers.fetchone("history", "SELECT max(rowid) FROM items")
        return int(row[0] or 0)

    def live_count(self) -> int:
        """How many live threads the store holds (discarded ones not)."""
        row = self._readers.fetchone("history", "SELECT count(*) FROM threads "
                                     "WHERE discarded_us IS NULL")
        return int(row[0])

    def schema_version(self) -> int:
        """The file's schema version."""
        return int(self._readers.fetchone("history", "PRAGMA user_version")[0])

    def traces(self, thread_id: str, after_seq: int, upto_seq: int, limit: int) -> StoredTraces:
        """The traceparents of appends ending in ``(after_seq, upto_seq]``, at most ``limit``."""
        rows = self._readers.fetchall("history", _TRACES, (thread_id, after_seq, upto_seq, limit))
        return StoredTraces(tuple(t for t, _ in rows), int(rows[0][1]) - len(rows) if rows else 0)

    def heads(self) -> dict[str, int]:
        """``{thread_id: head}`` of every live thread, in one read (recovery, reindex)."""
        return {thread_id: int(head or 0)
                for thread_id, head in self._readers.fetchall("history", _HEADS)}

    def head(self, thread_id: str) -> int:
        """Return the thread's head; raise if it is unknown or discarded.

        A writer caches heads while no other process writes (the writers' lock file
        tells), and reads a cached head without the lock, so a barrier or ``status``
        never waits for a group commit in flight (whose heads are cached once it
        committed); a read-only store reads the file each time.
        """
        if self.read_only:
            self.created_us(thread_id)
            row = self._readers.fetchone("history", "SELECT max(seq) FROM items "
                                         "WHERE thread_id = ?", (thread_id,))
            return int(row[0] or 0)
        if not self._conn_closed and self._writers().unchanged():
            cached = self._heads.get(thread_id)
            if cached is not None:
                return cached
        with self.lock:
            if self._conn_closed:
                raise StoreClosed("the thread store is closed; open it again")
            self._writers().look()
            head = self._heads.get(thread_id)
            return self._load_head(thread_id) if head is None else head

    def live_head(self, thread_id: str) -> int | None:
        """The thread's head as the file holds it now (no cache); ``None`` unless it is live."""
        row = self._readers.fetchone("history", _LIVE_HEAD, (thread_id,))
        return None if row is None else int(row[0] or 0)

    def position(self) -> int:
        """A rowid at or above every item committed, by any process (see ``last_rowid``).

        While no other process wrote it is read without the lock, so a projection never
        waits for this process's group commit (and its fsync): a commit in flight counts
        with the bound it set over the rows it writes (read first: the commit publishes
        ``last_rowid`` before it clears the bound). When another process wrote and a
        writer of this process holds the lock (often waiting for that other process's
        commit), the file's highest rowid answers instead of a wait.
        """
        if self._conn_closed:
            return self.last_rowid
        if self._writers().unchanged():
            bound = self.rowid_bound
            return max(bound, self.last_rowid)
        if self.lock.acquire(blocking=False):
            try:
                self._writers().look()
                return self.last_rowid
            finally:
                self.lock.release()
        bound = self.rowid_bound
        return max(bound, self.high_water())

    def incarnation(self, thread_id: str) -> int:
        """Which creation of the id the live thread is (random, drawn at creation)."""
        found = self.incarnations([thread_id])
        if thread_id not in found:
            self._check_row(thread_id, self._readers.fetchone(
                "history", "SELECT discarded_us FROM threads WHERE thread_id = ?", (thread_id,)))
        return found[thread_id]

    def incarnations(self, thread_ids: list[str]) -> dict[str, int]:
        """``{thread_id: incarnation}`` of those of ``thread_ids`` that are live.

        A writer caches them while no other process writes (every projection asks, and
        only a removal here or a write elsewhere can change them); a read-only history
        reads the file each time.
        """
        if self.read_only:
            return self._read_incarnations(thread_ids)
        if not self._conn_closed and self._writers().unchanged():
            # No lock, so no wait for a group commit: only a removal changes them here,
            # which drops them before it commits and keeps reads begun before it from
            # caching (``_removals``); an index commit, which asks again, never runs
            # beside one.
            known = self._incarnations
            cached = {t: i for t in thread_ids if (i := known.get(t)) is not None}
        elif self.lock.acquire(blocking=False):
            try:
                self._writers().look()
                cached = {t: self._incarnations[t] for t in thread_ids if t in self._incarnations}
            finally:
                self.lock.release()
        else:  # a writer holds the lock (maybe waiting for another process): read the file
            return self._read_incarnations(thread_ids)
        missing = [t for t in thread_ids if t not in cached]
        if missing:
            removals = self._removals
            read = self._read_incarnations(missing)
            if self.lock.acquire(blocking=False):  # caching them is worth no wait
                try:
                    self._writers().look()
                    if self._removals == removals:  # else one may be a removed thread's
                        self._incarnations.update(read)
                finally:
                    self.lock.release()
            cached.update(read)
        return cached

    def created_times(self, thread_ids: list[str]) -> dict[str, int]:
        """``{thread_id: created_us}`` of those of ``thread_ids`` that are live."""
        return dict(self._readers.fetch_in(
            "history", "SELECT thread_id, created_us FROM threads WHERE discarded_us IS NULL "
            "AND thread_id IN ({keys})", thread_ids))

    def _read_incarnations(self, thread_ids: list[str]) -> dict[str, int]:
        return dict(self._readers.fetch_in(
            "history", "SELECT thread_id, incarnation FROM threads WHERE discarded_us IS NULL "
            "AND thread_id IN ({keys})", thread_ids))

    def created_us(self, thread_id: str) -> int:
        """Return the thread's creation time; raise if it is unknown or discarded."""
        row = self._readers.fetchone(
            "history", "SELECT created_us, discarded_us FROM threads WHERE thread_id = ?", (thread_id,))
        self._check_row(thread_id, row)
        return int(row[0])

    def read(self, thread_id: str, after_seq: int, upto_seq: int, limit: int) -> list[StoredRow]:
        """Return up to ``limit`` items with ``after_seq < seq <= upto_seq``, in order."""
        rows = self._readers.fetchall("history", _RANGE, (thread_id, after_seq, upto_seq, limit))
        return [StoredRow(seq, ts_us, text) for seq, ts_us, text in rows]

    def read_page(self, thread_id: str, after_seq: int, upto_seq: int, limit: int) -> StoredPage:
        """What :meth:`read` returns, as columns."""
        return StoredPage.of(self._readers.fetchall("history", _RANGE,
                                                    (thread_id, after_seq, upto_seq, limit)))

    def read_many(self, ranges: Sequence[tuple[str, int, int]], limit: int) -> Mapping[str, StoredPage]:
        """:meth:`read_page` for each range (``HistoryLog.read_many``): no round trips to save."""
        return LazyPages(self.read_page, ranges, limit)

    # -- internals ------------------------------------------------------------------------

    def _writers(self) -> ProcessLock:
        """With ``lock`` held: the file lock every writing process takes (entering it
        accounts for what other processes wrote meanwhile)."""
        assert self._process_lock is not None, "a read-only history never writes"
        return self._process_lock

    def _others_wrote(self) -> None:
        """Another process wrote (``lock`` held): forget cached heads and incarnations,
        and read the position again."""
        self._heads.clear()
        self._incarnations.clear()
        self.last_rowid = max(self.last_rowid, self._top_rowid())

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(CLOSED)

    @staticmethod
    def _check_row(thread_id: str, row: tuple[Any, ...] | None) -> None:
        if row is None:
            raise ThreadNotFound(f"thread {thread_id!r} does not exist; create it with create_thread() first")
        if row[-1] is not None:
            raise ThreadDiscarded(f"thread {thread_id!r} was discarded")

    def _load_head(self, thread_id: str) -> int:
        """Called with the lock held: find a thread's head and cache it."""
        self._check_row(thread_id, self._tombstone(thread_id))
        with _connections.reading("history"):
            head = self._conn.execute(
                "SELECT max(seq) FROM items WHERE thread_id = ?", (thread_id,)).fetchone()[0] or 0
        self._heads[thread_id] = head
        return int(head)

    def _tombstone(self, thread_id: str) -> tuple[int | None] | None:
        """The thread's row, ``(discarded_us,)``, read on the writer connection; ``None`` if unknown."""
        with _connections.reading("history"):
            row: tuple[int | None] | None = self._conn.execute(
                "SELECT discarded_us FROM threads WHERE thread_id = ?", (thread_id,)).fetchone()
        return row

    def _top_rowid(self) -> int:
        with _connections.reading("history"):
            return int(self._conn.execute("SELECT max(rowid) FROM items").fetchone()[0] or 0)

    def _raise_last_rowid(self, rowid: int | None) -> None:
        """Called with the lock held, after a commit and before it is published."""
        if rowid is not None and rowid > self.last_rowid:
            self.last_rowid = rowid

    def _keep_high_water(self, thread_id: str) -> None:
        """Before a thread's items go: if it holds the highest rowid, keep that row as the
        placeholder (thread id ``''``, which no thread can have) instead of deleting it.

        So the highest rowid never goes down, and SQLite, which gives a new row the
        highest rowid plus one, never hands out a rowid again: an index whose
        ``history_mark`` is above it folded items that a power loss took from history,
        and removing the newest thread is no false alarm (see ``_files.recover``).
        """
        top = self._conn.execute("SELECT thread_id FROM items ORDER BY rowid DESC LIMIT 1").fetchone()
        if top is not None and top[0] == thread_id:
            self._conn.execute("DELETE FROM items WHERE thread_id = ''")
            self._conn.execute("UPDATE items SET thread_id = '', seq = 0, ts_us = 0, item = '' "
                               "WHERE rowid = (SELECT max(rowid) FROM items)")

    def _write(self, body: Callable[[], T], what: str, *, txn: bool = True) -> T:
        try:
            if txn:
                done = _connections.in_transaction(self._conn, body)
                self.checkpoints.committed()
                return done
            return body()
        except sqlite3.Error as exc:
            raise _connections.storage_error(exc, what) from exc
