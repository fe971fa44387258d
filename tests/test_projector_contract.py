"""DESIGN §1 points 2-8, one named test per point, through the public API of ThreadStore,
on every backend."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from conftest import Backend, in_thread, plain, user_msg, wait_for
from thread_store import (FlushTimeout, ProjectionFailed, StoreClosed, ThreadDiscarded,
                          ThreadNotFound, ThreadStore, TransientProjectionError)
from thread_store.derive import CodexRules, fold

HANG = 30.0  # generous timeout that only catches hangs


class Gate:
    """A projection_hook that records calls and can block or fail chosen threads."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.block: set[str] = set()
        self.released = threading.Event()
        self.entered = threading.Event()
        self.faults: dict[str, list[BaseException]] = {}
        self._lock = threading.Lock()

    def __call__(self, thread_id: str, generation: int) -> None:
        with self._lock:
            self.calls.append((thread_id, generation))
            fault = self.faults.get(thread_id)
            error = fault.pop(0) if fault else None
        if thread_id in self.block:
            self.entered.set()
            assert self.released.wait(HANG), "test never released the gate"
        if error is not None:
            raise error

    def count(self, thread_id: str) -> int:
        with self._lock:
            return sum(1 for t, _ in self.calls if t == thread_id)


@pytest.fixture
def gate() -> Gate:
    return Gate()


@pytest.fixture
def open_store(backend: Backend, gate: Gate) -> Iterator[Callable[..., ThreadStore]]:
    """Open stores on each backend with the gate as hook; every store is closed at the end
    (by ``backend``, after the gate let every held attempt go)."""

    def _open(**kw: object) -> ThreadStore:
        kw.setdefault("projection_hook", gate)
        return backend.open_store(**kw)

    yield _open
    gate.released.set()


def expected_metadata(store: ThreadStore, thread_id: str):  # type: ignore[no-untyped-def]
    """The fold of the thread's whole history, as the projection must show it."""
    rules = CodexRules()
    history = store.read_history(thread_id, limit=100_000)
    created = store.read_thread(thread_id).created_at
    assert created is not None
    base = rules.initial(thread_id, int(created.timestamp() * 1_000_000))
    state = fold(rules, base, [(int(i.ts.timestamp() * 1_000_000), i.item) for i in history])
    return rules.metadata(thread_id, state, history[-1].seq if history else 0)


def waiting_in(thread: threading.Thread, *functions: str) -> bool:
    """Whether ``thread`` is inside calls of all ``functions`` (blocked there, for a test)."""
    names = set()
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        names.add(frame.f_code.co_name)
        frame = frame.f_back
    return names.issuperset(functions)


def fresh_thread(store: ThreadStore) -> str:
    """A new thread whose initial row is written, so no attempt of it is left over."""
    tid = store.create_thread()
    store.flush(tid, timeout=HANG)
    return tid


def paused_append(store: ThreadStore, gate: Gate, text: str) -> tuple[str, int]:
    """A fresh thread with one user message appended while the projector is paused.

    Returns the id and how many hook calls the thread had before the append.
    """
    tid = fresh_thread(store)
    before = gate.count(tid)
    store.pause_projection()
    store.append(tid, [user_msg(text)])
    return tid, before


def blocked_thread(store: ThreadStore, gate: Gate, items: list[dict[str, object]]) -> tuple[str, int]:
    """A new, projected thread whose next attempt, covering ``items``, is held in the hook."""
    tid = fresh_thread(store)
    gate.block.add(tid)
    gen = store.append(tid, items)
    assert gate.entered.wait(HANG)
    return tid, gen


# -- 1. append is not blocked by projection ---------------------------------------------

def test_append_returns_while_projection_is_blocked(open_store, gate: Gate) -> None:
    store = open_store()
    tid = store.create_thread()
    store.append_and_flush(tid, [user_msg("first")], timeout=HANG)
    gate.block.add(tid)
    gen = store.append(tid, [user_msg("ignored: title is set once"), plain()])
    assert gate.entered.wait(HANG)  # the projection of this append is now blocked
    gen2 = store.append(tid, [plain(1)])
    assert (gen, gen2) == (3, 4)
    assert [i.seq for i in store.read_history(tid)] == [1, 2, 3, 4]
    old = store.read_thread(tid)
    assert old.projected_seq == 1 and old.item_count == 1
    gate.released.set()
    new = store.flush(tid, timeout=HANG)
    assert new.projected_seq == 4 and new.item_count == 4
    assert new == expected_metadata(store, tid)


# -- 2. coalescing -----------------------------------------------------------------------

