"""Issue 15: append latency that stays flat with many threads pending, and while a
reopened store catches up; memory and listing as a process touches ever more threads.

**Flat append.** Two async stores in this process, one appended to on a single hot
thread, the other round robin over ``many_threads`` threads (each append then costs the
projector a row of its own: nothing coalesces). The arms alternate in blocks, each
block starting quiesced (:func:`~benchmarks.workloads.interleave`), in ``flat_rounds``
rounds: 40 in every mode but smoke, so each p99 is the 80th or 200th slowest of 8,000 or
20,000 samples (12 rounds of 200 gave the 24th of 2,400, which a few hiccups of a loaded
machine moved by a factor of several).

**Appends during catch-up.** A store of ``catchup_append_threads`` threads (a few items
each) is built with projection paused; then, each round, ``index.db`` is deleted and the
store reopened, so the projector re-folds every thread. While it does, a caller appends
to one thread of its own in blocks (the "catching up" arm) until ``flush_all`` would find
nothing; then the same number of blocks runs on the idle store (the "idle" arm).

**Touching threads.** :mod:`benchmarks.touch`, in its own process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from thread_store import ThreadStore

from . import touch
from .systems import ThreadStoreSystem
from .workloads import Arm, Config, first_message, interleave, items, percentile, thread_ids

HOT = "thread_store async, 1 hot thread"
MANY = "thread_store async, {n:,} threads round robin"
TARGET_FLAT = 1.5
TARGET_CATCH_UP = 2.0
TARGET_MEMORY_MIB = 20.0
TARGET_LISTING = 1.5
TARGET_CATCH_UP_RATE = 0.25
_CATCH_UP_ITEMS = 3  # per thread, besides its opening message
_PROBE = "probe"


#: The measurements of this section, by key (``python -m benchmarks --only KEY`` runs one).
PARTS = ("flat", "catch_up_appends", "touch")


def run(config: Config, root: Path, phase: Callable[[str, Callable[[], Any]], Any],
        parts: tuple[str, ...] = PARTS) -> dict[str, Any]:
    """The measurements of this section named in ``parts`` (all by default); ``phase``
    times each one for the report."""
    plan: dict[str, tuple[str, Callable[[], Any]]] = {
        "flat": ("flat append", lambda: flat_append(config, root / "flat")),
        "catch_up_appends": ("appends during catch-up",
                             lambda: catch_up_appends(config, root / "catch-up")),
        "touch": ("touching threads", lambda: touch.run(root / "touch", list(config.touch))),
    }
    return {key: phase(*plan[key]) for key in PARTS if key in parts}


def _us(samples: list[int]) -> dict[str, float]:
    return {"p50_us": percentile(samples, 50) / 1e3, "p99_us": percentile(samples, 99) / 1e3,
            "n": len(samples)}


def flat_append(config: Config, root: Path) -> dict[str, Any]:
    """Append latency on one hot thread and round robin over many, interleaved."""
    n_ops = config.warmup * 2 + config.flat_rounds * config.block
    tids = thread_ids(config.many_threads)
    pool = items(min(n_ops, 20_000))
    work = [(tids[k % len(tids)], pool[k % len(pool)]) for k in range(n_ops)]
    hot = ThreadStoreSystem(root / "hot", "hot")
    many = ThreadStoreSystem(root / "many", "many")
    try:
        hot.populate(["hot"])
        many.populate(tids)
        arms = [Arm(HOT, "append", hot, lambda _tid, item: hot.append("hot", item), config.block),
                Arm(MANY.format(n=len(tids)), "append", many, many.append, config.block)]
        interleave(arms, work, config.flat_rounds, config.warmup)
        hot.verify()
        many.verify()
    finally:
        hot.close()
        many.close()
    return {"threads": len(tids), "hot": _us(arms[0].samples), "many": _us(arms[1].samples)}


def catch_up_appends(config: Config, root: Path) -> dict[str, Any]:
    """Append latency while the projector re-folds every thread of a reopened store,
    against the same store idle afterwards (see the module docstring)."""
    n = config.catchup_append_threads
    pool = items(max(_CATCH_UP_ITEMS, 64), seed=17)
    with ThreadStore.open(root) as store:
        store.pause_projection()
        for i, thread_id in enumerate(thread_ids(n, "u")):
            store.create_thread(thread_id)
            store.append(thread_id, [first_message(i), *pool[:_CATCH_UP_ITEMS]])
        store.create_thread(_PROBE)
        store.close(timeout=0.0)
    busy: list[int] = []
    idle: list[int] = []
    rounds, seconds, k = 0, 0.0, 0
    while rounds < config.catchup_append_rounds:
        rounds += 1
        for suffix in ("", "-wal", "-shm"):
            Path(f"{root / 'index.db'}{suffix}").unlink(missing_ok=True)
        t0 = time.perf_counter()
        with ThreadStore.open(root) as store:
            blocks = 0
            while not blocks or store.stats().pending_threads > 1:  # 1: the probe itself
                k = _block(store, pool, busy, k, config.block)
                blocks += 1
            store.flush_all(timeout=600.0)
            seconds += time.perf_counter() - t0
            for _ in range(blocks):
                store.flush_all(timeout=60.0)
                k = _block(store, pool, idle, k, config.block)
    return {"threads": n, "items": n * (1 + _CATCH_UP_ITEMS), "rounds": rounds,
            "catch_up_s": seconds / rounds, "catching_up": _us(busy), "idle": _us(idle)}


def _block(store: ThreadStore, pool: list[dict[str, Any]], samples: list[int], k: int,
           block: int) -> int:
    clock = time.perf_counter_ns
    for _ in range(block):
        item = pool[k % len(pool)]
        k += 1
        t0 = clock()
        store.append(_PROBE, [item])
        samples.append(clock() - t0)
    return k


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 15's targets, in the rows ``targets.evaluate`` returns."""
    s = results.get("at_scale") or {}
    catch = results.get("scale", {}).get("catch_up", {})
    flat = s.get("flat", {})
    busy = s.get("catch_up_appends", {})
    points = s.get("touch", {}).get("checkpoints", [])
    rows = [
        ("scale-flat", f"append p99, {flat.get('threads', 0):,} threads round robin vs 1 hot "
         "thread (interleaved)", _ratio(flat.get("many", {}), flat.get("hot", {})), "×",
         TARGET_FLAT, False),
        ("scale-catch-up", f"append p99 while {busy.get('threads', 0):,} threads catch up vs idle",
         _ratio(busy.get("catching_up", {}), busy.get("idle", {})), "×", TARGET_CATCH_UP, False),
    ]
    rows.append(("scale-catch-up-rate", f"catch-up rate after losing index.db "
                 f"({catch.get('items', 0):,} items) vs a raw SELECT of the same items",
                 catch.get("items_per_s", math.nan) / catch.get("raw_select_items_per_s", math.nan),
                 "×", TARGET_CATCH_UP_RATE, True))
    if len(points) >= 3:
        small, mid, big = points[0], points[1], points[-1]
        rows += [
            ("scale-memory", f"RSS after touching {big['threads']:,} threads minus after "
             f"{mid['threads']:,}", (big["rss_kib"] - mid["rss_kib"]) / 1024, " MiB",
             TARGET_MEMORY_MIB, False),
            ("scale-listing", f"list_threads first page p50 at {big['threads']:,} threads vs "
             f"{small['threads']:,}", big["first_page_p50_us"] / small["first_page_p50_us"], "×",
             TARGET_LISTING, False),
        ]
    out = []
    for key, name, value, unit, limit, at_least in rows:
        met = not math.isnan(value) and (value >= limit if at_least else value <= limit)
        out.append({"key": key, "name": name, "value": value,
                    "shown": "—" if math.isnan(value) else f"{value:,.2f}{unit}",
                    "limit": f"{'≥' if at_least else '≤'} {limit:g}{unit if unit != '×' else '×'}",
                    "met": met})
    return out


