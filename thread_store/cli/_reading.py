"""Commands that read: ``list``, ``show``, ``status`` and ``export``."""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import Any

import click

from thread_store import StoredItem, ThreadStore

from ._output import echo_fields, echo_json, echo_table, echo_threads, example, plural
from ._stores import open_existing, resolve_id


@click.command("list", epilog=example("thread-store list --search 'flaky test' --limit 20",
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
        echo_json([meta.to_json() for meta in page.threads])
    else:
        echo_threads(page.threads)
        if page.next_cursor:
            click.echo(f"more: add --cursor {page.next_cursor} (same filters) for the next page",
                       err=True)


@click.command(epilog=example("thread-store show 0194a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b --items 5"))
@click.argument("thread_id")
@click.option("--items", "count", type=click.IntRange(0, 100_000), default=10, show_default=True,
              help="How many of the last history items to show.")
@click.option("--json", "as_json", is_flag=True, help='Print {"thread": {...}, "items": [...]}.')
@click.pass_obj
def show(store_path: Path, thread_id: str, count: int, as_json: bool) -> None:
    """Show a thread's metadata and its last history items."""
    with ThreadStore.open(store_path, read_only=True) as store:
        thread_id = resolve_id(store, thread_id)
        meta = store.read_thread(thread_id)
        items = _last_items(store, thread_id, meta.projected_seq, count)
    if as_json:
        echo_json({"thread": meta.to_json(),
                   "items": [{"seq": s.seq, "ts": s.ts.isoformat(), "item": s.item} for s in items]})
        return
    echo_fields(meta.to_json())
    if items:
        click.echo(f"\nlast {plural(len(items), 'item')}:")
        echo_table(("SEQ", "TIME", "TYPE", "PAYLOAD"),
                   [(str(s.seq), s.ts.strftime("%Y-%m-%d %H:%M:%S"), _item_kind(s.item),
                     " ".join(json.dumps(s.item.get("payload"), ensure_ascii=False).split()))
                    for s in items], flexible=3)


@click.command(epilog=example("thread-store status --json"))
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 10_000),
              help="Name at most this many threads behind, and as many failed.")
@click.pass_obj
def status(store_path: Path, as_json: bool, limit: int) -> None:
    """Report projection health as the store has it: threads behind their history and by
    how much, the oldest lag, failed threads with their last error, schema versions.

    Opens the store read-only and writes nothing, so it works while agents have the
    store open, and it never catches up the backlog itself.
    """
    with open_existing(store_path, read_only=True) as store:
        report = store.report(limit)
    if as_json:
        echo_json({"path": str(store_path), **report.to_json()})
        return
    since = report.oldest_behind_since
    click.echo(f"store      {store_path}")
    click.echo("schema     " + ", ".join(f"{k} {v}" for k, v in report.schema_version.items()))
    click.echo(f"threads    {report.threads}")
    click.echo(f"behind     {plural(report.threads_behind, 'thread')}, "
               f"{plural(report.items_behind, 'item')}"
               + (f"; the oldest since {since.isoformat(timespec='seconds')}" if since else ""))
    click.echo(f"failed     {plural(len(report.failed), 'thread')}")
    if report.behind:
        click.echo()
        echo_table(("ID", "HEAD", "PROJECTED", "LAG"),
                   [(b.thread_id, str(b.head_seq), str(b.projected_seq),
                     str(b.head_seq - b.projected_seq)) for b in report.behind], flexible=0)
    if report.failed:
        click.echo()
        echo_table(("ID", "LAST ERROR"),
                   [(f.thread_id, " ".join(f.last_error.split())) for f in report.failed],
                   flexible=1)


@click.command(epilog=example("thread-store export 0194a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b > session.jsonl"))
@click.argument("thread_id")
@click.pass_obj
def export(store_path: Path, thread_id: str) -> None:
    """Print a thread's history as JSON Lines: each item as it was appended, in order.

    Items are written as compact JSON (the form the store keeps), so `import-codex` of
    the output gives the same items back.
    """
    with ThreadStore.open(store_path, read_only=True) as store:
        thread_id = resolve_id(store, thread_id)
        after = 0
        while page := store.read_history(thread_id, after_seq=after, limit=1000):
            click.echo("\n".join(json.dumps(s.item, separators=(",", ":")) for s in page))
            after = page[-1].seq


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


def _item_kind(item: dict[str, Any]) -> str:
    """``type/payload.type`` of a Codex item, or just ``type`` when the payload has none."""
    payload = item.get("payload")
    sub = payload.get("type") if isinstance(payload, dict) else None
    return f"{item.get('type')}/{sub}" if isinstance(sub, str) else str(item.get("type"))
