"""The PostgreSQL section of the report: its tables, its targets and what limits a miss."""

from __future__ import annotations

import math
from typing import Any

from .writer_processes import arm_row, fmt

RAW_INSERT = "raw PostgreSQL INSERT+COMMIT (floor)"
RAW_ONE = "raw PostgreSQL one-statement append, seq allocated (floor)"
RAW_TXN = "raw PostgreSQL INSERT + metadata UPSERT, one transaction (floor)"
TS = "thread_store on PostgreSQL"
PEER = "eventsourcing peer on PostgreSQL"
#: Writer processes of the sustained arms, and the raw floor's client processes.
PROCESS_COUNTS = (1, 2, 4, 8)
RAW_CLIENTS = 8
#: Seconds between the lag watcher's reads of the ``meta`` table.
POLL_S = 0.002
TARGET_APPEND, TARGET_BARRIER, TARGET_RATE, TARGET_LAG_MS, TARGET_PEER = 1.3, 1.5, 0.6, 50.0, 10.0


def _p50(section: dict[str, Any], label: str, metric: str) -> float:
    row = section.get("latency", {}).get(f"{label}|{metric}")
    return float(row["p50_us"]) if row else math.nan


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


def _most(section: dict[str, Any]) -> dict[str, Any]:
    return dict(section.get("sustained", {}).get("arms", {}).get(str(max(PROCESS_COUNTS)), {}))


