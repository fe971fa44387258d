"""The store's files: directory checks, the single-writer lock, opening the index, and
the recovery scan that finds threads whose projection is behind their history."""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
from contextlib import closing
from pathlib import Path

from . import _connections
from ...errors import InvalidArgument, NotAThreadStore, StoreLocked
from .history import EPOCH_KEY, History
from .index import Index

log = logging.getLogger("thread_store")

HISTORY_FILE = "history.db"
INDEX_FILE = "index.db"
LOCK_FILE = "store.lock"


def prepare_directory(root: Path, read_only: bool) -> Path:
    """Check (or create, mode 0700) the store directory."""
    if root.exists() and not root.is_dir():
        raise NotAThreadStore(f"{root} exists and is not a directory; pass a directory path")
    if root.is_dir() and any(root.iterdir()) and not (root / HISTORY_FILE).exists():
        raise NotAThreadStore(f"{root} is a non-empty directory without {HISTORY_FILE}; "
                              "it is not a thread store; pass an empty or new directory")
    if read_only:
        if not (root / HISTORY_FILE).exists():
            raise NotAThreadStore(f"{root} holds no thread store to open read-only")
        return root
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise NotAThreadStore(f"cannot create the store directory {root}: {exc}") from exc
    if not os.access(root, os.W_OK | os.X_OK):
        raise NotAThreadStore(f"{root} is not writable; fix its permissions or open read_only=True")
    return root


