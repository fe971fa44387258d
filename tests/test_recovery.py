"""DESIGN §1.8 recovery: what open() checks after a clean close, a crash and power loss."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

from conftest import plain, user_msg
from thread_store import ThreadStore


def _fake_crash(store_path: Path) -> None:
    """Make the last session look unclean, as a SIGKILL or power loss leaves it."""
    with sqlite3.connect(store_path / "history.db") as conn:
        conn.execute("UPDATE store_meta SET value = ? WHERE key = 'session'",
                     (json.dumps({"clean": False}),))


def _set_projected(store_path: Path, thread_id: str, projected: int, title: str) -> None:
    with sqlite3.connect(store_path / "index.db") as conn:
        conn.execute("UPDATE threads SET projected_seq = ?, title = ? WHERE thread_id = ?",
                     (projected, title, thread_id))


def _held_hook(release: threading.Event):  # type: ignore[no-untyped-def]
    """A projection_hook that holds open()'s catch-up until the test has looked."""
    return lambda thread_id, generation: release.wait(30)


def _reopen_after_crash(store_path: Path, release: threading.Event) -> ThreadStore:
    """Reopen as after a crash, with the catch-up held until ``release`` is set."""
    _fake_crash(store_path)
    return ThreadStore.open(store_path, projection_hook=_held_hook(release))


def _populate(store_path: Path, threads: int) -> list[str]:
    with ThreadStore.open(store_path) as store:
        tids = [store.create_thread() for _ in range(threads)]
        for tid in tids:
            store.append(tid, [user_msg(f"title {tid}"), plain()])
        store.flush_all(timeout=30)
    return tids


def test_clean_reopen_checks_only_the_threads_close_left_behind(store_path: Path) -> None:
    tids = _populate(store_path, 50)
    # Tamper with a row behind the store's back. A clean close recorded nothing behind,
    # so open() must not scan every thread and therefore does not notice the tampering.
    _set_projected(store_path, tids[0], 1, "tampered")
    with ThreadStore.open(store_path) as store:
        assert store.stats().attempts == 0
        assert store.read_thread(tids[0]).title == "tampered"


def test_crash_reopen_compares_every_thread(store_path: Path) -> None:
    tids = _populate(store_path, 50)
    _set_projected(store_path, tids[0], 1, "tampered")
    release = threading.Event()
    with _reopen_after_crash(store_path, release) as store:
        assert store.status(tids[0]).pending
        release.set()
        meta = store.flush(tids[0], timeout=30)
        assert meta.title == f"title {tids[0]}" and meta.projected_seq == 2
        assert store.stats().rows_written == 1


def test_index_ahead_of_history_is_refolded(store_path: Path) -> None:
    """After power loss with durability=normal the index can be ahead of history."""
    tids = _populate(store_path, 3)
    _set_projected(store_path, tids[1], 7, "from the future")
    release = threading.Event()
    with _reopen_after_crash(store_path, release) as store:
        status = store.status(tids[1])
        assert status.head_seq == 2 and status.projected_seq == 0
        release.set()
        meta = store.flush(tids[1], timeout=30)
        assert (meta.projected_seq, meta.title, meta.item_count) == (2, f"title {tids[1]}", 2)


def test_orphan_rows_of_removed_threads_are_dropped_after_a_crash(store_path: Path) -> None:
    tids = _populate(store_path, 2)
    with sqlite3.connect(store_path / "history.db") as conn:  # the history half of a delete
        conn.execute("DELETE FROM items WHERE thread_id = ?", (tids[0],))
        conn.execute("DELETE FROM threads WHERE thread_id = ?", (tids[0],))
    _fake_crash(store_path)
    with ThreadStore.open(store_path) as store:
        assert [t.thread_id for t in store.list_threads().threads] == [tids[1]]
