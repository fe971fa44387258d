"""OpenTelemetry for thread_store: span names, attribute keys, context capture, metrics.

The library uses the OpenTelemetry API only. Tracers and meters come from the providers
given to ``open`` or else the global ones. When no SDK is configured, the append path
skips span creation behind one cheap check (:meth:`Telemetry.tracing`), because a no-op
``start_as_current_span`` costs about as much as the append itself.

Projection spans never use the current context of the thread that runs them: their
parent is the appending span's context (one append) or nothing, with links to every
coalesced append (DESIGN §1.9), so no request's context can leak into another's work.
"""

from __future__ import annotations

import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace import (Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode,
                                 TraceFlags)

from .errors import describe

_package = "thread_store"

SPAN_APPEND = "thread_store.append"
SPAN_PROJECT = "thread_store.project"
SPAN_VISIBLE = "thread_store.visible"
SPAN_FLUSH = "thread_store.flush"
EVENT_RETRY = "thread_store.retry"

ATTR_THREAD_ID = "thread_store.thread_id"
ATTR_THREAD_IDS = "thread_store.thread_ids"
ATTR_GENERATION = "thread_store.generation"
ATTR_ITEMS = "thread_store.items"
ATTR_GEN_FROM = "thread_store.generation.from"
ATTR_GEN_TO = "thread_store.generation.to"
ATTR_COALESCED = "thread_store.coalesced_appends"
ATTR_ATTEMPT = "thread_store.attempt"
ATTR_EXPEDITED = "thread_store.expedited"
ATTR_LINKS_DROPPED = "thread_store.links.dropped"
ATTR_BATCH_THREADS = "thread_store.batch.threads"
ATTR_OUTCOME = "thread_store.outcome"
ATTR_TARGET = "thread_store.generation.target"
ATTR_BACKOFF = "thread_store.retry.backoff_s"

#: OTel's default span link limit; also the cap of captured contexts per thread.
MAX_LINKS = 128
_VERSION = "0.1.0"

Readings = Callable[[], dict[str, float]]

# (name suffix, unit, description, how readings of several live stores combine)
_GAUGES: tuple[tuple[str, str, str, Callable[[Iterable[float]], float]], ...] = (
    ("pending_threads", "{thread}", "Threads whose projection is behind their history", sum),
    ("oldest_pending_age", "s", "Age of the oldest unprojected append", max),
    ("waiters", "{waiter}", "Barriers currently waiting", sum),
    ("heartbeat_age", "s", "Seconds since the projector worker last woke up", max),
)


class _GaugeSet:
    """The projector gauges of one meter provider, read from every live store using it.

    A meter keeps the first instrument registered under a name and ignores the callbacks
    of later registrations, so per-store gauges would leave a second store unobserved and
    keep a closed one alive. The gauges are registered once; stores are held weakly.
    """

    def __init__(self, meter: metrics.Meter) -> None:
        self._lock = threading.Lock()
        self._sources: list[weakref.WeakMethod[Readings]] = []
        for key, unit, text, combine in _GAUGES:
            meter.create_observable_gauge(f"thread_store.projector.{key}",
                                          callbacks=[self._callback(key, combine)],
                                          unit=unit, description=text)

    def add(self, read: Readings) -> None:
        with self._lock:
            self._sources.append(weakref.WeakMethod(read))

    def _readings(self) -> list[dict[str, float]]:
        with self._lock:
            pairs = [(ref, ref()) for ref in self._sources]
            self._sources = [ref for ref, read in pairs if read is not None]
        live = [read for _, read in pairs if read is not None]
        # A stopped store reads as {}: it has nothing left to report.
        return [r for r in (read() for read in live) if r]

    def _callback(self, key: str, combine: Callable[[Iterable[float]], float]
                  ) -> Callable[[metrics.CallbackOptions], list[metrics.Observation]]:
        def observe(_options: metrics.CallbackOptions) -> list[metrics.Observation]:
            readings = self._readings()
            return [metrics.Observation(combine(r[key] for r in readings))] if readings else []
        return observe


class _GlobalProviders:
    """Key of the gauges registered through the global (possibly not yet set) provider."""


_GLOBAL = _GlobalProviders()
_gauge_sets: weakref.WeakKeyDictionary[object, _GaugeSet] = weakref.WeakKeyDictionary()
_gauge_sets_lock = threading.Lock()


def _real_tracer(tracer: trace.Tracer) -> trace.Tracer:
    # ProxyTracer resolves to the global provider's tracer once one is set.
    resolved = getattr(tracer, "_tracer", tracer) if isinstance(tracer, trace.ProxyTracer) else tracer
    return resolved


