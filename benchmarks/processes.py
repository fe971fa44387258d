"""Several writer processes on one store: sustained rate and lag, and cross-process wake-up.

**Sustained.** For N in :data:`PROCESS_COUNTS`, N spawned processes each open the same
store (``ThreadStore.open(path)``) and run :data:`WRITERS_PER_PROCESS` threads appending
round robin over the same 100 threads for a fixed time. The raw floor is one sqlite3
connection in this process (:class:`~benchmarks.systems.RawSQLite`, one writer). The arms
run in interleaved rounds, order rotated each round, each thread_store arm on its own store.

Lag: every append's thread, generation and return time (``time.monotonic_ns``,
CLOCK_MONOTONIC, one clock for every process of the machine) is kept by its writer and
written to a file after the run. Meanwhile this process watches ``index.db`` read-only:
every :data:`POLL_S` it reads ``PRAGMA data_version`` (microseconds), and when another
connection has committed it reads every thread's ``projected_seq`` (what ``status()``
reports) and stamps that snapshot with the time the read returned. Afterwards each append
is matched with the first snapshot stamped at or after its return that covers its
generation. Lag is overestimated by at most one poll gap plus one read; both are measured
and reported as the method's resolution.

**Wake-up.** Process A (this one) appends to one of 100 threads and sends the
generation and the return time through a pipe to process B, which calls
``flush(thread_id, generation=g)``. The latency is from A's append returning to B's
flush returning (the pipe hop, measured, is part of it). Arms, interleaved in blocks:
the same-process baseline (A appends then flushes itself), B alone with A projecting
normally (A's 5 ms coalescing usually lets B's barrier project the thread itself), B
alone with A's projection paused (B always does the work), and A flushing too, so B
often blocks on the index lock until A's commit releases it.
"""

from __future__ import annotations

import array
import bisect
import math
import multiprocessing
import sqlite3
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from thread_store import ThreadStore

from .systems import RawSQLite
from .workloads import Config, Sustained, fill, items, percentile, sustained, thread_ids

PROCESS_COUNTS = (1, 2, 4)
WRITERS_PER_PROCESS = 2
THREADS = 100
POLL_S = 0.0005
RAW = "raw sqlite3, 1 connection (floor)"
TARGET_RATIO = 0.6
TARGET_LAG_MS = 50.0
WAKE_ARMS = {
    "same": "same process: append, then flush",
    "cross": "B flushes; A projects normally",
    "paused": "B flushes; A's projection paused",
    "both": "B flushes while A flushes too",
}
_SPAWN = multiprocessing.get_context("spawn")
_TIMEOUT_S = 120.0


def run(config: Config, root: Path) -> dict[str, Any]:
    """Both benchmarks of this module; the ``processes`` section of the results."""
    return {"sustained": _sustained(config, root / "sustained"),
            "wake": _wake(config.wake_rounds, config.block, root / "wake"),
            "writers_per_process": WRITERS_PER_PROCESS, "threads": THREADS}


# -- sustained ---------------------------------------------------------------------------


def _sustained(config: Config, root: Path) -> dict[str, Any]:
    tids = thread_ids(THREADS)
    seconds = config.mp_s / config.mp_rounds
    raw = RawSQLite(root / "raw")
    raw.populate(tids)
    raw_result = Sustained(RAW, 1)
    arms: dict[int, dict[str, Any]] = {}
    for n in PROCESS_COUNTS:
        path = root / f"ts-{n}"
        with ThreadStore.open(path) as store:
            fill(_Filler(store), tids)
            store.flush_all(timeout=60.0)
        arms[n] = {"path": path, "appends": 0, "commits": 0, "seconds": 0.0, "latencies": [], "lags": [],
                   "unmatched": 0, "gaps": [], "reads": [], "per_thread": [0] * THREADS}
    order: list[int | None] = [None, *PROCESS_COUNTS]
    try:
        for r in range(config.mp_rounds):
            shift = r % len(order)
            for procs in order[shift:] + order[:shift]:
                if procs is None:
                    sustained(raw_result, raw, tids, items(2000, seed=3), seconds)
                else:
                    _round(arms[procs], procs, seconds, root / f"round-{procs}-{r}")
        raw.verify()
    finally:
        raw.close()
    for arm in arms.values():
        _verify(arm["path"], tids, arm["per_thread"])
    raw_rate = raw_result.appends / raw_result.seconds
    out: dict[str, Any] = {"raw_appends_per_s": raw_rate, "arms": {}}
    for n, arm in arms.items():
        rate = arm["appends"] / arm["seconds"]
        out["arms"][str(n)] = {
            "processes": n, "appends": arm["appends"], "seconds": arm["seconds"],
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
            "snapshot_read_p50_ms": percentile(arm["reads"], 50) / 1e6,
        }
    return out


