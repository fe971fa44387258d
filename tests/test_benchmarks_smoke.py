"""Smoke test of the benchmark runner: a tiny run writes all three outputs, well formed.

It checks structure only, never timings (the machine is shared and noisy). The
PostgreSQL section runs where the machine has PostgreSQL's binaries (a missing server is
a failure under ``THREAD_STORE_REQUIRE_POSTGRES=1``, as for the other PostgreSQL tests).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import pg_report, pg_systems

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PG_TARGETS = ["pg-append", "pg-barrier", "pg-throughput", "pg-lag", "pg-peer"]


@pytest.fixture(scope="module")
def postgres_runs() -> bool:
    """Whether the run will include PostgreSQL (it does when the binaries are found)."""
    from conftest import REQUIRE_POSTGRES

    missing = pg_systems.unavailable()
    if missing and REQUIRE_POSTGRES:
        pytest.fail(f"THREAD_STORE_REQUIRE_POSTGRES=1 but the benchmarks cannot start PostgreSQL: {missing}")
    return missing is None


def test_smoke_run_writes_table_json_and_plot(tmp_path: Path, postgres_runs: bool) -> None:
    out = tmp_path / "results"
    run = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", "--out", str(out)],
                         check=False, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stderr[-4000:]

    results = json.loads((out / "bench.json").read_text())
    assert results["mode"] == "smoke"
    assert results["command"] == "python -m benchmarks --smoke"
    assert {"cpu", "cpus", "python", "sqlite", "eventsourcing"} <= results["machine"].keys()

    hot = results["latency"]["hot"]
    for key in ("raw sqlite3 (floor)|append", "thread_store async (default)|append",
                "thread_store async (default)|append_and_flush", "thread_store sync|append",
                "thread_store async, projection paused|append",
                "thread_store async, projection +100 ms/batch|append",
                "thread_store async, caller_runs=False|append_and_flush",
                "eventsourcing peer|append", "eventsourcing peer|append_and_flush"):
        assert hot[key]["n"] > 0, key
        assert 0 < hot[key]["p50_us"] <= hot[key]["p99_us"], key
    assert "thread_store async (default)|append" in results["latency"]["many"]

    sustained = results["sustained"]
    assert sustained["thread_store async (default)|8"]["appends"] > 0
    assert sustained["thread_store async (default)|8"]["lag_ms"]["n"] > 0
    assert sustained["eventsourcing peer|8"]["lag_ms"]["n"] > 0
    full = sustained["thread_store async, durability=full|8"]
    assert full["appends"] > 0 and 0 < full["commits_per_append"] <= 1
    assert sustained["raw sqlite3, synchronous=FULL (fsync floor)|8"]["commits_per_append"] == 1
    assert set(results["rss"]) == {"raw", "ts-async", "ts-sync", "peer"}
    assert results["tracing"]["ok"], results["tracing"]["table"]  # the tracing section ran
    for probe in results["rss"].values():
        assert probe["peak_kib"] >= probe["baseline_kib"] > 0

    processes = results["processes"]
    assert processes["sustained"]["raw_appends_per_s"] > 0
    assert set(processes["sustained"]["arms"]) == {"1", "2", "4"}
    for arm in processes["sustained"]["arms"].values():
        assert arm["appends"] > 0 and arm["ratio_to_raw"] > 0 and arm["appends_per_commit"] >= 1, arm
        assert arm["lag_n"] + arm["unmatched"] == arm["appends"], arm
        assert arm["lag_n"] > 0 and 0 <= arm["lag_p50_ms"] <= arm["lag_p99_ms"], arm
    for key in ("same", "cross", "paused", "both"):
        wake = processes["wake"][key]
        assert wake["n"] > 0 and 0 < wake["p50_us"] <= wake["p99_us"], key

    scale = results["scale"]
    assert scale["listing"]["first_page"]["n"] > 0 and scale["listing"]["deep_page"]["n"] > 0
    assert scale["catch_up"]["items"] == 1000 and scale["catch_up"]["items_per_s"] > 0
    assert scale["pending_memory"]["pending_threads"] == 50
    assert scale["catch_up"]["raw_select_items_per_s"] > 0

    at_scale = results["at_scale"]  # issue 15
    assert at_scale["flat"]["threads"] == 200
    for arm in (at_scale["flat"]["hot"], at_scale["flat"]["many"],
                at_scale["catch_up_appends"]["catching_up"], at_scale["catch_up_appends"]["idle"]):
        assert arm["n"] > 0 and 0 < arm["p50_us"] <= arm["p99_us"], arm
    points = at_scale["touch"]["checkpoints"]
    assert [p["threads"] for p in points] == [100, 200, 300]
    assert all(p["rss_kib"] > 0 and p["first_page_p50_us"] > 0 for p in points)
    assert points[-1]["cached_heads"] == 300  # under the caps: every thread touched is cached

    if postgres_runs:
        _check_postgres(results["postgres"])
    else:
        assert "skipped" in results["postgres"]

    targets = results["targets"]
    assert [t["key"] for t in targets] == ["append-floor", "decoupling", "barrier", "throughput",
                                           "lag", "group-commit", "full-rate", "peer",
                                           "mp-throughput", "mp-lag", "scale-flat",
                                           "scale-catch-up", "scale-catch-up-rate",
                                           "scale-memory", "scale-listing",
                                           *(PG_TARGETS if postgres_runs else [])]
    assert all(isinstance(t["met"], bool) for t in targets)

    table = (out / "bench.md").read_text()
    assert results["command"] in table and "Machine:" in table
    assert "Several writer processes" in table and "Cross-process wake-up" in table
    assert "Flat appends, catch-up and touched threads" in table
    assert "Group commit: 8 writers" in table
    assert "## PostgreSQL" in table
    for target in targets:
        assert target["name"] in table
    assert (out / "bench.png").read_bytes().startswith(PNG_MAGIC)


def _check_postgres(section: dict[str, Any]) -> None:
    """Every PostgreSQL arm ran and recorded figures, at default durability."""
    assert section["settings"]["fsync"] == "on" and section["synchronous_commit"] == "local"
    latency = section["latency"]
    for key in (f"{pg_report.RAW_INSERT}|append", f"{pg_report.RAW_ONE}|append",
                f"{pg_report.RAW_TXN}|append_and_flush", f"{pg_report.TS}|append",
                f"{pg_report.TS}|append_and_flush", f"{pg_report.PEER}|append",
                f"{pg_report.PEER}|append_and_flush"):
        assert latency[key]["n"] > 0 and 0 < latency[key]["p50_us"] <= latency[key]["p99_us"], key
    sustained = section["sustained"]
    assert sustained["raw_appends_per_s"] > 0 and sustained["raw"]["processes"] == pg_report.RAW_CLIENTS
    assert set(sustained["arms"]) == {str(n) for n in pg_report.PROCESS_COUNTS}
    for arm in sustained["arms"].values():
        assert arm["appends"] > 0 and arm["ratio_to_raw"] > 0, arm
        assert arm["lag_n"] + arm["unmatched"] == arm["appends"], arm
        assert arm["lag_n"] > 0 and 0 <= arm["lag_p50_ms"] <= arm["lag_p99_ms"], arm
    for key in ("same", "cross", "paused", "both"):
        wake = section["wake"][key]
        assert wake["n"] > 0 and 0 < wake["p50_us"] <= wake["p99_us"], key


def test_pg_async_barriers_prints_both_arms(postgres_runs: bool, capsys: pytest.CaptureFixture[str]) -> None:
    if not postgres_runs:
        pytest.skip("PostgreSQL is not available here")
    from benchmarks import pg_async_barriers

    times = pg_async_barriers.main(["--rounds", "5"])
    assert {arm: len(samples) for arm, samples in times.items()} == {
        f"{arm} {kind}": 5 for arm in pg_async_barriers.ARMS for kind in ("native", "hop")}
    out = capsys.readouterr().out
    assert "| `flush` |" in out and "| `append_and_flush` |" in out


def test_only_runs_the_at_scale_arms_named(tmp_path: Path) -> None:
    out = tmp_path / "results"
    run = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", "--only", "flat",
                          "--out", str(out)],
                         check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads((out / "at_scale.json").read_text())
    assert results["command"] == "python -m benchmarks --smoke --only flat"
    assert set(results["at_scale"]) == {"flat"}
    flat = results["at_scale"]["flat"]
    assert flat["hot"]["n"] == flat["many"]["n"] > 0
    assert "append p99, 200 threads round robin vs 1 hot thread" in run.stdout
    assert not (out / "bench.json").exists()
