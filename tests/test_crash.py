"""Crash torture (DESIGN §1.1, §1.8, §6) and a lost or corrupt index (the index is derived).

A child process appends to many threads, with random barriers and projection pauses, and
acknowledges each append only after it returned. The parent SIGKILLs it at a random
moment, then checks: every acknowledged item is in the history, both databases pass
``PRAGMA integrity_check``, and after reopening, the metadata is the fold of the history.
The same runs with several writer processes on one store, killed and restarted at random,
while the survivors must keep getting through their barriers.
"""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path

import pytest
from _child import (INDEX, READY, Child, assert_acknowledged, assert_converged, assert_no_projector_thread,
                    assert_store_integrity, live_threads, parse_acks)
from conftest import plain, user_msg, wait_for

from thread_store import ThreadStore, ThreadStoreError

KILLS_PER_STORE = 20  # a fresh store every 20 kills keeps each check O(recent history)


def _torture(root: Path, kills: int, durability: str, seed: int) -> None:
    rng = random.Random(seed)
    acknowledged = 0
    for n in range(kills):
        path = root / f"store{n // KILLS_PER_STORE}"
        child = Child("crash", path, rng.randrange(1 << 30), durability)
        try:
            child.wait_for(READY)
            child.wait_for("A ")  # the kill lands mid-work, however slow the machine
            time.sleep(rng.uniform(0.0, 0.25))  # at a random point of the work, not a wait
            lines = child.kill()
            assert child.proc.returncode == -9, child.stderr()
        finally:
            child.close()
        with ThreadStore.open(path, durability=durability) as store:
            acknowledged += assert_acknowledged(store, live_threads(path), parse_acks(lines))
            assert_store_integrity(path)
            assert_converged(store)
        assert_no_projector_thread()
    print(f"\n{kills} SIGKILLs ({durability}): {acknowledged} acknowledged items, all found")
    # The kills must have landed mid-work, or this test proves nothing.
    assert acknowledged > kills, f"only {acknowledged} items acknowledged in {kills} runs"


@pytest.mark.parametrize("durability", ["normal", "full"])
def test_sigkill_loses_nothing_acknowledged(tmp_path: Path, durability: str) -> None:
    _torture(tmp_path, 20, durability, seed=20)


@pytest.mark.slow
@pytest.mark.parametrize("durability", ["normal", "full"])
def test_sigkill_loses_nothing_acknowledged_long(tmp_path: Path, durability: str) -> None:
    _torture(tmp_path, 200, durability, seed=200)


# -- several writers killed at random (issue 13) ----------------------------------------------

#: Seconds the survivors of a kill get to return from another barrier: only catches a hang.
PROGRESS = 60.0


def _barriers(child: Child) -> int:
    """How many ``append_and_flush`` calls of ``child`` returned so far (its ``F`` lines)."""
    return sum(1 for line in list(child.lines) if line.startswith("F "))


def _alive(child: Child) -> Child:
    """``child``, failing with its stderr if it ended on its own (a barrier raised in it)."""
    assert child.proc.poll() is None, f"a writer died unkilled:\n{child.stderr()}"
    return child


def _next_barrier(child: Child, before: int) -> None:
    """Wait until ``child`` has returned from more than ``before`` barriers; fail if it died."""
    wait_for(lambda: _barriers(child) > before or child.proc.poll() is not None,
             "a survivor's next barrier", timeout=PROGRESS)
    _alive(child)


def _several_writers_torture(path: Path, writers: int, kills: int, seed: int) -> None:
    """``writers`` processes append to shared threads (each also pauses and resumes its
    projector, so others take its work over, and half project through a slow hook), and
    one at random is SIGKILLed and restarted, ``kills`` times: mid-append, mid-projection,
    in a barrier, or holding a file lock of the store. After each kill every survivor
    must still return from a barrier; at the end all are killed, and every acknowledged
    append is stored once at its generation, both files pass ``integrity_check``, and a
    fresh process's ``flush_all`` brings every thread to the fold of its history."""
    rng = random.Random(seed)
    with ThreadStore.open(path) as store:  # the shared threads every writer starts with
        for _ in range(6):
            store.create_thread()
    seeds = iter(range(seed * 1000, (seed + 1) * 1000))
    children = [Child("crash", path, next(seeds), "normal", "several") for _ in range(writers)]
    lines: list[str] = []
    try:
        for child in children:
            child.wait_for(READY)
        for _ in range(kills):
            for child in children:
                child.wait_for("A ")  # the kill lands mid-work, however slow the machine
            time.sleep(rng.uniform(0.0, 0.25))
            victim = rng.randrange(writers)
            survivors = {_alive(c): _barriers(c) for n, c in enumerate(children) if n != victim}
            lines += _alive(children[victim]).kill()
            children[victim].close()
            for child, before in survivors.items():  # what the dead one held blocks no one
                _next_barrier(child, before)
            children[victim] = Child("crash", path, next(seeds), "normal", "several")
            children[victim].wait_for(READY)
        for child in children:
            lines += _alive(child).kill()
    finally:
        for child in children:
            child.close()
    with ThreadStore.open(path, read_only=True) as reader:
        acknowledged = assert_acknowledged(reader, live_threads(path), parse_acks(lines))
    assert_store_integrity(path)
    with ThreadStore.open(path) as store:
        assert assert_converged(store, timeout=PROGRESS) >= 6
    assert_no_projector_thread()
    barriers = sum(line.startswith("F ") for line in lines)
    print(f"\n{writers} writers, {kills} SIGKILLs: {acknowledged} acknowledged items "
          f"({barriers} by append_and_flush), all found once")
    assert barriers > kills, f"only {barriers} barriers returned in {kills} rounds"


