"""Shared fixtures: real stores in temporary directories, always closed."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor

from thread_store import ThreadStore


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
