"""DESIGN §5: every bad input raises a typed error with a helpful message and writes nothing,
on every backend; bad paths and files concern the SQLite backend alone."""

from __future__ import annotations

import asyncio
import functools
import json
import math
import os
import sqlite3
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from conftest import Backend, plain, user_msg
from thread_store import (AsyncThreadStore, InvalidArgument, InvalidItem, NotAThreadStore, RetryPolicy,
                          SchemaTooNew, ThreadDiscarded, ThreadNotFound, ThreadStore, ThreadStoreError)

MAX_ITEM = 1024
Call = Callable[[ThreadStore, str], Any]


def _raw_counts(store: ThreadStore) -> tuple[int, ...]:
    """Row counts of the history tables, read beside the store: catches writes to any thread.

    A store without files is asked through its history port: live threads and their items.
    """
    if store.path is None:
        heads = store._storage.history.heads()
        return sum(heads.values()), len(heads)
    conn = sqlite3.connect(f"file:{store.path / 'history.db'}?mode=ro", uri=True)
    try:
        return tuple(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("items", "threads"))
    finally:
        conn.close()


def snapshot(store: ThreadStore) -> tuple[Any, ...]:
    """Everything a rejected call must leave alone."""
    listed = store.list_threads(limit=1000, include_empty=True).threads
    return (_raw_counts(store), listed,
            {t.thread_id: store.read_history(t.thread_id) for t in listed},
            {t.thread_id: store.status(t.thread_id) for t in listed})


@pytest.fixture
def seeded(backend: Backend) -> Iterator[ThreadStore]:
    """Threads 't' and 'other', projected; items up to MAX_ITEM bytes. Checks the store survives."""
    with backend.open_store(max_item_bytes=MAX_ITEM) as s:
        s.append_and_flush(s.create_thread("t"), [user_msg("hello"), plain(1)], timeout=10)
        s.append_and_flush(s.create_thread("other"), [user_msg("other")], timeout=10)
        yield s
        # No bad input may crash the worker or harm other threads.
        assert s.append_and_flush("other", [plain(2)], timeout=10).item_count == 2


def assert_rejected(store: ThreadStore, call: Callable[[], Any], error: type[BaseException],
                    match: str) -> None:
    """``call`` raises ``error`` whose message matches ``match``, and nothing changed."""
    before = snapshot(store)
    with pytest.raises(error, match=match):
        call()
    assert snapshot(store) == before


# -- items ----------------------------------------------------------------------------------

@pytest.mark.parametrize("payload", [{1, 2}, object(), b"bytes", math.nan, math.inf])
def test_non_json_item_is_rejected(seeded: ThreadStore, payload: object) -> None:
    batch = [plain(3), {"type": "response_item", "payload": {"bad": payload}}]
    assert_rejected(seeded, lambda: seeded.append("t", batch), InvalidItem, "not JSON-serializable")
    assert_rejected(seeded, lambda: seeded.append_and_flush("t", batch, timeout=1), InvalidItem,
                    "not JSON-serializable")


def _item_of_size(size: int) -> dict[str, Any]:
    item: dict[str, Any] = {"type": "response_item", "payload": ""}
    item["payload"] = "x" * (size - len(json.dumps(item, separators=(",", ":"))))
    return item


def test_item_larger_than_max_item_bytes_is_rejected(seeded: ThreadStore) -> None:
    assert_rejected(seeded, lambda: seeded.append("t", [plain(), _item_of_size(MAX_ITEM + 1)]),
                    InvalidItem, f"{MAX_ITEM + 1} bytes.*max_item_bytes={MAX_ITEM}")
    assert seeded.append("t", [_item_of_size(MAX_ITEM)]) == 3  # the limit itself is fine


def test_create_thread_with_bad_metadata_creates_nothing(seeded: ThreadStore) -> None:
    assert_rejected(seeded, lambda: seeded.create_thread("new", metadata={"cwd": "x" * MAX_ITEM}),
                    InvalidItem, "max_item_bytes")
    assert_rejected(seeded, lambda: seeded.create_thread("new", metadata={"cwd": {1}}),
                    InvalidItem, "JSON-serializable")
    assert_rejected(seeded, lambda: seeded.create_thread("new", metadata=["cwd"]),  # type: ignore[arg-type]
                    InvalidArgument, "metadata must be a dict")
    with pytest.raises(ThreadNotFound):
        seeded.read_thread("new")


