"""The writers' lock of the PostgreSQL backend (``backends/postgres/_writers.py``): what
``rebuild_index`` needs the store to itself relies on, against a real server.

The refusal beside writers of other processes, named, is in ``test_several_writers.py``
(it runs on SQLite and PostgreSQL alike).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

import psycopg
import pytest
from conftest import new_schema, plain, user_msg, wait_for

from thread_store import InvalidArgument, ProjectionFailed, StoreLocked, ThreadStore
from thread_store.derive import CodexRules

#: Waits and barrier timeouts: they only catch hangs.
HANG = 30.0
_LOCK_CLASS = 0x7477


def _lock_sessions(admin: psycopg.Connection[Any], schema: str) -> list[int]:
    """The server pids of the sessions holding the store's writers' lock."""
    rows = admin.execute(
        "SELECT l.pid FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted "
        "AND l.classid = %s AND l.objsubid = 2 "
        "AND l.objid = (hashtext(%s)::bigint & 4294967295)::oid ORDER BY 1",
        (_LOCK_CLASS, schema)).fetchall()
    return [int(pid) for pid, in rows]


def test_no_store_opens_for_writing_while_a_rebuild_holds_the_store(pg_url: str) -> None:
    """The rebuild's exclusive hold (taken here by hand, as ``rebuild_index`` does in the
    transaction that empties the index) keeps writers out with StoreLocked; read-only
    stores still open."""
    schema = new_schema()
    with ThreadStore.open(pg_url, schema=schema) as store:
        store.append_and_flush(store.create_thread(), [user_msg("hi")], timeout=HANG)
    with psycopg.connect(pg_url, autocommit=True) as rebuild:
        rebuild.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (_LOCK_CLASS, schema))
        with pytest.raises(StoreLocked, match="being rebuilt"):
            ThreadStore.open(pg_url, schema=schema)
        with ThreadStore.open(pg_url, schema=schema, read_only=True) as reader:
            assert len(reader.list_threads().threads) == 1
    with ThreadStore.open(pg_url, schema=schema) as store:  # the hold ended with its session
        assert len(store.list_threads().threads) == 1


def test_a_closed_or_killed_writer_lets_the_rebuild_run(pg_url: str) -> None:
    """A store lets go of its share at close; a writer process killed with SIGKILL lets go
    when the server sees its connection close."""
    schema = new_schema()
    store = ThreadStore.open(pg_url, schema=schema)
    store.append_and_flush(store.create_thread(), [user_msg("hi")], timeout=HANG)
    with pytest.raises(StoreLocked):
        ThreadStore.rebuild_index(pg_url, schema=schema)
    store.close()
    assert ThreadStore.rebuild_index(pg_url, schema=schema) == 1

    with subprocess.Popen(
            [sys.executable, "-c", "import sys; from thread_store import ThreadStore; "
             "s = ThreadStore.open(sys.argv[1], schema=sys.argv[2]); print('open', flush=True); "
             "sys.stdin.read()", pg_url, schema],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout is not None and child.stdout.readline() == "open\n"
            with pytest.raises(StoreLocked, match=f"pid {child.pid} "):
                ThreadStore.rebuild_index(pg_url, schema=schema)
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.kill()
            child.wait(HANG)

    def rebuilt() -> bool:
        try:
            return ThreadStore.rebuild_index(pg_url, schema=schema) == 1
        except StoreLocked:
            return False

    wait_for(rebuilt, "the killed writer's session to end", HANG)


def _end_lock_session(admin: psycopg.Connection[Any], schema: str) -> int:
    """End the store's lock session as a server restart would; return its pid."""
    first, = _lock_sessions(admin, schema)
    admin.execute("SELECT pg_terminate_backend(%s)", (first,))
    wait_for(lambda: not _lock_sessions(admin, schema), "the lock session to end", HANG)
    return first


def test_a_lost_lock_session_is_replaced_before_the_next_projection(pg_url: str) -> None:
    """The server ends the store's lock session (as a restart would): the next projection
    takes the lock again on a new session, so a rebuild is still refused."""
    schema = new_schema()
    with ThreadStore.open(pg_url, schema=schema) as store, \
            psycopg.connect(pg_url, autocommit=True) as admin:
        tid = store.create_thread()
        store.append_and_flush(tid, [user_msg("hi")], timeout=HANG)
        first = _end_lock_session(admin, schema)
        assert store.append_and_flush(tid, [plain(1)], timeout=HANG).item_count == 2
        again, = _lock_sessions(admin, schema)
        assert again != first
        with pytest.raises(StoreLocked):
            ThreadStore.rebuild_index(pg_url, schema=schema)


class _OtherRules(CodexRules):
    rules_id = "other-rules"


def test_a_rebuild_with_other_rules_while_the_lock_was_lost_stops_projections(pg_url: str) -> None:
    """While a store's lock session was gone, a rebuild applied other fold rules: its next
    projection finds that out as it takes the lock again, and fails rather than writing a
    row of the old rules among the new ones."""
    schema = new_schema()
    with ThreadStore.open(pg_url, schema=schema) as store, \
            psycopg.connect(pg_url, autocommit=True) as admin:
        tid = store.create_thread()
        store.append_and_flush(tid, [user_msg("hi")], timeout=HANG)
        _end_lock_session(admin, schema)
        assert ThreadStore.rebuild_index(pg_url, schema=schema, rules=_OtherRules()) == 1
        with pytest.raises(ProjectionFailed) as failed:
            store.append_and_flush(tid, [plain(1)], timeout=HANG)
        assert isinstance(failed.value.__cause__, InvalidArgument), failed.value.__cause__
        assert store.read_thread(tid).item_count == 1  # the rebuilt row, untouched
