"""Appends go first (issue 15): the projector worker steps aside for this process's
appends, within the time it earned, and settles a batch in slices."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Any, Callable

import pytest

from thread_store import ThreadStore, _priority, projector
from thread_store._priority import AppendPriority
from thread_store._schedule import Schedule
from thread_store.backends.sqlite.index import _ROWS_PER_STATEMENT
from thread_store.workload import user_message

from conftest import Backend

ITEM = user_message("hello", datetime.now(UTC))


def _wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll a test condition; the generous deadline only catches hangs."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def test_with_no_append_under_way_the_worker_does_not_wait() -> None:
    priority = AppendPriority()
    priority.enter()
    priority.leave()
    priority.step_aside()
    assert (priority.steps, priority.under_way) == (0, 0)


def test_the_worker_waits_until_the_appends_under_way_have_left(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_priority, "MAX_CREDIT_S", 600.0)  # only the appends end the wait
    priority = AppendPriority()
    priority.enter()
    _steps_aside_until_the_append_leaves(priority)


def _steps_aside_until_the_append_leaves(priority: AppendPriority) -> None:
    """With one append under way, the worker waits until it leaves."""
    worker = threading.Thread(target=priority.step_aside)
    worker.start()
    _wait_until(lambda: priority.steps == 1, "the worker to step aside")
    worker.join(0.05)
    assert worker.is_alive(), "the worker went on while an append was under way"
    priority.leave()
    worker.join(30.0)
    assert not worker.is_alive(), "the append's end did not wake the worker"


def test_the_worker_waits_no_longer_than_its_credit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_priority, "MAX_CREDIT_S", 0.0)  # it earned nothing: no wait at all
    priority = AppendPriority()
    priority.enter()
    priority.step_aside()
    assert (priority.steps, priority.under_way) == (0, 1)


def test_the_worker_leaves_several_appends_under_way_to_take_turns(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_priority, "MAX_CREDIT_S", 600.0)
    priority = AppendPriority()
    priority.enter()
    priority.enter()
    priority.step_aside()
    assert (priority.steps, priority.under_way) == (0, 2)


def test_the_worker_does_not_hold_back_appended_work_past_the_lag_budget(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_priority, "MAX_CREDIT_S", 600.0)
    priority = AppendPriority()
    priority.start_batch(100.0, 100.0 + 2 * _priority.LAG_BUDGET_S)
    priority.enter()
    priority.step_aside()
    assert priority.steps == 0
    # Work found behind (at open, or left by other processes) was appended by no one here.
    priority.start_batch(None, 100.0)
    _steps_aside_until_the_append_leaves(priority)


def test_the_worker_holds_a_batch_only_for_a_gap_in_a_lone_append_stream() -> None:
    priority = AppendPriority()
    now = 100.0
    fresh = now - _priority.LAG_BUDGET_S / 2
    assert priority.hold(fresh, now) == 0.0, "no append since open: nothing to wait for"
    priority.enter()
    assert priority.hold(fresh, now) == _priority.GAP_S
    assert priority.hold(None, now) == 0.0, "work found behind is never held"
    stale = now - _priority.LAG_BUDGET_S
    assert priority.hold(stale, now) == 0.0, "held past the lag budget"
    almost = now - _priority.LAG_BUDGET_S + _priority.GAP_S / 2
    assert priority.hold(almost, now) == pytest.approx(_priority.GAP_S / 2)
    priority.enter()
    assert priority.hold(fresh, now) == 0.0, "several appenders take turns themselves"
    priority.leave()
    priority.leave()
    left = time.monotonic()
    assert priority.hold(left, left) == _priority.GAP_S, "the stream's next append may come"
    later = left + _priority.GAP_S
    assert priority.hold(left, later) == 0.0, "a gap in the stream"


def test_background_work_waits_for_a_gap_in_appends_until_a_barrier_expedites_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_priority, "MAX_BACKGROUND_CREDIT_S", 600.0)
    monkeypatch.setattr(_priority, "GAP_S", 600.0)  # no gap comes: only expedite ends the wait
    priority = AppendPriority()
    priority.step_aside(background=True)
    assert priority.steps == 0, "with no append since open, background work never waits"
    priority.enter()
    worker = threading.Thread(target=priority.step_aside, kwargs={"background": True})
    worker.start()
    _wait_until(lambda: priority.steps == 1, "the worker to wait for the append")
    priority.leave()
    _wait_until(lambda: priority.steps == 2, "the worker to wait on for a gap")
    assert worker.is_alive(), "background work went on beside the append stream"
    priority.expedite()
    worker.join(30.0)
    assert not worker.is_alive(), "expedite did not end the wait"
    monkeypatch.setattr(_priority, "MAX_CREDIT_S", 0.0)
    priority.enter()
    priority.step_aside(background=True)  # expedited: a lone append's rule and credit (none)
    assert priority.steps == 2


def test_a_closing_store_holds_and_paces_no_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_priority, "MAX_BACKGROUND_CREDIT_S", 600.0)
    monkeypatch.setattr(_priority, "MAX_CREDIT_S", 0.0)  # a lone append's rule: no wait
    priority = AppendPriority()
    priority.enter()
    fresh = time.monotonic()
    assert priority.hold(fresh, fresh) == _priority.GAP_S
    priority.leave()
    priority.drain()
    assert priority.hold(fresh, fresh) == 0.0, "a closing store holds no batch"
    priority.start_batch(None, 100.0)
    priority.enter()
    priority.step_aside(background=True)
    assert (priority.steps, priority.under_way) == (0, 1)


def test_background_waits_are_bounded_by_the_workers_credit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_priority, "MAX_BACKGROUND_CREDIT_S", 0.0)  # it may never wait
    priority = AppendPriority()
    priority.enter()
    priority.step_aside(background=True)
    assert (priority.steps, priority.under_way) == (0, 1)


@pytest.mark.parametrize("call", ["flush", "discard"])
def test_a_barrier_or_a_discard_ends_the_background_pace_of_a_catch_up(
        sqlite_backend: Backend, monkeypatch: pytest.MonkeyPatch, call: str) -> None:
    """Threads found behind at open (here: the index was lost) are background work: while
    an append of this process is under way the worker waits for a gap before each fold,
    and a barrier or a discard (with no timeout) on a thread of the batch ends that wait."""
    with sqlite_backend.open_store() as store:
        for thread_id in ("a", "b"):
            store.create_thread(thread_id)
            store.append(thread_id, [ITEM])
    assert sqlite_backend.path is not None
    for suffix in ("", "-wal", "-shm"):
        (sqlite_backend.path / f"index.db{suffix}").unlink(missing_ok=True)
    monkeypatch.setattr(_priority, "MAX_BACKGROUND_CREDIT_S", 600.0)
    monkeypatch.setattr(_priority, "GAP_S", 600.0)
    init = AppendPriority.__init__

    def under_way_since_open(self: AppendPriority) -> None:
        init(self)
        self.enter()

    monkeypatch.setattr(AppendPriority, "__init__", under_way_since_open)
    store = sqlite_backend.open_store()
    priority = store._writes.projector.priority  # type: ignore[union-attr]  # noqa: SLF001
    _wait_until(lambda: priority.steps >= 1, "the worker to wait before a fold")
    time.sleep(0.2)  # ample for a worker that did not keep waiting to write both rows
    assert store.stats().rows_written == 0, "the catch-up wrote beside the append stream"
    if call == "flush":
        assert store.flush("b", timeout=30.0).item_count == 1
    else:
        discard = threading.Thread(target=store.discard, args=("b",), kwargs={"timeout": None})
        discard.start()
        discard.join(30.0)
        assert not discard.is_alive(), "the discard waited out the paced batch"
    priority.leave()
    store.flush_all(timeout=30.0)
    assert store.read_thread("a").item_count == 1


def _lone_append_under_way(store: ThreadStore) -> tuple[threading.Thread, AppendPriority]:
    """With work pending (:func:`_with_work_pending`), an append to "a" waits for the
    history's write lock, which the caller holds; then resume the projection."""
    priority = store._writes.projector.priority  # type: ignore[union-attr]  # noqa: SLF001
    appender = threading.Thread(target=store.append, args=("a", [ITEM]))
    appender.start()
    _wait_until(lambda: priority.under_way == 1, "the append to be under way")
    store.resume_projection()
    return appender, priority


