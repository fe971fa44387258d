"""Trace propagation (DESIGN §1.9) with the real OTel SDK and an in-memory exporter.

Every test opens a store on every backend with ``tracer_provider=`` (no global provider is
touched) and checks the finished spans: names, attributes, parents, links and events.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import Backend, plain, user_msg
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, SpanKind, StatusCode, Tracer

from thread_store import FlushTimeout, ProjectionFailed, RetryPolicy, ThreadStore, TransientProjectionError

HANG = 30.0  # generous timeout that only catches hangs
PROJECT = "thread_store.project"
ATTR_COALESCED = "thread_store.coalesced_appends"
FAST_RETRY = RetryPolicy(attempts=5, base_delay=0.001, max_delay=0.002)


class Traced:
    """An SDK tracer provider whose finished spans are kept in memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer: Tracer = self.provider.get_tracer("tests.caller")

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if s.name == name]

    def one(self, name: str) -> ReadableSpan:
        spans = self.projections() if name == PROJECT else self.named(name)
        assert len(spans) == 1, [s.name for s in self.exporter.get_finished_spans()]
        return spans[0]

    def projections(self) -> list[ReadableSpan]:
        """Projection spans that covered appends; a new thread's empty row is projected
        too, and unless an append joins it, that projection covers none."""
        return [s for s in self.named(PROJECT) if (s.attributes or {})[ATTR_COALESCED]]


@pytest.fixture
def traced() -> Iterator[Traced]:
    t = Traced()
    yield t
    t.provider.shutdown()


def key(ctx: SpanContext | None) -> tuple[int, int]:
    """``(trace_id, span_id)`` of a span context, comparable across spans."""
    assert ctx is not None
    return ctx.trace_id, ctx.span_id


def link_keys(span: ReadableSpan) -> list[tuple[int, int]]:
    return [key(link.context) for link in span.links]


def append_in_own_trace(traced: Traced, store: ThreadStore, thread_id: str, n: int) -> list[int]:
    """Append ``n`` single items, each under its own root caller span; return the trace ids."""
    traces = []
    for i in range(n):
        with traced.tracer.start_as_current_span(f"request-{i}") as request:
            store.append(thread_id, [plain(i)])
        traces.append(request.get_span_context().trace_id)
    return traces


