"""The SQLite plumbing: schema migrations and error classification."""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils

from thread_store import NotAThreadStore, SchemaTooNew, StorageError
from thread_store.backends.sqlite import _connections
from thread_store.backends.sqlite._acks import SLICE as ACK_SLICE
from thread_store.backends.sqlite._acks import AckBatch
from thread_store.backends.sqlite.history import History
from thread_store.model import EncodedItem


def _connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def _v1(db: sqlite_utils.Database) -> None:
    db["things"].create({"id": int, "name": str}, pk="id")  # type: ignore[union-attr]


def _v2(db: sqlite_utils.Database) -> None:
    db["things"].add_column("colour", str)  # type: ignore[union-attr]


def test_migrate_creates_then_upgrades_step_by_step(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    conn = _connect(path)
    assert _connections.migrate(conn, path, [_v1], read_only=False) == 0
    conn.execute("INSERT INTO things (id, name) VALUES (1, 'kept')")
    assert _connections.migrate(conn, path, [_v1, _v2], read_only=False) == 1
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    assert conn.execute("SELECT name, colour FROM things").fetchall() == [("kept", None)]
    assert _connections.migrate(conn, path, [_v1, _v2], read_only=False) == 2  # nothing left to do
    conn.close()


def test_failed_migration_keeps_the_old_version(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    conn = _connect(path)
    _connections.migrate(conn, path, [_v1], read_only=False)

    def broken(db: sqlite_utils.Database) -> None:
        _v2(db)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        _connections.migrate(conn, path, [_v1, broken], read_only=False)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    assert [c[1] for c in conn.execute("PRAGMA table_info(things)")] == ["id", "name"]
    conn.close()


def test_newer_and_foreign_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    conn = _connect(path)
    _connections.migrate(conn, path, [_v1, _v2], read_only=False)
    with pytest.raises(SchemaTooNew, match="upgrade thread_store"):
        _connections.migrate(conn, path, [_v1], read_only=False)
    conn.close()
    foreign = tmp_path / "foreign.sqlite"
    other = _connect(foreign)
    other.execute("CREATE TABLE x (y)")
    with pytest.raises(NotAThreadStore):
        _connections.migrate(other, foreign, [_v1], read_only=False)
    other.close()


@pytest.mark.parametrize(("message", "transient"), [
    ("database is locked", True), ("database table is locked", True),
    ("database or disk is full", True), ("disk I/O error", True),
    ("no such table: x", False),
])
def test_transient_classification(message: str, transient: bool) -> None:
    assert _connections.is_transient(sqlite3.OperationalError(message)) is transient


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_short_lived_reader_threads_leave_no_connections_behind(tmp_path: Path) -> None:
    """Connections are pooled and capped, not kept per OS thread until close ."""
    from thread_store import ThreadStore

    with ThreadStore.open(tmp_path / "store") as store:
        tid = store.create_thread()
        store.append_and_flush(tid, [{"type": "event_msg", "payload": {
            "type": "user_message", "message": "hello"}}], timeout=30)
        store.read_thread(tid)
        store.read_history(tid)
        before = _open_fds()
        errors: list[BaseException] = []
        start = threading.Barrier(20)

        def reader() -> None:
            try:
                start.wait(30)  # 20 at a time really read concurrently
                store.read_thread(tid)
                store.list_threads()
                store.read_history(tid)
                store.status(tid)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        for _ in range(6):  # 120 short-lived threads, 20 alive at a time
            threads = [threading.Thread(target=reader) for _ in range(20)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        assert not errors, errors
        grown = _open_fds() - before
        # At most the pool's cap of connections per file (4 descriptors each), not 480.
        assert grown <= 2 * _connections.POOL_SIZE * 4, grown


def test_pool_caps_connections_and_closes_borrowed_ones_on_return(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    _connect(path).close()
    made: list[sqlite3.Connection] = []

    def factory() -> sqlite3.Connection:
        made.append(sqlite3.connect(path, check_same_thread=False))
        return made[-1]

    pool = _connections.ConnectionPool(factory, size=2)
    with pool.connection() as a, pool.connection() as b:
        assert a is not b
        got: list[sqlite3.Connection] = []
        trying = threading.Event()

        def third() -> None:
            trying.set()
            got.append(pool.fetchone("t", "SELECT 1"))  # exhausted: waits for a return

        waiter = threading.Thread(target=third)
        waiter.start()
        assert trying.wait(30)
    waiter.join(30)
    assert got == [(1,)] and len(made) == 2
    with pool.connection() as c:
        pool.close()
        assert c.execute("SELECT 1").fetchone() == (1,)  # never closed under its borrower
    with pytest.raises(sqlite3.ProgrammingError):
        c.execute("SELECT 1")  # closed once given back
    with pytest.raises(StorageError):
        pool.fetchone("t", "SELECT 1")


class _RecordingConnection(sqlite3.Connection):
    """Records the text of every statement it runs."""

    texts: set[str]

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        self.texts.add(sql)
        return super().execute(sql, parameters)


def test_in_lists_of_any_length_find_their_keys_with_a_few_statements(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    conn = _connect(path)
    conn.execute("CREATE TABLE t (k TEXT PRIMARY KEY, v INTEGER)")
    conn.executemany("INSERT INTO t VALUES (?, ?)", [(f"k{i}", i) for i in range(1200)])
    conn.close()
    texts: set[str] = set()

    def factory() -> sqlite3.Connection:
        conn = sqlite3.connect(path, check_same_thread=False, factory=_RecordingConnection)
        conn.texts = texts
        return conn

    pool = _connections.ConnectionPool(factory, size=1)
    for n in [*range(1, 70), 255, 256, 257, 511, 512, 513, 1100]:
        keys = [f"k{i}" for i in range(0, 2 * n, 2)]  # every other key exists below 1200
        rows = pool.fetch_in("t", "SELECT k, v FROM t WHERE k IN ({keys})", keys)
        assert sorted(rows) == sorted((f"k{i}", i) for i in range(0, min(2 * n, 1200), 2)), n
    # One statement per power of two up to the chunk (the cache would keep 128, each
    # holding its last values), not one per length.
    assert len(texts) == _connections.MAX_IN_LIST.bit_length()
    pool.close()


def test_acknowledgements_leave_the_batch_a_slice_at_a_time_each_with_the_epoch() -> None:
    batch = AckBatch()
    batch.add([(f"t{i}", 1) for i in range(ACK_SLICE + 5)], 7)
    first, epoch = batch.take(ACK_SLICE)
    assert (len(first), epoch, bool(batch)) == (ACK_SLICE, 7, True)
    rest, epoch = batch.take(ACK_SLICE)
    assert (len(rest), epoch, bool(batch)) == (5, 7, False)
    assert {t for t, _ in first + rest} == {f"t{i}" for i in range(ACK_SLICE + 5)}


def test_acknowledgements_are_written_a_slice_per_transaction(tmp_path: Path) -> None:
    """Each write holds the history's write lock, which appends wait for: never for the
    whole batch. Close writes whatever is left."""
    path = tmp_path / "history.db"
    history = History(path, durability="normal")
    threads = [f"t{i}" for i in range(ACK_SLICE + 5)]
    for thread_id in threads:
        history.create(thread_id, created_us=1, first=EncodedItem('{"type":"x"}', 1, "x"))
    history.acknowledge([(thread_id, 1) for thread_id in threads], 3)

    def behind() -> int:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return int(conn.execute("SELECT count(*) FROM behind").fetchone()[0])
        finally:
            conn.close()

    history.write_acknowledgements()
    assert behind() == 5
    history.close()
    assert behind() == 0
