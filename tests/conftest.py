"""Shared fixtures: real stores in temporary directories, always closed."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from pg_server import PostgresServer, PostgresUnavailable

from thread_store import ThreadStore

#: CI sets this, so that a machine that cannot start PostgreSQL fails the run, not skips.
REQUIRE_POSTGRES = os.environ.get("THREAD_STORE_REQUIRE_POSTGRES") == "1"


@pytest.fixture(autouse=True)
def projector_threads_end() -> Iterator[None]:
    """Every projector worker a test started has exited by the end of that test.

    A close whose deadline passed leaves its worker fenced, finishing its batch: it gets
    a generous grace to exit, so it never counts against a later test's thread checks.
    One that never exits (a leak, a hang) fails the test that started it.
    """
    before = set(threading.enumerate())
    yield
    started = [t for t in threading.enumerate() if t.name == "thread_store-projector" and t not in before]
    for t in started:
        t.join(30.0)
    alive = [t for t in started if t.is_alive()]
    assert not alive, f"projector threads started by this test are still running: {alive}"


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    """A fresh store directory path (not yet created)."""
    return tmp_path / "store"


@pytest.fixture
def store(store_path: Path) -> Iterator[ThreadStore]:
    """An open async-projection store, closed after the test."""
    s = ThreadStore.open(store_path)
    try:
        yield s
    finally:
        s.close(timeout=5.0)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server for the whole session, started on first use.

    Skipped (one line in the summary) where the machine has no PostgreSQL, unless
    ``THREAD_STORE_REQUIRE_POSTGRES=1`` (CI), which makes that a failure.
    """
    try:
        server = PostgresServer()
        server.__enter__()
    except PostgresUnavailable as exc:
        if REQUIRE_POSTGRES:
            pytest.fail(f"THREAD_STORE_REQUIRE_POSTGRES=1 but PostgreSQL cannot start: {exc}")
        pytest.skip(f"PostgreSQL tests skipped: {str(exc).splitlines()[0]}")
    try:
        yield server
    finally:
        server.stop()


def user_msg(text: str, **extra: object) -> dict[str, object]:
    """A minimal ``event_msg`` / ``user_message`` item."""
    return {"type": "event_msg", "payload": {"type": "user_message", "message": text, **extra}}


def plain(n: int = 0) -> dict[str, object]:
    """A ``response_item`` that changes nothing but counts and times."""
    return {"type": "response_item", "payload": {"type": "message", "n": n}}


class CloseAfterAppend(SpanProcessor):
    """Closes the store as an append's span ends: after the commit, before its barrier.

    Add it to the ``tracer_provider`` of the store, then set ``close``.
    """

    def __init__(self) -> None:
        self.close: Callable[[], object] | None = None

    def on_end(self, span: ReadableSpan) -> None:
        if span.name == "thread_store.append" and self.close is not None:
            close, self.close = self.close, None
            close()


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll a test condition until it holds (tests may poll; the library never does).

    ``timeout`` is generous: it only catches hangs.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, dict[str, object]]:
    """Run ``fn`` in a thread; its result or exception lands in the returned dict."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    return t, out