class _Filler:
    """The adapter :func:`fill` wants, over an open store (setup only)."""

    def __init__(self, store: ThreadStore) -> None:
        self.store = store

    def create(self, thread_id: str) -> None:
        self.store.create_thread(thread_id)

    def append(self, thread_id: str, item: dict[str, Any]) -> int:
        return self.store.append(thread_id, [item])


def _round(arm: dict[str, Any], n: int, seconds: float, scratch: Path) -> None:
    """One round of N writer processes on ``arm``'s store, watched from this process."""
    scratch.mkdir(parents=True)
    start = _SPAWN.Barrier(n + 1)
    pipes = [_SPAWN.Pipe(duplex=False) for _ in range(n)]
    procs = [_SPAWN.Process(target=_writer_process, name=f"bench-writer-proc-{p}",
                            args=(str(arm["path"]), p, n, seconds, start, pipes[p][1], str(scratch)))
             for p in range(n)]
    for proc in procs:
        proc.start()
    watcher = _Watcher(arm["path"] / "index.db")
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


def _writer_process(path: str, index: int, n: int, seconds: float, start: Any, report: Connection,
                    scratch: str) -> None:
    """A spawned writer process: WRITERS_PER_PROCESS threads append until ``seconds`` pass."""
    tids = thread_ids(THREADS)
    pool = items(2000, seed=3 + index)
    writers = WRITERS_PER_PROCESS
    logs = [tuple(array.array("q") for _ in range(4)) for _ in range(writers)]
    per_thread = [[0] * THREADS for _ in range(writers)]
    store = ThreadStore.open(path)
    history = store._storage.history  # type: ignore[attr-defined]  # the commit counter
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
        commits = history.append_commits
        gate.wait()
        stop.wait(seconds)
        stop.set()
        for t in threads:
            t.join()
        stopped = time.monotonic_ns()
        commits = history.append_commits - commits
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


def _load(scratch: Path, index: int) -> list[array.array[int]]:
    out = []
    for kind in range(4):
        a = array.array("q")
        a.frombytes((scratch / f"{index}-{kind}.bin").read_bytes())
        out.append(a)
    return out


class _Watcher:
    """Snapshots of every thread's ``projected_seq`` in ``index.db``, taken when it changes."""

    def __init__(self, index_db: Path) -> None:
        self._conn = sqlite3.connect(f"file:{index_db}?mode=ro", uri=True, isolation_level=None)
        tids = thread_ids(THREADS)
        self._slot = {t: i for i, t in enumerate(tids)}
        self.times: list[int] = []
        self.seqs: list[list[int]] = [[] for _ in range(THREADS)]  # per thread, one per snapshot
        self.gaps: list[int] = []
        self.reads: list[int] = []
        self._version = -1

    def _poll(self) -> None:
        version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        if version == self._version:
            return
        self._version = version
        t0 = time.monotonic_ns()
        rows = self._conn.execute("SELECT thread_id, projected_seq FROM threads").fetchall()
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
            time.sleep(POLL_S)
            now = time.monotonic_ns()
            self.gaps.append(now - last)
            last = now

    def final(self) -> None:
        """One last snapshot, after every writer has closed its store."""
        self._version = -1
        self._poll()
        self._conn.close()

    def lag(self, slot: int, generation: int, returned: int) -> int | None:
        """ns from ``returned`` to the first snapshot at or after it covering ``generation``."""
        seqs = self.seqs[slot]
        first = max(bisect.bisect_left(self.times, returned), bisect.bisect_left(seqs, generation))
        return self.times[first] - returned if first < len(self.times) else None


