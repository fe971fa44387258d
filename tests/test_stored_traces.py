"""DESIGN §1.9 and §1.11: the trace context travels with the stored items.

An append stores its W3C ``traceparent`` with its last item (``HistoryLog.append(trace=)``,
tested on every backend in ``test_ports.py``). A projection that folds items it did not
buffer itself (another process's appends, a barrier's takeover, a catch-up) reads the
stored contexts back: it is a child of a single append, or links to several, whichever
process appended them. The cross-process tests run real writer processes
(``_writer_child.py``) that export over OTLP/HTTP to a local receiver, as the test
process does.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing

import psycopg
import pytest
from conftest import Backend, Spawn, plain, user_msg, wait_for
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, TraceFlags
from otlp_receiver import OTLPReceiver, ReceivedSpan

from thread_store import ThreadStore
from thread_store.otel_setup import build_tracer_provider
from thread_store.tracing import MAX_LINKS, merge_links, parse_traceparent, traceparent

#: A ``catch_up_after`` that never comes within a test: only barriers do this store's work.
NEVER = 600.0
#: A ``catch_up_after`` short enough to wait for.
SOON = 0.5
#: Timeouts of barriers and waits: they only catch hangs, never measure speed.
HANG = 30.0

APPEND = "thread_store.append"
PROJECT = "thread_store.project"
VISIBLE = "thread_store.visible"
THREAD = "thread_store.thread_id"
COALESCED = "thread_store.coalesced_appends"


# -- the pure parts ----------------------------------------------------------------------------


def ctx(n: int) -> SpanContext:
    return SpanContext(n, n, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))


def test_a_traceparent_round_trips_and_anything_else_links_nothing() -> None:
    context = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, is_remote=False,
                          trace_flags=TraceFlags(TraceFlags.SAMPLED))
    text = traceparent(context)
    assert text == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    back = parse_traceparent(text)
    assert back is not None and back.is_remote
    assert (back.trace_id, back.span_id, back.trace_flags) == (context.trace_id, context.span_id, 1)
    for foreign in ("", "garbage", text.upper(), text + "-", "01" + text[2:], text[:-1],
                    f"00-{0:032x}-{1:016x}-01", f"00-{1:032x}-{0:016x}-01"):  # zero ids are invalid
        assert parse_traceparent(foreign) is None, foreign


def test_stored_and_local_contexts_merge_without_duplicates_in_seq_order() -> None:
    links = merge_links([ctx(1), ctx(3)], 0, 2, [traceparent(ctx(2)), traceparent(ctx(3))], 0)
    assert [c.span_id for c in links.contexts] == [2, 3, 1]
    assert (links.dropped, links.appends) == (0, 3)
    # Another process's single append, and nothing here: a child of it.
    links = merge_links([], 0, 0, [traceparent(ctx(7)), "not a traceparent"], 0)
    assert [c.span_id for c in links.contexts] == [7] and (links.dropped, links.appends) == (0, 1)
    # Untraced appends counted here stay counted.
    assert merge_links([], 0, 4, [traceparent(ctx(7))], 0).appends == 4


def test_merged_links_are_capped_and_the_rest_counted_once() -> None:
    everything = [ctx(n) for n in range(1, 201)]
    stored = [traceparent(c) for c in everything[:MAX_LINKS]]
    # 200 appends of this process, stored too: the store's count and the local one agree.
    links = merge_links(everything[:MAX_LINKS], 200 - MAX_LINKS, 200, stored, 200 - MAX_LINKS)
    assert [c.span_id for c in links.contexts] == list(range(1, MAX_LINKS + 1))
    assert (links.dropped, links.appends) == (200 - MAX_LINKS, 200)
    # 150 appends elsewhere, 50 here (the newest): the store counts them all.
    links = merge_links(everything[150:], 0, 50, stored, 200 - MAX_LINKS)
    assert len(links.contexts) == MAX_LINKS and (links.dropped, links.appends) == (200 - MAX_LINKS, 200)


# -- two stores in one process: the store is the only channel ----------------------------------


class Traced:
    """An SDK tracer provider whose finished spans are kept in memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def named(self, name: str, thread_id: str) -> list[ReadableSpan]:
        """Spans of ``name`` about ``thread_id``; projections only if they covered appends."""
        return [s for s in self.exporter.get_finished_spans() if s.name == name
                and (s.attributes or {}).get(THREAD) == thread_id
                and (name != PROJECT or (s.attributes or {})[COALESCED])]


@pytest.fixture
def two_traced() -> Iterator[tuple[Traced, Traced]]:
    pair = Traced(), Traced()
    yield pair
    for t in pair:
        t.provider.shutdown()


def key(context: SpanContext | None) -> tuple[int, int]:
    assert context is not None
    return context.trace_id, context.span_id


