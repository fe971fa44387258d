"""``thread-store [--store PATH] COMMAND``: a thin click group over the public API.

Each command opens the store, calls public methods and formats the result; ``--json``
sits beside the table output. The store path comes from ``--store``, else
``$THREAD_STORE``, else ``./thread-store-data``. A :class:`ThreadStoreError` or a usage
error prints one line ``error: ...`` on stderr and exits non-zero, without a traceback.

Only the console script loads this module, so the library itself never needs click.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import shutil
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

import thread_store
from thread_store import (NotAThreadStore, StoredItem, ThreadMetadata, ThreadNotFound, ThreadStore,
                          ThreadStoreError)
from thread_store.codex import import_codex
from thread_store.demo import run_demo

if TYPE_CHECKING:
    from click._termui_impl import ProgressBar

    from thread_store.otel_setup import TraceDelivery

DEFAULT_STORE = "thread-store-data"
_OTEL_ENV = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER")
_TITLE_WIDTH = 48
#: Narrowest a clipped column gets; the TITLE column's width before ids are shortened.
_MIN_FLEXIBLE = 10
_MIN_TITLE = 20
_SHORT_ID = 8
#: What ``import-codex`` has imported in full, beside the store: lets a re-import skip
#: unchanged files (the store itself keeps no application bookkeeping).
_IMPORT_RECORD = "codex-import.json"


def _example(*lines: str) -> str:
    """A help epilog; ``\\b`` keeps click from re-wrapping the example."""
    return "\b\nExample:\n" + "\n".join(f"  {line}" for line in lines)


class _Group(click.Group):
    """A group whose errors are one line on stderr, in the console script and in CliRunner."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            exc.show()  # the group's help, not an error message
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            _fail("aborted", 1)
        except ThreadStoreError as exc:
            _fail(str(exc), 1)
        sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int) -> NoReturn:
    click.echo("error: " + " ".join(message.split()), err=True)
    sys.exit(code)


@click.group(cls=_Group, epilog=_example("thread-store --store ~/agent-threads list --search flaky"))
@click.option("--store", "store_path", type=click.Path(path_type=Path), envvar="THREAD_STORE",
              default=DEFAULT_STORE, show_default=True,
              help="Store directory; $THREAD_STORE when the option is not given.")
@click.version_option(thread_store.__version__, prog_name="thread-store")
@click.pass_context
def cli(ctx: click.Context, store_path: Path) -> None:
    """Durable conversation threads with a listable metadata index."""
    ctx.obj = store_path


# -- reading ------------------------------------------------------------------------------


@cli.command("list", epilog=_example("thread-store list --search 'flaky test' --limit 20",
                                     "thread-store list --json | jq '.[].title'"))
@click.option("--archived", is_flag=True, help="List archived threads instead of active ones.")
@click.option("--search", metavar="TEXT",
              help="Words found (as substrings, any case) in the name, title, preview or first message.")
@click.option("--cwd", metavar="DIR", help="Only threads whose working directory is DIR.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--cursor", help="The next-page cursor a previous list printed.")
@click.option("--include-empty", is_flag=True, help="Also list threads without a preview yet.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of ThreadMetadata objects.")
@click.pass_obj
def list_threads(store_path: Path, archived: bool, search: str | None, cwd: str | None, limit: int,
                 cursor: str | None, include_empty: bool, as_json: bool) -> None:
    """List threads, most recent first (reads the index; never writes)."""
    with ThreadStore.open(store_path, read_only=True) as store:
        page = store.list_threads(limit=limit, cursor=cursor, archived=archived, search=search,
                                  include_empty=include_empty, cwd=cwd)
    if as_json:
        _echo_json([meta.to_json() for meta in page.threads])
    else:
        _echo_threads(page.threads)
        if page.next_cursor:
            click.echo(f"more: add --cursor {page.next_cursor} (same filters) for the next page",
                       err=True)


@cli.command(epilog=_example("thread-store show 0194a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b --items 5"))
@click.argument("thread_id")
@click.option("--items", "count", type=click.IntRange(0, 100_000), default=10, show_default=True,
              help="How many of the last history items to show.")