def _ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
    x, y = a.get("p99_us", math.nan), b.get("p99_us", math.nan)
    return x / y if y and not math.isnan(y) else math.nan


def markdown(section: dict[str, Any]) -> list[str]:
    """The section's tables (of the parts it holds)."""
    flat, busy = section.get("flat"), section.get("catch_up_appends")
    rows = []
    if flat:
        rows += [(HOT, flat["hot"]), (MANY.format(n=flat["threads"]), flat["many"])]
    if busy:
        rows += [(f"appending while {busy['threads']:,} threads ({busy['items']:,} items) "
                  "catch up after losing index.db", busy["catching_up"]),
                 ("the same store, idle", busy["idle"])]
    out: list[str] = []
    if rows:
        out += ["| Arm | append p50 | append p99 | n |", "|---|---:|---:|---:|"]
    for label, row in rows:
        out.append(f"| {label} | {row['p50_us']:,.1f} µs | {row['p99_us']:,.1f} µs | {row['n']} |")
    if busy:
        out += ["", f"A catch-up took {busy['catch_up_s']:.2f} s on average over {busy['rounds']} "
                "rounds (open to `flush_all`, with the probe appending)."]
    if "touch" not in section:
        return out
    out += [""] * bool(out) + ["| Threads touched | RSS | of which SQLite's heap | list_threads first page p50 "
            "| cached heads | cached incarnations | projector states | elapsed |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in section["touch"]["checkpoints"]:
        out.append(f"| {p['threads']:,} | {p['rss_kib'] / 1024:,.1f} MiB | "
                   f"{p['sqlite_kib'] / 1024:,.1f} MiB | "
                   f"{p['first_page_p50_us']:,.0f} µs | {p['cached_heads']:,} | "
                   f"{p['cached_incarnations']:,} | {p['projector_states']:,} | {p['seconds']:,.0f} s |")
    return out


def why(key: str, section: dict[str, Any]) -> str:
    """What limits a missed target of this section, from this run's own figures."""
    if key == "scale-flat":
        return ("Round robin over many threads coalesces nothing: every append costs the "
                "projector a fold and a row of its own. The worker steps aside for a lone "
                "append between folds, rows and settling slices, so what is left is the "
                "worker's own CPU: on a loaded machine its thread competes with the "
                "appender's for the two cores (the hot arm's worker barely runs), and a "
                "descheduled worker may hold the GIL; garbage collections triggered by its "
                "allocations land in the appender's tail too.")
    if key == "scale-catch-up":
        return ("The catch-up folds every thread from history while the probe appends; the "
                "worker steps aside for each append, but its CPU competes with the appender's "
                "on a loaded machine, and collections of its many new objects land in the "
                "appender's tail.")
    if key == "scale-catch-up-rate":
        return ("The raw SELECT only fetches rows; the catch-up also parses each item's JSON "
                "and folds it in Python, then writes a row per thread.")
    if key == "scale-memory":
        return ("RSS also counts SQLite's page caches (bounded per connection) and the "
                "allocator's fragmentation, which returns memory to the system lazily.")
    return ("The first page is a keyset scan of an index on recency: its cost should not "
            "grow with the table; a miss points at page-cache misses in a larger file.")