def test_fifty_appends_while_blocked_cost_at_most_two_projections(open_store, gate: Gate) -> None:
    store = open_store()
    tid, _ = blocked_thread(store, gate, [user_msg("go")])
    before = gate.count(tid) - 1  # the blocked attempt is the first of the fifty appends'
    for n in range(49):
        store.append(tid, [plain(n)])
    gate.released.set()
    meta = store.flush(tid, timeout=HANG)
    assert gate.count(tid) - before <= 2
    assert meta.projected_seq == 50 and meta == expected_metadata(store, tid)


# -- 3. group commit ----------------------------------------------------------------------

def test_two_hundred_dirty_threads_share_few_transactions(open_store) -> None:
    store = open_store()
    tids = [store.create_thread() for _ in range(200)]
    # The new threads' own (empty) rows are projected first, so that the counters below
    # see only the rows and transactions of the 200 appends.
    store.flush_all(timeout=HANG)
    store.pause_projection()
    for tid in tids:
        store.append(tid, [user_msg(f"hello {tid}")])
    before = store.stats()
    assert before.pending_threads == 200
    store.resume_projection()
    store.flush_all(timeout=HANG)
    after = store.stats()
    assert after.rows_written - before.rows_written == 200
    assert after.transactions - before.transactions <= 20
    assert store.list_threads(limit=1000).threads.__len__() == 200


# -- 4. barriers ---------------------------------------------------------------------------

def test_flush_covers_its_own_generation_not_later_appends(open_store, gate: Gate) -> None:
    store = open_store(coalesce_delay=0.0)
    tid = fresh_thread(store)
    gate.block.add(tid)  # its attempts wait in the hook until a later append has landed
    target = store.append(tid, [user_msg("x")] * 5)
    stop = threading.Event()
    flush_waiting = threading.Event()
    appended_while_flush_waited: list[int] = []

    def writer() -> None:
        while not stop.is_set():
            gen = store.append(tid, [plain()])
            if flush_waiting.is_set():
                appended_while_flush_waited.append(gen)
                gate.released.set()

    w = threading.Thread(target=writer)
    w.start()
    try:
        flusher, out = in_thread(lambda: store.flush(tid, generation=target, timeout=HANG))
        wait_for(lambda: store.status(tid).waiters == 1, "the flush waiting")
        flush_waiting.set()
        flusher.join(HANG)
    finally:
        stop.set()
        w.join()
    assert "error" not in out, out
    assert out["result"].projected_seq >= target  # type: ignore[attr-defined]
    assert appended_while_flush_waited, "the writer must keep appending while flush waits"


def test_flush_timeout_carries_generations_and_never_hangs(open_store, gate: Gate) -> None:
    store = open_store()
    tid = store.create_thread()
    store.append_and_flush(tid, [user_msg("a")], timeout=HANG)
    gate.block.add(tid)
    gen = store.append(tid, [plain()])
    assert gate.entered.wait(HANG)
    started = time.monotonic()
    with pytest.raises(FlushTimeout) as info:
        store.flush(tid, timeout=0.2)
    assert time.monotonic() - started < HANG
    assert isinstance(info.value, TimeoutError)
    assert (info.value.target, info.value.projected) == (gen, 1)
    assert "durable" in str(info.value)
    assert store.status(tid).waiters == 0


@pytest.mark.parametrize("caller_runs", [True, False])
def test_waiting_barrier_skips_the_coalescing_delay(open_store, caller_runs: bool) -> None:
    store = open_store(coalesce_delay=600.0, caller_runs=caller_runs)
    tid = store.create_thread()
    store.append(tid, [user_msg("slow lane")])
    meta = store.flush(tid, timeout=HANG)  # would take ten minutes without the expedite
    assert meta.title == "slow lane"


def test_thousand_waiters_released_by_one_projection(open_store, gate: Gate) -> None:
    store = open_store()
    tid, before = paused_append(store, gate, "many eyes")
    results: list[object] = []
    lock = threading.Lock()

    def waiter() -> None:
        meta = store.flush(tid, timeout=HANG)
        with lock:
            results.append(meta.projected_seq)

    threads = [threading.Thread(target=waiter) for _ in range(1000)]
    for t in threads:
        t.start()
    wait_for(lambda: store.status(tid).waiters == 1000, "1000 registered waiters")
    store.resume_projection()
    for t in threads:
        t.join(HANG)
    assert results == [1] * 1000
    assert gate.count(tid) - before == 1
    assert store.status(tid).waiters == 0


