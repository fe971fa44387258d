"""The store's directory: its checks, the single-writer lock, opening the two files,
backup, and deleting the index (it is derived from history)."""

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


def lock_directory(root: Path, *, exclusive: bool = False) -> int:
    """Take the store's lock: shared by every writing store (any number, in any process),
    exclusive for what needs the store to itself (rebuilding the index).

    :raises StoreLocked: a rebuild holds it (shared), or any writer does (exclusive).
    """
    path = root / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise NotAThreadStore(f"cannot create {path}: {exc}") from exc
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        holders = _lock_holders(path) if exclusive else []
        os.close(fd)
        if exclusive:
            who = (f"by process{'es' if len(holders) > 1 else ''} {', '.join(map(str, holders))}"
                   if holders else "by another store")
            raise StoreLocked(f"{root} is open for writing {who}; rebuilding its index needs it "
                              "to itself: close those stores (read-only ones may stay open)") from None
        raise StoreLocked(f"the index of {root} is being rebuilt; open the store once that "
                          "is done") from None
    return fd


def _lock_holders(path: Path) -> list[int]:
    """The pids holding a ``flock`` on ``path``, from Linux's ``/proc/locks`` (empty where
    there is none): for naming the writers in a message only."""
    try:
        st = os.stat(path)
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            lines = locks.read().splitlines()
    except OSError:
        return []
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = {int(fields[4]) for fields in (line.split() for line in lines)
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == where and fields[4].isdigit()}
    return sorted(pids)


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
