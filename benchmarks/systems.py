"""System adapters: every system under test behind one small interface.

An adapter has ``populate(thread_ids)`` (setup: create the threads, each with an opening
user message, and settle), ``create(thread_id)``, ``append(thread_id, item) -> position``,
``append_and_flush(thread_id, item)`` (append, then return only once the write is
visible in the metadata view), ``progress(thread_ids) -> {thread_id: visible position}``
(for the lag watcher), ``quiesce()`` (untimed: let background work finish between
measured blocks), ``transactions()`` (metadata write transactions so far), ``commits()``
(history commits so far, each an fsync with ``synchronous=FULL``; ``None`` when the system
does not count them), ``verify()``
(raise unless the system holds exactly what was appended: no arm may skip work) and
``close()``.
"""

from __future__ import annotations

import collections
import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from thread_store import ThreadStore

from .workloads import fill

Item = dict[str, Any]

_HISTORY_SCHEMA = (
    ("CREATE TABLE items (id INTEGER PRIMARY KEY, thread_id TEXT NOT NULL, seq INTEGER NOT NULL, "
    "ts_us INTEGER NOT NULL, item TEXT NOT NULL)"),
    "CREATE UNIQUE INDEX items_thread_seq ON items (thread_id, seq)",
    ("CREATE TABLE meta (thread_id TEXT PRIMARY KEY, title TEXT, item_count INTEGER NOT NULL, "
    "updated_us INTEGER NOT NULL)"),
)
_INSERT = "INSERT INTO items (thread_id, seq, ts_us, item) VALUES (?, ?, ?, ?)"
_UPSERT = ("INSERT INTO meta VALUES (?, ?, 1, ?) ON CONFLICT(thread_id) DO UPDATE SET "
           "title = COALESCE(meta.title, excluded.title), item_count = meta.item_count + 1, "
           "updated_us = excluded.updated_us")


class RawFloor:
    """A raw floor's setup, and what it answers for the projection it does not have."""

    def populate(self, thread_ids: list[str]) -> None:
        """Create the threads with their opening messages (``create`` and ``append``)."""
        fill(self, thread_ids)

    def progress(self, thread_ids: Iterable[str]) -> dict[str, int]:
        """No projection: nothing to watch."""
        return {}

    def quiesce(self) -> None:
        """No background work."""

    def transactions(self) -> int:
        """No separate metadata transactions."""
        return 0