def lock_directory(root: Path) -> int:
    """Take the single-writer lock; name the holder when another process has it."""
    path = root / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise NotAThreadStore(f"cannot create {path}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if holder == str(os.getpid()):
            raise StoreLocked(f"{root} is already open for writing in this process (pid {holder}); "
                              "use that ThreadStore, or close it before opening the store again") from None
        raise StoreLocked(f"{root} is open for writing in another process (pid {holder}); "
                          "close it there, or open this one with read_only=True") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def open_history(path: Path, durability: str, read_only: bool) -> History:
    """Open the history; SQLite errors become typed (a missing, locked or unreadable file)."""
    try:
        return History(path, durability=durability, read_only=read_only)
    except sqlite3.Error as exc:
        raise _connections.storage_error(exc, f"opening {path}") from exc


def open_index(path: Path, durability: str, read_only: bool) -> Index:
    """Open the index; a corrupt or foreign index is rebuilt from history (it is derived)."""
    if read_only:
        if not path.exists():
            raise NotAThreadStore(
                f"{path.parent} has no {path.name} (the index was deleted or is being "
                "rebuilt); open the store once for writing, or run `thread-store reindex`, "
                "then open it read-only")
        try:
            return Index(path, durability=durability, read_only=True)
        except sqlite3.Error as exc:
            raise _connections.storage_error(exc, f"opening {path} read-only") from exc
    try:
        return Index(path, durability=durability, read_only=read_only)
    except (NotAThreadStore, sqlite3.DatabaseError) as exc:
        if _connections.is_transient(exc):
            raise  # busy, full or I/O: the file may be fine, so never delete it for that
        log.warning("thread_store: index %s is unreadable (%s); rebuilding it from history",
                    path, exc)
        remove_index(path)
        return Index(path, durability=durability)


def backup(history: History, index: Index, dest: Path) -> None:
    """Copy the store into the new directory ``dest`` while appends go on.

    The index is copied before the history, so the copy's index never holds rows of items
    its history lacks; what it misses (or anything a mark cleared meanwhile) is caught up
    when the copy is opened, by the usual recovery.
    """
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InvalidArgument(f"backup destination {dest} exists and is not an empty directory; "
                              "pass a new path")
    created = not dest.exists()
    try:
        dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidArgument(f"cannot create the backup directory {dest}: {exc}") from exc
    try:
        index.backup_to(dest / INDEX_FILE)
        history.backup_to(dest / HISTORY_FILE)
    except BaseException:
        for name in (INDEX_FILE, HISTORY_FILE):
            (dest / name).unlink(missing_ok=True)
        if created:
            dest.rmdir()
        raise


def drop_index(root: Path) -> None:
    """Delete the store's index on request (``reindex``); the caller holds the writer lock.

    History first forgets the index epoch it acknowledged: it belonged to the index going
    away, and without it the next open rebuilds without warning about a lost index.
    """
    with closing(sqlite3.connect(root / HISTORY_FILE, isolation_level=None)) as conn:
        try:
            conn.execute("DELETE FROM store_meta WHERE key = ?", (EPOCH_KEY,))
        except sqlite3.Error as exc:
            raise _connections.storage_error(exc, "resetting the index epoch") from exc
    remove_index(root / INDEX_FILE)


def remove_index(path: Path) -> None:
    """Delete the index database with its WAL files (it is derived from history)."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


Behind = dict[str, tuple[int, int, bool]]


def recover(history: History, index: Index) -> Behind:
    """Find threads whose projection is behind (or, after power loss, ahead of) history.

    History marks a thread behind in the append's own transaction, and acknowledgements
    clear the mark once the index committed the thread's row, so open() reads only the
    marked threads: O(threads behind), after a clean close or a crash alike.
    Acknowledgements are written lazily (about once per second, and at close), so a
    crash leaves the threads of the last commits marked although their rows are written:
    they are checked here, found caught up, and acknowledged.

    Every thread is compared once, the findings are marked in history and the files
    agree again, only when one file lost a tail the other kept (power loss with
    ``durability="normal"``, a restored backup), or for a new index:

    - the index lost commits that history acknowledged: its epoch (a count of its
      transactions) is below the one history recorded with its last acknowledgement;
    - history lost items that the index folded: its highest items rowid is below the
      index's ``history_mark`` (what history's highest rowid was before each fold).
      Rowids only grow (a removal keeps the highest one, see
      ``History._keep_high_water``), so removing the newest thread is no false alarm.
    """
    index.history = history
    acknowledged = history.index_epoch()
    if (index.fresh or acknowledged is None or index.epoch() < acknowledged
            or history.high_water() < index.history_mark()):
        return _compare_all(history, index)
    behind: Behind = {}
    caught_up = []
    for thread_id, head in history.behind_threads().items():
        projected, state = index.load_state(thread_id)
        _note_behind(behind, thread_id, head, projected if state is not None else None)
        if thread_id not in behind:
            caught_up.append((thread_id, head))  # its acknowledgement was not written yet
    history.acknowledge(caught_up, None)  # the worker writes it with the others
    return behind


def _compare_all(history: History, index: Index) -> Behind:
    """Compare every thread's row with its history, once (see :func:`recover`).

    Crash-safe in this order: the findings are marked in history before the index's mark
    and history's epoch say that the files agree again.
    """
    if not index.fresh:
        log.warning("thread_store: the index and the history disagree (a power loss or a "
                    "restored file); comparing every thread")
    elif history.index_epoch() is not None:
        log.warning("thread_store: rebuilding the index from history")
    high_water = history.high_water()
    projected_by_id = index.projected_seqs()
    behind: Behind = {}
    for thread_id, head in history.heads().items():
        _note_behind(behind, thread_id, head, projected_by_id.pop(thread_id, None))
    history.mark_behind(sorted(behind))
    with index.write_lock:
        # Rows of threads whose history is gone (removed mid-crash, or lost with a tail).
        index.delete_rows(sorted(projected_by_id))
        index.reset_history_mark(high_water)
    history.mark_behind([], epoch=index.epoch())
    return behind


def _note_behind(behind: Behind, thread_id: str, head: int, projected: int | None) -> None:
    """Record a thread that needs projecting; ``projected=None`` means it has no row yet.

    A thread without a row, or whose row is ahead of its history, is re-folded from its
    first item.
    """
    if projected is None:
        behind[thread_id] = (head, 0, True)
    elif projected != head:
        behind[thread_id] = (head, projected, projected > head)
