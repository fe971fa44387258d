"""Writer processes on one store, and the cross-process wake-up: the harness, for any backend.

**Sustained.** :func:`run_round` spawns N processes; each opens the store with a
:class:`StoreOpener` (or any picklable opener with the same shape) and runs ``writers``
threads appending round robin over the same :data:`THREADS` threads for a fixed time.
Every append's thread, generation and return time (``time.monotonic_ns``,
CLOCK_MONOTONIC, one clock for every process of the machine) is kept by its writer and
written to a file after the run, so no IPC happens while it runs. Meanwhile this process
takes snapshots of every thread's ``projected_seq`` with a backend's :class:`Watcher`,
stamped with the time the read returned. Afterwards each append is matched with the
first snapshot stamped at or after its return that covers its generation: lag is
overestimated by at most one poll gap plus one read, both measured and reported.

**Wake-up.** :func:`wake`: process A (this one) appends to one of 100 threads and sends
the generation and the return time through a pipe to process B, which calls
``flush(thread_id, generation=g)``. The latency is from A's append returning to B's flush
returning (the pipe hop, measured, is part of it). Arms, interleaved in blocks: the
same-process baseline (A appends then flushes itself), B alone with A projecting
normally, B alone with A's projection paused (B always does the work), and A flushing
too, so B often waits for A's commit.
"""

from __future__ import annotations

import array
import bisect
import math
import multiprocessing
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from thread_store import ThreadStore

from .workloads import fill, items, percentile, thread_ids

THREADS = 100
#: Seconds between a watcher's snapshots (a backend's watcher may set its own).
POLL_S = 0.0005
WAKE_ARMS = {
    "same": "same process: append, then flush",
    "cross": "B flushes; A projects normally",
    "paused": "B flushes; A's projection paused",
    "both": "B flushes while A flushes too",
}
_SPAWN = multiprocessing.get_context("spawn")
_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class StoreOpener:
    """How a spawned process opens the store under test: ``ThreadStore.open(target, **options)``.

    Picklable, so the same writer and flusher processes serve every backend.
    """

    target: str
    options: dict[str, Any] = field(default_factory=dict)

    def open(self) -> ThreadStore:
        """Open the store."""
        return ThreadStore.open(self.target, **self.options)


def new_arm(opener: Any, watcher: Callable[[], Watcher], writers: int) -> dict[str, Any]:
    """The totals of one multi-process arm: its processes open ``opener`` (a
    :class:`StoreOpener`, or any picklable object whose ``open()`` gives something with
    ``append(thread_id, items) -> generation`` and ``close(timeout=)``), each run ``writers``
    threads, and ``watcher()`` watches one round's projection."""
    return {"opener": opener, "watcher": watcher, "writers": writers, "appends": 0, "commits": 0,
            "seconds": 0.0,
            "latencies": [], "lags": [], "unmatched": 0, "gaps": [], "reads": [],
            "per_thread": [0] * THREADS}


def fmt(value: float, digits: int = 1) -> str:
    """A figure for the tables, or a dash when it was not measured (NaN)."""
    return "—" if math.isnan(value) else f"{value:,.{digits}f}"


def arm_row(arm: dict[str, Any], extra: tuple[str, ...] = ()) -> str:
    """A sustained arm's Markdown row (from :func:`summarize`), with ``extra`` cells after
    its ratio to the raw floor."""
    n = arm["processes"]
    cells = [f"thread_store, {n} process{'es' if n > 1 else ''}", f"{arm['appends_per_s']:,.0f}",
             f"{arm['ratio_to_raw']:.2f}", *extra,
             f"{fmt(arm['append_p50_us'])} µs", f"{fmt(arm['append_p99_us'])} µs",
             f"{fmt(arm['lag_p50_ms'])} ms", f"{fmt(arm['lag_p99_ms'])} ms", f"{fmt(arm['lag_max_ms'])} ms",
             f"{fmt(arm['poll_gap_p99_ms'], 2)} + {fmt(arm['snapshot_read_p50_ms'], 2)} ms"]
    return "| " + " | ".join(cells) + " |"


