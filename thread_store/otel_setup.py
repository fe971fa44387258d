"""OpenTelemetry SDK set-up for the ``thread-store`` CLI and demos.

The library records spans through the OpenTelemetry API only and never imports this
module; applications configure their own SDK. This module is the application side for
our own commands: a global tracer provider named after the service, exporting OTLP/HTTP
(e.g. to Jaeger on port 4318) and/or OTLP/JSON Lines to a file that Jaeger's UI can load.

Standard ``OTEL_*`` variables work as usual: ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_EXPORTER_OTLP_ENDPOINT`` (a base URL; ``/v1/traces``
is appended) or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (used as is),
``OTEL_EXPORTER_OTLP_PROTOCOL`` (only ``http/protobuf``) and ``OTEL_TRACES_EXPORTER``
(``otlp``, ``console``, ``none``).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.json_format import MessageToDict  # type: ignore[import-untyped]
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.environment_variables import (
    OTEL_EXPORTER_OTLP_ENDPOINT,
    OTEL_EXPORTER_OTLP_PROTOCOL,
    OTEL_EXPORTER_OTLP_TIMEOUT,
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
    OTEL_EXPORTER_OTLP_TRACES_PROTOCOL,
    OTEL_EXPORTER_OTLP_TRACES_TIMEOUT,
)
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)

log = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME = "thread-store"
TRACES_PATH = "/v1/traces"
_OTEL_TRACES_EXPORTER = "OTEL_TRACES_EXPORTER"
_ID_FIELDS = ("traceId", "spanId", "parentSpanId")
#: Seconds one OTLP export may take, retries included, unless OTEL_EXPORTER_OTLP_*TIMEOUT
#: says otherwise: a command with no collector to talk to fails in seconds, not the SDK's 10.
EXPORT_TIMEOUT_S = 3.0


@dataclass(frozen=True, slots=True)
class TraceDelivery:
    """What the exporters did with the spans, counted when tracing shut down."""

    delivered: int
    failed: int


def configure_tracing(service_name: str = DEFAULT_SERVICE_NAME, otlp_endpoint: str | None = None,
                      trace_file: str | None = None) -> Callable[[], TraceDelivery]:
    """Install a global SDK tracer provider that exports thread_store's spans.

    :param service_name: the ``service.name`` resource attribute. ``OTEL_SERVICE_NAME``
        (or ``service.name`` in ``OTEL_RESOURCE_ATTRIBUTES``) replaces the default name; a
        name passed explicitly wins.
    :param otlp_endpoint: OTLP/HTTP base URL such as ``http://127.0.0.1:4318``; spans go
        to its ``/v1/traces``. Without it, the ``OTEL_EXPORTER_OTLP_*`` variables decide.
    :param trace_file: also write OTLP/JSON Lines here (one export request per line),
        replacing the file. Jaeger's UI loads it via "Upload JSON".
    :returns: a function that flushes pending spans, shuts the provider down and returns
        the :class:`TraceDelivery` counts (spans an exporter failed to deliver, e.g. with
        no collector listening, count as failed); call it before the process exits.
    :raises RuntimeError: a global tracer provider is already installed.
    :raises ValueError: the OTLP protocol or ``OTEL_TRACES_EXPORTER`` is not supported.

    >>> shutdown = configure_tracing(otlp_endpoint="http://127.0.0.1:4318")  # doctest: +SKIP
    >>> ...; shutdown()  # doctest: +SKIP
    """
    installed = not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    if installed:
        raise RuntimeError("a global OpenTelemetry tracer provider is already set; configure "
                           "tracing once per process, or pass tracer_provider= to ThreadStore.open")
    counters = [_DeliveryCounter(e) for e in _exporters(otlp_endpoint, trace_file)]
    provider = _provider(service_name, counters)
    trace.set_tracer_provider(provider)

    def shutdown() -> TraceDelivery:
        provider.force_flush()
        provider.shutdown()
        return TraceDelivery(delivered=sum(c.delivered for c in counters),
                             failed=sum(c.failed for c in counters))

    return shutdown


def build_tracer_provider(service_name: str = DEFAULT_SERVICE_NAME, otlp_endpoint: str | None = None,
                          trace_file: str | None = None) -> TracerProvider:
    """The provider :func:`configure_tracing` installs, without installing it.

    Pass it to ``ThreadStore.open(tracer_provider=...)`` to trace one store only.
    Parameters as in :func:`configure_tracing`; the caller shuts the provider down.
    """
    return _provider(service_name, _exporters(otlp_endpoint, trace_file))


def _provider(service_name: str, exporters: Sequence[SpanExporter]) -> TracerProvider:
    provider = TracerProvider(resource=_resource(service_name))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def otlp_traces_url(endpoint: str) -> str:
    """The traces URL of an OTLP/HTTP base endpoint, the way the SDK reads the env var.

    >>> otlp_traces_url("http://127.0.0.1:4318")
    'http://127.0.0.1:4318/v1/traces'
    """
    base = endpoint.rstrip("/")
    return base if base.endswith(TRACES_PATH) else base + TRACES_PATH


def _resource(service_name: str) -> Resource:
    detected = Resource.create()  # reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
    named_by_env = not str(detected.attributes.get(SERVICE_NAME, "")).startswith("unknown_service")
    if named_by_env and service_name == DEFAULT_SERVICE_NAME:
        return detected
    return detected.merge(Resource({SERVICE_NAME: service_name}))


def _exporters(otlp_endpoint: str | None, trace_file: str | None) -> list[SpanExporter]:
    exporters: list[SpanExporter] = []
    if otlp_endpoint:
        exporters.append(OTLPSpanExporter(endpoint=otlp_traces_url(otlp_endpoint),
                                          timeout=_export_timeout()))
    else:
        for name in _env_exporter_names():
            if name == "otlp":
                _check_protocol()
                # The SDK resolves the endpoint env vars.
                exporters.append(OTLPSpanExporter(timeout=_export_timeout()))
            elif name == "console":
                exporters.append(ConsoleSpanExporter())
            elif name != "none":
                raise ValueError(f"{_OTEL_TRACES_EXPORTER}={name!r} is not supported here; "
                                 "use otlp, console or none")
    if trace_file:
        exporters.append(OTLPJsonFileExporter(trace_file))
    return exporters


def _env_exporter_names() -> list[str]:
    names = os.environ.get(_OTEL_TRACES_EXPORTER, "").strip()
    if names:
        return [n.strip().lower() for n in names.split(",") if n.strip()]
    endpoint_set = os.environ.get(OTEL_EXPORTER_OTLP_ENDPOINT) or os.environ.get(
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)
    return ["otlp"] if endpoint_set else []


def _export_timeout() -> float | None:
    """``None`` lets the SDK read a timeout the environment sets; else ours."""
    if os.environ.get(OTEL_EXPORTER_OTLP_TRACES_TIMEOUT) or os.environ.get(OTEL_EXPORTER_OTLP_TIMEOUT):
        return None
    return EXPORT_TIMEOUT_S


def _check_protocol() -> None:
    protocol = (os.environ.get(OTEL_EXPORTER_OTLP_TRACES_PROTOCOL)
                or os.environ.get(OTEL_EXPORTER_OTLP_PROTOCOL) or "http/protobuf").strip()
    if protocol != "http/protobuf":
        raise ValueError(f"OTLP protocol {protocol!r} is not supported by thread-store; "
                         "set OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf (port 4318)")


class _DeliveryCounter(SpanExporter):
    """Passes spans to ``exporter`` and counts the delivered and the failed ones."""

    def __init__(self, exporter: SpanExporter) -> None:
        self._exporter = exporter
        self._lock = threading.Lock()
        self.delivered = 0
        self.failed = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Export through the wrapped exporter; an exception counts as a failure."""
        try:
            result = self._exporter.export(spans)
        except Exception:
            result = SpanExportResult.FAILURE
            log.exception("thread_store: a span exporter failed")
        with self._lock:
            if result is SpanExportResult.SUCCESS:
                self.delivered += len(spans)
            else:
                self.failed += len(spans)
        return result

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Flush the wrapped exporter."""
        return self._exporter.force_flush(timeout_millis)

    def shutdown(self) -> None:
        """Shut the wrapped exporter down."""
        self._exporter.shutdown()


class OTLPJsonFileExporter(SpanExporter):
    """Write each export batch as one OTLP/JSON ``ExportTraceServiceRequest`` line.

    The encoding is OTLP/JSON as Jaeger's UI and the OTel file exporter read it:
    camelCase fields, enums as integers, and trace/span ids as lowercase hex.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Open (and truncate) ``path``."""
        self._lock = threading.Lock()
        self._file = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in shutdown()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Append one line holding ``spans``."""
        line = json.dumps(otlp_json(spans), separators=(",", ":"))
        with self._lock:
            if self._file.closed:
                return SpanExportResult.FAILURE
            try:
                self._file.write(line + "\n")
                self._file.flush()
            except OSError as exc:
                log.warning("thread_store: cannot write the trace file: %s", exc)
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Lines are flushed as they are written."""
        return True

    def shutdown(self) -> None:
        """Close the file; later exports fail."""
        with self._lock:
            self._file.close()


def otlp_json(spans: Sequence[ReadableSpan]) -> dict[str, Any]:
    """``spans`` as one ``ExportTraceServiceRequest`` in OTLP/JSON (ids in hex)."""
    request: dict[str, Any] = MessageToDict(encode_spans(spans), use_integers_for_enums=True)
    for resource_spans in request.get("resourceSpans", []):
        for scope_spans in resource_spans.get("scopeSpans", []):
            for span in scope_spans.get("spans", []):
                _hex_ids(span)
                for link in span.get("links", []):
                    _hex_ids(link)
    return request


def _hex_ids(message: dict[str, Any]) -> None:
    # Proto JSON renders bytes as base64; OTLP/JSON wants ids as hex (OTLP spec).
    for key in _ID_FIELDS:
        if key in message:
            message[key] = base64.b64decode(message[key]).hex()
