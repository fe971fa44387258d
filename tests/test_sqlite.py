"""The SQLite plumbing: schema migrations and error classification."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import sqlite_utils

from thread_store import NotAThreadStore, SchemaTooNew
from thread_store import _sqlite


def _connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def _v1(db: sqlite_utils.Database) -> None:
    db["things"].create({"id": int, "name": str}, pk="id")  # type: ignore[union-attr]


def _v2(db: sqlite_utils.Database) -> None:
    db["things"].add_column("colour", str)  # type: ignore[union-attr]


def test_migrate_creates_then_upgrades_step_by_step(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    conn = _connect(path)
    assert _sqlite.migrate(conn, path, [_v1], read_only=False) == 0
    conn.execute("INSERT INTO things (id, name) VALUES (1, 'kept')")
    assert _sqlite.migrate(conn, path, [_v1, _v2], read_only=False) == 1
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    assert conn.execute("SELECT name, colour FROM things").fetchall() == [("kept", None)]
    assert _sqlite.migrate(conn, path, [_v1, _v2], read_only=False) == 2  # nothing left to do
    conn.close()


def test_failed_migration_keeps_the_old_version(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    conn = _connect(path)
    _sqlite.migrate(conn, path, [_v1], read_only=False)

    def broken(db: sqlite_utils.Database) -> None:
        _v2(db)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        _sqlite.migrate(conn, path, [_v1, broken], read_only=False)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    assert [c[1] for c in conn.execute("PRAGMA table_info(things)")] == ["id", "name"]
    conn.close()


def test_newer_and_foreign_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    conn = _connect(path)
    _sqlite.migrate(conn, path, [_v1, _v2], read_only=False)
    with pytest.raises(SchemaTooNew, match="upgrade thread_store"):
        _sqlite.migrate(conn, path, [_v1], read_only=False)
    conn.close()
    foreign = tmp_path / "foreign.sqlite"
    other = _connect(foreign)
    other.execute("CREATE TABLE x (y)")
    with pytest.raises(NotAThreadStore):
        _sqlite.migrate(other, foreign, [_v1], read_only=False)
    other.close()


@pytest.mark.parametrize(("message", "transient"), [
    ("database is locked", True), ("database table is locked", True),
    ("database or disk is full", True), ("disk I/O error", True),
    ("no such table: x", False),
])
def test_transient_classification(message: str, transient: bool) -> None:
    assert _sqlite.is_transient(sqlite3.OperationalError(message)) is transient