@dataclass(slots=True)
class Projection:
    """One started projection span and what it covers (see :meth:`Telemetry.start_projection`)."""

    span: trace.Span
    contexts: Sequence[SpanContext]
    child: bool
    thread_id: str
    generation: int


class Telemetry:
    """The tracer, meter and instruments of one store."""

    def __init__(self, tracer_provider: trace.TracerProvider | None,
                 meter_provider: metrics.MeterProvider | None) -> None:
        self.tracer = trace.get_tracer(_package, _VERSION, tracer_provider=tracer_provider)
        meter = metrics.get_meter(_package, _VERSION, meter_provider=meter_provider)
        self._resolved: trace.Tracer | None = None
        self.transactions = meter.create_counter(
            "thread_store.projection.transactions", unit="{transaction}",
            description="Index transactions committed by the projector (group commits)")
        self.retries = meter.create_counter(
            "thread_store.projection.retries", unit="{attempt}",
            description="Projection attempts that failed transiently and were retried")
        self.failures = meter.create_counter(
            "thread_store.projection.failures", unit="{attempt}",
            description="Projection attempts that failed for good")
        self.lag = meter.create_histogram(
            "thread_store.projection.lag", unit="s",
            description="Time from the oldest covered append to its projection commit")
        self.flush_latency = meter.create_histogram(
            "thread_store.flush.duration", unit="s", description="Barrier wait by outcome")
        key = _GLOBAL if meter_provider is None else meter_provider
        with _gauge_sets_lock:
            gauges = _gauge_sets.get(key)
            if gauges is None:
                gauges = _gauge_sets[key] = _GaugeSet(meter)
        self._gauges = gauges

    def observe(self, read: Readings) -> None:
        """Report ``read()`` through the gauges: pending, oldest age, waiters, heartbeat age.

        :param read: a bound method, held weakly; it returns ``{}`` once its store stopped.
            Stores sharing a meter provider are combined (counts summed, ages maximised).
        """
        self._gauges.add(read)

    def tracing(self) -> bool:
        """True when spans would be recorded: an SDK (or other real tracer) is configured."""
        resolved = self._resolved
        if resolved is None:
            real = _real_tracer(self.tracer)
            if isinstance(real, trace.NoOpTracer):
                return False
            self._resolved = resolved = real
        return True

    def append_span(self, thread_id: str, items: int) -> AbstractContextManager[trace.Span]:
        """The span around one append (use it in ``with``); a child of the current context."""
        # The SDK's own context manager, unwrapped, with the attributes given at start:
        # this is the whole tracing cost on the append path, once tracing() is True.
        return self.tracer.start_as_current_span(SPAN_APPEND, kind=SpanKind.PRODUCER, attributes={
            ATTR_THREAD_ID: thread_id, ATTR_ITEMS: items})

    def start_projection(self, thread_id: str, contexts: Sequence[SpanContext], dropped: int,
                         coalesced: int, gen_from: int, gen_to: int, attempt: int,
                         expedited: bool, batch_threads: int) -> Projection:
        """Start the span of one thread's projection attempt.

        One captured append: a child of it. Several: a new trace linking each of them.
        Either way the parent is explicit, never the running thread's current context.
        """
        child = len(contexts) == 1 and coalesced == 1 and not dropped
        if child:
            parent = trace.set_span_in_context(NonRecordingSpan(contexts[0]), otel_context.Context())
            links: list[Link] = []
        else:
            parent = otel_context.Context()
            links = [Link(c) for c in contexts]
        span = self.tracer.start_span(SPAN_PROJECT, context=parent, links=links,
                                      kind=SpanKind.CONSUMER)
        if span.is_recording():
            span.set_attributes({
                ATTR_THREAD_ID: thread_id, ATTR_THREAD_IDS: [thread_id], ATTR_GEN_FROM: gen_from,
                ATTR_GEN_TO: gen_to, ATTR_COALESCED: coalesced, ATTR_ATTEMPT: attempt,
                ATTR_EXPEDITED: expedited, ATTR_LINKS_DROPPED: dropped,
                ATTR_BATCH_THREADS: batch_threads,
            })
        return Projection(span, contexts, child, thread_id, gen_to)

    def end_projection(self, projection: Projection, *, outcome: str,
                       error: BaseException | None = None, backoff: float | None = None) -> None:
        """End a projection span with its outcome; mark linked appends visible."""
        span = projection.span
        try:
            if span.is_recording():
                span.set_attribute(ATTR_OUTCOME, outcome)
                if error is not None:
                    # The error may come from a hook and be hostile (its __str__ raising):
                    # format it once, safely, and never let recording skip span.end().
                    text = describe(error)
                    kind, _, message = text.partition(": ")
                    try:
                        span.record_exception(error)
                    except Exception:  # noqa: BLE001 - the SDK formats it with str()
                        span.add_event("exception", {"exception.type": kind,
                                                     "exception.message": message})
                    if outcome == "retry":
                        span.add_event(EVENT_RETRY, {ATTR_BACKOFF: backoff or 0.0,
                                                     "exception.type": kind,
                                                     "exception.message": message})
                    else:
                        span.set_status(Status(StatusCode.ERROR, text))
        finally:
            span.end()
        if outcome == "ok" and not projection.child:
            self._mark_visible(projection)

    def _mark_visible(self, projection: Projection) -> None:
        # Jaeger shows links only on the linking span: give each append's own trace a
        # short span that says when it became visible and points at the projection.
        link = [Link(projection.span.get_span_context())]
        attributes: dict[str, str | int] = {ATTR_THREAD_ID: projection.thread_id,
                                             ATTR_GENERATION: projection.generation}
        now = time.time_ns()
        for ctx in projection.contexts:
            parent = trace.set_span_in_context(NonRecordingSpan(ctx), otel_context.Context())
            self.tracer.start_span(SPAN_VISIBLE, context=parent, links=link, attributes=attributes,
                                   start_time=now).end(end_time=now)

    @contextmanager
    def flush_span(self, thread_id: str) -> Iterator[dict[str, Any]]:
        """The span of one barrier wait; callers set ``info['outcome']`` and ``info['target']``.

        An exception that leaves the block without an outcome names it by its type.
        """
        info: dict[str, Any] = {"outcome": "error"}
        start = time.monotonic()
        tracing = self.tracing()
        scope = (self.tracer.start_as_current_span(SPAN_FLUSH, record_exception=True) if tracing
                 else nullcontext(trace.INVALID_SPAN))
        try:
            with scope as span:
                try:
                    yield info
                except BaseException as exc:
                    if info["outcome"] == "error":
                        info["outcome"] = type(exc).__name__
                    raise
                finally:
                    if span.is_recording():
                        span.set_attribute(ATTR_THREAD_ID, thread_id)
                        span.set_attribute(ATTR_OUTCOME, info["outcome"])
                        if "target" in info:
                            span.set_attribute(ATTR_TARGET, info["target"])
        finally:
            self.flush_latency.record(time.monotonic() - start, {ATTR_OUTCOME: info["outcome"]})


