"""Projector and barrier metrics through the OTel metrics API, read with the SDK's
InMemoryMetricReader via ``meter_provider=``, on every backend."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Backend, plain, user_msg
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from thread_store import (
    FlushTimeout,
    ProjectionFailed,
    RetryPolicy,
    ThreadDiscarded,
    ThreadStore,
    TransientProjectionError,
)

HANG = 30.0  # generous timeout that only catches hangs


class Metered:
    """A meter provider whose metrics are collected on demand."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])

    def collect(self) -> dict[str, list[Any]]:
        """``{metric name: data points}`` of one collection (gauges are read now)."""
        data = self.reader.get_metrics_data()
        points: dict[str, list[Any]] = {}
        for rm in data.resource_metrics if data else []:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    points.setdefault(metric.name, []).extend(metric.data.data_points)
        return points

    def value(self, name: str) -> float:
        """The single point's value of a counter or gauge."""
        (point,) = self.collect()[name]
        return point.value  # type: ignore[no-any-return]


@pytest.fixture
def metered() -> Iterator[Metered]:
    m = Metered()
    yield m
    m.provider.shutdown()


def wait_until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + HANG
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.002)


def test_projection_transactions_retries_failures_and_lag(backend: Backend, metered: Metered) -> None:
    transient: dict[str, list[BaseException]] = {}
    broken: set[str] = set()

    def hook(thread_id: str, generation: int) -> None:
        if transient.get(thread_id):
            raise transient[thread_id].pop(0)
        if thread_id in broken:
            raise ValueError("bad item")

    with backend.open_store(meter_provider=metered.provider, projection_hook=hook,
                          retry=RetryPolicy(attempts=5, base_delay=0.001, max_delay=0.002)) as store:
        flaky, failing, fine = store.create_thread(), store.create_thread(), store.create_thread()
        transient[flaky] = [TransientProjectionError("busy")]
        broken.add(failing)
        for tid in (flaky, failing, fine):
            store.append(tid, [user_msg("hello")])
        store.flush(flaky, timeout=HANG)
        store.flush(fine, timeout=HANG)
        with pytest.raises(ProjectionFailed):
            store.flush(failing, timeout=HANG)
        stats = store.stats()
        points = metered.collect()

    (transactions,) = points["thread_store.projection.transactions"]
    (retries,) = points["thread_store.projection.retries"]
    (failures,) = points["thread_store.projection.failures"]
    (lag,) = points["thread_store.projection.lag"]
    assert retries.value == stats.retries == 1
    # The worker may fail the broken thread before the flush, which then tries afresh.
    assert failures.value == stats.failures >= 1
    assert transactions.value == stats.transactions >= 1
    # Lag is measured for projections that covered appends: flaky's and fine's.
    assert lag.count == 2
    assert stats.rows_written >= 2  # plus the empty rows of new threads, when projected alone
    assert lag.min >= 0


def test_flush_latency_is_recorded_by_outcome(backend: Backend, metered: Metered) -> None:
    with backend.open_store(meter_provider=metered.provider) as store:
        tid, doomed = store.create_thread(), store.create_thread()
        store.append(tid, [user_msg("hello")])
        store.flush(tid, timeout=HANG)
        store.pause_projection()
        store.append(tid, [plain(1)])
        with pytest.raises(FlushTimeout):
            store.flush(tid, timeout=0.02)
        store.append(doomed, [plain(1)])
        outcome: list[BaseException] = []
        waiter = threading.Thread(target=_flush_into, args=(store, doomed, outcome))
        waiter.start()
        wait_until(lambda: store.status(doomed).waiters == 1, "the flush never started waiting")
        store.discard(doomed)
        waiter.join(HANG)
        store.resume_projection()
        points = metered.collect()

    assert [type(e) for e in outcome] == [ThreadDiscarded]
    by_outcome = {p.attributes["thread_store.outcome"]: p for p in points["thread_store.flush.duration"]}
    assert {k: p.count for k, p in by_outcome.items()} == {"ok": 1, "timeout": 1, "ThreadDiscarded": 1}
    assert by_outcome["timeout"].min >= 0.02


def _flush_into(store: ThreadStore, thread_id: str, outcome: list[BaseException]) -> None:
    try:
        store.flush(thread_id, timeout=HANG)
    except BaseException as exc:  # noqa: BLE001 - handed back to the test
        outcome.append(exc)


def test_gauges_report_backlog_waiters_and_heartbeat(backend: Backend, metered: Metered) -> None:
    with backend.open_store(meter_provider=metered.provider) as store:
        first, second = store.create_thread(), store.create_thread()
        # Their own rows first: an attempt of them finishing during the wait below would
        # restart the backlog's age at its end.
        store.flush_all(timeout=HANG)
        store.pause_projection()
        store.append(first, [plain(1)])
        store.append(second, [plain(2)])
        waiter = threading.Thread(target=store.flush, args=(first,), kwargs={"timeout": HANG})
        waiter.start()
        wait_until(lambda: store.status(first).waiters == 1, "the flush never started waiting")
        time.sleep(0.01)  # let the backlog age measurably
        backlog = metered.collect()
        store.resume_projection()
        waiter.join(HANG)
        store.flush_all(timeout=HANG)
        idle = metered.collect()

    def gauge(points: dict[str, list[Any]], name: str) -> float:
        (point,) = points[f"thread_store.projector.{name}"]
        return point.value  # type: ignore[no-any-return]

    assert gauge(backlog, "pending_threads") == 2
    assert gauge(backlog, "waiters") == 1
    assert gauge(backlog, "oldest_pending_age") >= 0.01
    assert 0 <= gauge(backlog, "heartbeat_age") < HANG
    assert gauge(idle, "pending_threads") == 0
    assert gauge(idle, "waiters") == 0
    assert gauge(idle, "oldest_pending_age") == 0


def test_gauges_follow_every_live_store_of_a_provider(backend: Backend, metered: Metered) -> None:
    # An SDK meter ignores the callbacks of a second registration under the same name:
    # the gauges must still see stores opened after the first one closed.
    with backend.new_place().open(meter_provider=metered.provider) as first:
        first.append(first.create_thread(), [plain(1)])
    with (backend.new_place().open(meter_provider=metered.provider) as a,
          backend.new_place().open(meter_provider=metered.provider) as b):
        a.pause_projection()
        b.pause_projection()
        a.append(a.create_thread(), [plain(1)])
        for _ in range(2):
            b.append(b.create_thread(), [plain(1)])
        assert metered.value("thread_store.projector.pending_threads") == 3
        a.resume_projection()
        a.flush_all(timeout=HANG)
        assert metered.value("thread_store.projector.pending_threads") == 2
        b.resume_projection()
    assert "thread_store.projector.pending_threads" not in metered.collect()
