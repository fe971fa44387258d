"""Commands that read: ``list``, ``show``, ``status`` and ``export``."""

from __future__ import annotations

import dataclasses
import json
from collections import deque
from pathlib import Path
from typing import Any

import click

from thread_store import StoredItem, ThreadStore

from ._output import echo_fields, echo_json, echo_table, echo_threads, example, plural
from ._stores import every_thread, open_existing, resolve_id


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
@click.option("--json", "as_json", is_flag=True, help="Print the report as a JSON object.")
@click.pass_obj
def status(store_path: Path, as_json: bool) -> None:
    """Report projection health: threads behind their history, retries, failures.

    Opening the store starts catching up threads that a crash or a slow shutdown left
    behind, so this is a snapshot taken right after open. Threads that never got a row
    in the index count in "pending" but are not named.
    """
    with open_existing(store_path) as store:
        stats = store.stats()
        counts = {"active": 0, "archived": 0}
        behind = []
        for archived in (False, True):
            for meta in every_thread(store, archived):
                counts["archived" if archived else "active"] += 1
                st = store.status(meta.thread_id)
                if st.pending or st.last_error:
                    behind.append({"thread_id": meta.thread_id, **dataclasses.asdict(st),
                                   "lag": st.head_seq - st.projected_seq})
    if as_json:
        echo_json({"path": str(store_path), "threads": counts, "stats": dataclasses.asdict(stats),
                   "behind": behind})
        return
    click.echo(f"store      {store_path}")
    click.echo(f"threads    {counts['active'] + counts['archived']} "
               f"({counts['active']} active, {counts['archived']} archived)")
    click.echo(f"pending    {stats.pending_threads} threads, {stats.waiters} waiters")
    click.echo(f"projector  {stats.transactions} transactions, {stats.rows_written} rows, "
               f"{stats.attempts} attempts, {stats.retries} retries, {stats.failures} failures")
    if behind:
        echo_table(("ID", "HEAD", "PROJECTED", "LAG", "ATTEMPTS", "LAST ERROR"),
                   [(b["thread_id"], str(b["head_seq"]), str(b["projected_seq"]), str(b["lag"]),
                     str(b["attempts"]), " ".join((b["last_error"] or "").split())) for b in behind],
                   flexible=5)


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
