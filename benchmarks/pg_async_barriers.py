"""PostgreSQL async barriers: native reads on the event loop against one executor hop.

Two ``AsyncThreadStore`` instances on one throwaway server (default durability, as the
other PostgreSQL arms), each in its own schema: one opened with
``AsyncThreadStore.open`` (its barriers read natively, on psycopg's asyncio pool), one
wrapping a ``ThreadStore`` (its barriers make one executor hop and read on the sync
pool, as every backend's did before). Each round runs one call of both, alternating
which goes first: first ``flush`` of a projected thread (the fast path), then
``append_and_flush``, each in its own phase (interleaved with a native flush, which
leaves its store's executor idle, an ``append_and_flush``'s hop finds a colder thread).
Read the ratios, measured side by side in one run; the machine is shared.

    $ python -m benchmarks.pg_async_barriers            # 400 rounds
    $ python -m benchmarks.pg_async_barriers --rounds 2000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from thread_store import AsyncThreadStore, ThreadStore

from .pg_systems import BenchServer, unavailable

#: Rounds left out of the figures at the start (connections, prepared statements).
WARM_UP = 50
ARMS = ("flush", "append_and_flush")
USER_ITEM = {"type": "event_msg", "payload": {"type": "user_message", "message": "hello"}}


async def measure(url: str, schemas: tuple[str, str], rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each arm, ``"<arm> native"`` and ``"<arm> hop"``."""
    stores = {"native": await AsyncThreadStore.open(url, schema=schemas[0]),
              "hop": AsyncThreadStore(ThreadStore.open(url, schema=schemas[1]))}
    times: dict[str, list[float]] = {f"{arm} {kind}": [] for arm in ARMS for kind in stores}
    try:
        tids = {kind: await store.create_thread() for kind, store in stores.items()}
        for kind, store in stores.items():
            await store.append_and_flush(tids[kind], [USER_ITEM], timeout=30)
        for arm in ARMS:
            for n in range(rounds):
                for kind in (("native", "hop") if n % 2 else ("hop", "native")):
                    store, tid = stores[kind], tids[kind]
                    start = time.perf_counter()
                    if arm == "flush":
                        await store.flush(tid, timeout=30)
                    else:
                        await store.append_and_flush(tid, [{"type": "note", "n": n}], timeout=30)
                    times[f"{arm} {kind}"].append(time.perf_counter() - start)
    finally:
        for store in stores.values():
            await store.close()
    return {arm: samples[WARM_UP:] for arm, samples in times.items()}


def table(times: dict[str, list[float]]) -> list[str]:
    """A markdown table: p50 and p99 of each arm, and native's p50 over hop's."""
    lines = ["| barrier | native p50 | hop p50 | native p99 | hop p99 | native / hop (p50) |",
             "|---|---|---|---|---|---|"]

    def p(samples: list[float], q: float) -> float:
        return sorted(samples)[min(len(samples) - 1, int(len(samples) * q))] * 1e6

    for arm in ARMS:
        native, hop = times[f"{arm} native"], times[f"{arm} hop"]
        ratio = statistics.median(native) / statistics.median(hop)
        lines.append(f"| `{arm}` | {p(native, 0.5):,.0f} µs | {p(hop, 0.5):,.0f} µs | "
                     f"{p(native, 0.99):,.0f} µs | {p(hop, 0.99):,.0f} µs | {ratio:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both arms on a throwaway server, print the table; returns the samples."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pg_async_barriers",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=400, help="rounds of both arms (default 400)")
    args = parser.parse_args(argv)
    missing = unavailable()
    if missing:
        raise SystemExit(f"PostgreSQL is not available here: {missing}")
    with BenchServer() as server:
        times = asyncio.run(measure(server.url, (server.new_schema("native"),
                                                 server.new_schema("hop")), args.rounds + WARM_UP))
    print("\n".join(table(times)))
    return times


if __name__ == "__main__":
    main()
