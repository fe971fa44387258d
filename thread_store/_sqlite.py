"""SQLite plumbing shared by the history and the index: connections, pragmas, errors."""

from __future__ import annotations

import os
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import sqlite_utils

from .errors import NotAThreadStore, SchemaTooNew, StorageError, ThreadStoreError

T = TypeVar("T")

# Error classes SQLite reports for contention, I/O and a full disk: retry these.
_TRANSIENT_CODES = {
    5,  # SQLITE_BUSY
    6,  # SQLITE_LOCKED
    10,  # SQLITE_IOERR
    13,  # SQLITE_FULL
}
APPLICATION_ID = 0x74735354  # "tsST": marks our files, so a foreign database is refused


def is_transient(exc: BaseException) -> bool:
    """True for SQLite errors that may go away on their own (busy, locked, I/O, full)."""
    if isinstance(exc, StorageError) and isinstance(exc.__cause__, sqlite3.Error):
        exc = exc.__cause__
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return (code & 0xFF) in _TRANSIENT_CODES
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc)
        return "locked" in text or "busy" in text or "disk" in text or "I/O" in text
    return False


def storage_error(exc: sqlite3.Error, what: str) -> ThreadStoreError:
    """Translate a SQLite error at the storage boundary into a typed error."""
    return StorageError(f"{what} failed in SQLite: {exc}. Nothing of this call was written.")


@contextmanager
def reading(what: str) -> Iterator[None]:
    """Translate SQLite errors of a read (a damaged page, a closed connection) into
    :class:`StorageError`; :func:`is_transient` still sees the cause."""
    try:
        yield
    except sqlite3.Error as exc:
        raise StorageError(f"reading {what} failed in SQLite: {exc}; if the index is damaged, "
                           "`thread-store reindex` rebuilds it from history") from exc


def create_private_file(path: Path) -> None:
    """Create ``path`` with mode 0600 if missing; SQLite gives -wal/-shm the same mode."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)


def connect(path: Path, *, durability: str, read_only: bool = False,
            busy_timeout_ms: int = 5000, schema_version: int | None = None) -> sqlite3.Connection:
    """Open a connection in autocommit mode; transactions are explicit BEGIN/COMMIT.

    With ``schema_version``, refuse a foreign, non-SQLite or newer file *before* the
    switch to WAL, which would otherwise write to a file we then reject.
    """
    if read_only:
        uri = f"file:{path}?mode=ro"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    if schema_version is not None:
        try:
            check_schema(conn, path, schema_version)
        except BaseException:
            conn.close()
            raise
    if not read_only:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise NotAThreadStore(f"{path}: could not switch to WAL journal mode (got {mode})")
        conn.execute(f"PRAGMA synchronous = {'FULL' if durability == 'full' else 'NORMAL'}")
    return conn


def check_schema(conn: sqlite3.Connection, path: Path, version: int) -> int:
    """Return the file's schema version (0 = new); refuse foreign or newer files."""
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        found = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise NotAThreadStore(f"{path} is not a SQLite database of a thread store: {exc}") from exc
    if app_id != APPLICATION_ID and (tables or found):
        raise NotAThreadStore(
            f"{path} is a SQLite database but not a thread store; point open() at another path"
        )
    if found > version:
        raise SchemaTooNew(
            f"{path} has schema version {found}, newer than this thread_store supports "
            f"({version}); upgrade thread_store to open it"
        )
    return int(found)


Migration = Callable[[sqlite_utils.Database], None]


def migrate(conn: sqlite3.Connection, path: Path, steps: Sequence[Migration], *,
            read_only: bool) -> int:
    """Bring the file to schema version ``len(steps)``; return the version it had.

    ``steps[n]`` moves a file from version ``n`` to ``n + 1`` (``steps[0]`` creates the
    schema), so a new version is one more step. All missing steps and the version stamp
    commit in one transaction: a crash mid-migration leaves the old version intact.
    """
    found = check_schema(conn, path, len(steps))
    if found < len(steps) and not read_only:
        db = sqlite_utils.Database(conn)

        def run() -> None:
            for step in steps[found:]:
                step(db)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {len(steps)}")

        in_transaction(conn, run)
    return found


class ConnectionPool:
    """One read connection per OS thread, all closed together by :meth:`close`.

    A read holds its connection's lock, and :meth:`close` takes each lock before closing:
    closing a SQLite connection while another thread runs a statement on it can crash
    the process (a worker fenced by close() may still be finishing a read).
    """

    def __init__(self, factory: Callable[[], sqlite3.Connection]) -> None:
        self._factory = factory
        self._local = threading.local()
        self._all: list[tuple[sqlite3.Connection, threading.Lock]] = []
        self._lock = threading.Lock()
        self._closed = False

    def _mine(self) -> tuple[sqlite3.Connection, threading.Lock]:
        """This thread's connection and its lock, opened on first use."""
        entry: tuple[sqlite3.Connection, threading.Lock] | None = getattr(self._local, "entry", None)
        if entry is None:
            entry = (self._factory(), threading.Lock())
            with self._lock:
                if self._closed:
                    entry[0].close()
                    raise StorageError("the store's connections are closed")
                self._all.append(entry)
            self._local.entry = entry
        return entry

    def fetchone(self, what: str, sql: str, params: Sequence[object] = ()) -> Any:
        """One row of a read on this thread's connection; SQLite errors become typed."""
        conn, lock = self._mine()
        with reading(what), lock:
            return conn.execute(sql, params).fetchone()

    def fetchall(self, what: str, sql: str, params: Sequence[object] = ()) -> list[Any]:
        """All rows of a read on this thread's connection; SQLite errors become typed."""
        conn, lock = self._mine()
        with reading(what), lock:
            return conn.execute(sql, params).fetchall()

    def close(self) -> None:
        """Close every connection handed out, each once no read is running on it."""
        with self._lock:
            self._closed = True
            entries, self._all = self._all, []
        for conn, lock in entries:
            with lock:
                conn.close()


def in_transaction(conn: sqlite3.Connection, body: Callable[[], T], *, immediate: bool = True) -> T:
    """Run ``body`` inside BEGIN ... COMMIT, rolling back on any error."""
    conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        result = body()
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result
