"""Storage faults: another process holding the index lock, and a full disk (DESIGN §1.2, §1.6).

A full disk is simulated with ``PRAGMA max_page_count`` on the store's own connections
(the pragma is per connection, so this is the one place the tests reach inside).
"""

from __future__ import annotations

import sqlite3
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from _child import Child, assert_converged, assert_no_projector_thread, assert_store_integrity
from conftest import plain, user_msg

from thread_store import (ProjectionFailed, RetryPolicy, StorageError, ThreadStore, ThreadStoreError,
                          TransientStorageError)

LOCK_SECONDS = 2.0  # how long appends are timed while another process holds the lock


def _p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98]


def _timed_appends(store: ThreadStore, threads: list[str], stop: threading.Event | None,
                   count: int) -> list[float]:
    """Append one item at a time round-robin; return each append's latency in seconds."""
    out = []
    n = 0
    while (stop is None or not stop.is_set()) and len(out) < count:
        tid = threads[n % len(threads)]
        started = time.perf_counter()
        store.append(tid, [plain(n)])
        out.append(time.perf_counter() - started)
        n += 1
    return out


def _wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll a test condition; the generous deadline only catches hangs."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_index_lock_held_by_another_process(store_path: Path) -> None:
    """Appends do not notice; projection retries; a barrier succeeds once the lock is gone."""
    with ThreadStore.open(store_path) as store:
        threads = [store.create_thread() for _ in range(4)]
        for tid in threads:
            store.append_and_flush(tid, [user_msg(f"hello {tid}")], timeout=10.0)
        _timed_appends(store, threads, None, 100)  # warm up
        idle = _timed_appends(store, threads, None, 2000)
        store.flush_all(timeout=10.0)

        barrier_tid = store.create_thread()
        retries_before = store.stats().retries
        holder = Child("hold-index-lock", store_path)
        try:
            holder.wait_for("locked")
            outcome: dict[str, Any] = {}

            def barrier() -> None:
                try:
                    outcome["meta"] = store.append_and_flush(barrier_tid, [user_msg("wait")],
                                                             timeout=15.0)
                except ThreadStoreError as exc:
                    outcome["error"] = exc
                outcome["at"] = time.monotonic()

            waiter = threading.Thread(target=barrier)
            waiter.start()
            stop = threading.Event()
            threading.Timer(LOCK_SECONDS * 0.9, stop.set).start()
            locked = _timed_appends(store, threads, stop, 10**9)

            def retried() -> bool:
                status = store.status(barrier_tid)
                return status.head_seq == 1 and (store.stats().retries > retries_before
                                                  or status.last_error is not None)

            _wait_until(retried, "the barrier's append and a projection retry under the lock")
            seen = store.status(barrier_tid)  # the child still holds the lock
            stats = store.stats()
            holder.tell("release")
            released_at = float(holder.wait_for("released", timeout=30.0).split()[1])
            waiter.join(20.0)
        finally:
            holder.finish()
            holder.close()
        print(f"\nappend p99 idle: {_p99(idle) * 1e3:.3f} ms ({len(idle)} appends); "
              f"with index.db locked by another process: {_p99(locked) * 1e3:.3f} ms "
              f"({len(locked)} appends); projection retries meanwhile: "
              f"{stats.retries - retries_before}")
        assert stats.retries > retries_before or seen.last_error is not None, (stats, seen)
        assert seen.projected_seq < seen.head_seq, "projected through a held write lock?"
        assert not waiter.is_alive(), "the barrier outlived its timeout"
        assert "error" not in outcome, outcome.get("error")
        assert outcome["meta"].title == "wait"
        assert outcome["at"] >= released_at  # it could not finish before the release
        assert_converged(store)
    assert_store_integrity(store_path)
    assert_no_projector_thread()


# -- disk full --------------------------------------------------------------------------------


def _fill(conn: Any) -> int:
    """Cap ``conn``'s database at its current size; return the old cap."""
    old = conn.execute("PRAGMA max_page_count").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")
    return int(old)


def _big(tag: str, size: int = 200_000) -> dict[str, Any]:
    return user_msg(f"{tag} " + "x" * size)


FAST_RETRY = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05)


def test_history_full_rejects_the_whole_append(store_path: Path) -> None:
    with ThreadStore.open(store_path, retry=FAST_RETRY) as store:
        tid = store.create_thread()
        store.append_and_flush(tid, [user_msg("before")], timeout=10.0)
        conn = store._history._conn  # fault injection: the store's own writer connection
        old = _fill(conn)
        with pytest.raises(StorageError):
            store.append(tid, [plain(1), plain(2), _big("too big")])
        with pytest.raises(StorageError):
            store.append(tid, [_big("single")])
        with pytest.raises(StorageError):
            store.create_thread(metadata={"cwd": "x" * 200_000})
        assert store.status(tid).head_seq == 1
        assert [s.item for s in store.read_history(tid)] == [user_msg("before")]
        conn.execute(f"PRAGMA max_page_count = {old}")  # space returns
        assert store.append(tid, [plain(1), _big("after")]) == 3
        assert store.append_and_flush(tid, [plain(3)], timeout=10.0).item_count == 4
        assert_converged(store)
    assert_store_integrity(store_path)
    assert_no_projector_thread()


