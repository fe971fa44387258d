"""Export end to end: OTLP/HTTP to a local receiver, and OTLP/JSON Lines trace files.

The demo workload runs in a subprocess configured only through standard ``OTEL_*``
variables; the receiver decodes what the real exporter sent.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import plain, user_msg
from google.protobuf.json_format import ParseDict
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from otlp_receiver import OTLPReceiver, ReceivedSpan

from thread_store import ThreadStore
from thread_store.otel_setup import build_tracer_provider

HANG = 60.0  # generous timeout that only catches hangs
SERVICE = "thread-store-e2e"

DEMO_SEED = "3"  # fixes content and interleaving; its threads get both projection shapes


@pytest.fixture
def receiver() -> Iterator[OTLPReceiver]:
    with OTLPReceiver() as r:
        yield r


def by_name(spans: list[ReceivedSpan], name: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.name == name]


def test_demo_subprocess_exports_linked_traces_over_otlp_http(tmp_path: Path, receiver: OTLPReceiver) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
               OTEL_SERVICE_NAME=SERVICE)
    store_path = tmp_path / "store"
    done = subprocess.run([sys.executable, "-m", "thread_store.cli", "--store", str(store_path), "demo",
                           "--threads", "5", "--seed", DEMO_SEED],
                          env=env, capture_output=True, text=True, timeout=HANG, check=False)
    assert done.returncode == 0, done.stderr
    spans = receiver.spans()  # the demo shut the SDK down, which flushed every span
    assert receiver.rejected == []

    assert {s.resource.get("service.name") for s in spans} == {SERVICE}
    appends = {s.key: s for s in by_name(spans, "thread_store.append")}
    with ThreadStore.open(store_path) as store:
        stored = sum(m.item_count for m in store.list_threads(limit=1000, include_empty=True).threads)
    assert sum(a.attributes["thread_store.items"] for a in appends.values()) == stored > 0

    projects = {s.key: s for s in by_name(spans, "thread_store.project")}
    covered = set()
    for project in projects.values():
        pointers = ([project.parent] if project.parent else []) + project.links
        # Only the projection of a new thread's empty row points at no append.
        assert pointers or project.attributes["thread_store.coalesced_appends"] == 0
        assert set(pointers) <= set(appends)
        covered.update(pointers)
    assert covered == set(appends)
    assert any(p.parent for p in projects.values()), "no single-append (child) projection"
    assert any(len(p.links) >= 2 for p in projects.values()), "no coalesced projection"

    visible = by_name(spans, "thread_store.visible")
    assert visible
    for span in visible:
        assert span.parent in appends
        assert len(span.links) == 1 and span.links[0] in projects


def _demo_exporting_to(endpoint: str, store_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return subprocess.run([sys.executable, "-m", "thread_store.cli", "--store", str(store_path), "demo",
                           "--threads", "2", "--otlp-endpoint", endpoint],
                          env=env, capture_output=True, text=True, timeout=HANG, check=False)


def _assert_one_line_delivery_error(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr  # not one warning per retry
    assert lines[0].startswith("error: ") and "spans could not be delivered" in lines[0]
    assert "demo: 2 threads" in done.stdout  # the work itself was done and reported


def test_demo_without_a_collector_says_so_in_one_line_and_fails(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = _demo_exporting_to(f"http://127.0.0.1:{port}", tmp_path / "store")
    _assert_one_line_delivery_error(done)
    assert "refused" in done.stderr.lower()


@pytest.mark.parametrize("status", [400, 503])
def test_demo_whose_collector_answers_an_http_error_fails(tmp_path: Path, status: int) -> None:
    with OTLPReceiver(fail_with=status) as failing:
        done = _demo_exporting_to(failing.endpoint, tmp_path / "store")
        assert failing.rejected, "the exporter never reached the receiver"
    _assert_one_line_delivery_error(done)


_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX16 = re.compile(r"^[0-9a-f]{16}$")


def _hex_to_base64(request: dict[str, Any]) -> dict[str, Any]:
    """Undo the hex id rendering, giving the proto JSON form that ParseDict accepts."""
    text = json.dumps(request)
    for value in set(re.findall(r'"(?:traceId|spanId|parentSpanId)": "([0-9a-f]+)"', text)):
        text = text.replace(f'"{value}"', '"' + base64.b64encode(bytes.fromhex(value)).decode() + '"')
    return json.loads(text)  # type: ignore[no-any-return]


def test_trace_file_holds_otlp_json_lines_with_hex_ids(tmp_path: Path, no_otel_env: None) -> None:
    path = tmp_path / "traces.jsonl"
    provider = build_tracer_provider(trace_file=str(path))
    try:
        with ThreadStore.open(tmp_path / "store", tracer_provider=provider) as store:
            tid = store.create_thread()
            store.append_and_flush(tid, [user_msg("hello")], timeout=HANG)
            store.pause_projection()
            for i in range(3):
                store.append(tid, [plain(i)])
            store.resume_projection()
            store.flush(tid, timeout=HANG)
    finally:
        provider.shutdown()

    lines = path.read_text().splitlines()
    assert lines
    spans: list[dict[str, Any]] = []
    for line in lines:
        request = json.loads(line)
        ParseDict(_hex_to_base64(request), ExportTraceServiceRequest())  # valid OTLP/JSON
        for rs in request["resourceSpans"]:
            resource = {a["key"]: a["value"] for a in rs["resource"]["attributes"]}
            assert resource["service.name"] == {"stringValue": "thread-store"}
            spans.extend(span for ss in rs["scopeSpans"] for span in ss["spans"])

    ids = {(s["traceId"], s["spanId"]): s for s in spans}
    for span in spans:
        assert _HEX32.match(span["traceId"]) and _HEX16.match(span["spanId"])
        assert isinstance(span["kind"], int)
        if "parentSpanId" in span:
            assert (span["traceId"], span["parentSpanId"]) in ids
        for link in span.get("links", []):
            assert _HEX32.match(link["traceId"]) and _HEX16.match(link["spanId"])
            assert (link["traceId"], link["spanId"]) in ids

    names = sorted(s["name"] for s in spans)
    assert names.count("thread_store.append") == 4
    assert names.count("thread_store.visible") == 3
    projects = [s for s in spans if s["name"] == "thread_store.project"]
    coalesced = [int({a["key"]: a["value"] for a in s["attributes"]}["thread_store.coalesced_appends"]
                     ["intValue"]) for s in projects]
    # One child, one coalesced; plus, maybe, the new thread's empty row on its own.
    assert sorted(c for c in coalesced if c) == [1, 3]
    assert {s["kind"] for s in projects} == {5}  # SPAN_KIND_CONSUMER


@pytest.mark.parametrize("suffix", ["", "/", "/v1/traces"])
def test_explicit_endpoint_targets_v1_traces(receiver: OTLPReceiver, no_otel_env: None, suffix: str) -> None:
    provider = build_tracer_provider("explicit-name", otlp_endpoint=receiver.endpoint + suffix)
    provider.get_tracer("test").start_span("probe").end()
    provider.shutdown()
    assert receiver.rejected == []
    assert [(s.name, s.resource["service.name"]) for s in receiver.spans()] == [("probe", "explicit-name")]


def test_standard_env_vars_configure_endpoint_and_service_name(receiver: OTLPReceiver, no_otel_env: None,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    for service in (None, "explicit-name"):
        provider = build_tracer_provider() if service is None else build_tracer_provider(service)
        provider.get_tracer("test").start_span(f"probe-{service}").end()
        provider.shutdown()
    assert receiver.rejected == []
    assert sorted((s.name, s.resource["service.name"]) for s in receiver.spans()) == [
        ("probe-None", "from-env"), ("probe-explicit-name", "explicit-name")]


def test_unsupported_otlp_protocol_is_refused(no_otel_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with pytest.raises(ValueError, match="http/protobuf"):
        build_tracer_provider()
