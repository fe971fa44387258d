"""PostgreSQL for the benchmarks: a throwaway server at default durability, and the raw floors.

:class:`BenchServer` starts a cluster from the machine's binaries with the starter the
tests use (``tests/pg_server.py``, imported, not copied), but with PostgreSQL's default
durability settings (``fsync``, ``full_page_writes`` and ``synchronous_commit`` on), and
sets :data:`SYNCHRONOUS_COMMIT` as the benchmark database's default, so every arm's
durable commits run at the same setting: thread_store's history commits at ``local``
with ``durability="normal"``, the raw floors and the eventsourcing peer inherit it. On a
server without synchronous standbys ``local`` and ``on`` wait for the same local WAL
flush. Each system gets its own schema.

:class:`RawPostgres` is the floor: hand-written psycopg on one autocommit connection, into
tables shaped like thread_store's (``items`` keyed by ``(thread_id, seq)``, a ``heads``
row per thread, a ``meta`` row per thread).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import psycopg

from tests.pg_server import PostgresServer, PostgresUnavailable, find_binary

from .systems import RawFloor

Item = dict[str, Any]
SYNCHRONOUS_COMMIT = "local"
DATABASE = "thread_store_bench"
#: Only what the benchmark needs beyond the defaults: room for its connections.
_SETTINGS = ("-c", "max_connections=200")

_SCHEMA = (
    "CREATE SCHEMA {s}",
    "CREATE TABLE {s}.heads (thread_id text COLLATE \"C\" PRIMARY KEY, head bigint NOT NULL)",
    ("CREATE TABLE {s}.items (thread_id text COLLATE \"C\" NOT NULL, seq bigint NOT NULL, "
     "ts_us bigint NOT NULL, item text NOT NULL, PRIMARY KEY (thread_id, seq))"),
    ("CREATE TABLE {s}.meta (thread_id text COLLATE \"C\" PRIMARY KEY, title text, "
     "item_count bigint NOT NULL, updated_us bigint NOT NULL)"),
)
_INSERT = "INSERT INTO {s}.items (thread_id, seq, ts_us, item) VALUES (%s, %s, %s, %s)"
#: The backend's own shape: the head bump under the row lock allocates the seq.
_APPEND_ONE = ("WITH h AS (UPDATE {s}.heads SET head = head + 1 WHERE thread_id = %(t)s RETURNING head) "
               "INSERT INTO {s}.items (thread_id, seq, ts_us, item) "
               "SELECT %(t)s, h.head, %(ts)s, %(item)s FROM h RETURNING seq")
_UPSERT = ("INSERT INTO {s}.meta VALUES (%s, %s, 1, %s) ON CONFLICT (thread_id) DO UPDATE SET "
           "title = coalesce(meta.title, excluded.title), item_count = meta.item_count + 1, "
           "updated_us = excluded.updated_us")


def unavailable() -> str | None:
    """Why the PostgreSQL benchmarks cannot run here (no server binaries), or ``None``."""
    try:
        find_binary("initdb")
        find_binary("pg_ctl")
    except PostgresUnavailable as exc:
        return str(exc)
    return None


class BenchServer:
    """A throwaway PostgreSQL server at default durability, with the benchmark database."""

    def __init__(self) -> None:
        self._server = PostgresServer(_SETTINGS)
        self._schemas = 0

    def __enter__(self) -> BenchServer:
        self._server.__enter__()
        try:
            with psycopg.connect(self._server.url, autocommit=True, connect_timeout=30) as conn:
                conn.execute(f"CREATE DATABASE {DATABASE}")
                conn.execute(f"ALTER DATABASE {DATABASE} SET synchronous_commit = {SYNCHRONOUS_COMMIT}")
        except BaseException:
            self._server.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()

    @property
    def url(self) -> str:
        """The benchmark database's ``postgresql://`` URL (TCP on 127.0.0.1)."""
        return self._server.url.rsplit("/", 1)[0] + "/" + DATABASE

    def settings(self) -> dict[str, str]:
        """The durability settings the server runs with (for the report)."""
        with psycopg.connect(self.url, autocommit=True, connect_timeout=30) as conn:
            return {name: str(conn.execute(f"SHOW {name}").fetchone()[0])  # type: ignore[index]
                    for name in ("server_version", "fsync", "full_page_writes", "synchronous_commit",
                                 "wal_sync_method")}

    def new_schema(self, name: str) -> str:
        """A fresh schema name for one system."""
        self._schemas += 1
        return f"{name}_{self._schemas}"


def _q(text: str, schema: str) -> bytes:
    return text.replace("{s}", schema).encode()


