"""Workloads and the two measuring harnesses: interleaved latency arms and sustained writers.

Items come from :mod:`thread_store.workload` (real Codex shapes: mostly response items
and token counts, few user messages) and are generated before timing starts, so every
arm appends the same items in the same order to the same thread ids.
"""

from __future__ import annotations

import collections
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from thread_store.workload import hot_path_item, user_message

Item = dict[str, Any]
Op = Callable[[str, Item], object]

WRITERS = 8
WATCH_PERIOD_S = 0.005
_DRAIN_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Config:
    """Sizes of one run; see :data:`MODES`."""

    mode: str
    rounds: int  # interleaved rounds of the latency arms
    block: int  # ops per block of a fast arm
    fsync_block: int  # ops per block of an arm that fsyncs every op (the peer, synchronous=FULL)
    peer_wait_block: int  # ops per block of the peer's append + wait arm (about 100 ms each)
    warmup: int  # unrecorded ops per arm before the first round
    many_threads: int  # threads of the "many threads" workload
    peer_many: bool  # run the peer on the many-threads workload (creating its aggregates is slow)
    sustained_s: float  # seconds per sustained arm, split over ``sustained_rounds``
    sustained_rounds: int
    list_threads: int  # threads in the listing benchmark
    catchup_threads: int
    catchup_items_per_thread: int
    memory_threads: int
    rss_s: float  # seconds of sustained load in each RSS subprocess
    tracing_rounds: int  # rounds x block of benchmarks/bench_tracing.py, when present
    tracing_block: int
    mp_s: float  # seconds per writer-processes arm (benchmarks/processes.py), split over mp_rounds
    mp_rounds: int
    wake_rounds: int  # samples per cross-process wake-up arm
    flat_rounds: int  # interleaved rounds of the flat-append arms (benchmarks/at_scale.py)
    catchup_append_threads: int  # threads a reopened store catches up while a caller appends
    catchup_append_rounds: int
    touch: tuple[int, ...]  # threads touched at each memory / listing checkpoint (benchmarks/touch.py)


MODES = {
    "full": Config("full", rounds=40, block=500, fsync_block=100, peer_wait_block=3, warmup=1000,
                   many_threads=10_000, peer_many=True, sustained_s=10.0, sustained_rounds=5,
                   list_threads=100_000, catchup_threads=1000, catchup_items_per_thread=1000,
                   memory_threads=1000, rss_s=5.0, tracing_rounds=60, tracing_block=200,
                   mp_s=12.0, mp_rounds=4, wake_rounds=2000, flat_rounds=40,
                   catchup_append_threads=30_000, catchup_append_rounds=3,
                   touch=(10_000, 100_000, 200_000)),
    "quick": Config("quick", rounds=12, block=200, fsync_block=40, peer_wait_block=2, warmup=200,
                    many_threads=10_000, peer_many=False, sustained_s=1.5, sustained_rounds=2,
                    list_threads=10_000, catchup_threads=100, catchup_items_per_thread=500,
                    memory_threads=1000, rss_s=0.5, tracing_rounds=10, tracing_block=100,
                    mp_s=4.0, mp_rounds=2, wake_rounds=400, flat_rounds=40,
                    catchup_append_threads=30_000, catchup_append_rounds=1,
                    touch=(1_000, 10_000, 30_000)),
    "smoke": Config("smoke", rounds=1, block=10, fsync_block=3, peer_wait_block=1, warmup=5,
                    many_threads=200, peer_many=True, sustained_s=0.2, sustained_rounds=1,
                    list_threads=300, catchup_threads=10, catchup_items_per_thread=100,
                    memory_threads=50, rss_s=0.2, tracing_rounds=1, tracing_block=10,
                    mp_s=0.2, mp_rounds=1, wake_rounds=8, flat_rounds=1,
                    catchup_append_threads=300, catchup_append_rounds=1, touch=(100, 200, 300)),
}


#: What ``--scale`` changes in any mode: issue 15's sizes (a run of 10 minutes or more).
SCALE = {"catchup_threads": 10_000, "catchup_items_per_thread": 100,
         "touch": (10_000, 100_000, 1_000_000)}


