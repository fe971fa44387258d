"""Crash torture (DESIGN §1.1, §1.8) and a lost or corrupt index (the index is derived).

A child process appends to many threads, with random barriers and projection pauses, and
acknowledges each append only after it returned. The parent SIGKILLs it at a random
moment, then checks: every acknowledged item is in the history, both databases pass
``PRAGMA integrity_check``, and after reopening, the metadata is the fold of the history.
"""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path

import pytest
from _child import INDEX, READY, Child, assert_converged, assert_no_projector_thread, assert_store_integrity
from conftest import plain, user_msg

from thread_store import ThreadStore, ThreadStoreError

KILLS_PER_STORE = 20  # a fresh store every 20 kills keeps each check O(recent history)


def _check_acknowledged(store: ThreadStore, lines: list[str]) -> int:
    """Every ``A tid gen tokens...`` line names items that sit at those seqs in history."""
    checked = 0
    for line in lines:
        word, *rest = line.split()
        if word != "A":
            continue
        thread_id, generation, tokens = rest[0], int(rest[1]), rest[2:]
        stored = store.read_history(thread_id, after_seq=generation - len(tokens),
                                    limit=len(tokens))
        assert [s.item["payload"]["token"] for s in stored] == tokens, line
        assert stored[-1].seq == generation, line
        checked += len(tokens)
    return checked


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
            acknowledged += _check_acknowledged(store, lines)
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
