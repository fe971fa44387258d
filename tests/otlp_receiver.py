"""A small OTLP/HTTP trace receiver for tests: ``POST /v1/traces`` (protobuf) on 127.0.0.1.

It decodes each ``ExportTraceServiceRequest`` with opentelemetry-proto, keeps it, and
answers the way a collector does, so the real OTLP exporter of a subprocess can be
checked end to end::

    with OTLPReceiver() as receiver:
        run(env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, ...})
        spans = receiver.spans()
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

TRACES_PATH = "/v1/traces"
_PROTOBUF = "application/x-protobuf"


def any_value(value: AnyValue) -> Any:
    """The Python value of an OTLP ``AnyValue`` (arrays become tuples)."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return tuple(any_value(v) for v in value.array_value.values)
    return None if kind is None else getattr(value, kind)


def attributes(pairs: list[KeyValue] | Any) -> dict[str, Any]:
    """OTLP ``KeyValue`` pairs as a dict."""
    return {kv.key: any_value(kv.value) for kv in pairs}


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as received, with its resource attributes and ids in hex."""

    resource: dict[str, Any]
    span: Span

    @property
    def name(self) -> str:
        return self.span.name

    @property
    def key(self) -> tuple[str, str]:
        """``(trace_id, span_id)`` in hex."""
        return self.span.trace_id.hex(), self.span.span_id.hex()

    @property
    def parent(self) -> tuple[str, str] | None:
        """``(trace_id, parent_span_id)`` in hex, or ``None`` for a root span."""
        return (self.span.trace_id.hex(), self.span.parent_span_id.hex()) if self.span.parent_span_id else None

    @property
    def links(self) -> list[tuple[str, str]]:
        return [(link.trace_id.hex(), link.span_id.hex()) for link in self.span.links]

    @property
    def attributes(self) -> dict[str, Any]:
        return attributes(self.span.attributes)


class OTLPReceiver:
    """An OTLP/HTTP receiver on a free port of 127.0.0.1; use it as a context manager.

    With ``fail_with`` (an HTTP status) it answers every export with that error instead.
    """

    def __init__(self, fail_with: int | None = None) -> None:
        self.fail_with = fail_with
        self._cond = threading.Condition()
        self._requests: list[ExportTraceServiceRequest] = []
        self.rejected: list[str] = []
        receiver = self

        class Handler(_Handler):
            owner = receiver

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-receiver",
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def endpoint(self) -> str:
        """The base URL to give an exporter, e.g. ``http://127.0.0.1:40123``."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)

    def requests(self) -> list[ExportTraceServiceRequest]:
        """Every request received so far."""
        with self._cond:
            return list(self._requests)

    def spans(self) -> list[ReceivedSpan]:
        """Every span received so far, flattened."""
        return [ReceivedSpan(attributes(rs.resource.attributes), span)
                for request in self.requests() for rs in request.resource_spans
                for ss in rs.scope_spans for span in ss.spans]

    def wait_for(self, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float) -> list[ReceivedSpan]:
        """Wait until ``predicate(spans())`` holds; return the spans either way."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.spans()) and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
        return self.spans()

    def _add(self, request: ExportTraceServiceRequest) -> None:
        with self._cond:
            self._requests.append(request)
            self._cond.notify_all()


class _Handler(BaseHTTPRequestHandler):
    owner: OTLPReceiver

    def do_POST(self) -> None:
        if self.owner.fail_with is not None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            return self._reject(self.owner.fail_with, "told to fail")
        if self.path != TRACES_PATH:
            return self._reject(404, f"unexpected path {self.path}")
        if self.headers.get("Content-Type") != _PROTOBUF:
            return self._reject(415, f"unexpected content type {self.headers.get('Content-Type')}")
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        encoding = self.headers.get("Content-Encoding", "")
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        try:
            request = ExportTraceServiceRequest.FromString(body)
        except DecodeError as exc:
            return self._reject(400, f"undecodable request: {exc}")
        self.owner._add(request)
        payload = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", _PROTOBUF)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _reject(self, status: int, why: str) -> None:
        self.owner.rejected.append(why)
        self.send_error(status, why)

    def log_message(self, format: str, *args: Any) -> None:
        return
