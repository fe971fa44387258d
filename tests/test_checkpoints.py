"""The history's WAL is checkpointed by the projector's worker, not inside an append
(issue 15: SQLite's own checkpoints put a multi-millisecond copy and fsync in one
append of every few hundred)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from thread_store import ThreadStore
from thread_store.backends.sqlite import _checkpoints
from thread_store.workload import user_message

ITEM = user_message("hello", datetime.now(UTC))


def test_an_append_checkpoints_only_past_the_safety_net(tmp_path: Path) -> None:
    with ThreadStore.open(tmp_path) as store:
        writer = store._storage.history._conn  # type: ignore[attr-defined]
        pages = writer.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
    assert pages == _checkpoints.SAFETY_NET_PAGES


def test_the_worker_checkpoints_so_bursts_of_appends_keep_the_log_short(tmp_path: Path) -> None:
    with ThreadStore.open(tmp_path) as store:
        store.create_thread("t")
        checkpoints = store._storage.history.checkpoints  # type: ignore[attr-defined]
        for _ in range(12):  # 6 x EVERY_COMMITS commits of a few pages each, in bursts
            for _ in range(_checkpoints.EVERY_COMMITS // 2):
                store.append("t", [ITEM])
            time.sleep(0.05)  # a pause between bursts, in which a checkpoint can finish
        store.flush_all(timeout=60.0)
        assert checkpoints.runs >= 1
        wal_bytes = (tmp_path / "history.db-wal").stat().st_size
    # Left to the safety net the log would reach SAFETY_NET_PAGES (16 MiB) first.
    assert wal_bytes < _checkpoints.SAFETY_NET_PAGES * 4096 // 2, wal_bytes


def test_a_paused_projection_still_checkpoints(tmp_path: Path) -> None:
    with ThreadStore.open(tmp_path) as store:
        store.create_thread("t")
        store.pause_projection()
        checkpoints = store._storage.history.checkpoints  # type: ignore[attr-defined]
        for _ in range(_checkpoints.EVERY_COMMITS):
            store.append("t", [ITEM])
        deadline = time.monotonic() + 60.0
        while checkpoints.runs == 0:
            assert time.monotonic() < deadline, "a paused store's worker never checkpointed"
            time.sleep(0.01)
        store.resume_projection()