def test_timed_out_waiters_are_removed(open_store, gate: Gate) -> None:
    store = open_store()
    tid = store.create_thread()
    store.pause_projection()
    store.append(tid, [user_msg("x")])
    for _ in range(20):
        with pytest.raises(FlushTimeout):
            store.flush(tid, timeout=0.01)
    assert store.status(tid).waiters == 0
    assert store.stats().waiters == 0


@pytest.mark.parametrize("caller_runs", [True, False])
def test_no_lost_wakeup_under_racing_projection(open_store, caller_runs: bool) -> None:
    store = open_store(coalesce_delay=0.0, caller_runs=caller_runs)
    tids = [store.create_thread() for _ in range(4)]
    errors: list[BaseException] = []

    def hammer(tid: str) -> None:
        try:
            for n in range(150):
                gen = store.append(tid, [plain(n)])
                assert store.flush(tid, generation=gen, timeout=HANG).projected_seq >= gen
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(t,)) for t in tids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# -- 5. retry and errors ---------------------------------------------------------------------

def test_transient_errors_are_retried_then_flush_succeeds(open_store, gate: Gate) -> None:
    store = open_store()
    tid = fresh_thread(store)
    before = gate.count(tid)
    gate.faults[tid] = [TransientProjectionError("busy")] * 3
    meta = store.append_and_flush(tid, [user_msg("retry me")], timeout=HANG)
    assert meta.title == "retry me"
    assert gate.count(tid) - before == 4
    assert store.stats().retries == 3
    assert store.status(tid).last_error is None


def test_permanent_error_fails_covered_waiters_and_keeps_work(open_store, gate: Gate) -> None:
    store = open_store()
    tid, other = fresh_thread(store), store.create_thread()
    gate.faults[tid] = [RuntimeError("rules exploded")]
    with pytest.raises(ProjectionFailed) as info:
        store.append_and_flush(tid, [user_msg("doomed")], timeout=HANG)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "durable" in str(info.value)
    status = store.status(tid)
    assert status.pending and status.last_error and "rules exploded" in status.last_error
    # Other threads project normally while this one is failed.
    assert store.append_and_flush(other, [user_msg("fine")], timeout=HANG).title == "fine"
    # Appends keep succeeding; the pending work is kept and the next flush retries it.
    assert store.append(tid, [plain()]) == 2
    meta = store.flush(tid, timeout=HANG)
    assert meta.projected_seq == 2 and meta.title == "doomed"
    assert store.status(tid).last_error is None


def test_flush_on_failed_thread_retries_instead_of_replaying(open_store, gate: Gate) -> None:
    store = open_store()
    tid = fresh_thread(store)
    gate.faults[tid] = [RuntimeError("once")]
    with pytest.raises(ProjectionFailed):
        store.append_and_flush(tid, [user_msg("a")], timeout=HANG)
    assert store.flush(tid, timeout=HANG).projected_seq == 1


def test_older_failure_does_not_fail_newer_waiter(open_store, gate: Gate) -> None:
    store = open_store()
    tid = fresh_thread(store)
    gate.block.add(tid)
    gate.faults[tid] = [RuntimeError("gen 1 attempt fails")]
    store.append(tid, [user_msg("one")])
    assert gate.entered.wait(HANG)  # the attempt covering gen 1 is in flight
    old, old_out = in_thread(lambda: store.flush(tid, generation=1, timeout=HANG))
    store.append(tid, [plain()])  # gen 2 is queued
    new, new_out = in_thread(lambda: store.flush(tid, generation=2, timeout=HANG))
    wait_for(lambda: store.status(tid).waiters == 2, "two waiters")
    gate.block.discard(tid)
    gate.released.set()
    old.join(HANG)
    new.join(HANG)
    assert isinstance(old_out.get("error"), ProjectionFailed)
    assert "error" not in new_out, new_out
    assert new_out["result"].projected_seq == 2  # type: ignore[attr-defined]


# -- 6. discard and delete ----------------------------------------------------------------------

def test_discard_drops_pending_work_without_running_it(open_store, gate: Gate) -> None:
    store = open_store()
    tid, before = paused_append(store, gate, "ephemeral")
    waiter, out = in_thread(lambda: store.flush(tid, timeout=HANG))
    wait_for(lambda: store.status(tid).waiters == 1, "waiter")
    store.discard(tid)
    waiter.join(HANG)
    assert isinstance(out.get("error"), ThreadDiscarded)
    store.resume_projection()
    store.flush_all(timeout=HANG)
    assert gate.count(tid) == before
    assert store.list_threads(include_empty=True).threads == []
    for call in (lambda: store.append(tid, [plain()]), lambda: store.read_thread(tid),
                 lambda: store.read_history(tid), lambda: store.flush(tid),
                 lambda: store.status(tid)):
        with pytest.raises(ThreadDiscarded):
            call()