def populate(opener: StoreOpener, tids: list[str]) -> None:
    """Create the threads with their opening messages, projected (setup)."""
    with opener.open() as store:
        fill(_Filler(store), tids)
        store.flush_all(timeout=60.0)


def summarize(arm: dict[str, Any], n: int, raw_rate: float) -> dict[str, Any]:
    """Rate, append latency and lag of an arm run with ``n`` processes, against ``raw_rate``."""
    rate = arm["appends"] / arm["seconds"]
    return {"processes": n, "appends": arm["appends"], "seconds": arm["seconds"],
            "appends_per_s": rate, "ratio_to_raw": rate / raw_rate,
            "appends_per_commit": arm["appends"] / arm["commits"] if arm["commits"] else math.nan,
            "append_p50_us": percentile(arm["latencies"], 50) / 1e3,
            "append_p99_us": percentile(arm["latencies"], 99) / 1e3,
            "lag_p50_ms": percentile(arm["lags"], 50) / 1e6,
            "lag_p99_ms": percentile(arm["lags"], 99) / 1e6,
            "lag_max_ms": max(arm["lags"], default=math.nan) / 1e6, "lag_n": len(arm["lags"]),
            "unmatched": arm["unmatched"],
            "poll_gap_p50_ms": percentile(arm["gaps"], 50) / 1e6,
            "poll_gap_p99_ms": percentile(arm["gaps"], 99) / 1e6,
            "snapshot_read_p50_ms": percentile(arm["reads"], 50) / 1e6}


class _Filler:
    """The adapter :func:`fill` wants, over an open store (setup only)."""

    def __init__(self, store: ThreadStore) -> None:
        self.store = store

    def create(self, thread_id: str) -> None:
        self.store.create_thread(thread_id)

    def append(self, thread_id: str, item: dict[str, Any]) -> int:
        return self.store.append(thread_id, [item])


def run_round(arm: dict[str, Any], n: int, seconds: float, scratch: Path) -> None:
    """One round of N writer processes on ``arm``'s store, watched from this process."""
    scratch.mkdir(parents=True)
    start = _SPAWN.Barrier(n + 1)
    pipes = [_SPAWN.Pipe(duplex=False) for _ in range(n)]
    procs = [_SPAWN.Process(target=_writer_process, name=f"bench-writer-proc-{p}",
                            args=(arm["opener"], p, arm["writers"], seconds, start, pipes[p][1],
                                  str(scratch)))
             for p in range(n)]
    for proc in procs:
        proc.start()
    watcher = arm["watcher"]()
    start.wait(timeout=_TIMEOUT_S)
    t0 = time.monotonic_ns()
    watcher.watch([recv for recv, _ in pipes])
    reports = [recv.recv() for recv, _ in pipes]
    for proc in procs:
        proc.join(timeout=_TIMEOUT_S)
        if proc.exitcode != 0:
            raise RuntimeError(f"writer process {proc.name} exited with {proc.exitcode}")
    watcher.final()
    arm["seconds"] += (max(r["stopped_ns"] for r in reports) - t0) / 1e9
    for p, rep in enumerate(reports):
        arm["appends"] += rep["appends"]
        arm["commits"] += rep["commits"]
        for i, count in enumerate(rep["per_thread"]):
            arm["per_thread"][i] += count
        tid, gen, ret, lat = _load(scratch, p)
        arm["latencies"].extend(lat)
        for k in range(len(tid)):
            lag = watcher.lag(tid[k], gen[k], ret[k])
            if lag is None:
                arm["unmatched"] += 1
            else:
                arm["lags"].append(lag)
    arm["gaps"].extend(watcher.gaps)
    arm["reads"].extend(watcher.reads)