@pytest.mark.parametrize(("item", "match"), [
    ({"payload": {}}, "needs a non-empty string 'type'"),
    ({"type": 5, "payload": {}}, "needs a non-empty string 'type'"),
    ({"type": None}, "needs a non-empty string 'type'"),
    ({"type": ["event_msg"]}, "needs a non-empty string 'type'"),
    ({"type": ""}, "needs a non-empty string 'type'"),
    ("event_msg", "must be a JSON object"),
    (["type", "x"], "must be a JSON object"),
    (None, "must be a JSON object"),
    ({"type": "x", "timestamp": "yesterday"}, "RFC 3339"),
    ({"type": "x", "timestamp": 1700000000}, "RFC 3339"),
])
def test_malformed_item_is_rejected(seeded: ThreadStore, item: object, match: str) -> None:
    assert_rejected(seeded, lambda: seeded.append("t", [plain(), item]), InvalidItem, match)  # type: ignore[list-item]


@pytest.mark.parametrize("items", [{"type": "x"}, "abc", b"abc", None, 5, {plain()["type"]},
                                   (plain() for _ in range(2))])
def test_items_that_are_not_a_list_are_rejected(seeded: ThreadStore, items: Any) -> None:
    assert_rejected(seeded, lambda: seeded.append("t", items), InvalidArgument, "items must be a list")


# -- thread ids -----------------------------------------------------------------------------

ID_CALLS: dict[str, Call] = {
    "append": lambda s, t: s.append(t, [plain()]),
    "append_and_flush": lambda s, t: s.append_and_flush(t, [plain()], timeout=1),
    "read_thread": lambda s, t: s.read_thread(t),
    "read_history": lambda s, t: s.read_history(t),
    "flush": lambda s, t: s.flush(t, timeout=1),
    "status": lambda s, t: s.status(t),
    "update_metadata": lambda s, t: s.update_metadata(t, name="n", timeout=1),
    "archive_thread": lambda s, t: s.archive_thread(t, timeout=1),
    "unarchive_thread": lambda s, t: s.unarchive_thread(t, timeout=1),
    "delete_thread": lambda s, t: s.delete_thread(t),
    "discard": lambda s, t: s.discard(t, timeout=1),
}
BAD_IDS = ["", "x" * 129, "a/b", "a b", "tab\t", "é", "t\n", 5, b"t", ["t"]]


@pytest.mark.parametrize("bad_id", BAD_IDS, ids=repr)
def test_malformed_thread_id_is_rejected(seeded: ThreadStore, bad_id: Any) -> None:
    for call in [*ID_CALLS.values(), lambda s, t: s.create_thread(t)]:
        assert_rejected(seeded, functools.partial(call, seeded, bad_id), InvalidArgument,
                        r"invalid thread id .*\[A-Za-z0-9\._:-\]")


@pytest.mark.parametrize("name", sorted(ID_CALLS))
def test_unknown_thread_is_not_found(seeded: ThreadStore, name: str) -> None:
    assert_rejected(seeded, lambda: ID_CALLS[name](seeded, "nobody"), ThreadNotFound,
                    "'nobody' does not exist; create it with create_thread")


def test_append_to_a_deleted_thread_is_not_found(seeded: ThreadStore) -> None:
    seeded.delete_thread("t")
    assert_rejected(seeded, lambda: seeded.append("t", [plain()]), ThreadNotFound, "'t' does not exist")


def test_append_to_a_discarded_thread_is_refused(seeded: ThreadStore) -> None:
    seeded.discard("t")
    assert_rejected(seeded, lambda: seeded.append("t", [plain()]), ThreadDiscarded, "'t' was discarded")


# -- timeouts, limits, generations, options -------------------------------------------------

TIMEOUT_CALLS: dict[str, Callable[[ThreadStore, Any], Any]] = {
    "flush": lambda s, x: s.flush("t", timeout=x),
    "append_and_flush": lambda s, x: s.append_and_flush("t", [plain()], timeout=x),
    "flush_all": lambda s, x: s.flush_all(timeout=x),
    "update_metadata": lambda s, x: s.update_metadata("t", name="n", timeout=x),
    "archive_thread": lambda s, x: s.archive_thread("t", timeout=x),
    "delete_thread": lambda s, x: s.delete_thread("t", timeout=x),
    "discard": lambda s, x: s.discard("t", timeout=x),
    "close": lambda s, x: s.close(timeout=x),
}