def test_discard_waits_for_in_flight_projection(open_store, gate: Gate) -> None:
    store = open_store()
    tid, _ = blocked_thread(store, gate, [user_msg("racing")])
    discarder, out = in_thread(lambda: store.discard(tid, timeout=HANG))
    # A discard under way changes nothing a caller can see until it is done (a removal
    # that fails must change nothing), so look at where the discarding thread stands.
    wait_for(lambda: waiting_in(discarder, "begin_removal", "wait"), "discard to wait for the attempt")
    assert discarder.is_alive(), "discard must wait for the attempt in flight"
    gate.released.set()
    discarder.join(HANG)
    assert out == {"result": None}
    assert store.list_threads(include_empty=True).threads == []


def test_fenced_projection_never_resurrects_a_discarded_thread(open_store, gate: Gate,
                                                               backend: Backend) -> None:
    store = open_store()
    tid, _ = blocked_thread(store, gate, [user_msg("must never show")])
    calls = gate.count(tid)
    store.discard(tid, timeout=0.05)  # gives up waiting: the attempt is fenced instead
    gate.released.set()
    wait_for(lambda: store.stats().pending_threads == 0 and gate.count(tid) == calls, "attempt end")
    store.flush_all(timeout=HANG)
    assert store.list_threads(include_empty=True).threads == []
    store.close()
    backend.requires("reopen")
    reopened = open_store()
    assert reopened.list_threads(include_empty=True).threads == []
    with pytest.raises(ThreadDiscarded):
        reopened.read_thread(tid)


def test_delete_resolves_waiters_and_removes_history(open_store, backend: Backend) -> None:
    store = open_store()
    tid = store.create_thread()
    store.append_and_flush(tid, [user_msg("bye")], timeout=HANG)
    store.pause_projection()
    store.append(tid, [plain()])
    waiter, out = in_thread(lambda: store.flush(tid, timeout=HANG))
    wait_for(lambda: store.status(tid).waiters == 1, "waiter")
    store.delete_thread(tid)
    waiter.join(HANG)
    assert isinstance(out.get("error"), ThreadDiscarded)
    with pytest.raises(ThreadNotFound):
        store.read_history(tid)
    store.resume_projection()
    store.close()
    backend.requires("reopen")
    reopened = open_store()
    with pytest.raises(ThreadNotFound):
        reopened.read_thread(tid)
    assert reopened.create_thread(tid) == tid  # the id is free again
    assert reopened.read_thread(tid).item_count == 0


def test_archive_seals_the_thread(open_store) -> None:
    store = open_store(coalesce_delay=600.0, caller_runs=False)
    tid = store.create_thread()
    store.append(tid, [user_msg("done"), plain()])
    meta = store.archive_thread(tid, timeout=HANG)
    assert meta.archived_at is not None and meta.projected_seq == 3
    assert store.status(tid).pending is False
    assert [t.thread_id for t in store.list_threads(archived=True).threads] == [tid]
    assert store.list_threads().threads == []


# -- 7. shutdown -------------------------------------------------------------------------------

def test_close_drains_so_reopen_needs_no_catch_up(open_store, backend: Backend) -> None:
    store = open_store(coalesce_delay=600.0, caller_runs=False)
    tids = [store.create_thread() for _ in range(50)]
    for tid in tids:
        store.append(tid, [user_msg(tid), plain()])
    assert store.stats().pending_threads == 50
    store.close(timeout=HANG)
    backend.requires("reopen")
    reopened = open_store()
    assert reopened.stats().attempts == 0
    for tid in tids:
        status = reopened.status(tid)
        assert status.projected_seq == status.head_seq == 2
        assert reopened.read_thread(tid).title == tid


def test_close_resolves_every_waiter_and_rejects_appends(open_store, gate: Gate) -> None:
    store = open_store()
    done, blocked = store.create_thread(), store.create_thread()
    store.append_and_flush(done, [user_msg("done")], timeout=HANG)
    gate.block.add(blocked)
    store.append(blocked, [user_msg("stuck")])
    assert gate.entered.wait(HANG)
    waiter, out = in_thread(lambda: store.flush(blocked, timeout=HANG))
    wait_for(lambda: store.status(blocked).waiters == 1, "waiter")
    store.close(timeout=0.2)
    waiter.join(HANG)
    assert isinstance(out.get("error"), StoreClosed)
    assert "durable" in str(out["error"])
    with pytest.raises(StoreClosed):
        store.append(done, [plain()])
    store.close()  # idempotent