@click.option("--json", "as_json", is_flag=True, help='Print {"thread": {...}, "items": [...]}.')
@click.pass_obj
def show(store_path: Path, thread_id: str, count: int, as_json: bool) -> None:
    """Show a thread's metadata and its last history items."""
    with ThreadStore.open(store_path, read_only=True) as store:
        thread_id = _resolve(store, thread_id)
        meta = store.read_thread(thread_id)
        items = _last_items(store, thread_id, meta.projected_seq, count)
    if as_json:
        _echo_json({"thread": meta.to_json(),
                    "items": [{"seq": s.seq, "ts": s.ts.isoformat(), "item": s.item} for s in items]})
        return
    room = max(_terminal_width() - 20, _MIN_FLEXIBLE)
    for key, value in meta.to_json().items():
        if value is not None:
            text = json.dumps(value) if isinstance(value, dict) else str(value)
            click.echo(f"{key:<20}{_clip(text, room)}")
    if items:
        click.echo(f"\nlast {_count(len(items), 'item')}:")
        _echo_table(("SEQ", "TIME", "TYPE", "PAYLOAD"),
                    [(str(s.seq), s.ts.strftime("%Y-%m-%d %H:%M:%S"), _kind(s.item),
                      " ".join(json.dumps(s.item.get("payload"), ensure_ascii=False).split()))
                     for s in items], flexible=3)


@cli.command(epilog=_example("thread-store status --json"))
@click.option("--json", "as_json", is_flag=True, help="Print the report as a JSON object.")
@click.pass_obj
def status(store_path: Path, as_json: bool) -> None:
    """Report projection health: threads behind their history, retries, failures.

    Opening the store starts catching up threads that a crash or a slow shutdown left
    behind, so this is a snapshot taken right after open. Threads that never got a row
    in the index count in "pending" but are not named.
    """
    if not store_path.exists():
        raise NotAThreadStore(f"{store_path} does not exist; pass --store or set $THREAD_STORE")
    with ThreadStore.open(store_path) as store:
        stats = store.stats()
        counts = {"active": 0, "archived": 0}
        behind = []
        for archived in (False, True):
            for meta in _every_thread(store, archived):
                counts["archived" if archived else "active"] += 1
                st = store.status(meta.thread_id)
                if st.pending or st.last_error:
                    behind.append({"thread_id": meta.thread_id, **dataclasses.asdict(st),
                                   "lag": st.head_seq - st.projected_seq})
    if as_json:
        _echo_json({"path": str(store_path), "threads": counts, "stats": dataclasses.asdict(stats),
                    "behind": behind})
        return
    click.echo(f"store      {store_path}")
    click.echo(f"threads    {counts['active'] + counts['archived']} "
               f"({counts['active']} active, {counts['archived']} archived)")
    click.echo(f"pending    {stats.pending_threads} threads, {stats.waiters} waiters")
    click.echo(f"projector  {stats.transactions} transactions, {stats.rows_written} rows, "
               f"{stats.attempts} attempts, {stats.retries} retries, {stats.failures} failures")
    if behind:
        _echo_table(("ID", "HEAD", "PROJECTED", "LAG", "ATTEMPTS", "LAST ERROR"),
                    [(b["thread_id"], str(b["head_seq"]), str(b["projected_seq"]), str(b["lag"]),
                      str(b["attempts"]), " ".join((b["last_error"] or "").split())) for b in behind],
                    flexible=5)


# -- writing ------------------------------------------------------------------------------


@cli.command(epilog=_example("thread-store rename 0194a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b 'Fix the flaky test'"))
@click.argument("thread_id")
@click.argument("name")
@click.pass_obj
def rename(store_path: Path, thread_id: str, name: str) -> None:
    """Give a thread a name (shown in lists instead of its title); '' clears it."""
    thread_id = _change(store_path, thread_id, lambda s, t: s.update_metadata(t, name=name or None))
    click.echo(f"renamed {thread_id}: {name or '(name cleared)'}")