def test_a_projection_by_another_store_joins_the_appends_traces(
        shared_backend: Backend, two_traced: tuple[Traced, Traced]) -> None:
    """Stores A and B share nothing but the store: B's projection finds A's appends'
    contexts there (only those it makes visible), merged with its own append's."""
    traced_a, traced_b = two_traced
    a = shared_backend.open_store(tracer_provider=traced_a.provider)
    b = shared_backend.open_store(tracer_provider=traced_b.provider, catch_up_after=NEVER)
    single, several = a.create_thread(), a.create_thread()
    a.append_and_flush(several, [user_msg("projected by A")], timeout=HANG)
    a.pause_projection()
    a.append(single, [user_msg("one append in A")])
    a.append(several, [plain(1)])
    a.append(several, [plain(2), plain(3)])
    b.append(several, [plain(4)])
    assert b.flush(single, timeout=HANG).title == "one append in A"
    assert b.flush(several, timeout=HANG).projected_seq == 5

    (a_single,) = traced_a.named(APPEND, single)
    (project,) = traced_b.named(PROJECT, single)
    assert key(project.parent) == key(a_single.context)
    assert project.links == () and (project.attributes or {})[COALESCED] == 1

    projected_by_a, *appends = traced_a.named(APPEND, several) + traced_b.named(APPEND, several)
    (project,) = traced_b.named(PROJECT, several)
    assert (project.attributes or {})["thread_store.generation.to"] == 5
    assert project.parent is None
    # A's first append was projected before: B's projection links only what it made visible.
    assert [key(link.context) for link in project.links] == [key(s.context) for s in appends]
    assert key(projected_by_a.context) not in [key(link.context) for link in project.links]
    assert (project.attributes or {})[COALESCED] == 3
    # Each append's own trace (A's too) shows the projection that made it visible.
    visible = traced_b.named(VISIBLE, several)
    assert sorted(key(v.parent) for v in visible) == sorted(key(s.context) for s in appends)


def _sqlite_trace_column(backend: Backend, thread_id: str) -> list[tuple[int, str | None]]:
    assert backend.path is not None
    with closing(sqlite3.connect(backend.path / "history.db")) as conn:
        return conn.execute("SELECT seq, trace FROM items WHERE thread_id = ? ORDER BY seq",
                            (thread_id,)).fetchall()


def _postgres_trace_column(backend: Backend, thread_id: str) -> list[tuple[int, str | None]]:
    schema = backend.place.options["schema"]
    with psycopg.connect(str(backend.target)) as conn:
        return conn.execute(f"SELECT seq, trace FROM {schema}.items WHERE thread_id = %s "
                            "ORDER BY seq", (thread_id,)).fetchall()


#: ``[(seq, trace), ...]`` of a thread as the backend's table holds them.
_TRACE_COLUMN: dict[str, Callable[[Backend, str], list[tuple[int, str | None]]]] = {
    "sqlite": _sqlite_trace_column, "postgres": _postgres_trace_column}


def test_an_untraced_store_stores_no_trace_context(shared_backend: Backend) -> None:
    traced = Traced()
    with shared_backend.open_store() as untraced:
        tid = untraced.create_thread()
        untraced.append(tid, [user_msg("untraced"), plain(1)])
        untraced.append(tid, [plain(2)])
    with shared_backend.open_store(tracer_provider=traced.provider) as store:
        store.append(tid, [plain(3), plain(4)])
    traced.provider.shutdown()
    (append,) = traced.named(APPEND, tid)
    assert _TRACE_COLUMN[shared_backend.name](shared_backend, tid) == [
        (1, None), (2, None), (3, None), (4, None), (5, traceparent(append.context))]


# -- migration of stores written before the trace column ---------------------------------------


def _drop_sqlite_trace_column(backend: Backend) -> None:
    assert backend.path is not None
    with closing(sqlite3.connect(backend.path / "history.db")) as conn, conn:
        conn.execute("ALTER TABLE items DROP COLUMN trace")
        conn.execute("PRAGMA user_version = 4")


def _drop_postgres_trace_column(backend: Backend) -> None:
    schema = backend.place.options["schema"]
    with psycopg.connect(str(backend.target), autocommit=True) as conn, conn.transaction():
        conn.execute(f"ALTER TABLE {schema}.items DROP COLUMN trace")
        conn.execute(f"UPDATE {schema}.store_meta SET value = '2' WHERE key = 'version'")


#: Take the test's store back to the schema before the trace column (SQLite history
#: version 4, PostgreSQL version 2).
_DOWNGRADE: dict[str, Callable[[Backend], None]] = {"sqlite": _drop_sqlite_trace_column,
                                                    "postgres": _drop_postgres_trace_column}