@pytest.mark.parametrize("name", sorted(TIMEOUT_CALLS))
def test_bad_timeout_is_rejected(seeded: ThreadStore, name: str) -> None:
    for timeout in (-1, -0.001, math.nan, -math.inf, "1", True):
        assert_rejected(seeded, functools.partial(TIMEOUT_CALLS[name], seeded, timeout), InvalidArgument,
                        "timeout must be")
    assert seeded.read_thread("t").item_count == 2  # still open, 't' neither deleted nor discarded


def test_list_limit_out_of_range_is_rejected(seeded: ThreadStore) -> None:
    for limit in (0, -1, 1001, 1.5, "10", True, None):
        assert_rejected(seeded, functools.partial(seeded.list_threads, limit=limit), InvalidArgument,
                        "limit must be an integer from 1 to 1000")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"limit": 0}, "limit must be an integer from 1"),
    ({"limit": 100_001}, "limit must be an integer from 1"),
    ({"after_seq": -1}, "after_seq must be an integer from 0"),
    ({"after_seq": "0"}, "after_seq must be an integer from 0"),
])
def test_read_history_bounds_are_checked(seeded: ThreadStore, kwargs: dict[str, Any], match: str) -> None:
    assert_rejected(seeded, lambda: seeded.read_history("t", **kwargs), InvalidArgument, match)


@pytest.mark.parametrize("generation", [3, 1 << 40, -1, 1.0, True], ids=repr)
def test_flush_of_bad_generation_raises_at_once(seeded: ThreadStore, generation: Any) -> None:
    # A generous timeout: waiting instead of refusing would surface as FlushTimeout, not hang.
    assert_rejected(seeded, lambda: seeded.flush("t", generation=generation, timeout=30),
                    InvalidArgument, "generation")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"archived": "yes"}, "archived must be True or False"),
    ({"include_empty": 1}, "include_empty must be True or False"),
    ({"search": 5}, "search must be a string"),
    ({"search": "x" * 1001}, "at most 1000 characters"),
    ({"search": "nul\x00byte"}, "NUL"),
    ({"search": "lone \ud800 surrogate"}, "surrogate"),
])
def test_bad_list_arguments_are_rejected(seeded: ThreadStore, kwargs: dict[str, Any], match: str) -> None:
    assert_rejected(seeded, lambda: seeded.list_threads(**kwargs), InvalidArgument, match)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({}, "needs at least one field"),
    ({"name": 5}, "name must be a string or None"),
])
def test_bad_update_metadata_is_rejected(seeded: ThreadStore, kwargs: dict[str, Any], match: str) -> None:
    assert_rejected(seeded, lambda: seeded.update_metadata("t", **kwargs), InvalidArgument, match)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"projection": "lazy"}, "projection must be 'async' or 'sync'"),
    ({"durability": "extra"}, "durability must be 'normal' or 'full'"),
    ({"max_item_bytes": 0}, "max_item_bytes must be an integer"),
    ({"catch_up_after": 0}, "catch_up_after must be"),
    ({"catch_up_after": -1.0}, "catch_up_after must be"),
    ({"catch_up_after": math.nan}, "catch_up_after must be"),
    ({"catch_up_after": True}, "catch_up_after must be"),
    ({"catch_up_after": "5"}, "catch_up_after must be"),
    ({"coalesce_delay": -1}, "coalesce_delay must be"),
    ({"coalesce_delay": None}, "coalesce_delay must be"),
    ({"coalesce_delay": math.nan}, "coalesce_delay must be"),
    ({"coalesce_delay": math.inf}, "coalesce_delay must be"),
    ({"coalesce_delay": "0.1"}, "coalesce_delay must be"),
    ({"coalesce_delay": True}, "coalesce_delay must be"),
    ({"projection": None}, "projection must be"),
    ({"projection": ["sync"]}, "projection must be"),
    ({"durability": None}, "durability must be"),
    ({"max_item_bytes": None}, "max_item_bytes must be"),
    ({"max_item_bytes": 1e6}, "max_item_bytes must be"),
    ({"tracer_provider": "jaeger"}, "tracer_provider must be"),
    ({"meter_provider": object()}, "meter_provider must be"),
    ({"projection_hook": "print"}, "projection_hook must be a callable"),
    ({"rules": object()}, "rules must implement ProjectionRules"),
    ({"rules": type("R", (), {"initial": len, "apply": len, "metadata": len, "item_types": "abc"})()},
     "item_types must be"),
    ({"retry": 5}, "retry must be a RetryPolicy"),
    ({"retry": {"attempts": 3}}, "retry must be a RetryPolicy"),
    ({"caller_runs": None}, "caller_runs must be True or False"),
    ({"caller_runs": 1}, "caller_runs must be True or False"),
    ({"read_only": "yes"}, "read_only must be True or False"),
    ({"no_such_option": 1}, "unknown ThreadStore.open option"),
    ({"schema": "thread_store"}, "only to postgresql"),
], ids=repr)
def test_bad_open_options_are_rejected_before_anything_is_written(
        backend: Backend, store_path: Path, kwargs: dict[str, Any], match: str) -> None:
    if set(kwargs) & set(backend.place.options):
        pytest.skip(f"the {backend.name} backend takes {sorted(kwargs)}: it names its stores")
    with pytest.raises(InvalidArgument, match=match):
        backend.place.open(**kwargs)
    assert not store_path.exists()
    with pytest.raises(InvalidArgument, match=match):
        asyncio.run(_aio_open(backend.target, {**backend.place.options, **kwargs}))
    assert not store_path.exists()