class RawSQLite(RawFloor):
    """The floor: hand-written sqlite3, WAL + synchronous=NORMAL, one autocommit statement.

    ``synchronous="FULL"`` gives the fsync-per-commit floor (the peer's setting).

    ``append`` is ``json.dumps`` + INSERT + COMMIT of the same item into a table shaped
    like thread_store's history; ``upsert`` is a metadata-row UPSERT + COMMIT;
    ``append_and_flush`` is both (a hand-written synchronous projection, no fold).
    One connection, guarded by a lock so several writer threads can share it.
    """

    name = "raw sqlite3"
    has_projection = False

    def __init__(self, root: Path, synchronous: str = "NORMAL") -> None:
        root.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(root / "raw.db", isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute(f"PRAGMA synchronous = {synchronous}")
        for statement in _HISTORY_SCHEMA:
            self._conn.execute(statement)
        self._heads: dict[str, int] = {}
        self._lock = threading.Lock()
        self.upserts = 0

    def create(self, thread_id: str) -> None:
        """Start a thread's sequence (no row; the raw floor has no thread table)."""
        self._heads[thread_id] = 0

    def append(self, thread_id: str, item: Item) -> int:
        """``json.dumps`` + INSERT + COMMIT (autocommit: one statement, one transaction)."""
        text = json.dumps(item, separators=(",", ":"))
        with self._lock:
            seq = self._heads[thread_id] + 1
            self._conn.execute(_INSERT, (thread_id, seq, time.time_ns() // 1000, text))
            self._heads[thread_id] = seq
        return seq

    def upsert(self, thread_id: str, item: Item) -> None:
        """One metadata-row UPSERT + COMMIT."""
        with self._lock:
            self._conn.execute(_UPSERT, (thread_id, None, time.time_ns() // 1000))
            self.upserts += 1

    def append_and_flush(self, thread_id: str, item: Item) -> None:
        """Insert the item, then upsert the metadata row: two commits."""
        self.append(thread_id, item)
        self.upsert(thread_id, item)

    def commits(self) -> int:
        """One autocommit per insert and per upsert."""
        with self._lock:
            return sum(self._heads.values()) + self.upserts

    def verify(self) -> None:
        """Every append and upsert made is in the database."""
        rows = self._conn.execute("SELECT count(*) FROM items").fetchone()[0]
        metas = self._conn.execute("SELECT coalesce(sum(item_count), 0) FROM meta").fetchone()[0]
        if rows != sum(self._heads.values()) or metas != self.upserts:
            raise AssertionError(f"raw: {rows} rows and {metas} upserts stored, expected "
                                 f"{sum(self._heads.values())} and {self.upserts}")

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()


class SlowHook:
    """A ``projection_hook`` that blocks 100 ms once per projection batch.

    The hook runs once per thread of a batch; a new batch is recognised by the store's
    transaction counter having moved since the last sleep (hooks of one batch all run
    before its single commit).
    """

    def __init__(self, delay: float = 0.1) -> None:
        self.delay = delay
        self.store: ThreadStore | None = None
        self._seen = -1

    def __call__(self, thread_id: str, generation: int) -> None:
        if self.store is None:
            return
        transactions = self.store.stats().transactions
        if transactions != self._seen:
            self._seen = transactions
            time.sleep(self.delay)  # benchmark code, not library code: a slow projection


class ThreadStoreSystem:
    """thread_store behind the adapter interface: ``ThreadStore.open(root, **options)``
    (``root``: a directory, or a ``postgresql://`` URL with a ``schema`` option)."""

    has_projection = True

    def __init__(self, root: Path | str, name: str, *, slow: bool = False, **options: Any) -> None:
        self.name = name
        self._root = root
        self._hook = SlowHook() if slow else None
        self._options = options
        self.store = self._open()
        self.sync = options.get("projection") == "sync"
        self.paused = False
        # Per-thread append counts; each writer thread owns its threads, so no lock.
        self.appended: collections.Counter[str] = collections.Counter()

    def _open(self) -> ThreadStore:
        store = ThreadStore.open(self._root, projection_hook=self._hook, **self._options)
        if self._hook is not None:
            self._hook.store = store
        return store

    def populate(self, thread_ids: list[str]) -> None:
        """Create the threads with their opening messages, then settle.

        A sync-mode store is filled through an async store on the same files and then
        reopened: projecting thousands of new threads one by one is only setup.
        """
        if not self.sync:
            fill(self, thread_ids)
            self.quiesce()
            return
        self.store.close()
        bulk = ThreadStoreSystem(self._root, f"{self.name} (setup)")
        try:
            fill(bulk, thread_ids)
        finally:
            bulk.close()
        self.appended.update(bulk.appended)
        self.store = self._open()

    def pause(self) -> None:
        """Hold the projector still from now on (the "no projection work" arm)."""
        self.store.pause_projection()
        self.paused = True
        self.has_projection = False  # nothing will become visible: nothing to watch

    def create(self, thread_id: str) -> None:
        """``create_thread`` with the given id (no item)."""
        self.store.create_thread(thread_id)

    def append(self, thread_id: str, item: Item) -> int:
        """``append`` one item; returns the generation."""
        self.appended[thread_id] += 1
        return self.store.append(thread_id, [item])

    def append_and_flush(self, thread_id: str, item: Item) -> None:
        """``append_and_flush`` one item."""
        self.appended[thread_id] += 1
        self.store.append_and_flush(thread_id, [item], timeout=60.0)

    def progress(self, thread_ids: Iterable[str]) -> dict[str, int]:
        """``status().projected_seq`` of each thread."""
        return {t: self.store.status(t).projected_seq for t in thread_ids}

    def quiesce(self) -> None:
        """``flush_all`` (untimed); nothing to wait for while paused."""
        if not self.paused:
            self.store.flush_all(timeout=120.0)

    def transactions(self) -> int:
        """Index (projection) transactions since open."""
        return self.store.stats().transactions

    def commits(self) -> int:
        """History transactions that committed appends since open: concurrent appends
        share one (group commit). A private counter of the SQLite backend."""
        return int(self.store._storage.history.append_commits)  # type: ignore[attr-defined]

    def verify(self) -> None:
        """Every thread's projected ``item_count`` equals the appends made to it."""
        if self.paused:
            self.store.resume_projection()
            self.paused = False
        self.quiesce()
        for thread_id, expected in self.appended.items():
            got = self.store.read_thread(thread_id).item_count
            if got != expected:
                raise AssertionError(f"{self.name}: {thread_id} has {got} items, expected {expected}")

    def close(self) -> None:
        """Close the store, draining its projections."""
        self.store.close(timeout=30.0)
