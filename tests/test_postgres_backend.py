"""The PostgreSQL backend against a real server: each port guarantee, then the public API
end to end on a ``postgresql://`` URL (DESIGN §6).

Every test gets a schema of its own; the module gets a database of its own, so where
``pg_trgm`` lands never meets the other PostgreSQL tests.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from dataclasses import replace
from typing import Iterator

import psycopg
import pytest
from conftest import in_thread, new_schema, plain, user_msg, wait_for

from thread_store import (AsyncThreadStore, FlushTimeout, InvalidArgument, ProjectionFailed, ReadOnlyStore,
                          ThreadDiscarded, ThreadNotFound, ThreadStore)
from thread_store.backends.postgres import PostgresStorage
from thread_store.errors import (NotAThreadStore, SchemaTooNew, StorageError, ThreadExists,
                                 TransientStorageError)
from thread_store.model import EncodedItem, ThreadMetadata, utc
from thread_store.storage import (Appended, CommitOutcome, Failure, IdempotencyKey, ListQuery,
                                  RowWrite, decode_cursor)



@pytest.fixture
def schema() -> str:
    return new_schema()


@pytest.fixture
def storage(pg_url: str, schema: str) -> Iterator[PostgresStorage]:
    s = PostgresStorage.open(pg_url, durability="normal", read_only=False, rules_id="rules-1",
                             schema=schema)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def store(pg_url: str, schema: str) -> Iterator[ThreadStore]:
    s = ThreadStore.open(pg_url, schema=schema)
    try:
        yield s
    finally:
        s.close(timeout=5.0)


def item(n: int, ts_us: int = 1_700_000_000_000_000) -> EncodedItem:
    return EncodedItem(text=f'{{"type": "response_item", "n": {n}}}', ts_us=ts_us + n,
                       kind="response_item")


def row(thread_id: str, seq: int, **fields: object) -> RowWrite:
    meta = ThreadMetadata(thread_id=thread_id, projected_seq=seq, item_count=seq,
                          recency_at=utc(1_700_000_000_000_000 + seq), **fields)  # type: ignore[arg-type]
    return RowWrite(meta, fold_state=f'{{"seq": {seq}}}', incarnation=UNKNOWN_INCARNATION)


#: ``row()`` leaves the incarnation to :func:`commit`, which reads the live thread's.
UNKNOWN_INCARNATION = -1


def commit(storage: PostgresStorage, *rows: RowWrite, may_write: object = None) -> object:
    allowed = may_write if callable(may_write) else (lambda _tid: True)
    live = storage.history.incarnations([r.meta.thread_id for r in rows])
    rows = tuple(replace(r, incarnation=live.get(r.meta.thread_id, 0))
                 if r.incarnation == UNKNOWN_INCARNATION else r for r in rows)
    return storage.index.commit(list(rows), position=0, may_write=allowed, deadline=None)


# -- HistoryLog -------------------------------------------------------------------------


def test_create_append_read_and_heads(storage: PostgresStorage) -> None:
    h = storage.history
    h.create("a", created_us=123, first=item(1))
    h.create("b", created_us=456, first=None)
    assert (h.head("a"), h.head("b"), h.created_us("a")) == (1, 0, 123)
    assert h.append("a", [item(2), item(3)]) == Appended(3, written=True)
    assert h.append("a", []) == Appended(3, written=False)
    assert [(r.seq, r.ts_us) for r in h.read("a", 0, 10, 10)] == [(1, item(1).ts_us), (2, item(2).ts_us),
                                                                  (3, item(3).ts_us)]
    assert [r.seq for r in h.read("a", 1, 3, 1)] == [2]
    assert h.read("a", 0, 3, 10)[2].text == item(3).text
    assert h.read("missing", 0, 10, 10) == []
    assert h.heads() == {"a": 3, "b": 0}
    assert h.position() == 0
    with pytest.raises(ThreadExists):
        h.create("a", created_us=1, first=None)
    with pytest.raises(ThreadNotFound):
        h.append("missing", [item(1)])
    with pytest.raises(ThreadNotFound):
        h.head("missing")


def test_concurrent_appends_to_one_thread_get_gap_free_seqs(storage: PostgresStorage) -> None:
    storage.history.create("t", created_us=1, first=None)
    generations: list[int] = []

    def appender() -> None:
        for n in range(20):
            generations.append(storage.history.append("t", [item(n), item(n)]).generation)

    workers = [threading.Thread(target=appender) for _ in range(6)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert sorted(generations) == list(range(2, 241, 2))
    assert [r.seq for r in storage.history.read("t", 0, 1000, 1000)] == list(range(1, 241))


def test_idempotency_keys(storage: PostgresStorage) -> None:
    h = storage.history
    h.create("t", created_us=1, first=item(0))
    key = IdempotencyKey("k1", "digest-a")
    assert h.append("t", [item(1), item(2)], key) == Appended(3, written=True)
    h.append("t", [item(3)])
    assert h.append("t", [item(1), item(2)], key) == Appended(3, written=False)
    with pytest.raises(InvalidArgument, match="other items"):
        h.append("t", [item(9)], IdempotencyKey("k1", "digest-b"))
    assert h.append("t", [], IdempotencyKey("k2", "x")) == Appended(4, written=False)
    assert h.head("t") == 4
    assert h.append("t", [item(5)], IdempotencyKey("k2", "x")) == Appended(5, written=True)


def test_concurrent_appends_with_one_key_write_once(storage: PostgresStorage) -> None:
    storage.history.create("t", created_us=1, first=None)
    results: list[Appended] = []
    barrier = threading.Barrier(6)

    def appender() -> None:
        barrier.wait()
        results.append(storage.history.append("t", [item(1)], IdempotencyKey("same", "d")))

    workers = [threading.Thread(target=appender) for _ in range(6)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert storage.history.head("t") == 1
    assert sorted(r.written for r in results) == [False] * 5 + [True]
    assert {r.generation for r in results} == {1}


def test_discard_keeps_a_tombstone_and_delete_frees_the_id(storage: PostgresStorage) -> None:
    h = storage.history
    for tid in ("gone", "deleted"):
        h.create(tid, created_us=1, first=item(1))
        commit(storage, row(tid, 1, preview="x"))
    storage.remove_thread("gone", tombstone=True)
    storage.remove_thread("deleted", tombstone=False)
    for call in (lambda: h.head("gone"), lambda: h.append("gone", [item(2)]),
                 lambda: h.create("gone", created_us=2, first=None),
                 lambda: storage.remove_thread("gone", tombstone=True)):
        with pytest.raises(ThreadDiscarded):
            call()
    assert h.read("gone", 0, 10, 10) == [] and storage.index.read("gone") is None
    with pytest.raises(ThreadNotFound):
        h.head("deleted")
    h.create("deleted", created_us=2, first=None)
    assert h.head("deleted") == 0 and storage.index.read("deleted") is None
    assert h.heads() == {"deleted": 0}


def test_reject_writes(storage: PostgresStorage) -> None:
    storage.history.create("t", created_us=1, first=None)
    storage.reject_writes()
    from thread_store.errors import StoreClosed
    with pytest.raises(StoreClosed):
        storage.history.append("t", [item(1)])
    assert storage.history.head("t") == 0


# -- MetadataIndex ----------------------------------------------------------------------


def test_commit_read_checkpoint_and_no_step_backwards(storage: PostgresStorage) -> None:
    storage.history.create("t", created_us=1, first=None)
    assert storage.index.checkpoint("t").fold_state is None
    result = commit(storage, row("t", 5, title="five"))
    assert result.outcome is CommitOutcome.COMMITTED and not result.errors  # type: ignore[attr-defined]
    commit(storage, row("t", 3, title="stale"))
    meta = storage.index.read("t")
    assert meta is not None and (meta.title, meta.projected_seq) == ("five", 5)
    assert storage.index.checkpoint("t").projected_seq == 5
    assert storage.index.checkpoint("t").fold_state == '{"seq": 5}'


def test_commit_never_resurrects_a_removed_thread(storage: PostgresStorage) -> None:
    storage.history.create("t", created_us=1, first=None)
    storage.remove_thread("t", tombstone=True)
    commit(storage, row("t", 1, preview="late"))
    commit(storage, row("never-created", 1, preview="late"))
    assert storage.index.read("t") is None and storage.index.read("never-created") is None


def test_a_fold_of_a_removed_incarnation_is_gone_and_clears_no_failure(storage: PostgresStorage) -> None:
    storage.history.create("t", created_us=1, first=None)
    old = storage.history.incarnation("t")
    storage.remove_thread("t", tombstone=False)
    storage.history.create("t", created_us=2, first=None)  # the id again: a new incarnation
    storage.index.record_failures([Failure("t", 3, "the new thread's failure")])
    result = commit(storage, replace(row("t", 3, preview="stale"), incarnation=old), row("u", 1))
    assert result.gone == {"t", "u"} and not result.errors  # type: ignore[attr-defined]
    assert storage.index.read("t") is None
    assert storage.index.checkpoint("t").last_error == "the new thread's failure"


def test_a_group_commit_locks_its_rows_in_thread_id_order(storage: PostgresStorage, pg_url: str,
                                                          schema: str) -> None:
    for tid in ("a", "b"):
        storage.history.create(tid, created_us=1, first=None)
    commit(storage, row("a", 1), row("b", 1))
    with psycopg.connect(pg_url) as other, psycopg.connect(pg_url, autocommit=True) as watch:
        other.execute(f"SELECT 1 FROM {schema}.meta WHERE thread_id = 'b' FOR UPDATE")
        worker, out = in_thread(lambda: commit(storage, row("b", 2), row("a", 2)))
        wait_for(lambda: watch.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'thread_store' "
            "AND wait_event_type = 'Lock'").fetchone()[0] == 1, "the commit to wait for row b")
        # It holds row a already: had it locked b first, a process taking a then b would deadlock.
        with pytest.raises(psycopg.errors.LockNotAvailable):
            other.execute(f"SELECT 1 FROM {schema}.meta WHERE thread_id = 'a' FOR UPDATE NOWAIT")
    worker.join(10.0)
    assert "error" not in out and storage.index.read("a").projected_seq == 2  # type: ignore[union-attr]


def test_a_row_postgres_refuses_fails_alone(storage: PostgresStorage) -> None:
    for tid in ("good", "surrogate", "big"):
        storage.history.create(tid, created_us=1, first=None)
    result = commit(storage, row("good", 1, title="fine"), row("surrogate", 1, cwd="\ud800"),
                    replace(row("big", 1), meta=replace(row("big", 1).meta, item_count=1 << 63)))
    assert set(result.errors) == {"surrogate", "big"}  # type: ignore[attr-defined]
    assert all(isinstance(e, StorageError) for e in result.errors.values())  # type: ignore[attr-defined]
    assert storage.index.read("good") is not None and storage.index.read("surrogate") is None


def test_values_with_nul_are_stored_exactly_and_match_as_elsewhere(storage: PostgresStorage) -> None:
    for tid in ("nul", "plain"):
        storage.history.create(tid, created_us=1, first=None)
    nul = row("nul", 1, title="a\x00b", preview="x\x00", cwd="/r\x00", model="m\x00\\0")
    commit(storage, nul, row("plain", 1, title="a b", preview="x", cwd="/r"))
    assert storage.index.read("nul") == nul.meta
    assert listed(storage, words=("a",)) == ["plain", "nul"]
    assert listed(storage, words=("ab",)) == []  # no word spans a NUL
    assert listed(storage, cwd="/r") == ["plain"]  # no filter equals a cwd with NUL
    commit(storage, row("nul", 2, title="ab"))
    assert storage.index.read("nul") == row("nul", 2, title="ab").meta  # exact text gone
    assert listed(storage, words=("ab",)) == ["nul"]


def test_a_group_commit_carries_every_value_exactly(storage: PostgresStorage) -> None:
    # Several rows go in one statement, as one JSON text: what JSON escapes (quotes,
    # backslashes, control characters, an escape's own text, non-BMP characters), NULs
    # (kept in ``exact``), JSON in the text columns and the extremes of bigint all come back.
    odd = 'q"\\ \\u0000 \n\t\x01 é 😀 \u2028'
    rows = [row("a", 3, title=odd, preview="x\x00y", token_usage={"in": 1 << 62, "k\x00": odd}),
            row("b", 1, name=odd, cwd="/tmp/\\", git_branch=None, archived_at=utc(1)),
            row("c", 7)]
    for r in rows:
        storage.history.create(r.meta.thread_id, created_us=1, first=None)
    rows = [replace(rows[0], fold_state=json.dumps({"s": odd, "nul": "\x00"})),
            replace(rows[1], fold_state=json.dumps({"s": odd}, ensure_ascii=False)), rows[2]]
    result = commit(storage, *rows)
    assert result.errors == {} and result.gone == frozenset()  # type: ignore[attr-defined]
    for r in rows:
        assert storage.index.read(r.meta.thread_id) == r.meta
    stored = storage.index.checkpoints(["a", "b", "c"])
    assert [stored[t].fold_state for t in "abc"] == [r.fold_state for r in rows]
    assert [stored[t].projected_seq for t in "abc"] == [3, 1, 7]


def listed(storage: PostgresStorage, **query: object) -> list[str]:
    page = storage.index.list(ListQuery(limit=10, include_empty=True, **query))  # type: ignore[arg-type]
    return [m.thread_id for m in page.threads]


def test_megabytes_of_text_in_every_field_are_stored(storage: PostgresStorage) -> None:
    text = "é" * 1_000_000  # far over a btree entry's 8 kB
    fields = {"title": text, "preview": text, "cwd": text, "name": text, "git_origin_url": text}
    storage.history.create("t", created_us=1, first=None)
    result = commit(storage, row("t", 1, **fields))
    assert result.errors == {}  # type: ignore[attr-defined]
    assert storage.index.read("t") == row("t", 1, **fields).meta
    assert listed(storage, cwd=text) == ["t"] and listed(storage, words=("éé",)) == ["t"]


def test_a_program_limit_exceeded_is_permanent() -> None:
    from thread_store.backends.postgres._errors import is_transient, translate

    too_big = psycopg.errors.ProgramLimitExceeded("index row requires 1172920 bytes")
    assert isinstance(too_big, psycopg.OperationalError) and not is_transient(too_big)
    error = translate(too_big, "writing")
    assert isinstance(error, StorageError) and not isinstance(error, TransientStorageError)
    assert is_transient(psycopg.errors.LockNotAvailable("busy"))


def test_a_version_1_schema_is_migrated(pg_url: str, schema: str) -> None:
    from thread_store.backends.postgres import _schema

    with psycopg.connect(pg_url, autocommit=True) as conn, conn.transaction():
        conn.execute(f"CREATE SCHEMA {schema}")
        _schema.MIGRATIONS[0](conn, psycopg.sql.Identifier(schema))
        conn.execute(f"INSERT INTO {schema}.store_meta VALUES ('format', 'thread_store'), "
                     "('version', '1')")
    with ThreadStore.open(pg_url, schema=schema) as store:
        tid = store.create_thread()
        long_cwd = "/" + "é" * 4000  # over a btree entry's limit, within the cwd filter's
        meta = store.append_and_flush(tid, [{"type": "session_meta", "payload": {"cwd": long_cwd}},
                                            user_msg("a\x00b")], timeout=30.0)
        assert (meta.cwd, meta.title) == (long_cwd, "a\x00b")
        assert store.report().schema_version == {"postgres": _schema.SCHEMA_VERSION}
        assert [m.thread_id for m in store.list_threads(cwd=long_cwd).threads] == [tid]


def test_may_write_refuses_rows(storage: PostgresStorage) -> None:
    for tid in ("a", "b"):
        storage.history.create(tid, created_us=1, first=None)
    result = commit(storage, row("a", 1), row("b", 1), may_write=lambda tid: tid == "a")
    assert result.refused == frozenset({"b"})  # type: ignore[attr-defined]
    assert storage.index.read("a") is not None and storage.index.read("b") is None


def test_failures_are_recorded_and_cleared(storage: PostgresStorage) -> None:
    storage.history.create("t", created_us=1, first=None)
    commit(storage, row("t", 2))
    storage.index.record_failures([Failure("t", 2, "covered already")])
    assert storage.index.checkpoint("t").last_error is None
    storage.index.record_failures([Failure("t", 3, "boom\x00")])
    assert storage.index.checkpoint("t").last_error == "boom\\0"
    commit(storage, row("t", 3))
    assert storage.index.checkpoint("t").last_error is None


def test_fence_cancels_a_running_transaction(storage: PostgresStorage, pg_url: str, schema: str) -> None:
    storage.history.create("t", created_us=1, first=None)
    commit(storage, row("t", 1))
    with psycopg.connect(pg_url) as blocker:  # holds the row: the next commit blocks on it
        blocker.execute(f"SELECT 1 FROM {schema}.meta WHERE thread_id = 't' FOR UPDATE")
        out: dict[str, object] = {}
        worker = threading.Thread(target=lambda: out.update(r=commit(storage, row("t", 2))))
        worker.start()
        time.sleep(0.3)
        started = time.monotonic()
        assert storage.index.fence(5.0)
        assert time.monotonic() - started < 2.0
        worker.join(5.0)
        assert out["r"].outcome is CommitOutcome.FENCED  # type: ignore[attr-defined]
    assert commit(storage, row("t", 3)).outcome is CommitOutcome.FENCED  # type: ignore[attr-defined]
    meta = storage.index.read("t")
    assert meta is not None and meta.projected_seq == 1


def test_list_keyset_filters_and_search(storage: PostgresStorage) -> None:
    texts = {"t1": "修复不稳定的测试", "t2": "Élan vital ÉCOLE", "t3": "100% done_ok \\ back",
             "t4": "three little pigs", "t5": None}
    for n, (tid, text) in enumerate(texts.items(), 1):
        storage.history.create(tid, created_us=1, first=None)
        commit(storage, row(tid, n, preview=text, cwd="/a" if n % 2 else "/b"))
    storage.history.create("arch", created_us=1, first=None)
    commit(storage, row("arch", 9, preview="x", archived_at=utc(5)))

    def ids(**kw: object) -> list[str]:
        return [m.thread_id for m in storage.index.list(ListQuery(limit=50, **kw)).threads]  # type: ignore[arg-type]

    assert ids() == ["t4", "t3", "t2", "t1"]
    assert ids(include_empty=True) == ["t5", "t4", "t3", "t2", "t1"]
    assert ids(archived=True) == ["arch"]
    assert ids(cwd="/a") == ["t3", "t1"]
    assert ids(words=("测试",)) == ["t1"]
    assert ids(words=("不稳定",)) == ["t1"]
    assert ids(words=("école",)) == ["t2"]
    assert ids(words=("élan", "VITAL")) == ["t2"]
    assert ids(words=("thr",)) == ["t4"] and ids(words=("ee",)) == ["t4"]
    assert ids(words=("%",)) == ["t3"] and ids(words=("_",)) == ["t3"] and ids(words=("\\",)) == ["t3"]
    assert ids(words=("0%",)) == ["t3"] and ids(words=("e_o",)) == ["t3"]
    assert ids(words=("three", "nope")) == []
    query = ListQuery(limit=2, include_empty=True)
    page = storage.index.list(query)
    seen = [m.thread_id for m in page.threads]
    while page.next_cursor:
        query = ListQuery(limit=2, include_empty=True, after=decode_cursor(page.next_cursor, query.filters()))
        page = storage.index.list(query)
        seen += [m.thread_id for m in page.threads]
    assert seen == ["t5", "t4", "t3", "t2", "t1"]


# -- Storage ----------------------------------------------------------------------------


def test_lagging_and_housekeeping(storage: PostgresStorage) -> None:
    assert storage.lagging() == [] and storage.housekeeping_due_at() == float("inf")
    storage.history.create("a", created_us=1, first=item(1))
    storage.history.create("b", created_us=1, first=None)
    storage.history.append("b", [item(1), item(2)])
    lag = {x.thread_id: (x.head, x.projected) for x in storage.lagging()}
    assert lag == {"a": (1, None), "b": (2, None)}
    commit(storage, row("a", 1), row("b", 1))
    assert {x.thread_id: (x.head, x.projected) for x in storage.lagging()} == {"b": (2, 1)}
    assert storage.housekeeping_due_at() < float("inf")
    storage.housekeep()
    assert storage.housekeeping_due_at() == float("inf")
    assert [x.thread_id for x in storage.lagging()] == ["b"]
    commit(storage, row("b", 2))
    storage.housekeep()
    assert storage.lagging() == []


def test_backup_points_to_pg_dump(storage: PostgresStorage, tmp_path: object) -> None:
    with pytest.raises(InvalidArgument, match="pg_dump"):
        storage.backup(tmp_path)  # type: ignore[arg-type]


def test_schema_too_new_and_foreign_schemas(pg_url: str, schema: str) -> None:
    PostgresStorage.open(pg_url, durability="normal", read_only=False, rules_id="r",
                         schema=schema).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"UPDATE {schema}.store_meta SET value = '99' WHERE key = 'version'")
        conn.execute("CREATE SCHEMA IF NOT EXISTS foreign_stuff")
        conn.execute("CREATE TABLE IF NOT EXISTS foreign_stuff.customers (id int)")
    with pytest.raises(SchemaTooNew):
        ThreadStore.open(pg_url, schema=schema)
    with pytest.raises(NotAThreadStore, match="foreign_stuff"):
        ThreadStore.open(pg_url, schema="foreign_stuff")


def test_rules_id_is_stored_and_other_rules_refused(pg_url: str, schema: str) -> None:
    PostgresStorage.open(pg_url, durability="normal", read_only=False, rules_id="r1",
                         schema=schema).close()
    with pytest.raises(InvalidArgument, match="fold rules"):
        PostgresStorage.open(pg_url, durability="normal", read_only=False, rules_id="r2",
                             schema=schema)
    PostgresStorage.open(pg_url, durability="full", read_only=False, rules_id="r1",
                         schema=schema).close()


def test_errors_are_typed_and_passwords_never_shown(pg_url: str) -> None:
    secret = "s3cr3t-pw"
    url = f"postgresql://someone:{secret}@127.0.0.1:1/nowhere"
    with pytest.raises(TransientStorageError) as caught:
        ThreadStore.open(url, connect_timeout=1)
    assert secret not in str(caught.value) and caught.value.__cause__ is not None
    assert isinstance(caught.value.__cause__, psycopg.OperationalError)
    good = pg_url.replace("thread_store@", f"thread_store:{secret}@")
    with ThreadStore.open(good, schema=new_schema()) as store:
        assert secret not in repr(store._storage.description) and "***" in store._storage.description


def test_options_apply_to_postgres_only(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidArgument, match="only to postgresql"):
        ThreadStore.open(":memory:", schema="x")
    with pytest.raises(InvalidArgument, match="only to postgresql"):
        ThreadStore.open(str(tmp_path) + "/s", pool_max_size=3)
    for bad in ({"schema": "Bad-Name"}, {"schema": "pg_x"}, {"pool_min_size": 5, "pool_max_size": 2},
                {"connect_timeout": 0}, {"statement_timeout": -1}):
        with pytest.raises(InvalidArgument):
            ThreadStore.open("postgresql://u@127.0.0.1:1/db", **bad)
    monkeypatch.setitem(sys.modules, "thread_store.backends.postgres", None)  # the extra missing
    with pytest.raises(InvalidArgument, match=r"thread_store\[postgres\]"):
        ThreadStore.open("postgresql://u@127.0.0.1:1/db")


# -- the public API on a postgresql:// URL ----------------------------------------------


def test_end_to_end(store: ThreadStore) -> None:
    tid = store.create_thread(metadata={"cwd": "/repo"})
    assert store.append(tid, [user_msg("fix the flaky 测试")]) == 2
    meta = store.append_and_flush(tid, [plain(1)], timeout=10.0)
    assert (meta.projected_seq, meta.title, meta.cwd) == (3, "fix the flaky 测试", "/repo")
    store.append(tid, [plain(2)])
    assert store.flush(tid, timeout=10.0).item_count == 4
    assert [m.thread_id for m in store.list_threads(search="FLAKY 测试").threads] == [tid]
    assert [m.thread_id for m in store.list_threads(cwd="/repo").threads] == [tid]
    assert [s.seq for s in store.read_history(tid)] == [1, 2, 3, 4]
    assert store.append(tid, [plain(5)], idempotency_key="k") == 5
    assert store.append(tid, [plain(5)], idempotency_key="k") == 5
    with pytest.raises(InvalidArgument):
        store.append(tid, [plain(6)], idempotency_key="k")
    status = store.status(tid)
    assert status.head_seq == 5 and status.last_error is None
    other = store.create_thread(metadata={"cwd": "/x"})
    store.discard(other)
    with pytest.raises(ThreadDiscarded):
        store.append(other, [plain()])
    store.delete_thread(tid)
    with pytest.raises(ThreadNotFound):
        store.read_history(tid)
    store.create_thread(thread_id=tid)
    assert store.append_and_flush(tid, [user_msg("again")], timeout=10.0).item_count == 1
    with pytest.raises(InvalidArgument, match="pg_dump"):
        store.backup("/tmp/never")


def test_failed_projection_is_recorded_in_status(pg_url: str, schema: str) -> None:
    failing = {"on": True}

    def hook(_tid: str, _gen: int) -> None:
        if failing["on"]:
            raise RuntimeError("the hook says no")

    with ThreadStore.open(pg_url, schema=schema, projection_hook=hook) as store:
        tid = store.create_thread()
        with pytest.raises(ProjectionFailed):
            store.append_and_flush(tid, [user_msg("hi")], timeout=10.0)
        assert "the hook says no" in (store.status(tid).last_error or "")
        failing["on"] = False
        store.append_and_flush(tid, [plain()], timeout=10.0)
        assert store.status(tid).last_error is None


def test_close_and_reopen_catches_up(pg_url: str, schema: str) -> None:
    store = ThreadStore.open(pg_url, schema=schema)
    tid = store.create_thread()
    store.append_and_flush(tid, [user_msg("first")], timeout=10.0)
    store.pause_projection()
    store.append(tid, [user_msg("second"), plain()])
    assert store.status(tid).pending
    store.close(timeout=0)  # the paused work stays durable and recorded as behind
    with ThreadStore.open(pg_url, schema=schema, read_only=True) as reader:
        assert reader.status(tid).pending
        with pytest.raises(ReadOnlyStore):
            reader.append(tid, [plain()])
        with pytest.raises(ReadOnlyStore):
            reader.flush(tid)
    with ThreadStore.open(pg_url, schema=schema) as store:
        meta = store.flush(tid, timeout=10.0)
        assert (meta.projected_seq, meta.item_count) == (3, 3)
        assert not store.status(tid).pending


def test_read_only_sessions_refuse_writes_in_the_server(pg_url: str, schema: str) -> None:
    PostgresStorage.open(pg_url, durability="normal", read_only=False, rules_id="r",
                         schema=schema).close()
    reader = PostgresStorage.open(pg_url, durability="normal", read_only=True, rules_id="r",
                                  schema=schema)
    try:
        with pytest.raises(StorageError, match="read-only"):
            reader.history.create("t", created_us=1, first=None)
    finally:
        reader.close()


def test_read_only_open_of_a_missing_store(pg_url: str, schema: str) -> None:
    with pytest.raises(NotAThreadStore):
        ThreadStore.open(pg_url, schema=schema, read_only=True)


def test_rebuild_index(pg_url: str, schema: str) -> None:
    with ThreadStore.open(pg_url, schema=schema) as store:
        tids = [store.create_thread() for _ in range(3)]
        for tid in tids:
            store.append_and_flush(tid, [user_msg(f"hello {tid}")], timeout=10.0)
    assert ThreadStore.rebuild_index(pg_url, schema=schema) == 3
    with ThreadStore.open(pg_url, schema=schema) as store:
        assert {m.thread_id for m in store.list_threads().threads} == set(tids)


def test_async_store(pg_url: str, schema: str) -> None:
    async def main() -> None:
        async with AsyncThreadStore.open(pg_url, schema=schema) as store:
            tid = await store.create_thread()
            await store.append(tid, [user_msg("async hello")])
            meta = await store.append_and_flush(tid, [plain()], timeout=10.0)
            assert meta.projected_seq == 2 and meta.title == "async hello"
            page = await store.list_threads(search="async")
            assert [m.thread_id for m in page.threads] == [tid]

    asyncio.run(main())


# -- scaling out: the schema Citus can distribute by thread_id (DESIGN §6) --------------------


def test_every_table_is_keyed_by_thread_id_first_with_no_sequence_or_foreign_key(
        storage: PostgresStorage, pg_url: str, schema: str) -> None:
    """Each data table's primary key starts with ``thread_id`` (so every table can be
    distributed and colocated by it), and nothing is global: no sequence, no foreign key,
    no identity column. ``store_meta`` is the one reference table (a few keys)."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        keys = conn.execute(
            "SELECT tc.table_name, array_agg(k.column_name::text ORDER BY k.ordinal_position) "
            "FROM information_schema.table_constraints tc JOIN information_schema.key_column_usage k "
            "USING (constraint_schema, constraint_name) WHERE tc.constraint_schema = %s "
            "AND tc.constraint_type = 'PRIMARY KEY' GROUP BY tc.table_name", (schema,)).fetchall()
        tables = {t for (t,) in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (schema,))}
        sequences = conn.execute("SELECT count(*) FROM information_schema.sequences "
                                 "WHERE sequence_schema = %s", (schema,)).fetchone()
        foreign = conn.execute("SELECT count(*) FROM information_schema.table_constraints WHERE "
                               "constraint_schema = %s AND constraint_type = 'FOREIGN KEY'",
                               (schema,)).fetchone()
        identity = conn.execute("SELECT count(*) FROM information_schema.columns WHERE "
                                "table_schema = %s AND (is_identity = 'YES' OR column_default "
                                "LIKE 'nextval%%')", (schema,)).fetchone()
    primary = dict(keys)
    assert tables == set(primary), "every table has a primary key"
    data = {t: cols for t, cols in primary.items() if t != "store_meta"}
    assert {"threads", "items", "meta"} <= set(data)
    assert all(cols[0] == "thread_id" for cols in data.values()), data
    assert primary["store_meta"] == ["key"]
    assert (sequences, foreign, identity) == ((0,), (0,), (0,))