async def _aio_open(path: object, kwargs: dict[str, Any]) -> None:
    store = await AsyncThreadStore.open(path, **kwargs)  # type: ignore[arg-type]
    await store.close()


def test_no_call_fails_after_its_write_with_the_default_options(backend: Backend) -> None:
    # coalesce_delay=None used to be accepted, then create_thread failed with a TypeError
    # after the thread was committed; every accepted option set must work end to end.
    with backend.open_store(coalesce_delay=0, caller_runs=False, max_item_bytes=64,
                            retry=RetryPolicy(attempts=1), projection_hook=lambda t, g: None) as s:
        tid = s.create_thread(metadata={"cwd": "/r"})
        assert s.append(tid, [plain()]) == 2
        assert s.update_metadata(tid, name="n", timeout=30).name == "n"
        assert s.archive_thread(tid, timeout=30).archived_at is not None


def test_rebuild_index_with_bad_options_leaves_the_index_alone(store_path: Path) -> None:
    with ThreadStore.open(store_path) as s:
        s.append_and_flush(s.create_thread(), [user_msg("kept")], timeout=30)
    before = _tree(store_path)
    for kwargs in ({"coalesce_delay": None}, {"bogus": 1}, {"read_only": True}, {"progress": 5}):
        with pytest.raises(InvalidArgument):
            ThreadStore.rebuild_index(store_path, **kwargs)
        assert _tree(store_path) == before


BAD_PATHS: list[Any] = [None, 5, 1.5, b"/tmp/store", bytearray(b"x"), "", "a\x00b", "\ud800",
                        "x" * 300, "/" + "y/" * 2100, ["store"]]


class _BytesPath:
    def __fspath__(self) -> bytes:
        return b"/tmp/store"


class _BrokenPath:
    def __fspath__(self) -> str:
        raise RuntimeError("no path")


@pytest.mark.parametrize("path", BAD_PATHS + [_BytesPath(), _BrokenPath()], ids=repr)
def test_malformed_path_raises_invalid_argument(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                path: Any) -> None:
    monkeypatch.chdir(tmp_path)  # a relative name that slipped through would land here
    with pytest.raises(InvalidArgument, match="path"):
        ThreadStore.open(path)
    with pytest.raises(InvalidArgument, match="path"):
        ThreadStore.rebuild_index(path)
    with pytest.raises(InvalidArgument, match="path"):
        asyncio.run(_aio_open(path, {}))
    assert list(tmp_path.iterdir()) == []