def test_index_full_fails_barriers_but_keeps_the_work(store_path: Path) -> None:
    with ThreadStore.open(store_path, retry=FAST_RETRY) as store:
        tid, other = store.create_thread(), store.create_thread()
        store.append_and_flush(tid, [plain()], timeout=10.0)
        conn = store._index._conn  # fault injection: the projector's connection
        old = _fill(conn)
        store.append(other, [_big("other")])
        with pytest.raises(ProjectionFailed) as failed:
            store.append_and_flush(tid, [_big("large")], timeout=10.0)
        assert failed.value.__cause__ is not None
        status = store.status(tid)
        assert status.pending and status.last_error, status
        assert status.head_seq == 2 and status.projected_seq == 1
        assert store.read_thread(tid).item_count == 1  # the old row is intact
        conn.execute(f"PRAGMA max_page_count = {old}")  # space returns
        assert store.flush(tid, timeout=10.0).item_count == 2
        assert_converged(store)
    assert_store_integrity(store_path)
    assert_no_projector_thread()


def test_driver_errors_reach_users_only_translated(store_path: Path) -> None:
    """SQLite's errors are translated once, at the backend boundary (DESIGN §4): users see
    ThreadStoreErrors, with the driver's error chained below them, never above."""
    with ThreadStore.open(store_path, retry=FAST_RETRY) as store:
        tid = store.create_thread()
        store.append_and_flush(tid, [plain()], timeout=10.0)
        index_cap = _fill(store._index._conn)  # a full disk under the index: transient
        with pytest.raises(ProjectionFailed) as failed:
            store.append_and_flush(tid, [_big("large")], timeout=10.0)
        cause = failed.value.__cause__
        assert isinstance(cause, TransientStorageError), repr(cause)
        assert isinstance(cause.__cause__, sqlite3.Error)
        assert (store.status(tid).last_error or "").startswith("TransientStorageError: ")
        store._index._conn.execute(f"PRAGMA max_page_count = {index_cap}")

        history_cap = _fill(store._history._conn)  # a full disk under the history
        with pytest.raises(StorageError) as rejected:
            store.append(tid, [_big("rejected")])
        assert isinstance(rejected.value, TransientStorageError)
        assert isinstance(rejected.value.__cause__, sqlite3.Error)
        store._history._conn.execute(f"PRAGMA max_page_count = {history_cap}")
        assert store.flush(tid, timeout=10.0).item_count == 2


def test_index_full_at_close_is_caught_up_on_reopen(store_path: Path) -> None:
    """Work the full disk kept from projecting survives close and lands after reopen."""
    with ThreadStore.open(store_path, retry=FAST_RETRY) as store:
        tid = store.create_thread()
        _fill(store._index._conn)
        store.append(tid, [_big("pending")])
        store.close(timeout=2.0)
    assert_no_projector_thread(grace=30.0)  # a busy machine may overrun the 2 s deadline
    with ThreadStore.open(store_path) as store:
        assert store.flush(tid, timeout=10.0).title.startswith("pending")
        assert_converged(store)
    assert_store_integrity(store_path)


def test_history_full_at_close_still_closes(store_path: Path) -> None:
    """close() must release everything even when it cannot record its session marker."""
    failing = threading.Event()

    def hook(thread_id: str, generation: int) -> None:
        if failing.is_set():
            raise RuntimeError("injected: keep this thread behind")

    store = ThreadStore.open(store_path, projection_hook=hook)
    try:
        kept = store.create_thread()
        store.append_and_flush(kept, [user_msg("kept")], timeout=10.0)
        failing.set()
        # Many long ids left behind make close()'s session marker too big for the disk.
        behind = [f"{n:04d}".ljust(128, "x") for n in range(1000)]
        for tid in behind:
            store.create_thread(tid)
            store.append(tid, [user_msg(tid)])
        _fill(store._history._conn)
        try:
            store.close(timeout=2.0)
        except StorageError:
            pass  # reporting the full disk is fine; leaking the store is not
    finally:
        store.close()
    assert_no_projector_thread(grace=30.0)  # a busy machine may overrun the 2 s deadline
    with ThreadStore.open(store_path) as reopened:  # the write lock is free again
        assert reopened.read_thread(kept).title == "kept"
        assert reopened.flush(behind[-1], timeout=10.0).title == behind[-1]
        assert assert_converged(reopened) == 1001