def run_in_new_thread(fn: Callable[[], Any]) -> None:
    """Run ``fn`` in a fresh thread (a fresh contextvars context) and re-raise its error."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            errors.append(exc)

    worker = threading.Thread(target=target)
    worker.start()
    worker.join(HANG)
    assert not worker.is_alive()
    if errors:
        raise errors[0]


def test_append_span_is_a_child_of_the_caller_with_its_attributes(backend: Backend, traced: Traced) -> None:
    with backend.open_store(tracer_provider=traced.provider) as store:
        tid = store.create_thread()
        with traced.tracer.start_as_current_span("request") as request:
            generation = store.append(tid, [user_msg("hello"), plain(1)])

    append = traced.one("thread_store.append")
    assert generation == 2
    assert append.kind is SpanKind.PRODUCER
    assert key(append.parent) == key(request.get_span_context())
    assert dict(append.attributes or {}) == {
        "thread_store.thread_id": tid, "thread_store.generation": 2, "thread_store.items": 2}


def wait_projected(store: ThreadStore, thread_id: str, generation: int) -> None:
    """Wait for the background projection without a barrier (which would expedite it)."""
    deadline = time.monotonic() + HANG
    while store.status(thread_id).projected_seq < generation:
        assert time.monotonic() < deadline, store.status(thread_id)
        time.sleep(0.002)


@pytest.mark.parametrize(("caller_runs", "barrier"), [(True, True), (False, True), (False, False)],
                         ids=["caller-run", "worker-run", "background"])
def test_projection_of_a_single_append_is_its_child(backend: Backend, traced: Traced,
                                                    caller_runs: bool, barrier: bool) -> None:
    # With a barrier, a long coalescing delay makes sure the barrier expedites the thread.
    delay = 60.0 if barrier else 0.0
    with backend.open_store(tracer_provider=traced.provider, caller_runs=caller_runs,
                          coalesce_delay=delay) as store:
        tid = store.create_thread()
        generation = store.append(tid, [user_msg("hello")])
        if barrier:
            store.flush(tid, timeout=HANG)
        else:
            wait_projected(store, tid, generation)

    append = traced.one("thread_store.append")
    project = traced.one(PROJECT)
    assert project.kind is SpanKind.CONSUMER
    assert key(project.parent) == key(append.context)
    assert project.context.trace_id == append.context.trace_id
    assert project.links == ()
    attrs = dict(project.attributes or {})
    assert attrs["thread_store.thread_ids"] == (tid,)
    assert (attrs["thread_store.generation.from"], attrs["thread_store.generation.to"]) == (0, 1)
    assert attrs["thread_store.coalesced_appends"] == 1
    assert attrs["thread_store.attempt"] == 1
    assert attrs["thread_store.expedited"] is barrier
    assert attrs["thread_store.links.dropped"] == 0
    assert attrs["thread_store.outcome"] == "ok"
    assert traced.named("thread_store.visible") == []


def test_coalesced_projection_starts_a_trace_linking_every_append(backend: Backend, traced: Traced) -> None:
    with backend.open_store(tracer_provider=traced.provider) as store:
        tid = store.create_thread()
        store.pause_projection()
        caller_traces = append_in_own_trace(traced, store, tid, 3)
        store.resume_projection()
        store.flush(tid, timeout=HANG)

    appends = traced.named("thread_store.append")
    project = traced.one(PROJECT)
    assert sorted(a.context.trace_id for a in appends) == sorted(caller_traces)
    assert project.parent is None
    assert project.context.trace_id not in caller_traces
    assert link_keys(project) == [key(a.context) for a in appends]
    attrs = dict(project.attributes or {})
    assert attrs["thread_store.coalesced_appends"] == 3
    assert (attrs["thread_store.generation.from"], attrs["thread_store.generation.to"]) == (0, 3)

    # Each append's own trace shows when it became visible, pointing at the projection.
    visible = traced.named("thread_store.visible")
    assert sorted(key(v.parent) for v in visible) == sorted(key(a.context) for a in appends)
    for span in visible:
        assert span.context.trace_id == span.parent.trace_id  # type: ignore[union-attr]
        assert link_keys(span) == [key(project.context)]
        assert dict(span.attributes or {}) == {"thread_store.thread_id": tid,
                                               "thread_store.generation": 3}


def test_projection_covering_an_untraced_create_too_is_not_a_child(backend: Backend, traced: Traced) -> None:
    # create_thread(metadata=...) writes an item without a span: the projection that
    # also covers it coalesces two appends, so it links the traced one instead.
    with backend.open_store(tracer_provider=traced.provider) as store:
        store.pause_projection()
        tid = store.create_thread(metadata={"cwd": "/repo"})
        append_in_own_trace(traced, store, tid, 1)
        store.resume_projection()
        store.flush(tid, timeout=HANG)

    append = traced.one("thread_store.append")
    project = traced.one(PROJECT)
    assert project.parent is None
    assert link_keys(project) == [key(append.context)]
    assert (project.attributes or {})["thread_store.coalesced_appends"] == 2
    assert [key(v.parent) for v in traced.named("thread_store.visible")] == [key(append.context)]


def test_links_are_capped_at_128_and_the_rest_counted(backend: Backend, traced: Traced) -> None:
    with backend.open_store(tracer_provider=traced.provider) as store:
        tid = store.create_thread()
        store.pause_projection()
        for i in range(130):
            store.append(tid, [plain(i)])
        store.resume_projection()
        store.flush(tid, timeout=HANG)

    appends = sorted(traced.named("thread_store.append"),
                     key=lambda s: (s.attributes or {})["thread_store.generation"])
    project = traced.one(PROJECT)
    assert len(appends) == 130
    assert link_keys(project) == [key(a.context) for a in appends[:128]]
    attrs = dict(project.attributes or {})
    assert attrs["thread_store.links.dropped"] == 2
    assert attrs["thread_store.coalesced_appends"] == 130
    assert len(traced.named("thread_store.visible")) == 128


def test_transient_failures_are_retry_events_carrying_the_exception(backend: Backend, traced: Traced) -> None:
    failures = [TransientProjectionError("index busy #1"), TransientProjectionError("index busy #2")]

    def hook(thread_id: str, generation: int) -> None:
        if failures and generation:  # not the empty row of the new thread
            raise failures.pop(0)

    with backend.open_store(tracer_provider=traced.provider, projection_hook=hook,
                          retry=FAST_RETRY) as store:
        tid = store.create_thread()
        store.append(tid, [user_msg("hello")])
        store.flush(tid, timeout=HANG)

    append = traced.one("thread_store.append")
    attempts = sorted(traced.projections(),
                      key=lambda s: (s.attributes or {})["thread_store.attempt"])
    assert [(s.attributes or {})["thread_store.attempt"] for s in attempts] == [1, 2, 3]
    assert [(s.attributes or {})["thread_store.outcome"] for s in attempts] == ["retry", "retry", "ok"]
    for n, span in enumerate(attempts[:2], start=1):
        assert key(span.parent) == key(append.context)
        events = {e.name: dict(e.attributes or {}) for e in span.events}
        assert events["exception"]["exception.type"].endswith("TransientProjectionError")
        assert events["exception"]["exception.message"] == f"index busy #{n}"
        retry = events["thread_store.retry"]
        assert retry["exception.type"] == "TransientProjectionError"
        assert retry["exception.message"] == f"index busy #{n}"
        assert retry["thread_store.retry.backoff_s"] > 0
        assert span.status.status_code is not StatusCode.ERROR
    assert attempts[2].events == ()
    assert key(attempts[2].parent) == key(append.context)


def test_permanent_failure_sets_error_status_on_projection_and_flush(backend: Backend,
                                                                     traced: Traced) -> None:
    def hook(thread_id: str, generation: int) -> None:
        raise ValueError("rules exploded")

    # The worker stays away (long delay): had it failed first, the flush would start a
    # fresh attempt (DESIGN §1.6) and make a second span.
    with backend.open_store(tracer_provider=traced.provider, projection_hook=hook,
                          coalesce_delay=60.0) as store:
        tid = store.create_thread()
        store.append(tid, [user_msg("hello")])
        with pytest.raises(ProjectionFailed):
            store.flush(tid, timeout=HANG)

    project = traced.one(PROJECT)
    assert (project.attributes or {})["thread_store.outcome"] == "failed"
    assert project.status.status_code is StatusCode.ERROR
    assert [e.name for e in project.events] == ["exception"]
    flush = traced.one("thread_store.flush")
    assert (flush.attributes or {})["thread_store.outcome"] == "ProjectionFailed"
    assert flush.status.status_code is StatusCode.ERROR


def test_flush_span_records_its_outcome(backend: Backend, traced: Traced) -> None:
    with backend.open_store(tracer_provider=traced.provider) as store:
        tid = store.create_thread()
        generation = store.append(tid, [user_msg("hello")])
        store.flush(tid, timeout=HANG)
        store.pause_projection()
        late = store.append(tid, [plain(1)])
        with pytest.raises(FlushTimeout):
            store.flush(tid, timeout=0.05)
        store.resume_projection()

    ok, timeout = sorted(traced.named("thread_store.flush"), key=lambda s: s.start_time or 0)
    assert dict(ok.attributes or {}) == {"thread_store.thread_id": tid, "thread_store.outcome": "ok",
                                         "thread_store.generation.target": generation}
    assert ok.status.status_code is StatusCode.UNSET
    assert (timeout.attributes or {})["thread_store.outcome"] == "timeout"
    assert (timeout.attributes or {})["thread_store.generation.target"] == late
    assert timeout.status.status_code is StatusCode.ERROR
    assert [e.name for e in timeout.events] == ["exception"]


def test_worker_started_inside_a_span_leaks_no_context(backend: Backend, traced: Traced) -> None:
    # The worker starts in open(): if it kept the opener's context, projections it runs
    # would land in the opener's trace.
    with traced.tracer.start_as_current_span("opener") as opener:
        store = backend.open_store(tracer_provider=traced.provider, caller_runs=False)
    opener_trace = opener.get_span_context().trace_id
    try:
        tid = store.create_thread()

        def single() -> None:
            with traced.tracer.start_as_current_span("request"):
                store.append(tid, [user_msg("hello")])
            store.flush(tid, timeout=HANG)

        run_in_new_thread(single)
        store.pause_projection()
        run_in_new_thread(lambda: append_in_own_trace(traced, store, tid, 2))
        store.resume_projection()
        run_in_new_thread(lambda: store.flush(tid, timeout=HANG))
    finally:
        store.close()

    appends = sorted(traced.named("thread_store.append"),
                     key=lambda s: (s.attributes or {})["thread_store.generation"])
    single_run, coalesced = sorted(traced.projections(),
                                   key=lambda s: (s.attributes or {})["thread_store.generation.to"])
    assert key(single_run.parent) == key(appends[0].context)
    assert coalesced.parent is None
    assert link_keys(coalesced) == [key(a.context) for a in appends[1:]]
    store_spans = [s for s in traced.exporter.get_finished_spans() if s.name.startswith("thread_store.")]
    assert len(store_spans) >= 7  # 3 appends, 2 projections, 2 visible, flushes
    assert all(s.context.trace_id != opener_trace for s in store_spans)


def test_caller_run_projection_belongs_to_the_appends_not_the_flusher(backend: Backend,
                                                                     traced: Traced) -> None:
    runners: list[str] = []

    def hook(thread_id: str, generation: int) -> None:
        runners.append(threading.current_thread().name)

    # A long coalescing delay keeps the worker away: the flush runs the projection itself
    # (with a hook, only a barrier without a deadline may, so it cannot overrun one).
    with backend.open_store(tracer_provider=traced.provider, coalesce_delay=60.0,
                          projection_hook=hook) as store:
        single, pair = store.create_thread(), store.create_thread()
        append_in_own_trace(traced, store, single, 1)
        append_in_own_trace(traced, store, pair, 2)
        with traced.tracer.start_as_current_span("flusher") as flusher:
            store.flush(single)
            store.flush(pair)
    assert runners == [threading.current_thread().name] * 2

    flusher_trace = flusher.get_span_context().trace_id
    flush_spans = traced.named("thread_store.flush")
    assert {f.context.trace_id for f in flush_spans} == {flusher_trace}
    appends = {(s.attributes or {})["thread_store.thread_id"]: s for s in traced.named("thread_store.append")}
    pair_appends = [s for s in traced.named("thread_store.append")
                    if (s.attributes or {})["thread_store.thread_id"] == pair]
    projects = {(s.attributes or {})["thread_store.thread_id"]: s for s in traced.projections()}
    assert key(projects[single].parent) == key(appends[single].context)
    assert projects[pair].parent is None
    assert link_keys(projects[pair]) == [key(a.context) for a in pair_appends]
    for span in projects.values():
        assert span.context.trace_id != flusher_trace
        assert span.parent is None or span.parent.span_id not in {f.context.span_id for f in flush_spans}


_HYGIENE = """
import json, sys, tempfile
from thread_store import ThreadStore

with tempfile.TemporaryDirectory() as tmp, ThreadStore.open(tmp + "/store") as store:
    tid = store.create_thread()
    store.append(tid, [{"type": "response_item", "payload": {}}])
    store.flush(tid, timeout=30)
    loaded = sorted(m for m in sys.modules
                    if m.startswith("opentelemetry.sdk") or m == "thread_store.otel_setup")

    # A global provider installed after open() is picked up by the same store.
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    store.append(tid, [{"type": "response_item", "payload": {}}])
    store.flush(tid, timeout=30)
print(json.dumps({"loaded": loaded, "spans": sorted({s.name for s in exporter.get_finished_spans()})}))
"""


def test_library_needs_only_the_api_and_follows_the_global_provider() -> None:
    done = subprocess.run([sys.executable, "-c", _HYGIENE], capture_output=True, text=True,
                          timeout=HANG, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["loaded"] == []
    assert report["spans"] == ["thread_store.append", "thread_store.flush", "thread_store.project"]
