"""Lifecycle: open/close, closed-store errors and garbage collection on every backend;
process exit, crash and fork with the SQLite backend's files and lock."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest

from conftest import Backend, plain, user_msg
from thread_store import StoreClosed, StoreLocked, ThreadStore

WORKER_NAME = "thread_store-projector"
CLOSED_CALLS: dict[str, Callable[[ThreadStore, str], Any]] = {
    "append": lambda s, t: s.append(t, [plain()]),
    "append_and_flush": lambda s, t: s.append_and_flush(t, [plain()], timeout=1),
    "flush": lambda s, t: s.flush(t, timeout=1),
    "flush_all": lambda s, t: s.flush_all(timeout=1),
    "create_thread": lambda s, t: s.create_thread(),
    "read_thread": lambda s, t: s.read_thread(t),
    "read_history": lambda s, t: s.read_history(t),
    "list_threads": lambda s, t: s.list_threads(),
    "status": lambda s, t: s.status(t),
    "discard": lambda s, t: s.discard(t),
    "pause_projection": lambda s, t: s.pause_projection(),
}


def _workers() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == WORKER_NAME}


def test_close_is_idempotent_and_releases_the_store(backend: Backend) -> None:
    s = backend.open_store()
    tid = s.create_thread()
    s.append(tid, [user_msg("hi")])
    s.close()
    s.close()
    s.close(timeout=0)
    backend.requires("reopen")
    with backend.open_store() as again:  # the writer lock was released
        assert again.flush(tid, timeout=10).title == "hi"


def test_context_manager_closes_even_on_error(backend: Backend) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with backend.open_store() as s:
            tid = s.create_thread()
            raise RuntimeError("boom")
    with pytest.raises(StoreClosed):
        s.append(tid, [plain()])


@pytest.mark.parametrize("name", sorted(CLOSED_CALLS))
def test_calls_after_close_raise_store_closed(backend: Backend, name: str) -> None:
    with backend.open_store() as s:
        tid = s.create_thread()
    with pytest.raises(StoreClosed, match="closed"):
        CLOSED_CALLS[name](s, tid)


def test_worker_is_named_daemon_and_gone_after_close(backend: Backend) -> None:
    """A daemon, so a fenced worker stuck in a hook cannot keep the process alive."""
    before = _workers()
    s = backend.open_store()
    try:
        mine = _workers() - before
        assert len(mine) == 1
        (worker,) = mine
        assert worker.is_alive() and worker.daemon
        s.append(s.create_thread(), [plain()])
    finally:
        s.close()
    assert not worker.is_alive()


def test_unclosed_store_warns_when_collected(backend: Backend) -> None:
    before = _workers()
    with warnings.catch_warnings(record=True) as caught:
        # pytest turns ResourceWarning into an error; here it is the expected outcome.
        warnings.simplefilter("always", ResourceWarning)
        s = backend.place.open()  # not backend.open_store(), which would keep it
        tid = s.create_thread()
        s.append(tid, [user_msg("left open")])
        (worker,) = _workers() - before
        del s
        gc.collect()
    assert any(issubclass(w.category, ResourceWarning) and "not closed" in str(w.message) for w in caught)
    worker.join(10)
    assert not worker.is_alive()
    backend.requires("reopen")
    with backend.open_store() as s:  # nothing lost; this process can open it again
        assert s.flush(tid, timeout=10).title == "left open"


# -- the SQLite backend's own: other processes, its files and its writer lock -----------------

def _run_child(store_path: Path, ending: str, *python_args: str) -> subprocess.CompletedProcess[str]:
    """A process that appends with projection paused, then ends with ``ending`` and no close."""
    script = textwrap.dedent(f"""
        import gc, os, sys
        from thread_store import ThreadStore
        store = ThreadStore.open(sys.argv[1])
        store.pause_projection()
        for t in range(3):
            tid = store.create_thread(f"t{{t}}", metadata={{"cwd": "/repo"}})
            for i in range(20):
                store.append(tid, [{{"type": "event_msg", "payload": {{"type": "user_message",
                                     "message": f"message {{i}}"}}}}])
        print("appended", flush=True)
        {ending}
    """)
    return subprocess.run([sys.executable, *python_args, "-c", script, str(store_path)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("ending", "python_args"), [
    ("sys.exit(0)", ()),
    ("os._exit(0)", ()),
    # Under -W error the ResourceWarning of __del__ raises; the worker must stop all the same.
    ("del store; gc.collect(); sys.exit(0)", ("-W", "error::ResourceWarning")),
], ids=["exit", "crash", "collected-under-W-error"])
def test_process_ending_without_close_exits_and_loses_nothing(store_path: Path, ending: str,
                                                              python_args: tuple[str, ...]) -> None:
    done = _run_child(store_path, ending, *python_args)  # a hang fails as TimeoutExpired
    assert (done.returncode, done.stdout) == (0, "appended\n"), done.stderr
    if python_args:
        assert "was not closed" in done.stderr
    else:
        assert "Traceback" not in done.stderr
    with ThreadStore.open(store_path) as s:
        for t in ("t0", "t1", "t2"):
            history = s.read_history(t)
            assert [i.seq for i in history] == list(range(1, 22))
            meta = s.flush(t, timeout=10)  # waits for the catch-up open() scheduled
            assert (meta.item_count, meta.projected_seq, meta.title) == (21, 21, "message 0")
        assert len(s.list_threads().threads) == 3


def test_fork_child_gets_store_closed_and_parent_keeps_working(tmp_path: Path) -> None:
    parent_path, child_path = tmp_path / "parent", tmp_path / "child"
    s = ThreadStore.open(parent_path)
    try:
        tid = s.create_thread()
        s.append_and_flush(tid, [user_msg("before fork")], timeout=10)
        pid = os.fork()
        if pid == 0:  # child: report through the exit code only, never return into pytest
            os._exit(_child_checks(s, tid, parent_path, child_path))
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        meta = s.append_and_flush(tid, [user_msg("after fork")], timeout=10)
        assert meta.item_count == 3
        assert [i.item for i in s.read_history(tid)] == [user_msg("before fork"), user_msg("from the child"),
                                                        user_msg("after fork")]
    finally:
        s.close()
    with ThreadStore.open(child_path) as child_store:
        assert child_store.list_threads().threads[0].title == "child's own"


def _child_checks(parent_store: ThreadStore, tid: str, parent_path: Path, child_path: Path) -> int:
    """Runs in the forked child; returns 0 or the number of the failed check."""
    try:
        for code, call in enumerate(CLOSED_CALLS.values(), start=10):
            try:
                call(parent_store, tid)
                return code
            except StoreClosed as exc:
                if "fork" not in str(exc):
                    return code
        with ThreadStore.open(child_path) as own:
            own.append_and_flush(own.create_thread(), [user_msg("child's own")], timeout=10)
        with ThreadStore.open(parent_path) as again:  # a writer of its own, beside the parent
            again.append_and_flush(tid, [user_msg("from the child")], timeout=10)
        # The parent is still a writer there (the fork took nothing from it): a rebuild,
        # which needs the store to itself among writers, is refused.
        try:
            ThreadStore.rebuild_index(parent_path)
            return 2
        except StoreLocked:
            return 0
    except BaseException:
        return 1


def test_close_during_busy_projection_never_crashes(tmp_path: Path) -> None:
    """close(timeout=0) while the worker is mid-read: connections close only between
    statements, so the fenced worker gets typed errors, never a crashed process."""
    for round_ in range(25):
        path = tmp_path / f"store{round_}"
        store = ThreadStore.open(path, coalesce_delay=0.0)
        tids = [store.create_thread() for _ in range(30)]
        for n in range(60):
            store.append(tids[n % 30], [{"type": "response_item", "payload": {"n": n}}])
        store.close(timeout=0)
        with ThreadStore.open(path) as reopened:
            reopened.flush_all(timeout=30)
            assert all(reopened.status(t).projected_seq == 2 for t in tids)
