"""Opening the store a command names, and finding the thread it means by an id or a prefix."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import click

from thread_store import NotAThreadStore, ThreadMetadata, ThreadNotFound, ThreadStore


def open_existing(store_path: Path, *, read_only: bool = False) -> ThreadStore:
    """Open a store that must exist already: a typo in --store must not create one.

    Commands that only read open it ``read_only``: they write nothing, never catch up a
    backlog, and work while agents have the store open for writing.

    :raises NotAThreadStore: ``store_path`` does not exist.
    """
    if not store_path.exists():
        raise NotAThreadStore(f"{store_path} does not exist; pass --store or set $THREAD_STORE")
    return ThreadStore.open(store_path, read_only=read_only)


def change_thread(store_path: Path, thread_id: str, change: Callable[[ThreadStore, str], object]) -> str:
    """Open the (existing) store, resolve ``thread_id``, apply ``change``; return the id.

    :param change: called as ``change(store, full_thread_id)``, e.g. ``ThreadStore.archive_thread``.
    :returns: the full id of the changed thread.
    """
    with open_existing(store_path) as store:
        thread_id = resolve_id(store, thread_id)
        change(store, thread_id)
    return thread_id


def every_thread(store: ThreadStore, archived: bool) -> Iterator[ThreadMetadata]:
    """Every listed thread, empty ones too, active or ``archived``, page by page."""
    cursor = None
    while True:
        page = store.list_threads(limit=1000, cursor=cursor, archived=archived, include_empty=True)
        yield from page.threads
        cursor = page.next_cursor
        if cursor is None:
            return


def resolve_id(store: ThreadStore, given: str) -> str:
    """The thread ``given`` names: its id (an exact match wins) or a unique prefix of one.

    Finding prefixes scans the index, which is fine for a command run by hand.

    :raises ThreadNotFound: no thread has that id or an id starting with it.
    :raises click.UsageError: the prefix matches several threads (they are listed).
    """
    try:
        store.status(given)
        return given
    except ThreadNotFound:
        pass
    found = [m.thread_id for archived in (False, True) for m in every_thread(store, archived)
             if m.thread_id.startswith(given)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise ThreadNotFound(f"thread {given!r} does not exist, and no thread id starts with it; "
                             "`thread-store list` shows the ids")
    shown = ", ".join(found[:10]) + (f" and {len(found) - 10} more" if len(found) > 10 else "")
    raise click.UsageError(f"{given!r} is the start of {len(found)} thread ids ({shown}); "
                           "give more of the id")
