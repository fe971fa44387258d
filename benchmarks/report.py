"""Summaries and the three outputs: Markdown table, JSON percentiles, PNG latency CDFs."""

from __future__ import annotations

import json
import math
import os
import platform
import sqlite3
from importlib import metadata
from pathlib import Path
from typing import Any

from . import at_scale, pg_report, processes
from .targets import ASYNC, PEER, RAW, SYNC, analysis, evaluate
from .workloads import WATCH_PERIOD_S, Arm, Sustained, percentile

PERCENTILES = (50, 90, 99, 99.9)


def _us(samples: list[int]) -> dict[str, float]:
    out = {f"p{p:g}_us": percentile(samples, p) / 1e3 for p in PERCENTILES}
    out["max_us"] = max(samples) / 1e3 if samples else math.nan
    out["n"] = len(samples)
    return out


def summarize_arms(arms: list[Arm]) -> dict[str, dict[str, Any]]:
    """Percentiles (µs) per arm, keyed ``label|metric``."""
    return {f"{a.label}|{a.metric}": {"label": a.label, "metric": a.metric, **_us(a.samples)}
            for a in arms}


def summarize_sustained(r: Sustained) -> dict[str, Any]:
    """Rate, append latency, lag and coalescing of one sustained arm."""
    out: dict[str, Any] = {"label": r.label, "writers": r.writers, "appends": r.appends,
                           "seconds": r.seconds, "appends_per_s": r.appends / r.seconds,
                           "append": _us(r.latencies), "watched": r.watched,
                           "transactions_per_append": r.transactions / r.appends if r.appends else math.nan,
                           "commits_per_append": (r.commits / r.appends if r.appends and r.commits is not None
                                                  else math.nan)}
    if r.watched:
        out["lag_ms"] = {f"p{p:g}": percentile(r.lags, p) / 1e6 for p in PERCENTILES}
        out["lag_ms"]["n"] = len(r.lags)
        out["watch_sweep_p50_ms"] = percentile(r.sweeps, 50) / 1e6
    return out


def summarize_listing(raw: dict[str, Any]) -> dict[str, Any]:
    """Replace the listing samples by their percentiles."""
    return {**raw, "first_page": _us(raw["first_page"]), "deep_page": _us(raw["deep_page"]),
            "search_first_page": {q: _us(s) for q, s in raw["search_first_page"].items()},
            "cwd_first_page": _us(raw["cwd_first_page"])}


def machine() -> dict[str, Any]:
    """What the run ran on."""
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cpus": os.cpu_count(), "mem_gib": round(mem_gib, 1),
            "os": platform.platform(terse=True), "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version, "eventsourcing": metadata.version("eventsourcing"),
            "thread_store": metadata.version("thread_store")}


def machine_line(m: dict[str, Any]) -> str:
    """One line describing the machine."""
    return (f"{m['cpus']} × {m['cpu']}, {m['mem_gib']} GiB, {m['os']}, Python {m['python']}, "
            f"SQLite {m['sqlite']}, eventsourcing {m['eventsourcing']}, thread_store {m['thread_store']}")


def write(results: dict[str, Any], cdf: dict[str, list[int]], out: Path) -> dict[str, Path]:
    """Write bench.md, bench.json and bench.png into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    results["targets"] = evaluate(results)
    paths = {"markdown": out / "bench.md", "json": out / "bench.json", "plot": out / "bench.png"}
    paths["json"].write_text(json.dumps(finite(results), indent=2, allow_nan=False) + "\n")
    paths["markdown"].write_text(markdown(results))
    plot(cdf, paths["plot"])
    return paths


def finite(value: Any) -> Any:
    """``value`` with NaN (a figure not measured) as ``null``, so the file is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def _f(value: float | None, unit: str = "") -> str:
    """A number with as many digits as matter at its size; ``—`` when missing."""
    if value is None or math.isnan(value):
        return "—"
    digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2 if abs(value) >= 1 else 3
    return f"{value:,.{digits}f}{unit}"


def _latency_table(rows: dict[str, dict[str, Any]]) -> list[str]:
    out = ["| System | append p50 | append p99 | read-your-writes p50 | read-your-writes p99 | n |",
           "|---|---:|---:|---:|---:|---:|"]
    by_label: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows.values():
        by_label.setdefault(row["label"], {})[row["metric"]] = row
    for label, metrics in by_label.items():
        a = metrics.get("append") or metrics.get("upsert")
        # Sync mode's append already returns with the metadata projected.
        b = metrics.get("append_and_flush") or (a if label == SYNC else None)
        cells = [_f(a["p50_us"], " µs") if a else "—", _f(a["p99_us"], " µs") if a else "—",
                 _f(b["p50_us"], " µs") if b else "—", _f(b["p99_us"], " µs") if b else "—"]
        n = "/".join(str(m["n"]) for m in (a, metrics.get("append_and_flush")) if m)
        out.append(f"| {label} | {' | '.join(cells)} | {n} |")
    return out