@cli.command(epilog=_example("thread-store archive 0194a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"))
@click.argument("thread_id")
@click.pass_obj
def archive(store_path: Path, thread_id: str) -> None:
    """Archive a thread: it leaves `list` and shows in `list --archived`."""
    click.echo(f"archived {_change(store_path, thread_id, ThreadStore.archive_thread)}")


@cli.command(epilog=_example("thread-store unarchive 0194a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"))
@click.argument("thread_id")
@click.pass_obj
def unarchive(store_path: Path, thread_id: str) -> None:
    """Bring an archived thread back to `list`."""
    click.echo(f"unarchived {_change(store_path, thread_id, ThreadStore.unarchive_thread)}")


@cli.command(epilog=_example("thread-store delete 0194a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b --yes"))
@click.argument("thread_id")
@click.option("--yes", is_flag=True, help="Do not ask; needed when stdin is not a terminal.")
@click.pass_obj
def delete(store_path: Path, thread_id: str, yes: bool) -> None:
    """Delete a thread for good: its history and its metadata.

    On a terminal it asks first; otherwise it refuses without --yes.
    """
    with _open_existing(store_path) as store:
        thread_id = _resolve(store, thread_id)
        meta = store.read_thread(thread_id)
        if not yes:
            if not sys.stdin.isatty():
                raise click.UsageError(f"delete of {thread_id} needs --yes when not run on a terminal")
            label = _clip(meta.name or meta.title or meta.preview or "untitled", _TITLE_WIDTH)
            click.confirm(f"Delete thread {thread_id} ({label}, {_count(meta.item_count, 'item')}) "
                          "for good?", abort=True, err=True)
        store.delete_thread(thread_id)
    click.echo(f"deleted {thread_id}")


@cli.command(epilog=_example("thread-store export 0194a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b > session.jsonl"))
@click.argument("thread_id")
@click.pass_obj
def export(store_path: Path, thread_id: str) -> None:
    """Print a thread's history as JSON Lines: each item as it was appended, in order.

    Items are written as compact JSON (the form the store keeps), so `import-codex` of
    the output gives the same items back.
    """
    with ThreadStore.open(store_path, read_only=True) as store:
        thread_id = _resolve(store, thread_id)
        after = 0
        while page := store.read_history(thread_id, after_seq=after, limit=1000):
            click.echo("\n".join(json.dumps(s.item, separators=(",", ":")) for s in page))
            after = page[-1].seq


@cli.command(epilog=_example("thread-store backup /backups/threads-2026-11-30"))
@click.argument("dest", type=click.Path(path_type=Path))
@click.pass_obj
def backup(store_path: Path, dest: Path) -> None:
    """Write a consistent copy of the store to DEST (a new or empty directory).

    It opens the store read-only, so agents may keep appending meanwhile; the copy opens
    as a normal store and catches up whatever its index missed.
    """
    with ThreadStore.open(store_path, read_only=True) as store:
        store.backup(dest)
    click.echo(f"backed up {store_path} to {dest}")


@cli.command(epilog=_example("thread-store --store ~/agent-threads reindex"))
@click.pass_obj
def reindex(store_path: Path) -> None:
    """Rebuild the metadata index from the history (the store must be closed elsewhere)."""
    started = time.perf_counter()
    with ExitStack() as bars:
        count = ThreadStore.rebuild_index(store_path, progress=_progress(bars, "re-projecting"))
    click.echo(f"reindexed {count} threads in {time.perf_counter() - started:.2f} s")


@cli.command("import-codex", epilog=_example("thread-store import-codex",
                                             "thread-store import-codex ~/old-laptop/.codex/sessions --replace"))
@click.argument("directory", required=False,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--replace", is_flag=True,
              help="Delete and re-import threads whose rollout was edited or truncated.")