def test_memory_never_becomes_a_directory_and_refuses_options_it_cannot_keep(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for options in ({"read_only": True}, {"durability": "full"}, {"catch_up_after": 1.0}):
        with pytest.raises(InvalidArgument, match=":memory:"):
            ThreadStore.open(":memory:", **options)
        with pytest.raises(InvalidArgument, match=":memory:"):
            asyncio.run(_aio_open(":memory:", options))
    with pytest.raises(InvalidArgument, match="in-memory"):
        ThreadStore.rebuild_index(":memory:")
    with ThreadStore.open(":memory:") as store:
        with pytest.raises(InvalidArgument, match="no files"):
            store.backup(tmp_path / "copy")
        with pytest.raises(InvalidArgument, match="in-memory backend"):
            store.backup(":memory:")
    assert list(tmp_path.rglob("*")) == []


@pytest.mark.parametrize("target", ["mysql://me@127.0.0.1:3306/db", "postgresq://db",
                                    "sqlite:///tmp/x", "s3://bucket/threads",
                                    "host=localhost dbname=threads", "host='a b' port=5432"])
def test_targets_of_other_backends_never_become_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           target: str) -> None:
    monkeypatch.chdir(tmp_path)  # a target taken for a relative directory would land here
    with pytest.raises(InvalidArgument):
        ThreadStore.open(target)
    with pytest.raises(InvalidArgument):
        asyncio.run(_aio_open(target, {}))
    with pytest.raises(InvalidArgument):
        ThreadStore.rebuild_index(target)
    assert list(tmp_path.rglob("*")) == []


# -- paths and files ------------------------------------------------------------------------

def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its contents."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_open_refused(path: Path, error: type[ThreadStoreError], match: str,
                         ignore: frozenset[str] = frozenset()) -> None:
    """Opening ``path`` raises, and leaves the files around it as they were."""
    before = _tree(path.parent)
    with pytest.raises(error, match=match):
        ThreadStore.open(path)
    after = {k: v for k, v in _tree(path.parent).items() if k not in ignore}
    assert after == before


def test_path_that_is_a_regular_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("my notes")
    _assert_open_refused(path, NotAThreadStore, "exists and is not a directory")


def test_non_empty_directory_that_is_not_a_store_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "project"
    path.mkdir()
    (path / "README").write_text("hello")
    _assert_open_refused(path, NotAThreadStore, "non-empty directory without history.db")


def test_unwritable_path_is_refused(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # Root ignores directory permissions, so a chmod 0o500 directory stays writable
        # here. A path below a regular file cannot be created by anyone, so it stands in.
        (tmp_path / "file").write_text("x")
        path, match = tmp_path / "file" / "store", "cannot create the store directory"
    else:
        path, match = tmp_path / "locked", "not writable"
        path.mkdir(mode=0o500)
    _assert_open_refused(path, NotAThreadStore, match)


# Our lock file is the one thing open() creates before it can inspect the databases.
LOCK = frozenset({"store/store.lock", "store/history.lock", "store/index.lock"})


@pytest.mark.parametrize("name", ["history.db", "index.db"])
def test_newer_schema_version_is_refused_and_left_alone(store_path: Path, name: str) -> None:
    with ThreadStore.open(store_path) as s:
        s.append_and_flush(s.create_thread("t"), [user_msg("from the future")], timeout=10)
    conn = sqlite3.connect(store_path / name)
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    # Also a too-new index is refused: rebuilding it would throw away a newer format.
    _assert_open_refused(store_path, SchemaTooNew, rf"{name} has schema version 99.*upgrade thread_store")
    conn = sqlite3.connect(store_path / name)
    conn.execute(f"PRAGMA user_version = {version}")
    conn.close()
    with ThreadStore.open(store_path) as s:
        assert s.read_thread("t").title == "from the future"


def test_foreign_sqlite_database_as_history_is_refused_untouched(store_path: Path) -> None:
    store_path.mkdir()
    conn = sqlite3.connect(store_path / "history.db")  # rollback journal, like most SQLite files
    conn.execute("CREATE TABLE notes (body TEXT)")
    conn.execute("INSERT INTO notes VALUES ('precious')")
    conn.commit()
    conn.close()
    _assert_open_refused(store_path, NotAThreadStore, "SQLite database but not a thread store", LOCK)
    conn = sqlite3.connect(store_path / "history.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    finally:
        conn.close()


def test_non_sqlite_file_as_history_is_refused(store_path: Path) -> None:
    store_path.mkdir()
    (store_path / "history.db").write_bytes(b"definitely not SQLite\n" * 100)
    _assert_open_refused(store_path, NotAThreadStore, "not a SQLite database of a thread store", LOCK)