def _sustained_table(rows: dict[str, dict[str, Any]], rss: dict[str, dict[str, Any]]) -> list[str]:
    rss_key = {RAW: "raw", ASYNC: "ts-async", SYNC: "ts-sync", PEER: "peer"}
    out = [("| System | writers | appends/s | append p50 | append p99 | lag p50 | lag p99 "
           "| projection txns / append | history commits / append | peak RSS (Δ over baseline) |"),
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows.values():
        lag = row.get("lag_ms")
        lag_cells = ([_f(lag["p50"], " ms"), _f(lag["p99"], " ms")] if lag
                     else ["0 (sync)", "0 (sync)"] if row["label"] == SYNC else ["—", "—"])
        probe = rss.get(rss_key.get(row["label"], ""))
        mem = "—"
        if probe and row["writers"] > 1:
            delta = (probe["peak_kib"] - probe["baseline_kib"]) / 1024
            mem = f"{probe['peak_kib'] / 1024:.0f} MiB (+{delta:.1f})"
        txn = row["transactions_per_append"] if row["label"] != RAW else math.nan
        out.append(f"| {row['label']} | {row['writers']} | {_f(row['appends_per_s'])} | "
                   f"{_f(row['append']['p50_us'], ' µs')} | {_f(row['append']['p99_us'], ' µs')} | "
                   f"{' | '.join(lag_cells)} | {_f(txn)} | {_f(row['commits_per_append'])} | {mem} |")
    return out


def _scale_table(scale: dict[str, Any], quick: bool) -> list[str]:
    listing, catch, mem = scale["listing"], scale["catch_up"], scale["pending_memory"]
    fewer = " (fewer in this mode; full mode uses 100,000)" if quick else ""
    fewer_items = ("" if catch["items"] >= 1_000_000
                   else " (fewer in this mode; full mode or --scale uses 1,000,000)")
    first, deep = listing["first_page"], listing["deep_page"]
    return [
        "| What | Result |", "|---|---|",
        (f"| list_threads first page ({listing['page_size']} rows) at {listing['threads']:,} "
         f"threads{fewer} | p50 {_f(first['p50_us'], ' µs')}, p99 {_f(first['p99_us'], ' µs')} |"),
        (f"| list_threads deep page (offset {listing['deep_offset']:,}, keyset cursor) "
         f"| p50 {_f(deep['p50_us'], ' µs')}, p99 {_f(deep['p99_us'], ' µs')} |"),
        *(f"| list_threads(search={query!r}) first page, same store "
          f"| p50 {_f(s['p50_us'], ' µs')} ({s['p50_us'] / first['p50_us']:.1f}× the plain list), "
          f"p99 {_f(s['p99_us'], ' µs')} |"
          for query, s in listing["search_first_page"].items()),
        (f"| list_threads(cwd=...) first page (up to a tenth of the threads), same store "
         f"| p50 {_f(listing['cwd_first_page']['p50_us'], ' µs')} "
         f"({listing['cwd_first_page']['p50_us'] / first['p50_us']:.1f}× the plain list) |"),
        f"| building that index through the API (create + append + flush_all) | {listing['build_s']:.1f} s |",
        (f"| catch-up after losing index.db: {catch['items']:,} items in {catch['threads']:,} threads"
        f"{fewer_items} | {_f(catch['items_per_s'])} items/s (open {catch['open_s']:.2f} s, "
        f"flush_all {catch['flush_all_s']:.2f} s, {catch['transactions']} transactions) |"),
        (f"| reading the same items back with a raw SELECT per thread (sqlite3) "
         f"| {_f(catch['raw_select_items_per_s'])} items/s |"),
        (f"| pending-state memory, {mem['threads']:,} threads paused, 1 append each "
        f"| {mem['bytes_per_thread_1_item']:,.0f} B/thread (Python heap, tracemalloc) |"),
        f"| same after 10 more appends per thread | {mem['bytes_per_thread_11_items']:,.0f} B/thread |",
    ]


def markdown(results: dict[str, Any]) -> str:
    """The report as Markdown."""
    hot, many = results["latency"]["hot"], results["latency"]["many"]
    quick = results["mode"] != "full"
    lines = [
        f"# thread_store benchmarks ({results['mode']} mode)", "",
        f"Machine: {machine_line(results['machine'])}  ",
        f"Command: `{results['command']}` — wall time {results['wall_s']:.0f} s.  ",
        ("Every figure comes from this one run; arms were interleaved in alternating blocks. "
        "Latencies are per call, from `time.perf_counter_ns`."), "",
        "Phases (s): " + ", ".join(f"{k} {v}" for k, v in results.get("phase_s", {}).items()) + ".", "",
        *target_rows(results["targets"]),
    ]
    lines += ["", "## Latency: one hot thread, one caller", "", *_latency_table(hot), "",
              ("Read-your-writes is `append_and_flush` for thread_store, an append plus the "
              "documented `view.recorder.wait` for the peer, insert+commit then upsert+commit for "
              "raw sqlite3, and the append itself in sync mode."), "",
              f"## Latency: {results['many_threads']:,} threads, round robin, one caller", "",
              *_latency_table(many)]
    if not any(r["label"] == PEER for r in many.values()):
        lines.append("\nThe peer is left out of this workload in this mode: creating its "
                     f"{results['many_threads']:,} aggregates alone takes about 25 s.")
    lines += ["", "## Sustained: 100 threads, round robin", "",
              *_sustained_table(results["sustained"], results["rss"]), "",
              ("Lag is the time from an append's return until a watcher thread first sees it "
              "projected (`status().projected_seq` for thread_store, the view's tracking id for the "
              f"peer), polled every {WATCH_PERIOD_S * 1e3:g} ms, so lag is overestimated by up to "
              f"that plus a sweep; a sweep took about {_sweep_note(results['sustained'])}. Peak RSS "
              "comes from a separate process per system running this workload; Δ is over the same "
              "process after imports."),
              "", "## Several writer processes on one store (benchmarks/processes.py)", "",
              *processes.markdown(results["processes"]),
              *_postgres(results),
              "", "## Scale (thread_store)", "", *_scale_table(results["scale"], quick), "",
              "## Flat appends, catch-up and touched threads (issue 15; benchmarks/at_scale.py)", "",
              *at_scale.markdown(results["at_scale"]), "",
              "## Analysis", "", *analysis(results), ""]
    if results.get("tracing"):
        lines += ["## Tracing cost on the append path (benchmarks/bench_tracing.py)", "",
                  results["tracing"]["table"], ""]
    return "\n".join(lines)


def target_rows(targets: list[dict[str, Any]]) -> list[str]:
    """The "Targets" heading and table of these target rows."""
    return ["## Targets", "", "| Target | Measured | Limit | Result |", "|---|---:|---:|---|",
            *(f"| {t['name']} | {t['shown']} | {t['limit']} | {'met' if t['met'] else '**missed**'} |"
              for t in targets)]


def _postgres(results: dict[str, Any]) -> list[str]:
    section = results.get("postgres")
    return [] if section is None else postgres_section(section)


def postgres_section(section: dict[str, Any]) -> list[str]:
    """The PostgreSQL part of the report (a skipped run says why)."""
    table = _latency_table(section["latency"]) if "latency" in section else []
    return ["", "## PostgreSQL (benchmarks/postgres.py)", "", *pg_report.markdown(section, table)]


def _sweep_note(rows: dict[str, dict[str, Any]]) -> str:
    sweeps = [f"{r['watch_sweep_p50_ms']:.2f} ms ({r['label']}, {r['writers']} "
              f"writer{'s' if r['writers'] != 1 else ''})"
              for r in rows.values() if r.get("watched")]
    return ", ".join(sweeps) or "n/a"


def plot(cdf: dict[str, list[int]], path: Path) -> None:
    """Append and barrier latency CDFs, one line per system (log-scaled time axis)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    panels = (("append", "append latency (one hot thread)"),
              ("append_and_flush", "read-your-writes latency (append + barrier)"))
    for ax, (metric, title) in zip(axes, panels):
        for key, samples in cdf.items():
            label, arm_metric = key.split("|")
            is_sync_rw = metric == "append_and_flush" and arm_metric == "append" and label == SYNC
            if (arm_metric != metric and not is_sync_rw) or not samples:
                continue
            ordered = sorted(s / 1e3 for s in samples)
            ys = [(i + 1) / len(ordered) for i in range(len(ordered))]
            if label == RAW and metric == "append_and_flush":
                label += ": insert + upsert"
            ax.step(ordered, ys, where="post", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("latency (µs, log scale)")
        ax.set_ylabel("fraction of calls")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