@click.option("--json", "as_json", is_flag=True, help="Print the import report as JSON.")
@click.pass_obj
def import_codex_command(store_path: Path, directory: Path | None, replace: bool, as_json: bool) -> None:
    """Import Codex rollout files (rollout-*.jsonl, recursively); safe to run again.

    DIRECTORY defaults to $CODEX_HOME/sessions, else ~/.codex/sessions. Re-importing
    appends only lines that are new since the last import, and skips files whose size
    and modification time are as they were (the record is STORE/codex-import.json).
    Lines that are not JSON objects with a "type" are reported as FILE:LINE and
    skipped. Exits 1 when a whole thread could not be imported.
    """
    directory = directory or _codex_sessions()
    record = store_path / _IMPORT_RECORD
    with ThreadStore.open(store_path) as store, ExitStack() as bars:
        seen = _read_json_object(record)
        try:
            report = import_codex(store, directory, progress=_progress(bars, "importing"), seen=seen,
                                  replace=replace)
        finally:
            _write_json_atomically(record, seen)
    if as_json:
        _echo_json(report.to_json())
    else:
        for line in report.skipped:
            click.echo(f"skipped {line}", err=True)
        for problem in report.errors:
            click.echo(f"not imported: {problem}", err=True)
        replaced = f", {report.threads_replaced} replaced" if report.threads_replaced else ""
        click.echo(f"{_count(report.files, 'file')} ({report.files_unchanged} unchanged, skipped): "
                   f"{_count(report.threads_created, 'thread')} created, {report.threads_updated} "
                   f"updated, {report.threads_unchanged} unchanged{replaced}; "
                   f"{_count(report.items_appended, 'item')} appended, "
                   f"{_count(len(report.skipped), 'line')} skipped")
    if report.errors:
        sys.exit(1)


@cli.command(epilog=_example("thread-store demo --threads 20 --otlp-endpoint http://127.0.0.1:4318"))
@click.option("--threads", type=click.IntRange(1, 10_000), default=20, show_default=True)
@click.option("--seed", type=int, help="Seed of the generated content and interleaving.")
@click.option("--otlp-endpoint", metavar="URL", help="Export traces over OTLP/HTTP, e.g. to Jaeger.")
@click.option("--trace-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the traces as OTLP/JSON lines (Jaeger UI: Upload JSON).")
@click.pass_obj
def demo(store_path: Path, threads: int, seed: int | None, otlp_endpoint: str | None,
         trace_file: Path | None) -> None:
    """Append realistic Codex sessions to new threads, live-agent style, then list them.

    Without --otlp-endpoint/--trace-file, tracing still follows the OTEL_* environment
    variables when OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_TRACES_EXPORTER is set.
    """
    tracing = _start_tracing(otlp_endpoint, trace_file)
    latencies: list[float] = []
    flushed = 0

    def observe(seconds: float, barrier: bool) -> None:
        nonlocal flushed
        if barrier:
            flushed += 1
        else:
            latencies.append(seconds)

    try:
        with ThreadStore.open(store_path) as store, ExitStack() as bars:
            started = time.perf_counter()
            metas = run_demo(store, threads, seed, on_append=observe,
                             progress=_progress(bars, "sessions") if threads >= 100 else None)
            elapsed = time.perf_counter() - started
    finally:
        delivery = tracing.stop() if tracing is not None else None
    _echo_threads(metas)
    p50 = statistics.median(latencies) * 1000 if latencies else 0.0
    click.echo(f"demo: {_count(len(metas), 'thread')}, {_count(len(latencies) + flushed, 'append')} "
               f"({flushed} append_and_flush) in {elapsed:.2f} s; p50 append {p50:.3f} ms; "
               f"store {store_path}")
    if tracing is not None and delivery is not None and delivery.failed:
        _fail(f"{delivery.failed} of {delivery.failed + delivery.delivered} spans could not be "
              f"delivered: {tracing.first_warning or 'the exporter reported a failure'}", 1)


@cli.command(context_settings={"ignore_unknown_options": True},
             epilog=_example("thread-store bench --quick --out bench-results",
                             "thread-store bench -- --help"))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def bench(ctx: click.Context, args: tuple[str, ...]) -> None:
    """Run the benchmarks (python -m benchmarks ARGS) from a source checkout."""
    ctx.exit(_benchmarks_main()(list(args)))


# -- helpers ------------------------------------------------------------------------------