def test_sigkill_of_several_writers_loses_nothing_and_blocks_no_one(tmp_path: Path) -> None:
    _several_writers_torture(tmp_path / "store", writers=3, kills=10, seed=3)


@pytest.mark.slow
def test_sigkill_of_several_writers_loses_nothing_and_blocks_no_one_long(tmp_path: Path) -> None:
    _several_writers_torture(tmp_path / "store", writers=4, kills=100, seed=4)


# -- a lost or corrupt index is rebuilt from history -----------------------------------------


def _populated(path: Path) -> dict[str, object]:
    """A store with a few threads in various states; return their metadata."""
    with ThreadStore.open(path) as store:
        threads = [store.create_thread(metadata={"cwd": f"/r{i}"}) for i in range(5)]
        for i, tid in enumerate(threads):
            store.append(tid, [user_msg(f"question {i}"), plain(i)])
        store.archive_thread(threads[0])
        store.update_metadata(threads[1], name="named")
        store.delete_thread(threads[2])
        store.discard(threads[3])
        store.flush_all(timeout=30.0)
        return {tid: store.read_thread(tid) for tid in (threads[0], threads[1], threads[4])}


def _break_index(path: Path, how: str) -> None:
    index = path / INDEX
    for suffix in ("-wal", "-shm"):
        Path(f"{index}{suffix}").unlink(missing_ok=True)
    if how == "deleted":
        index.unlink()
    elif how == "garbage":
        index.write_bytes(random.Random(4).randbytes(64 * 1024))
    elif how == "truncated":
        data = index.read_bytes()
        index.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        index.write_bytes(b"")
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["deleted", "garbage", "truncated", "empty"])
def test_broken_index_is_rebuilt_from_history(tmp_path: Path, how: str,
                                               caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "store"
    before = _populated(path)
    _break_index(path, how)
    with caplog.at_level(logging.WARNING, logger="thread_store"):
        with ThreadStore.open(path) as store:
            assert "rebuilding" in caplog.text
            store.flush_all(timeout=30.0)
            assert {tid: store.read_thread(tid) for tid in before} == before
            assert assert_converged(store) == 3
            listed = store.list_threads(include_empty=True).threads
            assert {m.thread_id for m in listed} == set(before) - {next(iter(before))}
            assert oct(os.stat(path / INDEX).st_mode & 0o777) == oct(0o600)
        assert_store_integrity(path)
    assert_no_projector_thread()



@pytest.mark.parametrize("page", [1, 2, 5])
def test_corrupt_index_page_gives_typed_errors(tmp_path: Path, page: int) -> None:
    """A damaged page inside index.db that open() does not touch: calls stay typed (§5)."""
    path = tmp_path / "store"
    before = _populated(path)
    index = path / INDEX
    data = bytearray(index.read_bytes())
    size = 4096  # the default page size
    data[page * size:(page + 1) * size] = random.Random(page).randbytes(size)
    index.write_bytes(bytes(data))
    tid = next(iter(before))
    calls = {
        "read_thread": lambda s: s.read_thread(tid),
        "list_threads": lambda s: s.list_threads(include_empty=True),
        "search": lambda s: s.list_threads(search="question"),
        "status": lambda s: s.status(tid),
        "append_and_flush": lambda s: s.append_and_flush(tid, [plain()], timeout=10.0),
        "flush_all": lambda s: s.flush_all(timeout=10.0),
    }
    untyped = {}
    with ThreadStore.open(path) as store:
        for name, call in calls.items():
            try:
                call(store)
            except ThreadStoreError:
                pass
            except Exception as exc:  # noqa: BLE001 - what this test looks for
                untyped[name] = repr(exc)
    assert not untyped, untyped
    assert_no_projector_thread()
