"""What tracing costs on the append path: ``python -m benchmarks.bench_tracing [--quick]``.

Every arm is a store of its own, all open in one process, fed the same items. Rounds
run one block of appends per arm, in a shuffled order, so drift and noise hit every arm
alike; each append is timed alone. After a block the store is flushed, untimed, so no
arm inherits another's projection backlog. Ratios are given on the pooled p50 and
"paired by round" (the median over rounds of the ratio of the two arms' block medians),
which drift between rounds cannot bias. Arms:

``removed``
    No SDK; the store's ``Telemetry.tracing()`` replaced by a constant ``False``. The
    append runs no tracing code but that one constant call: the nearest thing to a
    build with tracing removed that the same code base allows.
``api``
    The default: OpenTelemetry API only, no SDK. The real guard runs on every append,
    finds the no-op tracer and skips the span.
``api-control``
    A second store set up exactly like ``api``: the difference between the two is the
    noise floor of this run (store files, cache placement, scheduling).
``api-unguarded``
    No SDK, guard forced ``True``: every append runs the API's no-op
    ``start_as_current_span``. It shows what the guard saves.
``sdk``
    SDK ``TracerProvider`` + ``BatchSpanProcessor`` with an exporter that drops the
    spans (no I/O): one append span per append, while the worker makes the projection
    and ``thread_store.visible`` spans of the same appends alongside (sharing the GIL).
``sdk-quiet``
    As ``sdk``, with the projector paused during the block (its spans are made at the
    untimed flush): the append path's own tracing cost, without background competition.
``api+span``
    The yardstick for "the append path costs about one SDK span": the ``api`` arm's
    store, each append wrapped by the caller in one empty SDK span of the ``sdk``
    arm's provider. Its excess over ``api`` is one span measured in situ.
``one-span``
    Not an append: one empty SDK span in a tight loop (hot caches), for reference.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from thread_store import ThreadStore
from thread_store.workload import hot_path_item

THREADS_PER_ARM = 16


class _DropSpans(SpanExporter):
    """Accepts and forgets spans, so the SDK arm measures span work, not export I/O."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _percentile(sorted_ns: list[int], q: float) -> float:
    """Nearest-rank percentile in microseconds."""
    index = min(len(sorted_ns) - 1, max(0, round(q * len(sorted_ns)) - 1))
    return sorted_ns[index] / 1000


def _append_arm(store: ThreadStore, items: list[dict[str, object]],
                wrap: TracerProvider | None = None) -> Callable[[int], int]:
    """Time one append per call; with ``wrap``, inside an empty span of that provider."""
    threads = [store.create_thread() for _ in range(THREADS_PER_ARM)]
    tracer = wrap.get_tracer("bench") if wrap is not None else None

    def one(i: int) -> int:
        tid, item = threads[i % THREADS_PER_ARM], items[i % len(items)]
        start = time.perf_counter_ns()
        if tracer is None:
            store.append(tid, [item])
        else:
            with tracer.start_as_current_span("bench.caller"):
                store.append(tid, [item])
        return time.perf_counter_ns() - start

    return one


def _span_arm(provider: TracerProvider) -> Callable[[int], int]:
    tracer = provider.get_tracer("bench")

    def one(_i: int) -> int:
        start = time.perf_counter_ns()
        with tracer.start_as_current_span("bench.span"):
            pass
        return time.perf_counter_ns() - start

    return one


Blocks = dict[str, list[list[int]]]


def run(rounds: int, block: int, root: Path) -> Blocks:
    """Run the arms interleaved; return each arm's per-operation times in ns, by round."""
    rng = random.Random(7)
    items = [hot_path_item(rng) for _ in range(512)]
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_DropSpans()))
    stores = {
        "removed": ThreadStore.open(root / "removed"),
        "api": ThreadStore.open(root / "api"),
        "api-control": ThreadStore.open(root / "api-control"),
        "api-unguarded": ThreadStore.open(root / "unguarded"),
        "sdk": ThreadStore.open(root / "sdk", tracer_provider=provider),
        "sdk-quiet": ThreadStore.open(root / "sdk-quiet", tracer_provider=provider),
    }
    # Benchmark-only surgery on a private attribute: it is the arm's definition (see above).
    stores["removed"]._writes._telemetry.tracing = lambda: False  # type: ignore[union-attr,method-assign]
    stores["api-unguarded"]._writes._telemetry.tracing = lambda: True  # type: ignore[union-attr,method-assign]
    arms = {name: _append_arm(store, items) for name, store in stores.items()}
    arms["api+span"] = _append_arm(stores["api"], items, wrap=provider)
    arms["one-span"] = _span_arm(provider)
    owner = {"api+span": "api"}  # which store an arm appends to
    times: Blocks = {name: [] for name in arms}
    order = list(arms)
    try:
        for r in range(rounds):
            rng.shuffle(order)
            for name in order:
                store = stores.get(owner.get(name, name))
                if name == "sdk-quiet":
                    stores[name].pause_projection()
                gc.collect()
                gc.disable()  # collections land on whichever arm is running: keep them out
                try:
                    times[name].append([arms[name](r * block + i) for i in range(block)])
                finally:
                    gc.enable()
                if store is not None:
                    store.resume_projection()
                    store.flush_all(timeout=60.0)
    finally:
        for store in stores.values():
            store.close()
        provider.shutdown()
    return times


def _paired(times: Blocks, arm: str, base: str) -> float:
    """Median over rounds of the ratio of block medians: robust to drift between rounds."""
    ratios = sorted(statistics.median(a) / statistics.median(b) for a, b in zip(times[arm], times[base]))
    return statistics.median(ratios)


def table(times: Blocks) -> str:
    """The markdown table of p50/p99 and ratios, and the two verdicts."""
    flat = {name: sorted(ns for blk in blocks for ns in blk) for name, blocks in times.items()}
    stats = {name: (_percentile(ns, 0.50), _percentile(ns, 0.99), len(ns)) for name, ns in flat.items()}
    base50, base99, _ = stats["removed"]
    lines = ["| arm | n | p50 µs | p99 µs | p50 / removed | p99 / removed |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, (p50, p99, n) in stats.items():
        lines.append(f"| {name} | {n} | {p50:.1f} | {p99:.1f} | {p50 / base50:.3f} | {p99 / base99:.3f} |")
    api50 = stats["api"][0]
    span = stats["api+span"][0] - api50
    noise = stats["api-control"][0] / api50
    guard, control = _paired(times, "api", "removed"), _paired(times, "api-control", "api")
    lines += ["",
              f"api / removed (p50): {api50 / base50:.3f}; paired by round: {guard:.3f}  (target <= 1.05)",
              f"noise floor, api-control / api (p50): {noise:.3f}; paired by round: {control:.3f}",
              f"one SDK span in situ = api+span - api (p50): {span:.1f} µs"]
    for arm in ("sdk-quiet", "sdk"):
        extra = stats[arm][0] - api50
        lines.append(f"{arm} - api (p50): {extra:.1f} µs = {extra / span:.2f} x one SDK span  "
                     "(target: about 1)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_tracing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=60, help="blocks per arm (default: %(default)s)")
    parser.add_argument("--block", type=int, default=200, help="appends per block (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="10 rounds of 100: a smoke run")
    args = parser.parse_args(argv)
    rounds, block = (10, 100) if args.quick else (args.rounds, args.block)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="thread_store-bench-tracing-") as tmp:
        times = run(rounds, block, Path(tmp))
    print(f"bench_tracing: {rounds} rounds x {block} ops per arm, arms interleaved "
          f"({time.perf_counter() - started:.1f} s)\n")
    print(table(times))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
