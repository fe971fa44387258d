"""The projector's concurrency and lifecycle, attacked through the public API: failed and
racing removals, hostile errors, Ctrl-C in a barrier, barriers and close() on time, close
without a limit, and process exit with a stuck hook (DESIGN §1.4, §1.6-§1.8). The contract
runs on every backend; locked files, long SQLite group commits and child processes are the
SQLite backend's own."""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
from conftest import Backend, in_thread, plain, user_msg, wait_for
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from thread_store import (FlushTimeout, ProjectionFailed, StorageError, StoreClosed,
                          ThreadDiscarded, ThreadNotFound, ThreadStore)

HANG = 30.0  # generous timeout that only catches hangs
MARGIN = 2.0  # DESIGN §1.4: a call with a timeout returns within it plus this


class WriteLock:
    """Another connection holding a database's write lock (past any busy timeout)."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, timeout=HANG)
        self.conn.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        self.conn.execute("ROLLBACK")
        self.conn.close()


# -- 1. a failed discard or delete_thread has changed nothing -----------------------------

@pytest.mark.parametrize(("remove", "locked", "then"), [
    ("discard", "index.db", "flush"), ("discard", "index.db", "reopen"),
    ("delete_thread", "index.db", "flush"), ("delete_thread", "index.db", "reopen"),
    # history.db fails only after its 5 s busy timeout: two cases cover that path
    ("discard", "history.db", "flush"), ("delete_thread", "history.db", "reopen"),
])
def test_failed_discard_changes_nothing(sqlite_backend: Backend, store_path: Path,
                                        remove: str, locked: str, then: str) -> None:
    """The removal fails on a locked file (index: before anything is removed; history:
    after the index row is gone). Pending work, waiters and the record of being behind
    survive: no flush returns metadata older than its target, and a reopen catches up."""
    store = sqlite_backend.open_store()
    tid = store.create_thread()
    store.append_and_flush(tid, [user_msg("first")], timeout=HANG)
    store.pause_projection()
    assert store.append(tid, [plain(1), user_msg("third")]) == 3
    waiter, out = in_thread(lambda: store.flush(tid, timeout=HANG))
    wait_for(lambda: store.status(tid).waiters == 1, "the waiter")
    lock = WriteLock(store_path / locked)
    try:
        with pytest.raises(StorageError):
            getattr(store, remove)(tid)
    finally:
        lock.release()
    status = store.status(tid)
    assert (status.head_seq, status.pending, status.waiters) == (3, True, 1)
    assert [i.seq for i in store.read_history(tid)] == [1, 2, 3]
    if then == "reopen":
        store.close(timeout=0)  # likely nothing drained: left behind for the next open
        waiter.join(HANG)
        assert isinstance(out.get("error"), StoreClosed) or out["result"].projected_seq == 3  # type: ignore[attr-defined]
        store = sqlite_backend.open_store()
    else:
        store.resume_projection()
        waiter.join(HANG)
        assert out["result"].projected_seq == 3  # type: ignore[attr-defined]
    meta = store.flush(tid, timeout=HANG)
    assert (meta.projected_seq, meta.item_count, meta.title) == (3, 3, "first")
    assert [t.thread_id for t in store.list_threads().threads] == [tid]
    getattr(store, remove)(tid)  # and the call may be retried
    with pytest.raises(ThreadDiscarded if remove == "discard" else ThreadNotFound):
        store.read_history(tid)
    assert store.list_threads(include_empty=True).threads == []


# -- 2. close() racing discard() ------------------------------------------------------------

def test_close_racing_discard_leaves_the_thread_discarded_or_untouched(backend: Backend) -> None:
    """Either the discard returned and the thread is gone, or it raised StoreClosed and the
    thread is intact and caught up; never another error, never something in between."""
    backend.requires("reopen")  # what the close left is seen by the next open
    rng = random.Random(10)
    outcomes = set()
    for _ in range(30):
        place = backend.new_place()
        store = place.open(coalesce_delay=0.0)
        tid = store.create_thread()
        store.append_and_flush(tid, [user_msg("keep or drop")], timeout=HANG)
        head = store.append(tid, [plain(n) for n in range(rng.randrange(1, 4))])
        start = threading.Barrier(2)
        spin = rng.randrange(0, 20_000)

        def discard(store: ThreadStore = store, tid: str = tid,
                    start: threading.Barrier = start, spin: int = spin) -> None:
            start.wait(HANG)
            for _ in range(spin):  # spread the interleavings
                pass
            store.discard(tid)

        racer, out = in_thread(discard)
        start.wait(HANG)
        store.close(timeout=rng.choice([0.0, 0.05, 5.0]))
        racer.join(HANG)
        error = out.get("error")
        assert error is None or isinstance(error, StoreClosed), repr(error)
        outcomes.add("closed" if error else "discarded")
        with place.open() as reopened:
            if error is None:
                with pytest.raises(ThreadDiscarded):
                    reopened.read_thread(tid)
                assert reopened.list_threads(include_empty=True).threads == []
            else:
                meta = reopened.flush(tid, timeout=HANG)
                assert (meta.projected_seq, meta.title) == (head, "keep or drop")
                assert [i.seq for i in reopened.read_history(tid)] == list(range(1, head + 1))
    assert outcomes  # which ones occur depends on the machine; each is checked above


def test_discard_waiting_for_an_attempt_when_close_begins_raises_store_closed(
        open_store: Callable[..., ThreadStore], backend: Backend) -> None:
    """A discard waiting for an attempt stuck in a hook when close() fences it: the
    discard raises StoreClosed (never a raw StorageError on a closed database) and the
    thread is left as it was, caught up by the next open."""
    entered, release = threading.Event(), threading.Event()

    def hook(thread_id: str, generation: int) -> None:
        if generation == 2:
            entered.set()
            assert release.wait(HANG)

    store = open_store(projection_hook=hook)
    tid = store.create_thread()
    store.append_and_flush(tid, [user_msg("survives")], timeout=HANG)
    store.append(tid, [plain()])
    assert entered.wait(HANG)
    discarder, out = in_thread(lambda: store.discard(tid))
    discarder.join(0.2)
    assert discarder.is_alive(), "the discard waits for the attempt in flight"
    store.close(timeout=0.2)
    release.set()
    discarder.join(HANG)
    assert isinstance(out.get("error"), StoreClosed), out
    backend.requires("reopen")
    reopened = open_store()
    assert reopened.flush(tid, timeout=HANG).projected_seq == 2
    assert reopened.read_thread(tid).title == "survives"


# -- 3. no user-supplied object can kill the projector --------------------------------------

class StrRaises(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ raised")


class StrNotAString(Exception):
    def __str__(self) -> str:
        return 42  # type: ignore[return-value]


class NothingPrints(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ raised")

    def __repr__(self) -> str:
        raise RuntimeError("__repr__ raised")


@pytest.mark.parametrize("error", [StrRaises, StrNotAString, NothingPrints, KeyboardInterrupt],
                         ids=lambda e: e.__name__)
def test_hostile_hook_exception_cannot_kill_the_projector(open_store: Callable[..., ThreadStore],
                                                          error: type[BaseException]) -> None:
    """The hook fails one thread in the worker with an error that cannot be printed (or a
    KeyboardInterrupt, which signals never deliver to the worker). Reporting it (status,
    ProjectionFailed, spans, logs) survives, and the other threads are unaffected."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    def hook(thread_id: str, generation: int) -> None:
        if thread_id == "bad":
            raise error()

    store = open_store(projection_hook=hook, tracer_provider=provider, coalesce_delay=0.0)
    for tid in ("bad", "good"):
        store.create_thread(tid)
    store.flush("good", timeout=HANG)
    store.pause_projection()  # both in one group commit
    store.append("bad", [user_msg("never projected")])
    store.append("good", [user_msg("projected")])
    store.resume_projection()
    with pytest.raises(ProjectionFailed) as failed:
        store.flush("bad", timeout=HANG)  # bounded, and a hook is set: the worker runs it
    assert error.__name__ in str(failed.value)
    assert store.flush("good", timeout=HANG).title == "projected"
    last_error = store.status("bad").last_error
    assert isinstance(last_error, str) and error.__name__ in last_error
    with pytest.raises(ProjectionFailed, match="bad"):
        store.flush_all(timeout=HANG)
    for n in range(3):  # the worker is alive: later work on other threads goes through
        assert store.append_and_flush("good", [plain(n)], timeout=HANG).projected_seq == 2 + n
    assert any(s.status.description and error.__name__ in s.status.description
               for s in exporter.get_finished_spans())
    started = time.monotonic()
    store.close(timeout=5.0)
    assert time.monotonic() - started < 5.0 + MARGIN