def _with_work_pending(store: ThreadStore) -> ThreadStore:
    """Threads "a" and "b" with an item each, not projected (projection paused)."""
    store.pause_projection()
    for thread_id in ("a", "b"):
        store.create_thread(thread_id)
        store.append(thread_id, [ITEM])
    return store


def test_the_worker_waits_for_a_gap_in_appends_but_not_a_barrier(
        sqlite_backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a lone append is under way the worker holds its due batch (within the lag
    budget, here longer than the test); a barrier's thread goes at once."""
    monkeypatch.setattr(_priority, "LAG_BUDGET_S", 600.0)
    store = _with_work_pending(sqlite_backend.open_store())
    worker = store._writes.projector  # type: ignore[union-attr]  # noqa: SLF001
    with store._storage.history.lock:  # type: ignore[attr-defined]  # noqa: SLF001
        appender, priority = _lone_append_under_way(store)
        _wait_until(lambda: worker._holding, "the worker to hold its batch")  # noqa: SLF001
        assert store.stats().rows_written == 0, "the worker wrote beside a lone append"
        assert store.flush("b", timeout=30.0).item_count == 1
        assert priority.under_way == 1, "the barrier did not wait for the append to end"
    appender.join(30.0)
    assert not appender.is_alive()
    store.flush_all(timeout=30.0)
    assert store.read_thread("a").item_count == 2


def test_the_worker_holds_appended_work_no_longer_than_the_lag_budget(
        sqlite_backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_priority, "LAG_BUDGET_S", 0.05)
    store = _with_work_pending(sqlite_backend.open_store())
    with store._storage.history.lock:  # type: ignore[attr-defined]  # noqa: SLF001
        appender, priority = _lone_append_under_way(store)
        _wait_until(lambda: store.stats().rows_written > 0, "the held batch to be written")
        assert priority.under_way == 1, "the append ended first: the budget was not tested"
    appender.join(30.0)
    assert not appender.is_alive()


def test_the_worker_steps_aside_for_an_append_under_way(sqlite_backend: Backend,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """An append waiting for the history's write lock is under way: the worker, given a
    batch meanwhile, steps aside for it before it writes, and goes on once it ends."""
    monkeypatch.setattr(_priority, "MAX_CREDIT_S", 600.0)  # only the append ends the wait
    monkeypatch.setattr(_priority, "GAP_S", 0.0)  # no hold before the batch: a step aside in it
    store = _with_work_pending(sqlite_backend.open_store())
    with store._storage.history.lock:  # type: ignore[attr-defined]  # noqa: SLF001
        appender, priority = _lone_append_under_way(store)
        _wait_until(lambda: priority.steps == 1, "the worker to step aside")
        assert store.stats().rows_written == 0, "the worker wrote before it stepped aside"
    appender.join(30.0)
    assert not appender.is_alive()
    store.flush_all(timeout=30.0)
    assert store.read_thread("a").item_count == 2


def test_the_worker_settles_a_batch_in_slices(store: ThreadStore,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Settling holds the projector lock an append needs: never for a whole batch."""
    sizes: list[int] = []
    settle = Schedule.settle

    def spy(self: Schedule, claims: list[object], *args: object, **kwargs: object) -> object:
        sizes.append(len(claims))
        return settle(self, claims, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Schedule, "settle", spy)
    store.pause_projection()
    threads = [f"t{i}" for i in range(3 * projector._SETTLE_SLICE)]  # noqa: SLF001
    for thread_id in threads:
        store.create_thread(thread_id)
        store.append(thread_id, [ITEM])
    store.resume_projection()
    _wait_until(lambda: store.stats().rows_written == len(threads), "the worker's batch")
    assert sum(sizes) == len(threads)
    assert max(sizes) == projector._SETTLE_SLICE  # noqa: SLF001


def test_the_worker_steps_aside_between_the_rows_of_a_sqlite_commit(
        sqlite_store: ThreadStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit of many rows is Python between short SQLite calls, as long as a batch's
    folds: the worker may step aside before each statement of rows but the first."""
    store = sqlite_store
    index = store._storage.index  # noqa: SLF001
    calls: dict[int, int] = {}  # a commit's rows: the times it stepped aside
    commit = index.commit

    def spy(rows: Any, **kwargs: Any) -> Any:
        between = kwargs["between_rows"]
        assert between is not None, "the worker gave its commit no step aside"
        calls[len(rows)] = 0

        def counted() -> None:
            calls[len(rows)] += 1
            between()

        return commit(rows, **{**kwargs, "between_rows": counted})

    monkeypatch.setattr(index, "commit", spy)
    store.pause_projection()
    threads = [f"t{i}" for i in range(2 * _ROWS_PER_STATEMENT + 1)]
    for thread_id in threads:
        store.create_thread(thread_id)
        store.append(thread_id, [ITEM])
    store.resume_projection()
    _wait_until(lambda: store.stats().rows_written == len(threads), "the worker's batches")
    assert max(calls) > _ROWS_PER_STATEMENT
    assert calls == {n: (n - 1) // _ROWS_PER_STATEMENT for n in calls}