def _writer_process(opener: Any, index: int, writers: int, seconds: float, start: Any,
                    report: Connection, scratch: str) -> None:
    """A spawned writer process: ``writers`` threads append until ``seconds`` pass."""
    tids = thread_ids(THREADS)
    pool = items(2000, seed=3 + index)
    logs = [tuple(array.array("q") for _ in range(4)) for _ in range(writers)]
    per_thread = [[0] * THREADS for _ in range(writers)]
    store = opener.open()
    stop = threading.Event()
    gate = threading.Barrier(writers + 1)

    def writer(w: int) -> None:
        # Every writer of every process goes round robin over all the threads, from its own offset.
        k = (index * writers + w) * 37
        tid_log, gen_log, ret_log, lat_log = logs[w]
        counts, clock, append = per_thread[w], time.monotonic_ns, store.append
        gate.wait()
        while not stop.is_set():
            i = k % THREADS
            t0 = clock()
            generation = append(tids[i], [pool[k % len(pool)]])
            t1 = clock()
            tid_log.append(i)
            gen_log.append(generation)
            ret_log.append(t1)
            lat_log.append(t1 - t0)
            counts[i] += 1
            k += 1

    threads = [threading.Thread(target=writer, args=(w,), name=f"bench-writer-{w}") for w in range(writers)]
    for t in threads:
        t.start()
    try:
        start.wait(timeout=_TIMEOUT_S)
        commits = _append_commits(store)
        gate.wait()
        stop.wait(seconds)
        stop.set()
        for t in threads:
            t.join()
        stopped = time.monotonic_ns()
        commits = _append_commits(store) - commits
    finally:
        stop.set()
        store.close(timeout=60.0)
    for kind in range(4):
        merged = array.array("q")
        for log in logs:
            merged.extend(log[kind])
        with open(Path(scratch) / f"{index}-{kind}.bin", "wb") as f:
            merged.tofile(f)
    report.send({"appends": sum(len(log[0]) for log in logs), "commits": commits, "stopped_ns": stopped,
                 "per_thread": [sum(c[i] for c in per_thread) for i in range(THREADS)]})


def _append_commits(store: Any) -> int:
    """The history commits the store made so far, where its backend counts them (SQLite's
    group commit); 0 elsewhere, which reports no appends-per-commit figure."""
    history = getattr(getattr(store, "_storage", None), "history", None)
    return int(getattr(history, "append_commits", 0))


def _load(scratch: Path, index: int) -> list[array.array[int]]:
    out = []
    for kind in range(4):
        a = array.array("q")
        a.frombytes((scratch / f"{index}-{kind}.bin").read_bytes())
        out.append(a)
    return out


class Watcher:
    """Snapshots of every thread's ``projected_seq``, stamped with the time they were read.

    A backend's watcher says how to read them (:meth:`snapshot`); this one reads nothing,
    for arms with no projection.
    """

    poll_s = POLL_S

    def __init__(self) -> None:
        tids = thread_ids(THREADS)
        self._slot = {t: i for i, t in enumerate(tids)}
        self.times: list[int] = []
        self.seqs: list[list[int]] = [[] for _ in range(THREADS)]  # per thread, one per snapshot
        self.gaps: list[int] = []
        self.reads: list[int] = []

    def snapshot(self, forced: bool) -> list[tuple[str, int]] | None:
        """Every thread's ``(thread_id, projected_seq)``; ``None`` when nothing changed since
        the last one (unless ``forced``)."""
        return None

    def close(self) -> None:
        """Release what :meth:`snapshot` holds."""

    def _poll(self, forced: bool = False) -> None:
        t0 = time.monotonic_ns()
        rows = self.snapshot(forced)
        if rows is None:
            return
        now = time.monotonic_ns()
        self.reads.append(now - t0)
        seen = dict(rows)
        self.times.append(now)
        for tid, i in self._slot.items():
            self.seqs[i].append(seen.get(tid, 0))

    def watch(self, conns: list[Connection]) -> None:
        """Poll until every writer process has reported (after its store closed, drained)."""
        last = time.monotonic_ns()
        while not all(c.poll() for c in conns):
            self._poll()
            time.sleep(self.poll_s)
            now = time.monotonic_ns()
            self.gaps.append(now - last)
            last = now

    def final(self) -> None:
        """One last snapshot, after every writer has closed its store."""
        self._poll(forced=True)
        self.close()

    def lag(self, slot: int, generation: int, returned: int) -> int | None:
        """ns from ``returned`` to the first snapshot at or after it covering ``generation``."""
        seqs = self.seqs[slot]
        first = max(bisect.bisect_left(self.times, returned), bisect.bisect_left(seqs, generation))
        return self.times[first] - returned if first < len(self.times) else None


