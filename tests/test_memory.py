"""DESIGN §1.2 bounded memory: pending state is O(1) per thread whatever the backlog.

Per thread the projector keeps watermarks, at most MAX_LINKS trace contexts and a buffer
of the newest items capped at BUFFER_ITEMS / BUFFER_BYTES. Past the caps nothing grows.
"""

from __future__ import annotations

import gc
import resource
import tracemalloc
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider

from thread_store import ThreadStore, _schedule
from thread_store.backends.sqlite import history as history_module
from thread_store._state import BUFFER_BYTES, BUFFER_ITEMS
from thread_store.tracing import MAX_LINKS

ITEM = {"type": "response_item", "payload": {"type": "message", "text": "x"}}


def _traced_bytes() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def _backlog_growth(store_path: Path, threads: int, appends: int) -> tuple[float, float]:
    """Append with the projector paused.

    Returns (bytes per thread with a full item buffer, bytes per append past the caps).
    """
    warm = BUFFER_ITEMS * threads
    with ThreadStore.open(store_path) as store:
        store.pause_projection()
        tracemalloc.start()
        try:
            empty = _traced_bytes()
            tids = [store.create_thread() for _ in range(threads)]
            for n in range(warm):
                store.append(tids[n % threads], [ITEM])
            per_thread = (_traced_bytes() - empty) / threads
            for tid in tids:  # one more each: the buffers overflow and are dropped
                store.append(tid, [ITEM])
            base = _traced_bytes()
            for n in range(appends - warm - threads):
                store.append(tids[n % threads], [ITEM])
            per_append = (_traced_bytes() - base) / (appends - warm - threads)
        finally:
            tracemalloc.stop()
        assert store.stats().pending_threads == threads
        store.close(timeout=0)
    return per_thread, per_append


def _report(label: str, per_thread: float, per_append: float) -> None:
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n{label}: pending state {per_thread:.0f} B/thread with a full item buffer, "
          f"{per_append:.3f} B per append past the caps, peak RSS {rss_mb:.0f} MiB")


def test_pending_state_is_constant_per_thread(store_path: Path) -> None:
    per_thread, per_append = _backlog_growth(store_path, threads=200, appends=40_000)
    _report("40k appends / 200 threads", per_thread, per_append)
    assert per_thread < BUFFER_BYTES + 8192
    assert per_append < 1.0  # no per-append entry is retained


@pytest.mark.slow
def test_million_appends_keep_pending_state_constant(store_path: Path) -> None:
    per_thread, per_append = _backlog_growth(store_path, threads=1000, appends=1_000_000)
    _report("1M appends / 1000 threads", per_thread, per_append)
    assert per_thread < BUFFER_BYTES + 8192
    assert per_append < 0.1


def test_captured_trace_contexts_are_capped(store_path: Path) -> None:
    provider = TracerProvider()  # records spans, exports nowhere
    with ThreadStore.open(store_path, tracer_provider=provider) as store:
        store.pause_projection()
        tids = [store.create_thread() for _ in range(20)]
        tracemalloc.start()
        try:
            for _ in range(max(MAX_LINKS, BUFFER_ITEMS) + 1):
                for tid in tids:
                    store.append(tid, [ITEM])
            at_cap = _traced_bytes()
            for _ in range(200):
                for tid in tids:
                    store.append(tid, [ITEM])
            beyond = _traced_bytes() - at_cap
        finally:
            tracemalloc.stop()
        assert beyond / (200 * len(tids)) < 1.0
        store.close(timeout=0)


def test_per_thread_caches_are_capped_however_many_threads_a_process_touches(
        store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Heads, incarnations and idle projector states stay within their caps after
    touching three times as many threads, and an evicted thread still appends at the
    right generation (its head is read back from history)."""
    cap = 40
    monkeypatch.setattr(history_module, "HEADS_CACHED", cap)
    monkeypatch.setattr(history_module, "INCARNATIONS_CACHED", cap)
    monkeypatch.setattr(_schedule, "IDLE_STATES", cap)
    with ThreadStore.open(store_path) as store:
        tids = [store.create_thread() for _ in range(3 * cap)]
        for tid in tids:
            store.append(tid, [ITEM])
        store.flush_all(timeout=30.0)
        history = store._storage.history  # noqa: SLF001 - the caches are what is tested
        states = store._writes.projector._schedule.states  # type: ignore[union-attr]  # noqa: SLF001
        assert len(history._heads) == cap and len(history._incarnations) <= cap  # noqa: SLF001
        assert len(states) <= cap
        assert tids[0] not in history._heads  # noqa: SLF001
        assert store.append(tids[0], [ITEM]) == 2  # its head (1) was read back from history
        assert store.append_and_flush(tids[0], [ITEM]).item_count == 3