def _verify(path: Path, tids: list[str], appended: list[int]) -> None:
    """Every thread's projected ``item_count`` is its opening message plus every append."""
    with ThreadStore.open(path) as store:
        store.flush_all(timeout=120.0)
        for thread_id, expected in zip(tids, appended):
            got = store.read_thread(thread_id).item_count
            if got != expected + 1:
                raise AssertionError(f"{path.name}: {thread_id} has {got} items, expected {expected + 1}")


# -- wake-up -----------------------------------------------------------------------------


def _wake(rounds: int, block: int, root: Path) -> dict[str, Any]:
    """Cross-process barrier latency, arms interleaved in blocks (see the module docstring)."""
    tids = thread_ids(THREADS, "w")
    pool = items(2000, seed=5)
    block = max(1, min(block, rounds) // 4)
    samples: dict[str, list[int]] = {key: [] for key in WAKE_ARMS}
    hops: list[int] = []
    store = ThreadStore.open(root)
    ours, theirs = _SPAWN.Pipe()
    proc = _SPAWN.Process(target=_flusher_process, args=(str(root), theirs), name="bench-flusher")
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


def _flusher_process(path: str, conn: Connection) -> None:
    """Process B: flush each (thread, generation) it is sent; reply with the times."""
    with ThreadStore.open(path) as store:
        conn.send("ready")
        while (message := conn.recv()) is not None:
            thread_id, generation, _ = message
            received = time.monotonic_ns()
            meta = store.flush(thread_id, generation=generation, timeout=30.0)
            flushed = time.monotonic_ns()
            if meta.item_count < generation:
                raise AssertionError(f"flush returned {meta.item_count} items, wanted {generation}")
            conn.send((received, flushed))


# -- report ------------------------------------------------------------------------------


def _f(value: float, digits: int = 1) -> str:
    return "—" if math.isnan(value) else f"{value:,.{digits}f}"


def markdown(section: dict[str, Any]) -> list[str]:
    """The section's Markdown lines."""
    sus, wake = section["sustained"], section["wake"]
    raw = sus["raw_appends_per_s"]
    lines = [f"### Sustained: {section['threads']} threads, N writer processes × "
             f"{section['writers_per_process']} threads each, one store", "",
             "| Arm | appends/s | × raw | appends per history commit | append p50 | append p99 "
             "| lag p50 | lag p99 | lag max | lag resolution (poll gap p99 + read) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| {RAW} | {raw:,.0f} | 1.00 | 1.00 | — | — | — | — | — | — |"]
    for arm in sus["arms"].values():
        n = arm["processes"]
        lines.append(
            f"| thread_store, {n} process{'es' if n > 1 else ''} | {arm['appends_per_s']:,.0f} | "
            f"{arm['ratio_to_raw']:.2f} | {_f(arm['appends_per_commit'], 2)} | "
            f"{_f(arm['append_p50_us'])} µs | {_f(arm['append_p99_us'])} µs | "
            f"{_f(arm['lag_p50_ms'])} ms | {_f(arm['lag_p99_ms'])} ms | {_f(arm['lag_max_ms'])} ms | "
            f"{_f(arm['poll_gap_p99_ms'], 2)} + {_f(arm['snapshot_read_p50_ms'], 2)} ms |")
    lines += ["", ("Lag: from an append's return to the first snapshot of `index.db` (read when "
                   "`PRAGMA data_version` changed, polled every "
                   f"{POLL_S * 1e3:g} ms) showing its generation projected; it overestimates by at "
                   "most the poll gap plus the read shown. Appends never seen projected before the "
                   "last snapshot: " + ", ".join(f"{a['unmatched']} ({a['processes']} proc)"
                                                for a in sus["arms"].values()) + "."), "",
              "### Cross-process wake-up: A appends, B's `flush` on that generation returns", "",
              "| Arm | p50 | p99 | n |", "|---|---:|---:|---:|"]
    for row in wake.values():
        lines.append(f"| {row['label']} | {_f(row['p50_us'])} µs | {_f(row['p99_us'])} µs | {row['n']} |")
    same = wake["same"]["p50_us"]
    lines += ["", (f"p50 over the same-process baseline: B with A projecting "
                   f"{wake['cross']['p50_us'] / same:.2f}×, A paused {wake['paused']['p50_us'] / same:.2f}×, "
                   f"A flushing too {wake['both']['p50_us'] / same:.2f}×. Times run from A's append "
                   "returning to B's flush returning (CLOCK_MONOTONIC in both processes).")]
    return lines


def targets(section: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The issue's multi-process targets, in the rows ``targets.evaluate`` returns."""
    four = (section or {}).get("sustained", {}).get("arms", {}).get(str(max(PROCESS_COUNTS)), {})
    ratio, lag = four.get("ratio_to_raw", math.nan), four.get("lag_p99_ms", math.nan)
    return [
        {"key": "mp-throughput", "name": "sustained rate, 4 writer processes vs raw single connection",
         "value": ratio, "shown": "—" if math.isnan(ratio) else f"{ratio:.2f}×",
         "limit": f"≥ {TARGET_RATIO}×", "met": not math.isnan(ratio) and ratio >= TARGET_RATIO},
        {"key": "mp-lag", "name": "projection lag p99, 4 writer processes",
         "value": lag, "shown": "—" if math.isnan(lag) else f"{lag:,.1f} ms",
         "limit": f"≤ {TARGET_LAG_MS:g} ms", "met": not math.isnan(lag) and lag <= TARGET_LAG_MS},
    ]


def why(key: str, section: dict[str, Any]) -> str:
    """What limits a missed multi-process target, from this run's own figures."""
    arms = section["sustained"]["arms"]
    rates = ", ".join(f"{a['processes']} → {a['ratio_to_raw']:.2f}×" for a in arms.values())
    if key == "mp-throughput":
        one, most = arms[str(min(PROCESS_COUNTS))], arms[str(max(PROCESS_COUNTS))]
        gil = (" So the GIL is not what limits it: one process, with one GIL, was as fast or faster."
               if one["appends_per_s"] >= most["appends_per_s"] else "")
        return f"Rate by writer processes ({rates}).{gil} " + LIMITS
    lags = ", ".join(f"{a['processes']} → {_f(a['lag_p99_ms'])} ms" for a in arms.values())
    return f"Lag p99 by writer processes ({lags}). " + LAG_LIMITS


#: What a development profile found (py-spy --idle, 4 processes × 2 writers; see benchmarks/README.md).
LIMITS = ("Adding processes does not add appends: every commit of every process takes the "
          "store-wide `history.lock` flock, so commits are serialized across the store. Group "
          "commit batches the appends of one process under one flock hold, but with 2 writer "
          "threads per process a group holds about 1.05 appends (the table's appends per "
          "history commit), so nearly every append still pays a flock round, and after another "
          "process's commit the writer re-reads the top rowid and the thread's head before its "
          "INSERT. In a profile of 4 writer processes with group commit, the writers spent about "
          "50 % of their samples queued behind their process's leader and 25 % in that leader's "
          "`flock` wait, against about 5 % writing. On 2 vCPUs more processes than cores also "
          "means the flock holder is often descheduled.")
LAG_LIMITS = ("Before group commit, each process's projector read the history position and the "
              "incarnations under the in-process history mutex that a writer holds while it waits "
              "for the flock (65 % of the projector's samples with 4 processes); now it reads them "
              "without waiting (the cache, or the file when a writer holds the mutex). What is "
              "left: the projectors of all processes serialize on `index.lock`, and with all "
              "processes writing all 100 threads each projector folds items that others appended, "
              "which it must read back from history.")