def test_a_store_from_before_the_trace_column_is_migrated(shared_backend: Backend) -> None:
    with shared_backend.open_store() as old:
        tid = old.create_thread()
        old.append_and_flush(tid, [user_msg("before the migration")], timeout=HANG)
        old.append(tid, [plain(1)])  # left behind: projected after the migration
    _DOWNGRADE[shared_backend.name](shared_backend)

    traced = Traced()
    with shared_backend.open_store(tracer_provider=traced.provider) as store:
        store.append(tid, [plain(2)])
        meta = store.flush(tid, timeout=HANG)
        assert (meta.title, meta.projected_seq, meta.item_count) == ("before the migration", 3, 3)
        assert [s.seq for s in store.read_history(tid)] == [1, 2, 3]
        versions = store.report().schema_version
    traced.provider.shutdown()
    assert versions.get("history", versions.get("postgres")) == {"sqlite": 5, "postgres": 3}[
        shared_backend.name]
    (append,) = traced.named(APPEND, tid)
    assert _TRACE_COLUMN[shared_backend.name](shared_backend, tid) == [
        (1, None), (2, None), (3, traceparent(append.context))]


# -- real processes, real OTLP export ----------------------------------------------------------


@pytest.fixture
def receiver(no_otel_env: None) -> Iterator[OTLPReceiver]:
    with OTLPReceiver() as r:
        yield r


def _exported(spans: list[ReceivedSpan], service: str, name: str, thread_id: str) -> list[ReceivedSpan]:
    """The spans ``service`` exported of ``name`` about ``thread_id``, in generation order
    (projections only if they covered appends)."""
    found = [s for s in spans if s.resource.get("service.name") == service and s.name == name
             and s.attributes.get(THREAD) == thread_id
             and (name != PROJECT or s.attributes[COALESCED])]
    return sorted(found, key=lambda s: s.attributes.get("thread_store.generation", 0))


def _traced_store(backend: Backend, receiver: OTLPReceiver,
                  **options: object) -> tuple[ThreadStore, Callable[[], list[ReceivedSpan]]]:
    """Open the test's store here as ``process-b``, exporting to ``receiver``; the
    returned function closes it and returns every span received."""
    provider = build_tracer_provider("process-b", otlp_endpoint=receiver.endpoint)
    try:
        store = backend.open_store(tracer_provider=provider, **options)
    except BaseException:
        provider.shutdown()
        raise

    def finish() -> list[ReceivedSpan]:
        store.close()
        provider.shutdown()  # exports what is left
        return receiver.spans()

    return store, finish


def test_a_flush_in_b_joins_the_trace_of_appends_a_left_paused(
        shared_backend: Backend, spawn: Spawn, receiver: OTLPReceiver) -> None:
    b, finish = _traced_store(shared_backend, receiver, catch_up_after=NEVER)
    a = spawn(otlp_endpoint=receiver.endpoint, service="process-a")
    a.call("pause")  # so B must take the work over
    single, several = a.call("create"), a.call("create")
    assert a.call("append", thread_id=single, items=[user_msg("one append in A")]) == 1
    assert a.call("append", thread_id=several, items=[plain(1)]) == 1
    assert a.call("append", thread_id=several, items=[plain(2), plain(3)]) == 3
    assert a.call("export_spans") is True
    assert b.flush(single, timeout=HANG).title == "one append in A"
    assert b.flush(several, timeout=HANG).projected_seq == 3
    a.exit()
    spans = finish()
    assert receiver.rejected == []

    (appended,) = _exported(spans, "process-a", APPEND, single)
    (project,) = _exported(spans, "process-b", PROJECT, single)
    assert project.parent == appended.key  # same trace id, A's append span as parent
    appends = _exported(spans, "process-a", APPEND, several)
    (project,) = _exported(spans, "process-b", PROJECT, several)
    assert project.parent is None
    assert project.links == [s.key for s in appends] and len(appends) == 2
    visible = _exported(spans, "process-b", VISIBLE, several)
    assert sorted(v.parent for v in visible) == sorted(s.key for s in appends)  # type: ignore[type-var]


def test_catch_up_in_b_joins_the_trace_of_a_killed_process_append(
        shared_backend: Backend, spawn: Spawn, receiver: OTLPReceiver) -> None:
    b, finish = _traced_store(shared_backend, receiver, catch_up_after=SOON)  # open before A appends
    a = spawn(otlp_endpoint=receiver.endpoint, service="process-a")
    a.call("pause")
    tid = a.call("create")
    assert a.call("append", thread_id=tid, items=[user_msg("orphaned"), plain()]) == 2
    assert a.call("export_spans") is True
    a.kill()
    wait_for(lambda: b.status(tid).projected_seq == 2, "B's catch-up", timeout=HANG)
    spans = finish()

    (appended,) = _exported(spans, "process-a", APPEND, tid)
    (project,) = _exported(spans, "process-b", PROJECT, tid)
    assert project.parent == appended.key
    assert project.attributes[COALESCED] == 1