class RawPostgres(RawFloor):
    """The floors: hand-written psycopg on one autocommit connection (see the module doc).

    - ``append``: ``json.dumps`` + INSERT + COMMIT of the item, its seq counted here; with
      ``allocate=True`` instead one statement that allocates the seq by bumping the
      thread's head row and inserts the item (the backend's own append shape);
    - ``append_and_flush``: INSERT + metadata-row UPSERT in one transaction.
    """

    name = "raw PostgreSQL"
    has_projection = False

    def __init__(self, url: str, schema: str, *, allocate: bool = False) -> None:
        self._conn = psycopg.connect(url, autocommit=True, connect_timeout=30)
        self._allocate = allocate
        for statement in _SCHEMA:
            self._conn.execute(_q(statement, schema))
        self._insert = _q(_INSERT, schema)
        self._append_one = _q(_APPEND_ONE, schema)
        self._upsert = _q(_UPSERT, schema)
        self._schema = schema
        self._heads: dict[str, int] = {}
        self._lock = threading.Lock()
        self.upserts = 0

    def create(self, thread_id: str) -> None:
        """The thread's head row."""
        self._conn.execute(_q("INSERT INTO {s}.heads VALUES (%s, 0)", self._schema), (thread_id,))
        self._heads[thread_id] = 0

    def _next(self, thread_id: str) -> int:
        self._heads[thread_id] += 1
        return self._heads[thread_id]

    def append(self, thread_id: str, item: Item) -> int:
        """``json.dumps`` + INSERT + COMMIT (autocommit: one statement, one transaction), at
        the seq counted here or (``allocate``) at the one the statement allocates."""
        text = json.dumps(item, separators=(",", ":"))
        with self._lock:
            seq = self._next(thread_id)
            now = time.time_ns() // 1000
            if not self._allocate:
                self._conn.execute(self._insert, (thread_id, seq, now, text))
                return seq
            row = self._conn.execute(self._append_one, {"t": thread_id, "ts": now, "item": text}).fetchone()
        assert row is not None and row[0] == seq
        return seq

    def append_and_flush(self, thread_id: str, item: Item) -> None:
        """INSERT + metadata UPSERT, one transaction (one durable commit)."""
        text = json.dumps(item, separators=(",", ":"))
        now = time.time_ns() // 1000
        with self._lock, self._conn.transaction():
            self._conn.execute(self._insert, (thread_id, self._next(thread_id), now, text))
            self._conn.execute(self._upsert, (thread_id, None, now))
            self.upserts += 1

    def verify(self) -> None:
        """Every append and upsert made is in the database, at gap-free seqs."""
        rows = self._conn.execute(_q("SELECT count(*), coalesce(sum(seq), 0) FROM {s}.items",
                                     self._schema)).fetchone()
        metas = self._conn.execute(_q("SELECT coalesce(sum(item_count), 0) FROM {s}.meta",
                                      self._schema)).fetchone()
        expected = (sum(self._heads.values()), sum(h * (h + 1) // 2 for h in self._heads.values()))
        if rows is None or tuple(rows) != expected or metas is None or metas[0] != self.upserts:
            raise AssertionError(f"raw PostgreSQL: stored (rows, seq sum) {rows} and {metas} upserts, "
                                 f"expected {expected} and {self.upserts}")

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()


@dataclass(frozen=True)
class RawAppender:
    """Opens, in a writer process, a raw one-statement appender (the N-client floor):
    the shape :func:`benchmarks.writer_processes.new_arm` wants of an opener."""

    url: str
    schema: str

    def open(self) -> _RawSession:
        """One autocommit connection."""
        return _RawSession(self.url, self.schema)


class _RawSession:
    def __init__(self, url: str, schema: str, *, allocate: bool = False) -> None:
        self._conn = psycopg.connect(url, autocommit=True, connect_timeout=30)
        self._allocate = allocate
        self._append_one = _q(_APPEND_ONE, schema)

    def append(self, thread_id: str, items: list[Item]) -> int:
        """The one-statement append of one item; its seq."""
        row = self._conn.execute(self._append_one, {
            "t": thread_id, "ts": time.time_ns() // 1000,
            "item": json.dumps(items[0], separators=(",", ":"))}).fetchone()
        assert row is not None
        return int(row[0])

    def close(self, timeout: float) -> None:
        """Close the connection."""
        self._conn.close()


def raw_counts(url: str, schema: str) -> dict[str, tuple[int, int]]:
    """``{thread_id: (rows, head)}`` of a raw schema, to check the N-client floor stored
    every append once, gap-free."""
    with psycopg.connect(url, autocommit=True, connect_timeout=30) as conn:
        rows = conn.execute(_q("SELECT h.thread_id, count(i.seq), h.head FROM {s}.heads h "
                               "LEFT JOIN {s}.items i USING (thread_id) GROUP BY h.thread_id, h.head",
                               schema)).fetchall()
    return {str(t): (int(n), int(h)) for t, n, h in rows}
