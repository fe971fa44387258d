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

import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode

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


def _real_tracer(tracer: trace.Tracer) -> trace.Tracer:
    # ProxyTracer resolves to the global provider's tracer once one is set.
    resolved = getattr(tracer, "_tracer", tracer) if isinstance(tracer, trace.ProxyTracer) else tracer
    return resolved


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
        self._meter = meter

    def observe(self, read: Callable[[], dict[str, float]]) -> None:
        """Register gauges read from ``read()``: pending, oldest age, waiters, heartbeat."""
        def gauge(key: str) -> Callable[[metrics.CallbackOptions], list[metrics.Observation]]:
            return lambda _options: [metrics.Observation(read().get(key, 0.0))]

        for key, unit, text in (
            ("pending_threads", "{thread}", "Threads whose projection is behind their history"),
            ("oldest_pending_age", "s", "Age of the oldest unprojected append"),
            ("waiters", "{waiter}", "Barriers currently waiting"),
            ("heartbeat_age", "s", "Seconds since the projector worker last woke up"),
        ):
            self._meter.create_observable_gauge(
                f"thread_store.projector.{key}", callbacks=[gauge(key)], unit=unit, description=text)

    def tracing(self) -> bool:
        """True when spans would be recorded: an SDK (or other real tracer) is configured."""
        resolved = self._resolved
        if resolved is None:
            real = _real_tracer(self.tracer)
            if isinstance(real, trace.NoOpTracer):
                return False
            self._resolved = resolved = real
        return True

    @contextmanager
    def append_span(self, thread_id: str, items: int) -> Iterator[trace.Span]:
        """The span around one append; a child of the caller's current context."""
        with self.tracer.start_as_current_span(SPAN_APPEND, kind=SpanKind.PRODUCER) as span:
            if span.is_recording():
                span.set_attribute(ATTR_THREAD_ID, thread_id)
                span.set_attribute(ATTR_ITEMS, items)
            yield span

    def start_projection(self, thread_id: str, contexts: Sequence[SpanContext], dropped: int,
                         coalesced: int, gen_from: int, gen_to: int, attempt: int,
                         expedited: bool, batch_threads: int) -> trace.Span:
        """Start the span of one thread's projection attempt.

        One captured append: a child of it. Several: a new trace linking each of them.
        """
        if len(contexts) == 1 and coalesced == 1:
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
        return span

    def end_projection(self, span: trace.Span, contexts: Sequence[SpanContext], *,
                       outcome: str, error: BaseException | None = None,
                       backoff: float | None = None) -> None:
        """End a projection span with its outcome; mark coalesced appends visible."""
        if span.is_recording():
            span.set_attribute(ATTR_OUTCOME, outcome)
            if error is not None and outcome == "retry":
                span.record_exception(error)
                span.add_event(EVENT_RETRY, {ATTR_BACKOFF: backoff or 0.0,
                                             "exception.type": type(error).__name__,
                                             "exception.message": str(error)})
            elif error is not None:
                span.record_exception(error)
                span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        span.end()
        if outcome == "ok" and len(contexts) > 1:
            # Jaeger shows links only on the linking span: give each append's own trace
            # a short span that says when it became visible and points at the projection.
            link = [Link(span.get_span_context())]
            now = time.time_ns()
            for ctx in contexts:
                parent = trace.set_span_in_context(NonRecordingSpan(ctx), otel_context.Context())
                self.tracer.start_span(SPAN_VISIBLE, context=parent, links=link,
                                       start_time=now).end(end_time=now)

    @contextmanager
    def flush_span(self, thread_id: str) -> Iterator[dict[str, Any]]:
        """The span of one barrier wait; callers set ``info['outcome']`` and ``info['target']``."""
        info: dict[str, Any] = {"outcome": "error"}
        start = time.monotonic()
        if not self.tracing():
            try:
                yield info
            finally:
                self.flush_latency.record(time.monotonic() - start, {ATTR_OUTCOME: info["outcome"]})
            return
        with self.tracer.start_as_current_span(SPAN_FLUSH, record_exception=True) as span:
            try:
                yield info
            finally:
                if span.is_recording():
                    span.set_attribute(ATTR_THREAD_ID, thread_id)
                    span.set_attribute(ATTR_OUTCOME, info["outcome"])
                    if "target" in info:
                        span.set_attribute(ATTR_TARGET, info["target"])
                self.flush_latency.record(time.monotonic() - start, {ATTR_OUTCOME: info["outcome"]})


def capture(span: trace.Span) -> SpanContext | None:
    """The span context worth linking to, or ``None`` when it is not sampled or invalid."""
    ctx = span.get_span_context()
    return ctx if ctx.is_valid else None