def test_close_returns_on_time_and_next_open_catches_up(open_store, gate: Gate,
                                                        backend: Backend) -> None:
    store = open_store()
    tid, _ = blocked_thread(store, gate, [user_msg("left behind")])
    started = time.monotonic()
    store.close(timeout=0.2)
    assert time.monotonic() - started < 5.0  # on time: nowhere near the blocked hook
    gate.block.discard(tid)
    gate.released.set()
    wait_for(lambda: not any(t.name == "thread_store-projector" for t in threading.enumerate()),
             "fenced worker exit")
    backend.requires("reopen")
    # Hold the reopened store's catch-up attempt in the hook, so it can be seen pending.
    gate.released.clear()
    gate.entered.clear()
    gate.block.add(tid)
    reopened = open_store()
    assert gate.entered.wait(HANG), "the reopened store must start the catch-up by itself"
    status = reopened.status(tid)
    assert status.pending and (status.projected_seq, status.head_seq) == (0, 1)
    gate.released.set()
    assert reopened.flush(tid, timeout=HANG).title == "left behind"


def test_no_worker_left_after_close(backend: Backend) -> None:
    store = backend.open_store()
    workers = [t for t in threading.enumerate() if t.name == "thread_store-projector"]
    assert workers
    store.close()
    for t in workers:
        t.join(HANG)
        assert not t.is_alive()


# -- 8. crash catch-up ----------------------------------------------------------------------------

_CHILD = """
import json, sys
from thread_store import ThreadStore
store = ThreadStore.open(sys.argv[1])
store.pause_projection()
tids = [store.create_thread() for _ in range(5)]
for n in range(40):
    for tid in tids:
        store.append(tid, [{"type": "event_msg", "payload": {"type": "user_message", "message": f"m{n}"}}])
print(json.dumps(tids), flush=True)
sys.stdin.read()  # wait to be killed
"""


def test_crash_catch_up_after_sigkill(sqlite_backend: Backend, gate: Gate, store_path: Path) -> None:
    """SQLite's own: a process killed with SIGKILL (the other backends have no such crash)."""
    with subprocess.Popen([sys.executable, "-c", _CHILD, str(store_path)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as child:
        try:
            tids = json.loads(child.stdout.readline())  # type: ignore[union-attr]
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(HANG)
    assert child.returncode == -signal.SIGKILL
    store = sqlite_backend.open_store(projection_hook=gate, coalesce_delay=600.0, caller_runs=False)
    for tid in tids:
        assert store.status(tid).head_seq == 40
    metas = [store.flush(tid, timeout=HANG) for tid in tids]  # waits for the catch-up
    for tid, meta in zip(tids, metas):
        assert meta.projected_seq == 40 and meta.title == "m0"
        assert meta == expected_metadata(store, tid)


# -- review regressions -----------------------------------------------------------------------

def test_caller_run_never_outlives_the_barrier_timeout(open_store, gate: Gate) -> None:
    """With a hook, a barrier that has a deadline leaves the work to the worker."""
    store = open_store(coalesce_delay=600.0)
    tid = fresh_thread(store)
    gate.block.add(tid)
    store.append(tid, [user_msg("slow hook")])
    started = time.monotonic()
    with pytest.raises(FlushTimeout):
        store.flush(tid, timeout=0.2)  # the flush itself must not sit in the blocked hook
    assert time.monotonic() - started < HANG / 2
    gate.released.set()
    assert store.flush(tid, timeout=HANG).title == "slow hook"


@pytest.mark.parametrize("error", [ThreadNotFound("from the hook"), ThreadDiscarded("from the hook")])
def test_hook_raising_a_store_error_fails_only_that_attempt(open_store, gate: Gate,
                                                            error: Exception) -> None:
    store = open_store()
    tid = fresh_thread(store)
    gate.faults[tid] = [error]
    with pytest.raises(ProjectionFailed):
        store.append_and_flush(tid, [user_msg("still alive")], timeout=HANG)
    assert store.append(tid, [plain()]) == 2
    assert store.flush(tid, timeout=HANG).title == "still alive"


def test_recreated_id_never_inherits_the_deleted_threads_metadata(open_store, backend: Backend) -> None:
    store = open_store()
    tid = store.create_thread("reused-id")
    store.append_and_flush(tid, [user_msg("old thread")], timeout=HANG)
    store.delete_thread(tid)
    store.create_thread("reused-id")
    meta = store.append_and_flush("reused-id", [plain()], timeout=HANG)
    assert (meta.title, meta.item_count, meta.projected_seq) == (None, 1, 1)
    store.close()
    backend.requires("reopen")
    reopened = open_store()
    assert reopened.read_thread("reused-id") == meta