# -- 5. a barrier never outlives its timeout, whatever the size of the work -----------------

def test_bounded_flush_never_runs_a_large_projection_in_the_caller(
        open_store: Callable[..., ThreadStore]) -> None:
    """The next attempt of a thread with a large row only folds one small buffered item,
    but serializing and writing the row is slow: a flush with a deadline leaves it to
    the worker and returns on time."""
    store = open_store(coalesce_delay=600.0)
    tid = store.create_thread()
    text = " ".join(f"word{n}" for n in range(350_000))  # ~3.5 MB each in five fields
    store.append(tid, [user_msg(text)])
    store.append(tid, [{"type": "session_meta", "payload": {"cwd": text, "source": text}}])
    assert store.flush(tid, timeout=HANG).projected_seq == 2
    store.append(tid, [plain()])
    _assert_flush_returns_on_time(store, tid, 0.05)
    assert store.flush(tid, timeout=HANG).item_count == 3


def _assert_flush_returns_on_time(store: ThreadStore, thread_id: str, timeout: float) -> None:
    """``flush`` returns (or raises FlushTimeout) within its timeout plus the margin."""
    started = time.monotonic()
    try:
        store.flush(thread_id, timeout=timeout)
    except FlushTimeout:
        pass
    assert time.monotonic() - started < timeout + MARGIN


