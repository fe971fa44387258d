"""Scale benchmarks of thread_store: listing depth, catch-up rate, pending-state memory."""

from __future__ import annotations

import gc
import sqlite3
import time
import tracemalloc
from pathlib import Path
from typing import Any

from thread_store import ThreadStore

from .workloads import first_message, items, thread_ids

_LIST_REPEATS = 50
_PAGE = 50


#: Working directories of the listing benchmark's threads: each holds a tenth of them
#: (fewer in small runs, so a filtered first page is still full).
_CWDS = 10
#: Searches whose first page is full: every opening message says "flaky" (a trigram
#: match) and so contains "fl" (two characters: a LIKE scan, the slowest path).
SEARCHES = ("flaky", "fl")


def listing(root: Path, n_threads: int) -> dict[str, Any]:
    """``list_threads`` latency at ``n_threads``: the plain keyset first page, a deep page
    (90 % down), searches (``SEARCHES``) and a ``cwd`` filter, measured side by side.

    The index is built through the public API: one thread per session with its working
    directory and one user message, then ``flush_all``.
    """
    tids = thread_ids(n_threads, "l")
    cwds = max(1, min(_CWDS, n_threads // _PAGE))  # each filter still fills a page
    t0 = time.perf_counter()
    with ThreadStore.open(root) as store:
        for i, thread_id in enumerate(tids):
            store.create_thread(thread_id, metadata={"cwd": f"/repo/{i % cwds}"})
            store.append(thread_id, [first_message(i)])
        store.flush_all(timeout=600.0)
        build_s = time.perf_counter() - t0
        deep_cursor, depth = _cursor_at(store, min(n_threads * 9 // 10, n_threads - _PAGE))
        first = _time_page(store, None)
        deep = _time_page(store, deep_cursor)
        searches = {query: _time_page(store, None, search=query) for query in SEARCHES}
        by_cwd = _time_page(store, None, cwd=f"/repo/{cwds - 1}")
    return {"threads": n_threads, "build_s": build_s, "deep_offset": depth,
            "first_page": first, "deep_page": deep, "page_size": _PAGE,
            "search_first_page": searches, "cwd_first_page": by_cwd}


def _cursor_at(store: ThreadStore, offset: int) -> tuple[str | None, int]:
    """Walk big pages to (about) ``offset`` threads down; return that cursor."""
    cursor, depth = None, 0
    step = max(1, min(1000, offset // 10))
    while depth + step <= offset:
        page = store.list_threads(limit=step, cursor=cursor)
        if page.next_cursor is None:
            break
        cursor, depth = page.next_cursor, depth + len(page.threads)
    return cursor, depth


def _time_page(store: ThreadStore, cursor: str | None, **query: Any) -> list[int]:
    samples = []
    for _ in range(_LIST_REPEATS):
        t0 = time.perf_counter_ns()
        page = store.list_threads(limit=_PAGE, cursor=cursor, **query)
        samples.append(time.perf_counter_ns() - t0)
        if len(page.threads) != _PAGE:
            raise AssertionError(f"listing returned {len(page.threads)} threads, expected {_PAGE}")
    return samples


def catch_up(root: Path, n_threads: int, per_thread: int) -> dict[str, Any]:
    """Re-projection rate: build a history with projection paused, drop the index, reopen.

    The store is closed with ``timeout=0`` (nothing drained), ``index.db`` is deleted,
    and the time from ``open`` until ``flush_all`` returns is measured: the open finds
    every thread behind and the projector folds all ``n_threads * per_thread`` items.
    """
    pool = items(min(per_thread, 2000), seed=11)
    batch = 100
    with ThreadStore.open(root) as store:
        store.pause_projection()
        for i, thread_id in enumerate(thread_ids(n_threads, "c")):
            store.create_thread(thread_id)
            store.append(thread_id, [first_message(i)])
            for start in range(1, per_thread, batch):
                chunk = [pool[k % len(pool)] for k in range(start, min(start + batch, per_thread))]
                store.append(thread_id, chunk)
        store.close(timeout=0.0)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{root / 'index.db'}{suffix}").unlink(missing_ok=True)
    t0 = time.perf_counter()
    with ThreadStore.open(root) as store:
        opened = time.perf_counter()
        store.flush_all(timeout=3600.0)
        done = time.perf_counter()
        transactions = store.stats().transactions
    total = n_threads * per_thread
    raw_s = _raw_read_s(root, thread_ids(n_threads, "c"), total)
    return {"items": total, "threads": n_threads, "open_s": opened - t0, "flush_all_s": done - opened,
            "items_per_s": total / (done - t0), "transactions": transactions,
            "raw_select_items_per_s": total / raw_s}


def _raw_read_s(root: Path, tids: list[str], total: int) -> float:
    """Seconds to read every thread's items back from ``history.db`` with a raw SELECT per
    thread (sqlite3, one connection): the floor of reading what the catch-up folds."""
    conn = sqlite3.connect(f"file:{root / 'history.db'}?mode=ro", uri=True)
    try:
        t0 = time.perf_counter()
        read = 0
        for thread_id in tids:
            read += len(conn.execute("SELECT seq, ts_us, item FROM items WHERE thread_id = ? "
                                     "ORDER BY seq", (thread_id,)).fetchall())
        seconds = time.perf_counter() - t0
    finally:
        conn.close()
    if read != total:
        raise AssertionError(f"the raw read found {read} items, expected {total}")
    return seconds


def pending_memory(root: Path, n_threads: int) -> dict[str, Any]:
    """Python heap held per thread with pending projection work (tracemalloc).

    Projection is paused, so every thread stays pending. Measured twice: after creating
    each thread and appending one item, then after ten more appends per thread; the
    second figure shows the per-thread state stays O(1) whatever the backlog.
    """
    tids = thread_ids(n_threads, "m")
    pool = items(11 * n_threads, seed=13)
    with ThreadStore.open(root) as store:
        store.pause_projection()
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        for i, thread_id in enumerate(tids):
            store.create_thread(thread_id)
            store.append(thread_id, [pool[i]])
        gc.collect()
        after_one = tracemalloc.get_traced_memory()[0]
        for r in range(1, 11):
            for i, thread_id in enumerate(tids):
                store.append(thread_id, [pool[r * n_threads + i]])
        gc.collect()
        after_eleven = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        pending = store.stats().pending_threads
        store.resume_projection()
    return {"threads": n_threads, "pending_threads": pending,
            "bytes_per_thread_1_item": (after_one - base) / n_threads,
            "bytes_per_thread_11_items": (after_eleven - base) / n_threads}