def percentile(samples: list[int] | list[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0..100) of ``samples``; NaN when empty."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    return float(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)])


def items(n: int, seed: int = 7) -> list[Item]:
    """``n`` hot-path items with the live-session mix (generated up front, untimed)."""
    rng = random.Random(seed)
    return [hot_path_item(rng) for _ in range(n)]


def first_message(i: int) -> Item:
    """A thread's opening user message (gives it a title and a preview)."""
    return user_message(f"Task {i}: fix the flaky test in module {i % 97}", datetime.now(UTC))


def fill(system: Any, tids: list[str]) -> None:
    """Create each thread with its opening user message (setup, untimed)."""
    for i, thread_id in enumerate(tids):
        system.create(thread_id)
        system.append(thread_id, first_message(i))


def thread_ids(n: int, prefix: str = "t") -> list[str]:
    """``n`` thread ids."""
    return [f"{prefix}{i:06d}" for i in range(n)]


@dataclass
class Arm:
    """One measured series: ``op`` on ``system``, run in blocks of ``block`` ops."""

    label: str  # the system row in the table
    metric: str  # "append" | "append_and_flush" | "upsert"
    system: Any
    op: Op
    block: int
    samples: list[int] = field(default_factory=list)
    cursor: int = 0


def interleave(arms: list[Arm], work: list[tuple[str, Item]], rounds: int, warmup: int) -> None:
    """Run the arms in alternating blocks so machine noise hits every arm alike.

    Each round runs one block of every arm, in an order rotated each round; background
    work an arm leaves behind is finished (untimed) before the next arm's block.
    """
    for arm in arms:
        _block(arm, work, min(warmup, arm.block * 2), record=False)
    for r in range(rounds):
        shift = r % len(arms)
        for arm in arms[shift:] + arms[:shift]:
            _block(arm, work, arm.block, record=True)


def _block(arm: Arm, work: list[tuple[str, Item]], n: int, *, record: bool) -> None:
    op, samples, k = arm.op, arm.samples, arm.cursor
    clock = time.perf_counter_ns
    for _ in range(n):
        thread_id, item = work[k % len(work)]
        k += 1
        t0 = clock()
        op(thread_id, item)
        t1 = clock()
        if record:
            samples.append(t1 - t0)
    arm.cursor = k
    arm.system.quiesce()


@dataclass
class Sustained:
    """Totals of one sustained arm over all its rounds."""

    label: str
    writers: int
    appends: int = 0
    seconds: float = 0.0
    transactions: int = 0
    commits: int | None = 0  # history commits (fsyncs with synchronous=FULL); None: not counted
    latencies: list[int] = field(default_factory=list)
    lags: list[int] = field(default_factory=list)
    sweeps: list[int] = field(default_factory=list)  # watcher sweep durations (lag resolution)
    watched: bool = False


def sustained(result: Sustained, system: Any, tids: list[str], pool: list[Item],
              seconds: float) -> None:
    """Run ``result.writers`` threads appending round robin to ``tids`` for ``seconds``.

    Writer ``w`` owns the threads ``tids[w::writers]``. Lag is measured by a watcher
    thread: each append's return time is queued with its position; the watcher polls
    ``system.progress`` for threads with outstanding appends and records, per append,
    the time from its return until the first sweep that sees it projected (so lag is
    overestimated by at most one sweep, whose durations are kept in ``sweeps``).
    """
    stop = threading.Event()
    start = threading.Barrier(result.writers + 1)
    returned: collections.deque[tuple[str, int, int]] = collections.deque()
    watch = system.has_projection and not getattr(system, "sync", False)
    counts = [0] * result.writers
    latencies: list[list[int]] = [[] for _ in range(result.writers)]

    def writer(w: int) -> None:
        mine = tids[w::result.writers]
        k, clock, record = w * 7919, time.perf_counter_ns, latencies[w]
        append = system.append
        start.wait()
        while not stop.is_set():
            thread_id = mine[k % len(mine)]
            t0 = clock()
            position = append(thread_id, pool[k % len(pool)])
            t1 = clock()
            record.append(t1 - t0)
            if watch:
                returned.append((thread_id, position, t1))
            k += 1
        counts[w] = len(record)

    before, commits_before = system.transactions(), system.commits()
    threads = [threading.Thread(target=writer, args=(w,), name=f"bench-writer-{w}")
               for w in range(result.writers)]
    watcher = threading.Thread(target=_watch, args=(system, returned, stop, result), name="bench-watcher")
    for t in threads:
        t.start()
    if watch:
        watcher.start()
    start.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    result.seconds += time.perf_counter() - t0
    if watch:
        watcher.join()
        result.watched = True
    system.quiesce()
    result.transactions += system.transactions() - before
    commits = system.commits()
    if commits is None or commits_before is None or result.commits is None:
        result.commits = None
    else:
        result.commits += commits - commits_before
    result.appends += sum(counts)
    for record in latencies:
        result.latencies.extend(record)


def _watch(system: Any, returned: collections.deque[tuple[str, int, int]], stop: threading.Event,
           result: Sustained) -> None:
    """The lag watcher (see :func:`sustained`); runs until every append is seen projected."""
    outstanding: dict[str, collections.deque[tuple[int, int]]] = {}
    clock = time.perf_counter_ns
    give_up = None
    while True:
        while returned:
            thread_id, position, t = returned.popleft()
            outstanding.setdefault(thread_id, collections.deque()).append((position, t))
        if stop.is_set():
            give_up = give_up or time.monotonic() + _DRAIN_TIMEOUT_S
            if (not outstanding and not returned) or time.monotonic() > give_up:
                return
        if outstanding:
            t0 = clock()
            seen = system.progress(list(outstanding))
            now = clock()
            result.sweeps.append(now - t0)
            for thread_id, visible in seen.items():
                queue = outstanding[thread_id]
                while queue and queue[0][0] <= visible:
                    result.lags.append(now - queue.popleft()[1])
                if not queue:
                    del outstanding[thread_id]
        time.sleep(WATCH_PERIOD_S)