def _index_write_locked(path: Path) -> bool:
    """Whether a transaction holds the index's write lock (a probe, released at once)."""
    conn = sqlite3.connect(path / "index.db", isolation_level=None, timeout=0)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return False
    except sqlite3.OperationalError:
        return True
    finally:
        conn.close()


def _pending_big_threads(store: ThreadStore, count: int) -> list[str]:
    """``count`` threads, each with one unprojected message of ~350 KB of distinct words
    (full-text indexing makes their group commit take seconds)."""
    tids = [store.create_thread() for _ in range(count)]
    for n, tid in enumerate(tids):
        store.append(tid, [user_msg(" ".join(f"t{n}w{k}" for k in range(40_000)))])
    return tids


def test_bounded_flush_does_not_wait_out_a_long_group_commit(
        sqlite_backend: Backend, store_path: Path) -> None:
    """A flush running its small attempt itself gives it back to the worker at its
    deadline instead of waiting for the index write lock a long group commit holds."""
    store = sqlite_backend.open_store(coalesce_delay=600.0)
    small = store.create_thread()
    store.append_and_flush(small, [user_msg("small")], timeout=HANG)
    _pending_big_threads(store, 60)
    with pytest.raises(FlushTimeout):
        store.flush_all(timeout=0)  # expedites every big thread: one long group commit
    wait_for(lambda: _index_write_locked(store_path), "the group commit")
    store.append(small, [plain()])
    _assert_flush_returns_on_time(store, small, 0.1)
    assert store.flush(small, timeout=HANG).item_count == 2


# -- 6. close(timeout=...) returns on time during a long group commit ------------------------

def test_close_returns_on_time_during_a_long_group_commit(sqlite_backend: Backend,
                                                          store_path: Path) -> None:
    """Sixty rows with large full-text fields take seconds to commit; close(timeout=0.1)
    stops that transaction instead of waiting for it, and the next open catches up."""
    count = 60
    prepared = threading.Event()
    calls: list[str] = []

    def hook(thread_id: str, generation: int) -> None:
        calls.append(thread_id)
        if len(calls) == count:
            prepared.set()  # the last row is folded: the group commit starts now

    store = sqlite_backend.open_store(coalesce_delay=600.0, caller_runs=False, projection_hook=hook)
    tids = _pending_big_threads(store, count)
    with pytest.raises(FlushTimeout):
        store.flush_all(timeout=0)  # expedites every thread: one batch
    assert prepared.wait(HANG)
    started = time.monotonic()
    store.close(timeout=0.1)
    assert time.monotonic() - started < 0.1 + MARGIN
    reopened = sqlite_backend.open_store()
    reopened.flush_all(timeout=HANG)
    assert all(reopened.status(t).projected_seq == 1 for t in tids)


# -- 13. the process can exit after close() returned, with a hook stuck in user code ---------

