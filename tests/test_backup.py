"""Online backup (DESIGN §7): a consistent copy while appends go on, from a library call,
from a read-only store, and from the command line while another process writes."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
from _child import Child, assert_converged, assert_store_integrity
from conftest import plain, user_msg

from thread_store import InvalidArgument, ThreadStore

HANG = 120.0


def _histories(path: Path) -> dict[str, list[object]]:
    with ThreadStore.open(path, read_only=True) as store:
        ids = [m.thread_id for m in store.list_threads(limit=1000, include_empty=True).threads]
        return {tid: [s.item for s in store.read_history(tid, limit=100_000)] for tid in ids}


def _assert_a_consistent_copy(copy: Path, source: Path) -> int:
    """The copy opens as a store, converges, and holds a prefix of each source history."""
    assert_store_integrity(copy)
    with ThreadStore.open(copy) as store:
        checked = assert_converged(store)
    copied, now = _histories(copy), _histories(source)
    assert copied and set(copied) <= set(now)
    for tid, items in copied.items():
        assert items == now[tid][:len(items)], tid
    return checked


def test_backup_while_appends_go_on_gives_a_store_that_converges(store_path: Path, tmp_path: Path) -> None:
    stop = threading.Event()
    appended = threading.Semaphore(0)
    with ThreadStore.open(store_path) as store:
        ids = [store.create_thread() for _ in range(5)]
        for tid in ids:
            store.append(tid, [user_msg(f"start {tid}")])

        def keep_appending() -> None:
            n = 0
            while not stop.is_set():
                store.append(ids[n % len(ids)], [plain(n)])
                appended.release()
                n += 1

        writer = threading.Thread(target=keep_appending)
        writer.start()
        try:
            for _ in range(200):  # the backups below run while the writer is mid-stream
                assert appended.acquire(timeout=HANG)
            store.backup(tmp_path / "from-the-writer")
            with ThreadStore.open(store_path, read_only=True) as reader:
                reader.backup(tmp_path / "from-a-reader")
            for _ in range(200):
                assert appended.acquire(timeout=HANG)  # appends went on after the backups
        finally:
            stop.set()
            writer.join(HANG)
        store.flush_all(timeout=HANG)
    for copy in ("from-the-writer", "from-a-reader"):
        assert _assert_a_consistent_copy(tmp_path / copy, store_path) == 5


def test_backup_refuses_a_destination_that_is_not_empty(sqlite_store: ThreadStore, tmp_path: Path) -> None:
    sqlite_store.create_thread()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(InvalidArgument, match="not an empty directory"):
        sqlite_store.backup(taken)
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]
    with pytest.raises(InvalidArgument):
        sqlite_store.backup(taken / "notes.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    sqlite_store.backup(empty)  # an empty directory is fine
    assert sorted(p.name for p in empty.iterdir()) == ["history.db", "index.db"]


def test_cli_backup_while_another_process_writes(tmp_path: Path) -> None:
    store_path, copy = tmp_path / "store", tmp_path / "copy"
    writer = Child("crash", store_path, 7, "normal")  # appends until killed
    try:
        for _ in range(3):
            writer.wait_for("A ")
        done = subprocess.run([sys.executable, "-m", "thread_store.cli", "--store", str(store_path),
                               "backup", str(copy)], capture_output=True, text=True, timeout=HANG,
                              check=False)
        assert done.returncode == 0, done.stderr
        assert f"backed up {store_path} to {copy}" in done.stdout
        writer.wait_for("A ")  # the writer was never stopped by the backup
    finally:
        writer.close()  # SIGKILL, then the pipes
    assert _assert_a_consistent_copy(copy, store_path) > 0
