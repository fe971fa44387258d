"""Commands that change threads or the store: ``rename``, ``archive``, ``unarchive``,
``delete``, ``backup`` and ``reindex``."""

from __future__ import annotations

import sys
import time
from contextlib import ExitStack
from pathlib import Path

import click

from thread_store import ThreadStore

from ._output import clip, example, plural, progress
from ._stores import change_thread, open_existing, resolve_id

#: How much of a thread's title the delete confirmation quotes.
_TITLE_WIDTH = 48


@click.command(epilog=example("thread-store rename 0194a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b 'Fix the flaky test'"))
@click.argument("thread_id")
@click.argument("name")
@click.pass_obj
def rename(store_path: Path, thread_id: str, name: str) -> None:
    """Give a thread a name (shown in lists instead of its title); '' clears it."""
    thread_id = change_thread(store_path, thread_id, lambda s, t: s.update_metadata(t, name=name or None))
    click.echo(f"renamed {thread_id}: {name or '(name cleared)'}")


@click.command(epilog=example("thread-store archive 0194a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"))
@click.argument("thread_id")
@click.pass_obj
def archive(store_path: Path, thread_id: str) -> None:
    """Archive a thread: it leaves `list` and shows in `list --archived`."""
    click.echo(f"archived {change_thread(store_path, thread_id, ThreadStore.archive_thread)}")


@click.command(epilog=example("thread-store unarchive 0194a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"))
@click.argument("thread_id")
@click.pass_obj
def unarchive(store_path: Path, thread_id: str) -> None:
    """Bring an archived thread back to `list`."""
    click.echo(f"unarchived {change_thread(store_path, thread_id, ThreadStore.unarchive_thread)}")


@click.command(epilog=example("thread-store delete 0194a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b --yes"))
@click.argument("thread_id")
@click.option("--yes", is_flag=True, help="Do not ask; needed when stdin is not a terminal.")
@click.pass_obj
def delete(store_path: Path, thread_id: str, yes: bool) -> None:
    """Delete a thread for good: its history and its metadata.

    On a terminal it asks first; otherwise it refuses without --yes.
    """
    with open_existing(store_path) as store:
        thread_id = resolve_id(store, thread_id)
        meta = store.read_thread(thread_id)
        if not yes:
            if not sys.stdin.isatty():
                raise click.UsageError(f"delete of {thread_id} needs --yes when not run on a terminal")
            label = clip(meta.name or meta.title or meta.preview or "untitled", _TITLE_WIDTH)
            click.confirm(f"Delete thread {thread_id} ({label}, {plural(meta.item_count, 'item')}) "
                          "for good?", abort=True, err=True)
        store.delete_thread(thread_id)
    click.echo(f"deleted {thread_id}")


@click.command(epilog=example("thread-store backup /backups/threads-2026-11-30"))
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


@click.command(epilog=example("thread-store --store ~/agent-threads reindex"))
@click.pass_obj
def reindex(store_path: Path) -> None:
    """Rebuild the metadata index from the history (the store must be closed elsewhere)."""
    started = time.perf_counter()
    with ExitStack() as bars:
        count = ThreadStore.rebuild_index(store_path, progress=progress(bars, "re-projecting"))
    click.echo(f"reindexed {count} threads in {time.perf_counter() - started:.2f} s")