def verify(opener: StoreOpener, tids: list[str], appended: list[int]) -> None:
    """Every thread's projected ``item_count`` is its opening message plus every append."""
    with opener.open() as store:
        store.flush_all(timeout=120.0)
        for thread_id, expected in zip(tids, appended):
            got = store.read_thread(thread_id).item_count
            if got != expected + 1:
                raise AssertionError(f"{opener.target} {opener.options}: {thread_id} has {got} items, "
                                     f"expected {expected + 1}")


# -- wake-up -----------------------------------------------------------------------------


def wake(rounds: int, block: int, opener: StoreOpener) -> dict[str, Any]:
    """Cross-process barrier latency, arms interleaved in blocks (see the module docstring)."""
    tids = thread_ids(THREADS, "w")
    pool = items(2000, seed=5)
    block = max(1, min(block, rounds) // 4)
    samples: dict[str, list[int]] = {key: [] for key in WAKE_ARMS}
    hops: list[int] = []
    store = opener.open()
    ours, theirs = _SPAWN.Pipe()
    proc = _SPAWN.Process(target=_flusher_process, args=(opener, theirs), name="bench-flusher")
    try:
        fill(_Filler(store), tids)
        store.flush_all(timeout=60.0)
        proc.start()
        if not ours.poll(_TIMEOUT_S):
            raise RuntimeError("the flusher process did not start")
        ours.recv()
        keys = list(WAKE_ARMS)
        k = 0
        for b in range(math.ceil(rounds / block)):
            shift = b % len(keys)
            for key in keys[shift:] + keys[:shift]:
                if key == "paused":
                    store.pause_projection()
                for _ in range(block):
                    k += 1
                    samples[key].append(_wake_once(key, store, ours, tids[k % THREADS],
                                                   pool[k % len(pool)], hops))
                if key == "paused":
                    store.resume_projection()
                store.flush_all(timeout=60.0)
        ours.send(None)
        proc.join(timeout=_TIMEOUT_S)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
        store.close(timeout=30.0)
    out: dict[str, Any] = {
        key: {"label": WAKE_ARMS[key], "p50_us": percentile(s, 50) / 1e3,
              "p99_us": percentile(s, 99) / 1e3, "n": len(s)} for key, s in samples.items()}
    out["pipe_hop"] = {"label": "pipe hop A → B (part of every cross-process figure)",
                       "p50_us": percentile(hops, 50) / 1e3, "p99_us": percentile(hops, 99) / 1e3,
                       "n": len(hops)}
    return out


def _wake_once(key: str, store: ThreadStore, conn: Connection, thread_id: str, item: dict[str, Any],
               hops: list[int]) -> int:
    generation = store.append(thread_id, [item])
    returned = time.monotonic_ns()
    if key == "same":
        store.flush(thread_id, generation=generation, timeout=30.0)
        return time.monotonic_ns() - returned
    conn.send((thread_id, generation, returned))
    if key == "both":
        store.flush(thread_id, generation=generation, timeout=30.0)
    received, flushed = conn.recv()
    hops.append(received - returned)
    return int(flushed - returned)


def _flusher_process(opener: StoreOpener, conn: Connection) -> None:
    """Process B: flush each (thread, generation) it is sent; reply with the times."""
    with opener.open() as store:
        conn.send("ready")
        while (message := conn.recv()) is not None:
            thread_id, generation, _ = message
            received = time.monotonic_ns()
            meta = store.flush(thread_id, generation=generation, timeout=30.0)
            flushed = time.monotonic_ns()
            if meta.item_count < generation:
                raise AssertionError(f"flush returned {meta.item_count} items, wanted {generation}")
            conn.send((received, flushed))