def _codex_sessions() -> Path:
    """Codex's sessions directory: ``$CODEX_HOME/sessions``, else ``~/.codex/sessions``."""
    home = os.environ.get("CODEX_HOME")
    sessions = (Path(home) if home else Path.home() / ".codex") / "sessions"
    if not sessions.is_dir():
        raise click.UsageError(f"no Codex sessions directory at {sessions}; pass DIRECTORY")
    return sessions


def _read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object kept in a file; empty when the file is missing or unreadable."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a lost record only makes the next import verify every file
    return value if isinstance(value, dict) else {}


def _write_json_atomically(path: Path, value: Any) -> None:
    """Replace ``path`` with ``value`` as JSON, never leaving a half-written file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value), encoding="utf-8")
    os.replace(partial, path)


def _change(store_path: Path, thread_id: str, change: Callable[[ThreadStore, str], object]) -> str:
    """Open the (existing) store, resolve ``thread_id``, apply ``change``; return the id."""
    with _open_existing(store_path) as store:
        thread_id = _resolve(store, thread_id)
        change(store, thread_id)
    return thread_id


def _open_existing(store_path: Path) -> ThreadStore:
    """Open a store that must exist already: a typo in --store must not create one."""
    if not store_path.exists():
        raise NotAThreadStore(f"{store_path} does not exist; pass --store or set $THREAD_STORE")
    return ThreadStore.open(store_path)


def _count(n: int, noun: str) -> str:
    """``1 item``, ``2 items``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _every_thread(store: ThreadStore, archived: bool) -> Iterator[ThreadMetadata]:
    cursor = None
    while True:
        page = store.list_threads(limit=1000, cursor=cursor, archived=archived, include_empty=True)
        yield from page.threads
        cursor = page.next_cursor
        if cursor is None:
            return


def _last_items(store: ThreadStore, thread_id: str, projected: int, count: int) -> list[StoredItem]:
    """The last ``count`` items; read-only stores know the projected seq, not the head."""
    if count == 0:
        return []
    last: deque[StoredItem] = deque(maxlen=count)
    after = max(0, projected - count)
    while page := store.read_history(thread_id, after_seq=after, limit=1000):
        last.extend(page)
        after = page[-1].seq
    return list(last)


