"""The projector's schedule without threads: due times and batches, the worker's wake-ups,
settling attempts, removal and the idle cache."""

from __future__ import annotations

import math
import threading

import pytest
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.trace import NoOpTracerProvider

from thread_store import RetryPolicy, ThreadDiscarded
from thread_store import _schedule
from thread_store._outcomes import AttemptOutcome, Outcome, Result, Success, Waiter
from thread_store._schedule import Schedule
from thread_store._phases import Phase, RemovalKind
from thread_store._state import ThreadState
from thread_store.model import EncodedItem, ThreadMetadata
from thread_store.tracing import Telemetry

NOW = 100.0
DELAY = 0.5
ITEM = EncodedItem('{"type": "event_msg"}', 1, "event_msg")


def _new() -> Schedule:
    telemetry = Telemetry(NoOpTracerProvider(), NoOpMeterProvider())
    return Schedule(DELAY, RetryPolicy(attempts=2, base_delay=0.1, max_delay=0.1), telemetry)


def _append(schedule: Schedule, thread_id: str, now: float = NOW) -> ThreadState:
    st = schedule.states.get(thread_id)
    head = 1 if st is None else st.head + 1
    schedule.appended(thread_id, head, [ITEM], None, now, schedule=True)
    return schedule.states[thread_id]


def test_the_first_due_thread_opens_a_batch_for_all_scheduled_but_those_backing_off() -> None:
    schedule = _new()
    a, b = _append(schedule, "a"), _append(schedule, "b", NOW + 0.3)
    c = schedule.states["c"] = ThreadState("c", 1, 0)
    schedule.schedule(c, NOW + 5, backoff=True)
    assert schedule.due(NOW, limit=10) == ([], NOW + DELAY)
    assert schedule.due(NOW + DELAY, limit=10) == ([a, b], NOW + DELAY)
    assert schedule.due(NOW + DELAY, limit=1) == ([a], NOW + DELAY)
    assert schedule.due(NOW + 5, limit=10) == ([c, a, b], NOW + DELAY)  # retries first
    schedule.closing = True  # everything scheduled is due at once
    assert schedule.due(NOW, limit=10) == ([c, a, b], NOW + DELAY)


def test_a_waiter_cutting_a_backoff_moves_the_thread_to_the_due_queue() -> None:
    schedule = _new()
    st = schedule.states["a"] = ThreadState("a", 1, 0)
    schedule.schedule(st, NOW + 5, backoff=True)
    assert schedule.due(NOW, limit=10) == ([], NOW + 5)
    schedule.schedule(st, NOW, cut_backoff=True)
    assert st.phase is Phase.DUE and schedule.due(NOW, limit=10) == ([st], NOW)
    schedule.claim(st, expedited=True)
    assert not schedule.has_due and schedule.due(NOW + 10, limit=10) == ([], math.inf)


def test_a_batch_costs_what_it_takes_not_what_is_queued() -> None:
    """Finding a batch among 20,000 queued threads looks at the batch, not at every
    queued thread (counted through reads of the states' due times, not timed)."""

    class Counted(ThreadState):
        __slots__ = ("_due",)
        reads = 0

        @property
        def due_at(self) -> float | None:
            Counted.reads += 1
            return self._due

        @due_at.setter
        def due_at(self, value: float | None) -> None:
            self._due = value

    schedule = _new()
    states = [Counted(f"t{i}", 1, 0) for i in range(20_000)]
    for st in states:
        schedule.states[st.thread_id] = st
        schedule.schedule(st, NOW + DELAY)
    Counted.reads = 0
    assert schedule.due(NOW, limit=64) == ([], NOW + DELAY)
    batch, wake = schedule.due(NOW + DELAY, limit=64)
    assert batch == states[:64] and wake == NOW + DELAY
    assert Counted.reads < 100, Counted.reads


def test_the_worker_is_woken_only_when_it_would_sleep_past_a_new_due_time() -> None:
    schedule = _new()
    assert not schedule.appended("a", 1, [ITEM], None, NOW, schedule=True)  # worker busy
    schedule.wake_at = NOW + 1
    assert schedule.appended("b", 1, [ITEM], None, NOW, schedule=True)
    assert schedule.wake_at == NOW + DELAY
    assert not schedule.appended("c", 1, [ITEM], None, NOW + 0.2, schedule=True)
    assert not schedule.appended("d", 1, [ITEM], None, NOW, schedule=False)
    assert schedule.states["d"].phase is Phase.IDLE  # the barrier that follows claims it


def test_settle_counts_answers_waiters_and_schedules_what_comes_next() -> None:
    schedule = _new()
    st = _append(schedule, "a")
    answered: list[Outcome] = []
    st.waiters.append(Waiter("a", 1, 0, answered.append, threading.Condition()))
    claim = schedule.claim(st, expedited=True)
    assert (schedule.in_flight, schedule.counts.attempts, schedule.has_due) == (1, 1, False)
    _append(schedule, "a")  # arrives mid-attempt: its settle schedules it
    assert st.in_flight and not schedule.has_due
    meta = ThreadMetadata(thread_id="a", projected_seq=1)
    settled = schedule.settle([claim], {id(claim): Result(AttemptOutcome.OK, meta=meta)}, now=NOW)
    assert isinstance(answered[0], Success) and answered[0].meta is meta and not st.waiters
    assert (st.phase, st.projected, schedule.in_flight, schedule.counts.rows_written) == (
        Phase.DUE, 1, 0, 1)
    assert settled.backoffs == {id(claim): None}

    retry = Result(AttemptOutcome.RETRY, error=ValueError("busy"))
    claim = schedule.claim(st, expedited=False)
    assert schedule.failures_for_good([claim], {id(claim): retry}) == []  # the budget lasts
    settled = schedule.settle([claim], {id(claim): retry}, now=NOW)
    backoff = settled.backoffs[id(claim)]
    assert st.phase == Phase.BACKING_OFF and backoff is not None and 0.05 <= backoff <= 0.1
    claim = schedule.claim(st, expedited=False)
    assert [f.generation for f in schedule.failures_for_good([claim], {id(claim): retry})] == [2]
    settled = schedule.settle([claim], {id(claim): retry}, now=NOW)  # the budget is spent
    assert st.phase == Phase.HELD
    assert (schedule.counts.retries, schedule.counts.failures) == (1, 1)


def test_removal_is_one_at_a_time_and_its_commit_forgets_the_thread() -> None:
    schedule = _new()
    st = schedule.begin_removal("gone", RemovalKind.DELETED, head=3)  # unknown here: made
    assert (st.phase, st.head, schedule.behind()) == (Phase.REMOVING, 3, {"gone": 3})
    with pytest.raises(ThreadDiscarded, match="being deleted"):
        schedule.begin_removal("gone", RemovalKind.DISCARDED, head=3)
    schedule.commit_removal(st)
    assert st.removed and "gone" not in schedule.states


def test_idle_threads_are_kept_up_to_a_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_schedule, "IDLE_STATES", 2)
    schedule = _new()
    for thread_id in "abc":
        st = schedule.states[thread_id] = ThreadState(thread_id, 1, 1)
        schedule.reschedule(st, NOW)  # caught up: retired, not scheduled
    assert sorted(schedule.states) == ["b", "c"] and not schedule.has_due
