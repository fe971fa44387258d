"""A long-lived process touching more and more threads: its memory and the listing's
first page as the store grows, measured in its own process (its RSS is its own).

``python -m benchmarks.touch DIR N1 N2 ...`` creates threads one after another (each
``create_thread`` + one opening user message, so it is listed; ``flush_all`` every
:data:`_SETTLE_EVERY`) in one store and, at each
``N`` threads, after ``flush_all`` and a garbage collection, records ``VmRSS``, the
store's per-thread cache sizes and the ``list_threads`` first-page latency. Prints one
JSON object.
"""

from __future__ import annotations

import ctypes
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from thread_store import ThreadStore

from .workloads import first_message, percentile

_LIST_REPEATS = 50
_PAGE = 50
#: A caller appending flat out starves the projector of the GIL; settling every this many
#: threads keeps the backlog (O(1) per pending thread, by design) as small as a server's,
#: so what is measured is what stays, not a backlog of every thread created.
_SETTLE_EVERY = 1000


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("VmRSS missing from /proc/self/status")


def _sqlite_kib() -> int:
    """Heap SQLite itself holds now (page caches, statements): ``sqlite3_memory_used``."""
    import _sqlite3  # the extension module; its library is the one this process loaded
    used = ctypes.CDLL(_sqlite3.__file__).sqlite3_memory_used
    used.restype = ctypes.c_int64
    return int(used()) // 1024


def _first_page_us(store: ThreadStore) -> list[float]:
    samples = []
    for _ in range(_LIST_REPEATS):
        t0 = time.perf_counter_ns()
        page = store.list_threads(limit=_PAGE)
        samples.append((time.perf_counter_ns() - t0) / 1e3)
        if len(page.threads) != _PAGE:
            raise AssertionError(f"listing returned {len(page.threads)} threads, expected {_PAGE}")
    return samples


def probe(root: Path, checkpoints: list[int]) -> dict[str, Any]:
    """Run the probe in this process (meant for a fresh subprocess)."""
    out: dict[str, Any] = {"checkpoints": []}
    started = time.perf_counter()
    with ThreadStore.open(root) as store:
        history = store._storage.history  # noqa: SLF001 - the cache sizes are what is measured
        projector = store._writes.projector  # type: ignore[union-attr]  # noqa: SLF001
        done = 0
        for n in sorted(checkpoints):
            for i in range(done, n):
                # Ids made here and dropped: the caller holds none of them, as a server would.
                thread_id = f"x{i:07d}"
                store.create_thread(thread_id)
                store.append(thread_id, [first_message(i)])
                if i % _SETTLE_EVERY == 0:
                    store.flush_all(timeout=600.0)
            done = n
            store.flush_all(timeout=600.0)
            gc.collect()
            samples = _first_page_us(store)
            out["checkpoints"].append({
                "threads": n, "rss_kib": _rss_kib(), "sqlite_kib": _sqlite_kib(),
                "seconds": time.perf_counter() - started,
                "first_page_p50_us": percentile(samples, 50),
                "first_page_p99_us": percentile(samples, 99),
                "cached_heads": len(history._heads),  # noqa: SLF001
                "cached_incarnations": len(history._incarnations),  # noqa: SLF001
                "projector_states": len(projector._schedule.states),  # noqa: SLF001
            })
    return out


def run(root: Path, checkpoints: list[int]) -> dict[str, Any]:
    """Run :func:`probe` in a fresh interpreter and return its result."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.touch", str(root),
                          *map(str, checkpoints)],
                         check=True, capture_output=True, text=True, timeout=7200,
                         cwd=Path(__file__).resolve().parent.parent)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


if __name__ == "__main__":
    print(json.dumps(probe(Path(sys.argv[1]), [int(n) for n in sys.argv[2:]])))
