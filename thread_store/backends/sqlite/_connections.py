"""SQLite plumbing shared by the history and the index: connections, pragmas, errors."""

from __future__ import annotations

import os
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import sqlite_utils

from ...errors import NotAThreadStore, SchemaTooNew, StorageError, TransientStorageError

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
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return (code & 0xFF) in _TRANSIENT_CODES
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc)
        return "locked" in text or "busy" in text or "disk" in text or "I/O" in text
    return False


def translate(exc: BaseException, message: str) -> StorageError:
    """The one translation of a SQLite error into thread_store's types.

    Transient errors (busy, locked, I/O, full) become :class:`TransientStorageError`,
    which the retry policy knows; the rest :class:`StorageError`. The caller chains the
    driver's error below it (``raise translate(exc, ...) from exc``).
    """
    kind = TransientStorageError if is_transient(exc) else StorageError
    return kind(f"{message}: {exc}")


def storage_error(exc: sqlite3.Error, what: str) -> StorageError:
    """A write that failed: nothing of the call was written."""
    return translate(exc, f"{what} failed in SQLite (nothing of this call was written)")


@contextmanager
def reading(what: str) -> Iterator[None]:
    """Translate SQLite errors of a read (a damaged page, a closed connection, a lock
    held past the busy timeout) into :class:`StorageError` or its transient kind."""
    try:
        yield
    except sqlite3.Error as exc:
        raise translate(exc, f"reading {what} failed in SQLite (if the index is damaged, "
                             "`thread-store reindex` rebuilds it from history)") from exc


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


#: Read connections per database file; readers beyond it wait for one to come back.
POOL_SIZE = 8
#: Keys per ``IN`` list: under SQLite's oldest limit on bound parameters (999).
MAX_IN_LIST = 512


def in_list_length(keys: int) -> int:
    """The length an ``IN`` list of ``keys`` keys is padded to: the next power of two.

    Every length is a statement of its own in each connection's statement cache (128 of
    them), and a prepared statement keeps its last bound values: lists of every length
    made the readers' caches grow towards 128 statements of up to 110 KiB each, the bulk
    of SQLite's heap growth as a process touched 1,000,000 threads (issue 15). Padded,
    a query has 10 statements (1, 2, 4 ... 512 keys).
    """
    return 1 << max(0, keys - 1).bit_length()


class ConnectionPool:
    """At most ``size`` read connections, borrowed for one statement and given back.

    Connections belong to the pool, not to threads: an application that reads from many
    short-lived threads reuses the same few connections (each one holds four file
    descriptors), and a reader finding them all busy waits for one. A connection is used
    by one borrower at a time, so :meth:`close` never closes one under a running
    statement: it closes the idle ones and the borrowers close theirs on return (closing
    a SQLite connection while another thread runs a statement on it can crash the process).

    With ``follows`` (a read-only store), a borrow notices that the file at that path was
    replaced (a writer rebuilt the index) and moves to the new file once it has a schema.
    """

    def __init__(self, factory: Callable[[], sqlite3.Connection], *, size: int = POOL_SIZE,
                 follows: Path | None = None) -> None:
        self._factory = factory
        self._size = size
        self._idle: list[sqlite3.Connection] = []
        self._count = 0
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._follows = follows
        self._identity = _file_identity(follows) if follows is not None else None
        #: Bumped when the followed file is replaced; connections of older files retire.
        self._generation = 0
        self._born: dict[int, int] = {}

    @contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        """Borrow a connection for one read; it goes back to the pool afterwards."""
        conn = self._borrow()
        try:
            yield conn
        finally:
            self._give_back(conn)

    def fetchone(self, what: str, sql: str, params: Sequence[object] = ()) -> Any:
        """One row of a read on a pooled connection; SQLite errors become typed."""
        with reading(what), self.connection() as conn:
            return conn.execute(sql, params).fetchone()

    def fetchall(self, what: str, sql: str, params: Sequence[object] = ()) -> list[Any]:
        """All rows of a read on a pooled connection; SQLite errors become typed."""
        with reading(what), self.connection() as conn:
            return conn.execute(sql, params).fetchall()

    def fetch_in(self, what: str, sql: str, keys: Sequence[object]) -> list[Any]:
        """All rows of ``sql``, whose ``{keys}`` names an ``IN`` list, for every key:
        in chunks under SQLite's limit on bound parameters, each padded with NULLs (which
        match nothing) to a length of :func:`in_list_length`."""
        rows: list[Any] = []
        for start in range(0, len(keys), MAX_IN_LIST):
            chunk = list(keys[start:start + MAX_IN_LIST])
            length = in_list_length(len(chunk))
            chunk += [None] * (length - len(chunk))
            rows.extend(self.fetchall(what, sql.format(keys=", ".join("?" * length)), chunk))
        return rows

    def backup_to(self, dest: Path) -> None:
        """Copy the database, as one consistent snapshot, into the new file ``dest``.

        SQLite's online backup in a single step holds one read transaction, so writers
        (in WAL mode) go on meanwhile.
        """
        create_private_file(dest)
        with reading(f"{dest.name} for a backup"), self.connection() as source:
            target = sqlite3.connect(dest)
            try:
                source.backup(target, pages=-1)
            finally:
                target.close()

    def close(self) -> None:
        """Close the idle connections now; borrowed ones close when they come back."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        for conn in idle:
            conn.close()

    def _borrow(self) -> sqlite3.Connection:
        self._check_replaced()
        with self._cond:
            while True:
                if self._closed:
                    raise StorageError("the store's connections are closed")
                if self._idle:
                    return self._idle.pop()
                if self._count < self._size:
                    self._count += 1
                    generation = self._generation
                    break
                self._cond.wait()
        try:
            conn = self._factory()
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise
        with self._cond:
            self._born[id(conn)] = generation
        return conn

    def _give_back(self, conn: sqlite3.Connection) -> None:
        with self._cond:
            keep = not self._closed and self._born.get(id(conn)) == self._generation
            if keep:
                self._idle.append(conn)
            else:
                self._count -= 1
                self._born.pop(id(conn), None)
            self._cond.notify()
        if not keep:
            conn.close()

    def _check_replaced(self) -> None:
        """Retire every connection of a followed file that was replaced (a stat per read)."""
        if self._follows is None:
            return
        identity = _file_identity(self._follows)
        if identity is None or identity == self._identity or not _has_schema(self._follows):
            return  # mid-rebuild: keep reading the old file until the new one is ready
        with self._cond:
            if identity == self._identity:
                return
            self._identity = identity
            self._generation += 1
            old, self._idle = self._idle, []
            self._count -= len(old)
            for conn in old:
                self._born.pop(id(conn), None)
        for conn in old:
            conn.close()


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _has_schema(path: Path) -> bool:
    """True once a writer committed the schema of a (new) file at ``path``."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return False
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0]) > 0
    except sqlite3.Error:
        return False
    finally:
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