def capture(span: trace.Span) -> SpanContext | None:
    """The span context to parent or link projections to, or ``None`` when it is invalid."""
    ctx = span.get_span_context()
    return ctx if ctx.is_valid else None


_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def traceparent(ctx: SpanContext) -> str:
    """The W3C ``traceparent`` of a valid span context (version 00), as stored with items."""
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"


def parse_traceparent(text: str) -> SpanContext | None:
    """The remote span context of a stored ``traceparent``; ``None`` if it is not one
    (a foreign or damaged value links nothing rather than failing a projection)."""
    found = _TRACEPARENT.fullmatch(text)
    if found is None:
        return None
    ctx = SpanContext(int(found[1], 16), int(found[2], 16), is_remote=True,
                      trace_flags=TraceFlags(int(found[3], 16)))
    return ctx if ctx.is_valid else None


@dataclass(frozen=True, slots=True)
class Links:
    """What a projection span points at: the appends' contexts and how many were left out."""

    contexts: tuple[SpanContext, ...]
    dropped: int
    #: Appends covered, at least: those counted here and those traced.
    appends: int


def merge_links(local: Sequence[SpanContext], local_dropped: int, appends: int,
                stored: Sequence[str], stored_dropped: int) -> Links:
    """The contexts of a projection that folds stored items: the ``stored`` traceparents
    (every traced append in its range, whichever process made it) merged with this
    process's ``local`` ones, without duplicates, capped at :data:`MAX_LINKS`.

    :param appends: the appends this process counted in the range (untraced ones too).
    :param stored_dropped: traced appends in the range that the stored read left out.
    """
    found = [c for c in (parse_traceparent(t) for t in stored) if c is not None]
    seen: dict[tuple[int, int], SpanContext] = {}
    for ctx in [*found, *local]:
        seen.setdefault((ctx.trace_id, ctx.span_id), ctx)
    merged = list(seen.values())
    # Local appends stored their context too: the stored count already holds them.
    traced = max(len(found) + stored_dropped, len(merged) + local_dropped)
    kept = tuple(merged[:MAX_LINKS])
    return Links(kept, traced - len(kept), max(appends, traced))
