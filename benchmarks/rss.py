"""Peak RSS of one system, measured in its own process (peaks of systems sharing a process
cannot be told apart).

``python -m benchmarks.rss SYSTEM SECONDS DIR`` builds the system in ``DIR``, runs the
100-thread, 8-writer sustained workload for ``SECONDS`` and prints one JSON object:
``baseline_kib`` (VmRSS after imports and generating the items, before the system
opens), ``peak_kib`` (VmHWM at the end) and ``appends``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .workloads import WRITERS, Sustained, items, sustained, thread_ids

SYSTEMS = ("raw", "ts-async", "ts-sync", "peer")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _factory(kind: str) -> Callable[[Path], Any]:
    """Import what ``kind`` needs (so the baseline includes it) and return its constructor."""
    from . import systems
    if kind == "raw":
        return systems.RawSQLite
    if kind == "ts-async":
        return lambda root: systems.ThreadStoreSystem(root, kind)
    if kind == "ts-sync":
        return lambda root: systems.ThreadStoreSystem(root, kind, projection="sync")
    from .peer_eventsourcing import PeerSystem
    return PeerSystem


def probe(kind: str, seconds: float, root: Path) -> dict[str, Any]:
    """Run the probe in this process (meant for a fresh subprocess)."""
    build = _factory(kind)
    tids = thread_ids(100)
    pool = items(2000)
    baseline = _status_kib("VmRSS")
    system = build(root)
    try:
        system.populate(tids)
        result = Sustained(kind, WRITERS)
        sustained(result, system, tids, pool, seconds)
    finally:
        system.close()
    return {"baseline_kib": baseline, "peak_kib": _status_kib("VmHWM"), "appends": result.appends}


def run(kind: str, seconds: float, root: Path) -> dict[str, Any]:
    """Run :func:`probe` in a fresh interpreter and return its result."""
    # The benchmarks package is not installed: run from the checkout, whatever our cwd.
    out = subprocess.run([sys.executable, "-m", "benchmarks.rss", kind, str(seconds), str(root)],
                         check=True, capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parent.parent)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


if __name__ == "__main__":
    print(json.dumps(probe(sys.argv[1], float(sys.argv[2]), Path(sys.argv[3]))))
