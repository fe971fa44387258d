"""The demo workload: agents appending Codex-shaped items to ~20 threads, live-style.

Each thread gets a realistic session (:func:`thread_store.workload.conversation`), fed in
chunks of 1 to 3 items at a time, with the threads interleaved at random as concurrent
agents would. The chunk that carries a thread's first user message is appended with
``append_and_flush``, as an agent does to make a new session list-visible at once;
everything else is a plain ``append``. Then ``flush_all`` and ``list_threads``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from itertools import islice
from typing import Any

from .model import ThreadMetadata
from .store import ThreadStore
from .workload import conversation

#: ``on_append(seconds, flushed)``: the latency of one call; ``flushed`` for append_and_flush.
AppendObserver = Callable[[float, bool], None]


def run_demo(store: ThreadStore, threads: int = 20, seed: int | None = None, *,
             on_append: AppendObserver | None = None,
             progress: Callable[[int, int], None] | None = None) -> list[ThreadMetadata]:
    """Run the demo workload on ``store`` and return its threads as listed, newest first.

    Thread ids are fresh UUIDs, so the demo can run again on the same store. Sessions
    start in the past hour-to-day, so their timestamps are never in the future.

    :param threads: how many threads (sessions) to create.
    :param seed: seed of the content and interleaving (ids stay random).
    :param on_append: observer of each append call's latency.
    :param progress: called as ``progress(sessions_done, sessions_total)`` as each session ends.
    :returns: the metadata of the demo's threads, in ``list_threads`` order.
    """
    rng = random.Random(seed)
    now = datetime.now(UTC)
    live: dict[str, Iterator[dict[str, Any]]] = {}
    for _ in range(threads):
        thread_id = store.create_thread()
        start = now - timedelta(minutes=rng.randint(60, 24 * 60))
        live[thread_id] = conversation(thread_id, rng, turns=rng.randint(1, 4), start=start)
    greeted: set[str] = set()
    while live:
        thread_id = rng.choice(list(live))
        chunk = list(islice(live[thread_id], rng.randint(1, 3)))
        if not chunk:
            del live[thread_id]
            if progress is not None:
                progress(threads - len(live), threads)
            continue
        first_message = thread_id not in greeted and any(_is_user_message(i) for i in chunk)
        started = time.perf_counter()
        if first_message:
            greeted.add(thread_id)
            store.append_and_flush(thread_id, chunk)
        else:
            store.append(thread_id, chunk)
        if on_append is not None:
            on_append(time.perf_counter() - started, first_message)
    store.flush_all()
    return _listed(store, greeted)


def _is_user_message(item: dict[str, Any]) -> bool:
    payload = item.get("payload")
    return (item.get("type") == "event_msg" and isinstance(payload, dict)
            and payload.get("type") == "user_message")


def _listed(store: ThreadStore, ids: set[str]) -> list[ThreadMetadata]:
    """Page through ``list_threads`` and keep the demo's own threads."""
    found: list[ThreadMetadata] = []
    cursor = None
    while True:
        page = store.list_threads(limit=200, cursor=cursor)
        found.extend(m for m in page.threads if m.thread_id in ids)
        cursor = page.next_cursor
        if cursor is None or len(found) == len(ids):
            return found
