"""Round trips to PostgreSQL on the hot path (issue 12 point 6), counted in the server's
own statement log, and the cached incarnation they no longer read.

The store's sessions log every statement (``log_statement`` set for the database while
it opens), each before running it; the log lines of those sessions (``[pid]`` in the default ``log_line_prefix``)
are the round trips (``BEGIN``, ``SET LOCAL`` and ``COMMIT`` each are one).
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import psycopg
import pytest
from conftest import new_schema, plain, user_msg, wait_for
from pg_server import PostgresServer

from thread_store import ThreadStore

HANG = 30.0


@pytest.fixture
def logged_store(pg_url: str) -> Iterator[tuple[ThreadStore, list[int]]]:
    """A store whose pooled sessions log every statement, and their server pids."""
    database = pg_url.rsplit("/", 1)[1]
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE {database} SET log_statement = 'all'")
        try:
            # No periodic catch-up scan lands among the counted statements.
            store = ThreadStore.open(pg_url, schema=new_schema(), pool_min_size=2, pool_max_size=2,
                                     catch_up_after=3600.0)
        finally:
            admin.execute(f"ALTER DATABASE {database} RESET log_statement")
        try:
            wait_for(lambda: len(_pool_pids(admin, database)) == 2, "the pool's two sessions")
            yield store, _pool_pids(admin, database)
        finally:
            store.close(timeout=5.0)


def _pool_pids(admin: psycopg.Connection[Any], database: str) -> list[int]:
    rows = admin.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s "
                         "AND application_name = 'thread_store'", (database,)).fetchall()
    return [int(r[0]) for r in rows]


def _statements(log: str, pids: list[int]) -> list[str]:
    tags = tuple(f"[{pid}] " for pid in pids)
    return [line for line in log.splitlines()
            if any(tag in line for tag in tags) and ("LOG:  statement:" in line
                                                     or "LOG:  execute" in line)]


def test_append_and_flush_on_a_hot_thread_is_two_round_trips(
        logged_store: tuple[ThreadStore, list[int]], postgres_server: PostgresServer) -> None:
    store, pids = logged_store
    tid = store.create_thread()
    store.append_and_flush(tid, [user_msg("warm up")], timeout=HANG)
    for n in range(5):
        store.append_and_flush(tid, [plain(n)], timeout=HANG)
    time.sleep(1.5)  # the housekeeping due after the last projection passes first
    store.append_and_flush(tid, [plain(5)], timeout=HANG)
    wait_for(lambda: store.stats().transactions >= 7, "the projections")
    time.sleep(0.5)
    mark = len(postgres_server.log())
    meta = store.append_and_flush(tid, [plain(6)], timeout=HANG)
    # Each session logs a statement before running it: every line is in the log by now.
    logged = postgres_server.log()[mark:]
    statements = _statements(logged, pids)
    assert meta.item_count == 8
    # The append (one statement) and the projection commit (one statement): no BEGIN,
    # SET LOCAL, COMMIT, incarnation read or failures probe (nine before).
    assert len(statements) == 2, "\n".join(statements)
    # An append of one item sends scalars: no array, which psycopg dumps in Python (a
    # statement's text runs over several log lines, so the whole log is searched).
    assert "INSERT INTO" in logged and "unnest" not in logged, logged


def test_a_cached_fold_of_a_thread_created_again_elsewhere_starts_over(pg_url: str) -> None:
    schema = new_schema()
    with ThreadStore.open(pg_url, schema=schema) as a, ThreadStore.open(pg_url, schema=schema) as b:
        a.create_thread("t")
        a.append_and_flush("t", [user_msg("old"), plain(1)], timeout=HANG)
        b.delete_thread("t", timeout=HANG)
        b.create_thread("t")
        b.append_and_flush("t", [user_msg("new"), *(plain(n) for n in range(4))], timeout=HANG)
        # A still caches the old thread's fold at seq 2, and the new thread's head is past
        # it: A folds seq 3..6 onto the old state, the commit refuses that row as gone,
        # and the next attempt reads the incarnation and folds the new thread anew.
        meta = a.append_and_flush("t", [plain(9)], timeout=HANG)
        assert (meta.item_count, meta.title) == (6, "new")
        assert b.read_thread("t").item_count == 6
