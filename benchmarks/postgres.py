"""PostgreSQL: floors, thread_store, the eventsourcing peer, writer processes, wake-up.

Everything runs against one throwaway server at default durability
(:class:`~benchmarks.pg_systems.BenchServer`), in one run, arms interleaved:

- **Latency, one hot thread, one caller** (the harness of :mod:`benchmarks.workloads`):
  the raw floors (INSERT+COMMIT; the one-statement append that allocates the seq;
  INSERT + metadata UPSERT in one transaction), thread_store's ``append`` and
  ``append_and_flush``, and the peer's append and append + documented wait.
- **Sustained, N writer processes over 100 threads** (:mod:`benchmarks.writer_processes`):
  N = 1, 2, 4, 8 processes with one writer thread each on one store, against the raw
  one-statement append from 8 client processes; lag from a watcher polling the ``meta``
  table's ``projected_seq`` every :data:`POLL_S`.
- **Cross-process wake-up**: :func:`benchmarks.writer_processes.wake` on a PostgreSQL store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from . import report
from .peer_eventsourcing_pg import PgPeerSystem
from .pg_report import PEER, POLL_S, PROCESS_COUNTS, RAW_CLIENTS, RAW_INSERT, RAW_ONE, RAW_TXN, TS
from .pg_systems import SYNCHRONOUS_COMMIT, BenchServer, RawAppender, RawPostgres, raw_counts
from .systems import ThreadStoreSystem
from .workloads import Arm, Config, interleave, items, thread_ids
from .writer_processes import (THREADS, StoreOpener, Watcher, new_arm, populate, run_round, summarize,
                               verify, wake)


def run(config: Config, tmp: Path) -> dict[str, Any]:
    """Start the server, run every PostgreSQL phase, stop it; the ``postgres`` section."""
    with BenchServer() as server:
        opener = StoreOpener(server.url, {"schema": server.new_schema("wake")})
        return {"settings": server.settings(), "synchronous_commit": SYNCHRONOUS_COMMIT,
                "latency": report.summarize_arms(_latency(config, server)),
                "sustained": _sustained(config, server, tmp),
                "wake": wake(config.wake_rounds, config.block, opener)}


def _latency(config: Config, server: BenchServer) -> list[Arm]:
    """The hot-thread arms, interleaved; every system verified, then closed."""
    n_ops = config.warmup * 2 + config.rounds * config.block
    pool = items(min(n_ops, 20_000))
    work = [("hot", pool[k % len(pool)]) for k in range(n_ops)]
    raw = RawPostgres(server.url, server.new_schema("raw"))
    one = RawPostgres(server.url, server.new_schema("raw_one"), allocate=True)
    systems: list[Any] = [raw, one]
    try:
        ts = ThreadStoreSystem(server.url, TS, schema=server.new_schema("ts"))
        systems.append(ts)
        peer = PgPeerSystem(server.url, server.new_schema("peer"))
        systems.append(peer)
        for system in systems:
            system.populate(["hot"])
        arms = [Arm(RAW_INSERT, "append", raw, raw.append, config.block),
                Arm(RAW_ONE, "append", one, one.append, config.block),
                Arm(RAW_TXN, "append_and_flush", raw, raw.append_and_flush, config.block),
                Arm(TS, "append", ts, ts.append, config.block),
                Arm(TS, "append_and_flush", ts, ts.append_and_flush, config.block),
                Arm(PEER, "append", peer, peer.append, config.fsync_block),
                Arm(PEER, "append_and_flush", peer, peer.append_and_flush, config.peer_wait_block)]
        interleave(arms, work, config.rounds, config.warmup)
        for system in systems:
            system.verify()
    finally:
        for system in systems:
            system.close()
    return arms


class _PgWatcher(Watcher):
    """Reads every thread's ``projected_seq`` from the store's ``meta`` table (one
    autocommit query), keeping a snapshot only when it changed."""

    poll_s = POLL_S

    def __init__(self, url: str, schema: str) -> None:
        super().__init__()
        self._conn = psycopg.connect(url, autocommit=True, connect_timeout=30)
        self._query = f'SELECT thread_id, projected_seq FROM "{schema}".meta'.encode()
        self._last: list[tuple[str, int]] = []

    def snapshot(self, forced: bool) -> list[tuple[str, int]] | None:
        rows = [(str(t), int(s)) for t, s in self._conn.execute(self._query)]
        if rows == self._last and not forced:
            return None
        self._last = rows
        return rows

    def close(self) -> None:
        self._conn.close()


def _sustained(config: Config, server: BenchServer, tmp: Path) -> dict[str, Any]:
    """N writer processes (one writer each) per arm, and the raw N-client floor, interleaved."""
    tids = thread_ids(THREADS)
    seconds = config.mp_s / config.mp_rounds
    raw_schema = server.new_schema("raw_clients")
    heads = RawPostgres(server.url, raw_schema)
    try:
        for tid in tids:
            heads.create(tid)
    finally:
        heads.close()
    raw = new_arm(RawAppender(server.url, raw_schema), Watcher, 1)
    arms: dict[int, dict[str, Any]] = {}
    for n in PROCESS_COUNTS:
        opener = StoreOpener(server.url, {"schema": server.new_schema(f"ts_{n}proc")})
        populate(opener, tids)
        arms[n] = new_arm(opener, lambda o=opener: _PgWatcher(o.target, o.options["schema"]), 1)
    order: list[int | None] = [None, *PROCESS_COUNTS]
    for r in range(config.mp_rounds):
        shift = r % len(order)
        for procs in order[shift:] + order[:shift]:
            scratch = tmp / f"round-{procs or 'raw'}-{r}"
            if procs is None:
                run_round(raw, RAW_CLIENTS, seconds, scratch)
            else:
                run_round(arms[procs], procs, seconds, scratch)
    stored = raw_counts(server.url, raw_schema)
    for i, tid in enumerate(tids):
        if stored[tid] != (raw["per_thread"][i], raw["per_thread"][i]):
            raise AssertionError(f"raw clients: {tid} holds (rows, head) {stored[tid]}, "
                                 f"expected {raw['per_thread'][i]} of each")
    for arm in arms.values():
        verify(arm["opener"], tids, arm["per_thread"])
    raw_rate = raw["appends"] / raw["seconds"]
    return {"raw": summarize(raw, RAW_CLIENTS, raw_rate), "raw_appends_per_s": raw_rate,
            "arms": {str(n): summarize(arm, n, raw_rate) for n, arm in arms.items()}}
