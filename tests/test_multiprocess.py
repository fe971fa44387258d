"""Processes on one store: any number of writers and read-only readers (DESIGN §6); only a
rebuild of the index needs the store to itself among writers (§7).

The contract of several writers at work on the same threads is tested in
``test_several_writers.py``.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from _child import READY, Child, assert_converged, assert_no_projector_thread
from conftest import plain, user_msg

from thread_store import (DiscardTimeout, NotAThreadStore, ReadOnlyStore, StoreLocked, ThreadDiscarded,
                          ThreadStore, ThreadStoreError)


@pytest.fixture
def writer(store_path: Path) -> Iterator[tuple[int, str]]:
    """Another process holding the store open for writing; yields (pid, its thread id)."""
    child = Child("writer", store_path)
    try:
        _, pid, thread_id = child.wait_for(READY).split()
        yield int(pid), thread_id
    finally:
        child.finish()
        child.close()


def test_two_writers_in_one_process_share_the_store(sqlite_store: ThreadStore,
                                                    store_path: Path) -> None:
    with ThreadStore.open(store_path) as second:
        tid = second.create_thread()
        sqlite_store.append(tid, [user_msg("one")])
        second.append(tid, [user_msg("two")])
        assert second.flush(tid, timeout=30).item_count == 2
        assert sqlite_store.flush(tid, timeout=30).projected_seq == 2


def test_second_writer_process_opens_beside_the_first(store_path: Path,
                                                      writer: tuple[int, str]) -> None:
    _, thread_id = writer
    with ThreadStore.open(store_path) as second:
        assert second.read_thread(thread_id).title == "from the writer"
        assert second.append(thread_id, [user_msg("from the second writer")]) == 2
        meta = second.flush(thread_id, timeout=30)
        assert (meta.title, meta.item_count, meta.projected_seq) == ("from the writer", 2, 2)
    assert_no_projector_thread()


def test_rebuild_index_beside_a_writer_gets_store_locked_naming_it(store_path: Path,
                                                                   writer: tuple[int, str]) -> None:
    pid, thread_id = writer
    with pytest.raises(StoreLocked, match=rf"\b{pid}\b"):
        ThreadStore.rebuild_index(store_path)
    with ThreadStore.open(store_path, read_only=True) as reader:  # the index is untouched
        assert reader.read_thread(thread_id).title == "from the writer"


def test_rebuild_index_beside_a_writer_of_this_process_gets_store_locked(sqlite_store: ThreadStore,
                                                                         store_path: Path) -> None:
    with pytest.raises(StoreLocked, match=rf"\b{os.getpid()}\b"):
        ThreadStore.rebuild_index(store_path)
    assert sqlite_store.create_thread()  # the open store is untouched


def test_read_only_store_reads_while_the_writer_is_open(store_path: Path,
                                                         writer: tuple[int, str]) -> None:
    _, thread_id = writer
    with ThreadStore.open(store_path, read_only=True) as reader:
        listed = reader.list_threads().threads
        assert [m.thread_id for m in listed] == [thread_id]
        assert reader.read_thread(thread_id).title == "from the writer"
        assert [s.item["payload"]["message"] for s in reader.read_history(thread_id)] == [
            "from the writer"]
        assert reader.status(thread_id).projected_seq == 1
        assert reader.list_threads(search="writer").threads == listed
        writes = {
            "create_thread": lambda: reader.create_thread(),
            "append": lambda: reader.append(thread_id, [plain()]),
            "append_and_flush": lambda: reader.append_and_flush(thread_id, [plain()]),
            "flush": lambda: reader.flush(thread_id),
            "flush_all": lambda: reader.flush_all(),
            "update_metadata": lambda: reader.update_metadata(thread_id, name="x"),
            "archive_thread": lambda: reader.archive_thread(thread_id),
            "unarchive_thread": lambda: reader.unarchive_thread(thread_id),
            "delete_thread": lambda: reader.delete_thread(thread_id),
            "discard": lambda: reader.discard(thread_id),
        }
        allowed = []
        for name, call in writes.items():
            try:
                call()
                allowed.append(name)
            except ReadOnlyStore:
                pass
        assert not allowed, f"read-only store allowed {allowed}"
        assert reader.read_history(thread_id)[-1].seq == 1, "a read-only call wrote"
    assert_no_projector_thread()


def test_a_killed_writer_leaves_nothing_that_needs_the_store_to_itself(store_path: Path) -> None:
    """A SIGKILLed writer leaves nothing behind (DESIGN §6): a writer opens and catches up,
    and a rebuild of the index, which needs the store to itself, goes ahead."""
    child = Child("writer", store_path)
    try:
        _, _, thread_id = child.wait_for(READY).split()
        child.kill()
    finally:
        child.close()
    with ThreadStore.open(store_path) as store:
        store.append_and_flush(thread_id, [user_msg("second life")], timeout=10.0)
        assert assert_converged(store) == 1
    assert ThreadStore.rebuild_index(store_path) == 1
    assert_no_projector_thread()


def test_reader_sees_later_writes_and_writer_unaffected(store_path: Path) -> None:
    """A reader opened first keeps working while this process writes and projects."""
    with ThreadStore.open(store_path) as store:
        first = store.create_thread()
        store.append_and_flush(first, [user_msg("one")], timeout=10.0)
        with ThreadStore.open(store_path, read_only=True) as reader:
            assert [m.title for m in reader.list_threads().threads] == ["one"]
            second = store.create_thread()
            store.append_and_flush(second, [user_msg("two")], timeout=10.0)
            assert {m.title for m in reader.list_threads().threads} == {"one", "two"}
            assert reader.read_thread(second).item_count == 1
        assert_converged(store)
    assert_no_projector_thread()


def test_read_only_status_sees_the_writers_backlog(tmp_path: Path) -> None:
    """A read-only store reads heads from the file, so another process's backlog shows."""
    path = tmp_path / "store"
    with ThreadStore.open(path) as writer:
        tid = writer.create_thread()
        writer.append_and_flush(tid, [{"type": "response_item"}], timeout=30)
        writer.pause_projection()
        writer.append(tid, [{"type": "response_item"}] * 3)
        with ThreadStore.open(path, read_only=True) as reader:
            status = reader.status(tid)
            assert (status.head_seq, status.projected_seq, status.pending) == (4, 1, True)
            assert [i.seq for i in reader.read_history(tid)] == [1, 2, 3, 4]
        writer.resume_projection()


