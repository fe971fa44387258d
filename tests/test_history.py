"""The history through the public API: per-thread seq allocation, timestamps and paging on
every backend; SQLite's keys, durability pragmas and reopen."""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from conftest import Backend, plain
from thread_store import StoredItem, ThreadStore

WORKERS = 16
APPENDS_PER_WORKER = 200
THREADS = 4


def _all_history(store: ThreadStore, thread_id: str, page: int = 1000) -> list[StoredItem]:
    """Read a whole history by paging on ``after_seq``."""
    out: list[StoredItem] = []
    while True:
        rows = store.read_history(thread_id, after_seq=out[-1].seq if out else 0, limit=page)
        if not rows:
            return out
        out.extend(rows)


def test_concurrent_appends_get_contiguous_seqs_and_each_payload_once(store: ThreadStore) -> None:
    tids = [store.create_thread(f"t{i}") for i in range(THREADS)]
    returned: dict[str, list[tuple[int, tuple[int, int]]]] = {t: [] for t in tids}
    lock = threading.Lock()
    start = threading.Barrier(WORKERS)
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            start.wait()
            for i in range(APPENDS_PER_WORKER):
                tid = tids[(w + i) % THREADS]
                gen = store.append(tid, [{"type": "response_item", "payload": {"w": w, "i": i}}])
                with lock:
                    returned[tid].append((gen, (w, i)))
        except BaseException as exc:  # reported below: a failing worker must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    total = WORKERS * APPENDS_PER_WORKER
    per_thread = total // THREADS
    for tid in tids:
        items = _all_history(store, tid, page=333)
        assert [it.seq for it in items] == list(range(1, per_thread + 1))
        payloads = [(it.item["payload"]["w"], it.item["payload"]["i"]) for it in items]
        assert len(set(payloads)) == per_thread
        # The generation append() returned is exactly the seq its item got.
        assert sorted(returned[tid]) == list(zip(range(1, per_thread + 1), payloads))
        assert store.status(tid).head_seq == per_thread
    expected = {(w, i) for w in range(WORKERS) for i in range(APPENDS_PER_WORKER)}
    seen = {(it.item["payload"]["w"], it.item["payload"]["i"]) for t in tids for it in _all_history(store, t)}
    assert seen == expected


def test_seqs_are_per_thread_and_batches_are_contiguous(store: ThreadStore) -> None:
    a, b = store.create_thread(), store.create_thread()
    assert store.append(a, [plain(1), plain(2), plain(3)]) == 3
    assert store.append(b, [plain(4)]) == 1
    assert store.append(a, [plain(5)]) == 4
    assert [(i.seq, i.item["payload"]["n"]) for i in store.read_history(a)] == [(1, 1), (2, 2), (3, 3), (4, 5)]
    assert [(i.seq, i.item["payload"]["n"]) for i in store.read_history(b)] == [(1, 4)]


def test_history_is_keyed_by_thread_and_seq(sqlite_store: ThreadStore, store_path: Path) -> None:
    sqlite_store.append(sqlite_store.create_thread(), [plain()])
    conn = sqlite3.connect(store_path / "history.db")
    try:
        unique = [
            [col[2] for col in conn.execute(f"PRAGMA index_info('{name}')")]
            for _, name, is_unique, *_ in conn.execute("PRAGMA index_list('items')") if is_unique
        ]
    finally:
        conn.close()
    assert ["thread_id", "seq"] in unique


def test_item_round_trips_exactly(store: ThreadStore) -> None:
    tid = store.create_thread()
    item = {"type": "response_item", "payload": {"text": "héllo \u2028 \x00 😀", "n": [1, 2.5, None, True],
                                                 "nested": {"a": {"b": []}}}}
    store.append(tid, [item])
    assert store.read_history(tid)[0].item == item


def test_explicit_timestamp_is_stored(store: ThreadStore) -> None:
    tid = store.create_thread()
    store.append(tid, [{**plain(), "timestamp": "2024-03-04T05:06:07.123456Z"},
                       {**plain(), "timestamp": "2024-03-04T07:06:07+02:00"}])
    first, second = store.read_history(tid)
    assert first.ts == datetime(2024, 3, 4, 5, 6, 7, 123456, tzinfo=timezone.utc)
    assert second.ts == datetime(2024, 3, 4, 5, 6, 7, tzinfo=timezone.utc)
    assert first.item["timestamp"] == "2024-03-04T05:06:07.123456Z"  # the item itself is unchanged


def test_item_without_timestamp_gets_append_time(store: ThreadStore) -> None:
    tid = store.create_thread()
    before = datetime.now(timezone.utc)
    store.append(tid, [plain()])
    after = datetime.now(timezone.utc)
    (stored,) = store.read_history(tid)
    assert stored.ts.tzinfo is not None
    assert before <= stored.ts <= after
    assert "timestamp" not in stored.item


def test_timestamps_survive_reopen(backend: Backend) -> None:
    backend.requires("reopen")
    with backend.open_store() as s:
        tid = s.create_thread()
        s.append(tid, [plain(), {**plain(), "timestamp": "2020-01-01T00:00:00Z"}])
        stored = s.read_history(tid)
    time.sleep(0.01)  # a later append time would differ from what was stored
    with backend.open_store() as s:
        assert s.read_history(tid) == stored


def _pragmas(conn: sqlite3.Connection) -> tuple[int, str]:
    return conn.execute("PRAGMA synchronous").fetchone()[0], conn.execute("PRAGMA journal_mode").fetchone()[0]


@pytest.mark.parametrize(("durability", "synchronous"), [("normal", 1), ("full", 2)])
def test_durability_sets_pragmas(store_path: Path, durability: str, synchronous: int) -> None:
    with ThreadStore.open(store_path, durability=durability) as s:
        s.append(s.create_thread(), [plain()])
        # synchronous is per connection, so look at the store's own writers.
        assert _pragmas(s._history._conn) == (synchronous, "wal")
        assert _pragmas(s._index._conn) == (synchronous, "wal")
    for name in ("history.db", "index.db"):  # WAL mode is persistent in the file
        conn = sqlite3.connect(store_path / name)
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            conn.close()


def test_read_history_pages_with_after_seq_and_limit(store: ThreadStore) -> None:
    tid = store.create_thread()
    store.append(tid, [plain(n) for n in range(1, 26)])
    pages = []
    after = 0
    while page := store.read_history(tid, after_seq=after, limit=7):
        assert len(page) <= 7
        pages.append([i.seq for i in page])
        after = page[-1].seq
    assert pages == [list(range(1, 8)), list(range(8, 15)), list(range(15, 22)), list(range(22, 26))]
    assert [i.item["payload"]["n"] for i in store.read_history(tid, after_seq=10, limit=3)] == [11, 12, 13]
    assert store.read_history(tid, after_seq=25) == []
    assert store.read_history(tid, after_seq=1000) == []


def test_empty_thread_has_empty_history(store: ThreadStore) -> None:
    tid = store.create_thread()
    assert store.read_history(tid) == []
    assert store.append(tid, []) == 0