_STUCK_CHILD = """
import sys, threading
from thread_store import ThreadStore
entered = threading.Event()

def hook(thread_id, generation):
    if thread_id == "stuck":
        entered.set()
        threading.Event().wait()  # stuck in user code for good

store = ThreadStore.open(sys.argv[1], projection_hook=hook)
store.create_thread("fine")
store.append_and_flush("fine", [{"type": "event_msg", "payload": {"type": "user_message",
                                                                  "message": "fine"}}])
store.create_thread("stuck")
store.append("stuck", [{"type": "event_msg", "payload": {"type": "user_message",
                                                          "message": "acknowledged"}}])
assert entered.wait(30)
store.append("fine", [{"type": "response_item", "payload": {}}])
{ending}
print("done", flush=True)
"""


@pytest.mark.parametrize("ending", ["store.close(timeout=0.2)", "pass"], ids=["closed", "left-open"])
def test_process_exits_after_close_while_a_hook_is_stuck(store_path: Path, ending: str) -> None:
    """The fenced worker does not keep the interpreter alive (closed: at once; left open:
    after the exit hook's drain deadline), and nothing acknowledged is lost."""
    script = _STUCK_CHILD.replace("{ending}", ending)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script), str(store_path)],
                          capture_output=True, text=True, timeout=60)  # a hang: TimeoutExpired
    assert (done.returncode, done.stdout) == (0, "done\n"), done.stderr
    with ThreadStore.open(store_path) as s:
        assert s.flush("stuck", timeout=HANG).title == "acknowledged"
        assert s.flush("fine", timeout=HANG).item_count == 2


# -- 14. Ctrl-C is never swallowed ---------------------------------------------------------

def _interrupt_by_signal() -> None:
    signal.raise_signal(signal.SIGINT)  # the default handler raises KeyboardInterrupt here
    deadline = time.monotonic() + HANG
    while time.monotonic() < deadline:  # at the next check of the eval loop, however loaded
        time.sleep(0.001)
    raise AssertionError("SIGINT never reached the main thread")


@pytest.fixture
def default_sigint() -> Iterator[None]:
    """SIGINT as a program starts with it: Python's handler, not blocked. Other code in
    this pytest process (an asyncio runner, a library spawning a helper) may have left
    either changed, which is no part of what the Ctrl-C test checks."""
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        signal.signal(signal.SIGINT, handler)


@pytest.mark.parametrize("interrupt", ["KeyboardInterrupt", "SIGINT", "SystemExit"])
def test_ctrl_c_in_a_barrier_reaches_the_caller(open_store: Callable[..., ThreadStore],
                                                interrupt: str, default_sigint: None) -> None:
    """A barrier with no deadline runs its thread's attempt in the calling (main) thread;
    an interrupt there reaches the caller, leaves nothing in flight, and the work is
    projected by the worker afterwards."""
    assert threading.current_thread() is threading.main_thread()
    armed = threading.Event()

    def hook(thread_id: str, generation: int) -> None:
        if armed.is_set() and threading.current_thread() is threading.main_thread():
            armed.clear()
            if interrupt == "SIGINT":
                _interrupt_by_signal()
            raise KeyboardInterrupt if interrupt == "KeyboardInterrupt" else SystemExit(3)

    store = open_store(projection_hook=hook, coalesce_delay=600.0)
    tid = store.create_thread()
    store.flush(tid, timeout=HANG)
    store.append(tid, [user_msg("interrupted once")])
    armed.set()
    expected = SystemExit if interrupt == "SystemExit" else KeyboardInterrupt
    with pytest.raises(expected):
        store.flush(tid)
    assert not armed.is_set(), "the caller must have run the attempt"
    status = store.status(tid)
    assert (status.waiters, status.last_error, store.stats().failures) == (0, None, 0)
    assert store.flush(tid, timeout=HANG).title == "interrupted once"


# -- 18. close(timeout=None) means no limit ---------------------------------------------------

def test_close_without_timeout_drains_everything(open_store: Callable[..., ThreadStore],
                                                 backend: Backend) -> None:
    release = threading.Event()

    def slow(thread_id: str, generation: int) -> None:
        assert release.wait(HANG)

    store = open_store(coalesce_delay=600.0, caller_runs=False, projection_hook=slow)
    tids = [store.create_thread() for _ in range(20)]
    for tid in tids:
        store.append(tid, [user_msg(tid)])
    closer, out = in_thread(lambda: store.close(timeout=None))
    closer.join(0.2)
    assert closer.is_alive(), "close(timeout=None) must wait for the drain"
    release.set()
    closer.join(HANG)
    assert out == {"result": None}
    backend.requires("reopen")
    reopened = open_store()
    assert reopened.stats().attempts == 0  # nothing was left to catch up
    for tid in tids:
        assert reopened.read_thread(tid).title == tid