def test_a_held_metadata_row_lock_leaves_appends_alone_and_barriers_on_time(
        store: ThreadStore, pg_url: str, schema: str) -> None:
    """Issue 12 point 4: another session holds a thread's projection row; appends (which
    lock only the head row) go on, and a barrier raises FlushTimeout on time."""
    tid = store.create_thread()
    store.append_and_flush(tid, [user_msg("first")], timeout=30)
    with psycopg.connect(pg_url) as other:
        other.execute(f"SELECT 1 FROM {schema}.meta WHERE thread_id = %s FOR UPDATE", (tid,))
        assert store.append(tid, [user_msg("second")]) == 2  # not blocked by the row lock
        started = time.monotonic()
        with pytest.raises(FlushTimeout) as info:
            store.flush(tid, timeout=0.5)
        assert time.monotonic() - started < 0.5 + 2.0  # the timeout plus a scheduling margin
        assert (info.value.target, info.value.projected) == (2, 1)
        other.rollback()  # let go of the row
    assert store.flush(tid, timeout=30).title == "first" and store.status(tid).projected_seq == 2


def test_a_barrier_with_the_longest_timeout_projects(store: ThreadStore) -> None:
    """Found by the fuzzer: a deadline-bounded attempt sets ``lock_timeout`` from its
    timeout, which PostgreSQL caps at 2**31 - 1 ms; a longer one must still project."""
    tid = store.create_thread()
    store.append(tid, [user_msg("patient")])
    assert store.flush(tid, timeout=1e9).title == "patient"
    assert store.append_and_flush(tid, [plain(1)], timeout=1e9).item_count == 2
