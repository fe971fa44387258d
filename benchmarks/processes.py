"""Several writer processes on one embedded store: sustained rate and lag, and cross-process wake-up.

The harness is :mod:`benchmarks.writer_processes`; this module runs it on SQLite stores
and reports it. **Sustained:** for N in :data:`PROCESS_COUNTS`, N spawned processes each
open the same directory and run :data:`WRITERS_PER_PROCESS` writer threads over the same
100 threads. The raw floor is one sqlite3 connection in this process
(:class:`~benchmarks.systems.RawSQLite`, one writer). The arms run in interleaved rounds,
order rotated each round, each thread_store arm on its own store. The watcher reads
``index.db`` read-only: every :data:`~benchmarks.writer_processes.POLL_S` it reads
``PRAGMA data_version`` (microseconds), and when another connection has committed it
reads every thread's ``projected_seq`` (what ``status()`` reports).

**Wake-up:** :func:`~benchmarks.writer_processes.wake` on a directory store; A's 5 ms
coalescing usually lets B's barrier project the thread itself, and with A flushing too B
often blocks on the index lock until A's commit releases it.
"""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path
from typing import Any

from .systems import RawSQLite
from .workloads import Config, Sustained, items, sustained, thread_ids
from .writer_processes import (POLL_S, THREADS, StoreOpener, Watcher, arm_row, fmt, new_arm, populate, run_round,
                               summarize, verify, wake)

PROCESS_COUNTS = (1, 2, 4)
WRITERS_PER_PROCESS = 2
RAW = "raw sqlite3, 1 connection (floor)"
TARGET_RATIO = 0.6
TARGET_LAG_MS = 50.0


def run(config: Config, root: Path) -> dict[str, Any]:
    """Both benchmarks of this module; the ``processes`` section of the results."""
    return {"sustained": _sustained(config, root / "sustained"),
            "wake": wake(config.wake_rounds, config.block, StoreOpener(str(root / "wake"))),
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
        arms[n] = new_arm(StoreOpener(str(path)), lambda p=path: _SQLiteWatcher(p / "index.db"),
                          WRITERS_PER_PROCESS)
        populate(arms[n]["opener"], tids)
    order: list[int | None] = [None, *PROCESS_COUNTS]
    try:
        for r in range(config.mp_rounds):
            shift = r % len(order)
            for procs in order[shift:] + order[:shift]:
                if procs is None:
                    sustained(raw_result, raw, tids, items(2000, seed=3), seconds)
                else:
                    run_round(arms[procs], procs, seconds, root / f"round-{procs}-{r}")
        raw.verify()
    finally:
        raw.close()
    for arm in arms.values():
        verify(arm["opener"], tids, arm["per_thread"])
    raw_rate = raw_result.appends / raw_result.seconds
    return {"raw_appends_per_s": raw_rate,
            "arms": {str(n): summarize(arm, n, raw_rate) for n, arm in arms.items()}}


class _SQLiteWatcher(Watcher):
    """Reads ``index.db`` read-only when ``PRAGMA data_version`` says another connection
    committed (microseconds when nothing did)."""

    def __init__(self, index_db: Path) -> None:
        super().__init__()
        self._conn = sqlite3.connect(f"file:{index_db}?mode=ro", uri=True, isolation_level=None)
        self._version = -1

    def snapshot(self, forced: bool) -> list[tuple[str, int]] | None:
        version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        if version == self._version and not forced:
            return None
        self._version = version
        return list(self._conn.execute("SELECT thread_id, projected_seq FROM threads"))

    def close(self) -> None:
        self._conn.close()


# -- report ------------------------------------------------------------------------------


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
        lines.append(arm_row(arm, (fmt(arm["appends_per_commit"], 2),)))
    lines += ["", ("Lag: from an append's return to the first snapshot of `index.db` (read when "
                   "`PRAGMA data_version` changed, polled every "
                   f"{POLL_S * 1e3:g} ms) showing its generation projected; it overestimates by at "
                   "most the poll gap plus the read shown. Appends never seen projected before the "
                   "last snapshot: " + ", ".join(f"{a['unmatched']} ({a['processes']} proc)"
                                                for a in sus["arms"].values()) + "."), "",
              "### Cross-process wake-up: A appends, B's `flush` on that generation returns", "",
              "| Arm | p50 | p99 | n |", "|---|---:|---:|---:|"]
    for row in wake.values():
        lines.append(f"| {row['label']} | {fmt(row['p50_us'])} µs | {fmt(row['p99_us'])} µs | {row['n']} |")
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
    lags = ", ".join(f"{a['processes']} → {fmt(a['lag_p99_ms'])} ms" for a in arms.values())
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