def targets(section: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Issue 12's PostgreSQL targets, in the rows ``targets.evaluate`` returns (none when
    the PostgreSQL benchmarks did not run)."""
    if not section or "latency" not in section:
        return []
    most = _most(section)
    rows = [
        ("pg-append", "PostgreSQL: append p50 vs the one-statement append floor",
         _ratio(_p50(section, TS, "append"), _p50(section, RAW_ONE, "append")), "×",
         f"≤ {TARGET_APPEND}×", lambda x: x <= TARGET_APPEND),
        ("pg-barrier", "PostgreSQL: append_and_flush p50 vs INSERT + UPSERT in one transaction",
         _ratio(_p50(section, TS, "append_and_flush"), _p50(section, RAW_TXN, "append_and_flush")), "×",
         f"≤ {TARGET_BARRIER}×", lambda x: x <= TARGET_BARRIER),
        ("pg-throughput", f"PostgreSQL: appends/s, {max(PROCESS_COUNTS)} writer processes vs raw "
         f"{RAW_CLIENTS}-client floor", most.get("ratio_to_raw", math.nan), "×", f"≥ {TARGET_RATE}×",
         lambda x: x >= TARGET_RATE),
        ("pg-lag", f"PostgreSQL: projection lag p99, {max(PROCESS_COUNTS)} writer processes",
         most.get("lag_p99_ms", math.nan), " ms", f"≤ {TARGET_LAG_MS:g} ms", lambda x: x <= TARGET_LAG_MS),
        ("pg-peer", "PostgreSQL: read-your-writes p50, eventsourcing peer vs thread_store",
         _ratio(_p50(section, PEER, "append_and_flush"), _p50(section, TS, "append_and_flush")),
         "× faster", f"≥ {TARGET_PEER:g}×", lambda x: x >= TARGET_PEER),
    ]
    return [{"key": key, "name": name, "value": value,
             "shown": "—" if math.isnan(value) else f"{value:,.2f}{unit}", "limit": limit,
             "met": not math.isnan(value) and bool(check(value))}
            for key, name, value, unit, limit, check in rows]


def markdown(section: dict[str, Any], latency_table: list[str]) -> list[str]:
    """The section's Markdown lines (``latency_table``: its latency rows, formatted by the
    report like the SQLite ones)."""
    if "skipped" in section:
        return [f"Not run: {section['skipped']}"]
    s = section["settings"]
    sus, wake = section["sustained"], section["wake"]
    lines = [(f"PostgreSQL {s['server_version']}, a throwaway local server at default durability "
              f"(fsync={s['fsync']}, full_page_writes={s['full_page_writes']}, wal_sync_method="
              f"{s['wal_sync_method']}), over TCP on 127.0.0.1. Every durable commit of every arm runs "
              f"at `synchronous_commit={section['synchronous_commit']}` (the benchmark database's "
              "default; thread_store's `durability=\"normal\"` sets the same; without synchronous "
              "standbys it waits for the same local WAL flush as `on`). thread_store's projection "
              "commits run at `off`, as the backend always does for derived data."), "",
             "### Latency: one hot thread, one caller", "", *latency_table, "",
             ("Read-your-writes: `append_and_flush` for thread_store; an append then "
              "`ProjectionRunner.wait` (the view's `TrackingRecorder.wait`) for the peer; INSERT + "
              "UPSERT in one transaction for the floor."), "",
             "### Sustained: 100 threads, N writer processes × 1 writer thread, one store", "",
             "| Arm | appends/s | × raw | append p50 | append p99 | lag p50 | lag p99 | lag max "
             "| lag resolution (poll gap p99 + read) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
             (f"| raw one-statement append, {RAW_CLIENTS} client processes (floor) | "
              f"{sus['raw_appends_per_s']:,.0f} | 1.00 | {fmt(sus['raw']['append_p50_us'])} µs | "
              f"{fmt(sus['raw']['append_p99_us'])} µs | — | — | — | — |")]
    for arm in sus["arms"].values():
        lines.append(arm_row(arm))
    lines += ["", ("Lag: from an append's return to the first snapshot of the `meta` table's "
                   f"`projected_seq` (one query, polled every {POLL_S * 1e3:g} ms from the parent process) that "
                   "covers it. Appends never seen projected before the last snapshot: "
                   + ", ".join(f"{a['unmatched']} ({a['processes']} proc)" for a in sus["arms"].values())
                   + "."), "",
              "### Cross-process wake-up: A appends, B's `flush` on that generation returns", "",
              "| Arm | p50 | p99 | n |", "|---|---:|---:|---:|"]
    for row in wake.values():
        lines.append(f"| {row['label']} | {fmt(row['p50_us'])} µs | {fmt(row['p99_us'])} µs | {row['n']} |")
    return lines


#: What development profiles found for each missed target (see benchmarks/README.md).
LIMITS = {
    "pg-append": ("The floor is one round trip of one prepared statement; thread_store's append is "
                  "the same statement plus its Python path: validation and JSON of the item, a "
                  "pooled connection checked out and back in (`psycopg_pool`) and the projector's "
                  "bookkeeping. Its arrays go in binary: in text format psycopg escaped every quote "
                  "of the JSON in Python, which alone cost more than the round trip."),
    "pg-barrier": ("The floor is one transaction: four statements, one durable commit. "
                   "`append_and_flush` is two round trips: the append (its durable commit), then "
                   "the caller's projection commit, one statement at `synchronous_commit=off` "
                   "(the guarded upsert, the failure clear and the live incarnation in one CTE). "
                   "What remains is Python: the item's validation and JSON, the projector's "
                   "hand-off and fold, and two pooled connections checked out and back in."),
    "pg-throughput": ("The raw clients only append. Every thread_store process also projects "
                      "every thread its writer appended to, and with every process writing every "
                      "thread each thread is projected by up to N processes, each reading back "
                      "(one round trip per thread) the items the others appended and the row's "
                      "checkpoint: projection work grows with N on a server whose two vCPUs the "
                      "writers and their backends already fill. In a py-spy profile of one of 8 "
                      "processes the projector's time went to per-thread reads (incarnations 48 %, "
                      "since batched; items 28 %; checkpoints 12 %), not to its commits (4 %)."),
    "pg-lag": ("The projectors of several processes contend for the same `meta` rows: sampled "
               "`pg_stat_activity` showed 39 % of thread_store's sessions waiting on another "
               "projector's row lock, and batches locked in different orders deadlocked (now locked "
               "in thread id order). Each projector's batch also makes a round trip per thread "
               "for other processes' items, so a batch of 100 threads takes tens of round trips "
               "on a loaded machine: lag grows with the number of processes."),
    "pg-peer": ("The peer's wait sleeps 100 ms before it checks again, so a miss would mean "
                "thread_store's barrier took over 10 ms."),
}


def why(key: str, section: dict[str, Any]) -> str:
    """What limits a missed PostgreSQL target, with this run's own figures."""
    arms = section["sustained"]["arms"]
    rates = ", ".join(f"{a['processes']} → {a['ratio_to_raw']:.2f}×" for a in arms.values())
    figures = {"pg-throughput": f"Rate by writer processes ({rates}). ",
               "pg-lag": "Lag p99 by writer processes ("
                         + ", ".join(f"{a['processes']} → {fmt(a['lag_p99_ms'])} ms" for a in arms.values())
                         + "). "}
    return figures.get(key, "") + LIMITS[key]

