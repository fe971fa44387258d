"""``python -m benchmarks [--quick | --full | --smoke] [--scale] [--only PART] [--out DIR]``:
run everything side by side.

Writes ``DIR/bench.md`` (the table), ``DIR/bench.json`` (raw percentiles) and
``DIR/bench.png`` (append and barrier latency CDFs). ``--only postgres`` runs the
PostgreSQL phase alone and writes its targets and tables to ``DIR/bench-postgres.md`` and
``.json``; ``--only at_scale`` runs issue 15's at-scale arms alone (or ``--only`` one of
them), prints their tables and targets and writes ``DIR/at_scale.json``.
``thread-store bench`` calls :func:`main`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import at_scale, pg_systems, processes, report, rss, scale
from .pg_report import targets as pg_targets
from .peer_eventsourcing import PeerSystem
from .systems import RawSQLite, ThreadStoreSystem
from .workloads import (
    MODES,
    SCALE,
    WRITERS,
    Arm,
    Config,
    Sustained,
    interleave,
    items,
    sustained,
    thread_ids,
)

HOT = "hot"
MANY = "many"
LABELS = {
    "raw": "raw sqlite3 (floor)",
    "raw_upsert": "raw metadata upsert+commit (floor)",
    "raw_full": "raw sqlite3, synchronous=FULL (fsync floor)",
    "full": "thread_store async, durability=full",
    "async": "thread_store async (default)",
    "paused": "thread_store async, projection paused",
    "slow": "thread_store async, projection +100 ms/batch",
    "no_cr": "thread_store async, caller_runs=False",
    "sync": "thread_store sync",
    "peer": "eventsourcing peer",
}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; return the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", const="quick", dest="mode",
                      help="a smaller run that takes under two minutes")
    size.add_argument("--full", action="store_const", const="full", dest="mode",
                      help="the full run (the default)")
    size.add_argument("--smoke", action="store_const", const="smoke", dest="mode",
                      help="a tiny run that only checks the runner works (numbers meaningless)")
    parser.add_argument("--scale", action="store_true",
                        help=("issue 15's sizes: catch-up of 1,000,000 items over 10,000 threads, "
                              "and a process touching 1,000,000 threads (adds 10 minutes or more)"))
    parser.add_argument("--out", type=Path, default=Path("bench-results"),
                        help="directory for bench.md, bench.json and bench.png (default: %(default)s)")
    parser.add_argument("--postgres", action=argparse.BooleanOptionalAction, default=None,
                        help="run the PostgreSQL benchmarks on a throwaway server started from the "
                             "machine's binaries (default: when initdb and pg_ctl are found)")
    parser.add_argument("--only", choices=("postgres", "at_scale", *at_scale.PARTS),
                        help=("run only this part: the PostgreSQL phase (postgres; writes "
                              "bench-postgres.md and .json into --out, its targets and tables as in "
                              "the full report), or issue 15's at-scale arms (at_scale) or one of "
                              "them (writes at_scale.json)"))
    args = parser.parse_args(argv)
    config = MODES[args.mode or "full"]
    if args.scale:
        config = dataclasses.replace(config, **SCALE)
    command = ("python -m benchmarks" + (f" --{args.mode}" if args.mode else "")
               + (" --scale" if args.scale else "") + (f" --only {args.only}" if args.only else ""))
    missing = pg_systems.unavailable()
    if args.postgres and missing:
        parser.error(f"--postgres: {missing}")
    postgres: bool | str = (missing or True) if args.postgres is None else args.postgres
    if args.only == "postgres":
        if missing or args.postgres is False:
            parser.error(f"--only postgres: {missing or 'PostgreSQL left out (--no-postgres)'}")
        return _postgres_only(config, args.out)
    if args.only:
        parts = at_scale.PARTS if args.only == "at_scale" else (args.only,)
        return _only_at_scale(config, parts, args.out, command)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="thread_store-bench-") as tmp:
        results, cdf = run_all(config, Path(tmp), postgres=postgres)
    results.update(mode=config.mode, command=command, machine=report.machine(),
                   wall_s=time.perf_counter() - started)
    paths = report.write(results, cdf, args.out)
    print(paths["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _postgres_only(config: Config, out: Path) -> int:
    """``--only postgres``: the PostgreSQL phase alone, its targets and tables."""
    from . import postgres as pg  # needs psycopg and eventsourcing's PostgreSQL module

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="thread_store-bench-") as tmp:
        section = pg.run(config, Path(tmp))
    lines = [f"# thread_store benchmarks, PostgreSQL only ({config.mode} mode)", "",
             f"Wall time {time.perf_counter() - started:.0f} s.", "", *report.target_rows(
                 pg_targets(section)), *report.postgres_section(section)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench-postgres.json").write_text(json.dumps(report.finite(section), indent=2) + "\n")
    (out / "bench-postgres.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _only_at_scale(config: Config, parts: tuple[str, ...], out: Path, command: str) -> int:
    """``--only``: run these at-scale arms, print their tables and targets, write
    ``out/at_scale.json``."""
    phases: dict[str, float] = {}

    def phase(name: str, run: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        result = run()
        phases[name] = round(time.perf_counter() - started, 1)
        return result

    with tempfile.TemporaryDirectory(prefix="thread_store-bench-") as tmp:
        section = at_scale.run(config, Path(tmp), phase, parts)
    results: dict[str, Any] = {"at_scale": section, "mode": config.mode, "command": command,
               "machine": report.machine(), "phase_s": phases}
    wanted = {"flat": {"scale-flat"}, "catch_up_appends": {"scale-catch-up"},
              "touch": {"scale-memory", "scale-listing"}}
    keys = set().union(*(wanted[p] for p in parts))
    rows = [t for t in at_scale.targets(results) if t["key"] in keys]
    lines = [f"Machine: {report.machine_line(results['machine'])}  ", f"Command: `{command}`", "",
             *at_scale.markdown(section), "", *report.target_rows(rows)]
    print("\n".join(lines))
    out.mkdir(parents=True, exist_ok=True)
    (out / "at_scale.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


def run_all(config: Config, tmp: Path, *, postgres: bool | str = False
            ) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """Run every phase; return the results (percentiles) and the hot-thread samples for the plot.

    :param postgres: run the PostgreSQL phase (``True``), leave it out (``False``), or the
        reason it cannot run here, reported instead of its figures.
    """
    results: dict[str, Any] = {"latency": {}, "phase_s": {}}

    def phase(name: str, run: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        out = run()
        results["phase_s"][name] = round(time.perf_counter() - started, 1)
        return out

    results["tracing"] = phase("tracing", lambda: _tracing(config))
    hot = phase("latency, hot thread",
                lambda: _latency(config, tmp / "hot", ["hot"], include_peer=True, variants=True))
    results["latency"][HOT] = report.summarize_arms(hot)
    many = phase("latency, many threads",
                 lambda: _latency(config, tmp / "many", thread_ids(config.many_threads),
                                  include_peer=config.peer_many, variants=False))
    results["latency"][MANY] = report.summarize_arms(many)
    results["many_threads"] = config.many_threads
    results["sustained"] = phase("sustained", lambda: _sustained(config, tmp / "sustained"))
    results["processes"] = phase("writer processes", lambda: processes.run(config, tmp / "processes"))
    results["rss"] = phase("rss", lambda: {kind: rss.run(kind, config.rss_s, tmp / f"rss-{kind}")
                                           for kind in rss.SYSTEMS})
    results["scale"] = {
        "listing": report.summarize_listing(
            phase("listing", lambda: scale.listing(tmp / "list", config.list_threads))),
        "catch_up": phase("catch-up", lambda: scale.catch_up(
            tmp / "catchup", config.catchup_threads, config.catchup_items_per_thread)),
        "pending_memory": phase("pending memory",
                                lambda: scale.pending_memory(tmp / "memory", config.memory_threads)),
    }
    results["at_scale"] = at_scale.run(config, tmp / "at-scale", phase)
    if postgres is True:
        from . import postgres as pg  # needs psycopg and eventsourcing's PostgreSQL module

        results["postgres"] = phase("postgres", lambda: pg.run(config, tmp / "postgres"))
    elif postgres:
        results["postgres"] = {"skipped": postgres}
    cdf = {f"{arm.label}|{arm.metric}": arm.samples for arm in hot}
    return results, cdf


def _tracing(config: Config) -> dict[str, Any] | None:
    """What tracing costs on the append path: bench_tracing.py's own table, when it is there.

    It runs through its command line in a fresh interpreter (its own heap, its own
    interface); a failure is reported in the table rather than ending this run.
    """
    if not (Path(__file__).parent / "bench_tracing.py").is_file():
        return None
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_tracing", "--rounds", str(config.tracing_rounds),
         "--block", str(config.tracing_block)],
        check=False, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
        timeout=900)
    if run.returncode != 0:
        tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
        return {"ok": False, "table": f"bench_tracing.py failed (exit {run.returncode}): {tail}"}
    return {"ok": True, "table": run.stdout.strip()}


def _latency(config: Config, root: Path, tids: list[str], *, include_peer: bool,
             variants: bool) -> list[Arm]:
    """Open the systems, create the threads, run the arms interleaved, verify, close.

    Arms of one system (its append and its append_and_flush) share one instance; every
    block starts with the instance quiesced. ``variants`` adds the decoupling and
    caller-runs arms (paused, slowed projection, ``caller_runs=False``), the raw upsert
    floor, and the synchronous=FULL arms.
    """
    n_ops = config.warmup * 2 + config.rounds * config.block
    pool = items(min(n_ops, 20_000))
    work = [(tids[k % len(tids)], pool[k % len(pool)]) for k in range(n_ops)]
    arms: list[Arm] = []
    opened: dict[str, Any] = {}

    def arm(key: str, metric: str, make: Callable[[Path], Any], op_name: str, *,
            label: str | None = None, block: int | None = None) -> None:
        system = opened.get(key)
        if system is None:
            system = opened[key] = make(root / key)
            system.populate(tids)
        arms.append(Arm(label or LABELS[key], metric, system, getattr(system, op_name),
                        block or config.block))

    try:
        arm("raw", "append", RawSQLite, "append")
        arm("raw", "append_and_flush", RawSQLite, "append_and_flush")
        arm("async", "append", _ts("async"), "append")
        arm("async", "append_and_flush", _ts("async"), "append_and_flush")
        arm("sync", "append", _ts("sync", projection="sync"), "append")
        if variants:
            arm("raw", "upsert", RawSQLite, "upsert", label=LABELS["raw_upsert"])
            arm("paused", "append", _ts("paused"), "append")
            opened["paused"].pause()  # after setup, whose flush needs the projector
            arm("slow", "append", _ts("slow", slow=True), "append")
            arm("no_cr", "append_and_flush",
                _ts("no_cr", caller_runs=False), "append_and_flush")
            # Equal-durability comparison with the peer, which always runs synchronous=FULL.
            fsync = config.fsync_block
            arm("raw_full", "append", lambda p: RawSQLite(p, "FULL"), "append", block=fsync)
            arm("full", "append", _ts("full", durability="full"), "append", block=fsync)
            arm("full", "append_and_flush", _ts("full", durability="full"), "append_and_flush", block=fsync)
        if include_peer:
            arm("peer", "append", PeerSystem, "append", block=config.fsync_block)
            arm("peer", "append_and_flush", PeerSystem, "append_and_flush", block=config.peer_wait_block)
        interleave(arms, work, config.rounds, config.warmup)
        for system in opened.values():
            system.verify()
    finally:
        for system in opened.values():
            system.close()
    return arms


def _ts(name: str, **options: Any) -> Callable[[Path], ThreadStoreSystem]:
    """A factory of thread_store systems opened with ``options``."""
    return lambda root: ThreadStoreSystem(root, name, **options)


def _sustained(config: Config, root: Path) -> dict[str, Any]:
    """The 100-thread workload: each arm runs ``sustained_rounds`` times, interleaved."""
    tids = thread_ids(100)
    pool = items(5000, seed=3)
    plan: list[tuple[str, int, Callable[[Path], Any]]] = [
        ("raw", 1, RawSQLite),
        ("raw", WRITERS, RawSQLite),
        ("async", WRITERS, _ts("async")),
        ("async", 1, _ts("async")),
        ("paused", WRITERS, _ts("paused")),
        ("slow", WRITERS, _ts("slow", slow=True)),
        ("sync", WRITERS, _ts("sync", projection="sync")),
        # Group commit (issue 15 point 3): the same 8 writers with an fsync per commit.
        ("full", WRITERS, _ts("full", durability="full")),
        ("raw_full", WRITERS, lambda p: RawSQLite(p, "FULL")),
        ("peer", WRITERS, PeerSystem),
    ]
    runs: list[tuple[Sustained, Any]] = []
    try:
        for key, writers, make in plan:
            system = make(root / f"{key}-{writers}")
            runs.append((Sustained(LABELS[key], writers), system))
            system.populate(tids)
            if key == "paused":
                system.pause()
        for _ in range(config.sustained_rounds):
            for result, system in runs:
                sustained(result, system, tids, pool, config.sustained_s / config.sustained_rounds)
        for _, system in runs:
            system.verify()
    finally:
        for _, system in runs:
            system.close()
    return {f"{r.label}|{r.writers}": report.summarize_sustained(r) for r, _ in runs}


if __name__ == "__main__":
    raise SystemExit(main())