def test_read_only_store_follows_an_index_rebuild(tmp_path: Path) -> None:
    """A long-lived reader moves to the new index.db that reindex (or open) built."""
    path = tmp_path / "store"
    with ThreadStore.open(path) as writer:
        old = writer.create_thread()
        writer.append_and_flush(old, [user_msg("before the rebuild")], timeout=30)
    with ThreadStore.open(path, read_only=True) as reader:
        assert [m.thread_id for m in reader.list_threads().threads] == [old]
        assert ThreadStore.rebuild_index(path) == 1  # deletes index.db and builds a new one
        with ThreadStore.open(path) as writer:
            new = writer.create_thread()
            writer.append_and_flush(new, [user_msg("after the rebuild")], timeout=30)
        assert {m.thread_id for m in reader.list_threads().threads} == {old, new}
        status = reader.status(new)
        assert (status.head_seq, status.projected_seq, status.pending) == (1, 1, False)
        assert reader.read_thread(new).title == "after the rebuild"
        assert reader.list_threads(search="after").threads[0].thread_id == new


def test_read_only_open_without_an_index_raises_a_typed_error(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with ThreadStore.open(path) as writer:
        writer.append_and_flush(writer.create_thread(), [plain()], timeout=30)
    (path / "index.db").unlink()
    with pytest.raises(NotAThreadStore, match="reindex"):
        ThreadStore.open(path, read_only=True)
    assert not (path / "index.db").exists()  # a read-only open writes nothing
    with ThreadStore.open(path) as writer:  # the writer rebuilds it
        writer.flush_all(timeout=30)
        assert len(writer.list_threads(include_empty=True).threads) == 1
    with ThreadStore.open(path, read_only=True) as reader:
        assert len(reader.list_threads(include_empty=True).threads) == 1


def test_read_only_open_of_an_unopenable_history_raises_a_typed_error(tmp_path: Path) -> None:
    path = tmp_path / "store"
    (path / "history.db").mkdir(parents=True)  # there, but SQLite cannot open it
    with pytest.raises(ThreadStoreError):
        ThreadStore.open(path, read_only=True)


def test_discard_waits_for_another_writer_only_until_its_timeout(sqlite_store: ThreadStore,
                                                                  store_path: Path) -> None:
    """DESIGN §1.7: a projection in flight in another process past the timeout gives
    DiscardTimeout, and the thread stays as it was. A lock on another open file
    description is exactly what another process's group commit holds."""
    tid = sqlite_store.create_thread()
    sqlite_store.append_and_flush(tid, [user_msg("kept")], timeout=30)
    other = os.open(store_path / "index.lock", os.O_RDWR)
    try:
        fcntl.flock(other, fcntl.LOCK_EX)
        with pytest.raises(DiscardTimeout, match="nothing changed"):
            sqlite_store.discard(tid, timeout=0.2)
        with pytest.raises(DiscardTimeout):
            sqlite_store.delete_thread(tid, timeout=0.2)
    finally:
        os.close(other)
    assert sqlite_store.read_thread(tid).title == "kept"
    assert sqlite_store.append_and_flush(tid, [plain(1)], timeout=30).item_count == 2
    sqlite_store.discard(tid, timeout=30)
    with pytest.raises(ThreadDiscarded):
        sqlite_store.read_thread(tid)