def _progress(bars: ExitStack, label: str) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback drawing a click progress bar on stderr."""
    bar: ProgressBar[int] | None = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = bars.enter_context(click.progressbar(length=total, label=label, file=sys.stderr))
        bar.update(done - bar.pos)

    return update


class _Tracing(logging.Handler):
    """The demo's tracing: stops the SDK, and keeps the exporters' first warning, so a
    collector that is down makes one line of output, not one per retry."""

    def __init__(self, stop: Callable[[], TraceDelivery]) -> None:
        super().__init__(logging.WARNING)
        self._stop = stop
        self.first_warning: str | None = None
        self._logger = logging.getLogger("opentelemetry")
        self._logger.addHandler(self)
        self._logger.propagate = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.first_warning is None:
            self.first_warning = _clip(record.getMessage(), 300)

    def stop(self) -> TraceDelivery:
        """Flush and shut down the SDK; return what was delivered."""
        try:
            return self._stop()
        finally:
            self._logger.removeHandler(self)
            self._logger.propagate = True


def _start_tracing(endpoint: str | None, trace_file: Path | None) -> _Tracing | None:
    """Configure the OpenTelemetry SDK for the demo; ``None`` when tracing is off."""
    if not (endpoint or trace_file or any(os.environ.get(name) for name in _OTEL_ENV)):
        return None
    try:
        from thread_store.otel_setup import DEFAULT_SERVICE_NAME, configure_tracing
    except ImportError as exc:
        raise click.ClickException(f"tracing needs the OpenTelemetry SDK and exporter: "
                                   f"pip install 'thread_store[otlp]' ({exc})") from exc
    try:
        return _Tracing(configure_tracing(DEFAULT_SERVICE_NAME, endpoint,
                                          str(trace_file) if trace_file else None))
    except (RuntimeError, ValueError, OSError) as exc:
        raise click.ClickException(f"cannot set up tracing: {exc}") from exc


def _benchmarks_main() -> Callable[[list[str]], int]:
    """``benchmarks.__main__.main``; the package lives in a source checkout, not the wheel."""
    checkout = Path(thread_store.__file__).resolve().parent.parent
    try:
        module = importlib.import_module("benchmarks.__main__")
    except ModuleNotFoundError as exc:
        if exc.name != "benchmarks" or not (checkout / "benchmarks" / "__main__.py").is_file():
            raise click.ClickException(
                "the benchmarks are not importable: they live in benchmarks/ of a source checkout "
                f"and need the bench extra (pip install -e '.[bench]'); {exc}") from exc
        sys.path.insert(0, str(checkout))  # an editable install: the checkout is right there
        module = importlib.import_module("benchmarks.__main__")
    main: Callable[[list[str]], int] = module.main
    return main


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def _echo_threads(threads: Sequence[ThreadMetadata]) -> None:
    if not threads:
        click.echo("no threads", err=True)
        return
    rows = [[m.thread_id, " ".join((m.name or m.title or m.preview or "").split()),
             m.model or "", str(m.item_count),
             m.recency_at.strftime("%Y-%m-%d %H:%M") if m.recency_at else ""] for m in threads]
    headers = ("ID", "TITLE", "MODEL", "ITEMS", "RECENCY (UTC)")
    if _table_width(headers, rows, flexible=1, flexible_width=_MIN_TITLE) > _terminal_width():
        # Like git: a short unique prefix, which every command taking an ID accepts.
        short = _short_ids([r[0] for r in rows])
        for row in rows:
            row[0] = short[row[0]]
    _echo_table(headers, rows, flexible=1)


def _terminal_width() -> int:
    return shutil.get_terminal_size((80, 24)).columns


def _table_width(headers: Sequence[str], rows: Sequence[Sequence[str]], *, flexible: int,
                 flexible_width: int) -> int:
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]
    widths[flexible] = min(widths[flexible], flexible_width)
    return sum(widths) + 2 * (len(widths) - 1)


def _echo_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *,
                flexible: int | None = None) -> None:
    """Print aligned columns; the ``flexible`` one is clipped to fit the terminal."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]
    if flexible is not None:
        room = _terminal_width() - (sum(widths) - widths[flexible]) - 2 * (len(widths) - 1)
        widths[flexible] = max(min(widths[flexible], room), _MIN_FLEXIBLE)
        rows = [[_clip(cell, widths[flexible]) if i == flexible else cell for i, cell in enumerate(row)]
                for row in rows]
    for row in (headers, *rows):
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def _short_ids(ids: Sequence[str]) -> dict[str, str]:
    """The shortest prefix of each id (at least 8 characters) unique among ``ids``."""
    short = {}
    for thread_id in ids:
        length = _SHORT_ID
        while length < len(thread_id) and any(o != thread_id and o.startswith(thread_id[:length])
                                              for o in ids):
            length += 1
        short[thread_id] = thread_id[:length]
    return short


def _resolve(store: ThreadStore, given: str) -> str:
    """The thread ``given`` names: its id (an exact match wins) or a unique prefix of one.

    Finding prefixes scans the index, which is fine for a command run by hand.

    :raises click.UsageError: the prefix matches several threads (they are listed).
    """
    try:
        store.status(given)
        return given
    except ThreadNotFound:
        pass
    found = [m.thread_id for archived in (False, True) for m in _every_thread(store, archived)
             if m.thread_id.startswith(given)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise ThreadNotFound(f"thread {given!r} does not exist, and no thread id starts with it; "
                             "`thread-store list` shows the ids")
    shown = ", ".join(found[:10]) + (f" and {len(found) - 10} more" if len(found) > 10 else "")
    raise click.UsageError(f"{given!r} is the start of {len(found)} thread ids ({shown}); "
                           "give more of the id")


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _kind(item: dict[str, Any]) -> str:
    payload = item.get("payload")
    sub = payload.get("type") if isinstance(payload, dict) else None
    return f"{item.get('type')}/{sub}" if isinstance(sub, str) else str(item.get("type"))


def main() -> None:
    """The ``thread-store`` console script."""
    logging.basicConfig(format="warning: %(message)s", level=logging.WARNING)
    cli(prog_name="thread-store")


if __name__ == "__main__":
    main()
