"""The index through the public API: listing order, keyset pagination, filters and search on
every backend; SQLite's schema, migrations, rebuilds and query plans.

A newer schema version (SchemaTooNew, never a rebuild) is tested with the other bad input,
in test_bad_input.py.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlite_utils

from conftest import plain, user_msg
from thread_store import InvalidCursor, ThreadMetadata, ThreadStore
from thread_store.backends.sqlite.history import SCHEMA_VERSION as HISTORY_VERSION
from thread_store.backends.sqlite.index import SCHEMA_VERSION as INDEX_VERSION

BASE = datetime(2024, 5, 1, tzinfo=timezone.utc)


def turn_started(at: datetime) -> dict[str, object]:
    """A ``turn_started`` event stored at ``at``: it sets the thread's recency."""
    return {"type": "event_msg", "timestamp": at.isoformat(), "payload": {"type": "turn_started"}}


def goal(objective: str) -> dict[str, object]:
    """A ``thread_goal_updated`` event: it sets the preview but no title."""
    return {"type": "event_msg", "payload": {"type": "thread_goal_updated", "goal": {"objective": objective}}}


def list_all(store: ThreadStore, limit: int, **query: object) -> list[list[ThreadMetadata]]:
    """Every page of one query, following ``next_cursor``."""
    pages = []
    cursor = None
    while True:
        page = store.list_threads(limit=limit, cursor=cursor, **query)  # type: ignore[arg-type]
        pages.append(page.threads)
        cursor = page.next_cursor
        if cursor is None:
            return pages


def ids(threads: list[ThreadMetadata]) -> list[str]:
    return [t.thread_id for t in threads]


def _pragma(path: Path, name: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute(f"PRAGMA {name}").fetchone()[0])
    finally:
        conn.close()


# -- schema ---------------------------------------------------------------------------------

def test_schema_is_versioned_and_created_with_fts(sqlite_store: ThreadStore, store_path: Path) -> None:
    sqlite_store.append_and_flush(sqlite_store.create_thread(), [user_msg("hello")])
    assert _pragma(store_path / "history.db", "user_version") == HISTORY_VERSION >= 1
    assert _pragma(store_path / "index.db", "user_version") == INDEX_VERSION >= 1
    db = sqlite_utils.Database(store_path / "index.db")
    try:
        assert "threads_fts" in db.table_names()
        assert {"threads_listed", "threads_all"} <= {i.name for i in db["threads"].indexes}
    finally:
        db.close()


def test_reopen_keeps_schema_and_rows(store_path: Path) -> None:
    with ThreadStore.open(store_path) as s:
        tid = s.create_thread()
        s.append_and_flush(tid, [user_msg("kept")])
    with ThreadStore.open(store_path) as s:
        assert ids(s.list_threads().threads) == [tid]
        assert s.read_thread(tid).title == "kept"
    assert _pragma(store_path / "index.db", "user_version") == INDEX_VERSION


@pytest.mark.parametrize("damage", ["delete", "garbage", "foreign"])
def test_lost_or_unreadable_index_is_rebuilt_from_history(store_path: Path, damage: str) -> None:
    """The index is derived, so its migration path is a rebuild from the history."""
    with ThreadStore.open(store_path) as s:
        s.append_and_flush(s.create_thread("a"), [user_msg("first"), plain()])
        s.append_and_flush(s.create_thread("b"), [user_msg("second")])
        s.archive_thread("b")
        before = {t: s.read_thread(t) for t in ("a", "b")}
    index = store_path / "index.db"
    index.unlink()
    if damage == "garbage":
        index.write_bytes(b"\x00garbage" * 512)
    elif damage == "foreign":
        conn = sqlite3.connect(index)
        conn.execute("CREATE TABLE threads (thread_id TEXT)")
        conn.close()
    with ThreadStore.open(store_path) as s:
        s.flush_all(timeout=10)
        assert {t: s.read_thread(t) for t in ("a", "b")} == before
        assert ids(s.list_threads().threads) == ["a"]
        assert ids(s.list_threads(archived=True).threads) == ["b"]
    assert _pragma(index, "user_version") == INDEX_VERSION


# -- ordering and keyset pagination ---------------------------------------------------------

CREATED_BEFORE_BASE = {"timestamp": (BASE - timedelta(days=1)).isoformat()}


def test_pagination_over_250_threads_with_ties(store: ThreadStore) -> None:
    expected = []
    for i in range(250):
        # id order is not creation order; created_at (a floor of recency) is before every turn
        tid = store.create_thread(f"t-{(i * 37) % 250:03d}", metadata=CREATED_BEFORE_BASE)
        at = BASE + timedelta(seconds=(i * 7919) % 50)  # 50 recency values, 5 threads each
        store.append(tid, [user_msg(f"message {i}"), turn_started(at)])
        expected.append((at, tid))
    store.flush_all(timeout=30)
    expected.sort(reverse=True)  # recency desc, then id desc
    pages = list_all(store, limit=7)
    assert [len(p) for p in pages] == [7] * 35 + [5]
    listed = [t for page in pages for t in page]
    assert [(t.recency_at, t.thread_id) for t in listed] == expected


def test_pagination_is_stable_when_threads_are_added_between_pages(store: ThreadStore) -> None:
    for i in range(10):
        store.append(store.create_thread(f"old-{i}"), [user_msg("x"), turn_started(BASE + timedelta(seconds=i))])
    store.flush_all(timeout=10)
    first = store.list_threads(limit=4)
    # A newer thread sorts before the cursor, so it does not shift the following pages.
    store.append_and_flush(store.create_thread("newest"), [user_msg("y"), turn_started(BASE + timedelta(days=1))])
    rest = list_all_from(store, first.next_cursor, limit=4)
    assert ids(first.threads) + rest == [f"old-{i}" for i in range(9, -1, -1)]


def list_all_from(store: ThreadStore, cursor: str | None, limit: int) -> list[str]:
    out: list[str] = []
    while cursor is not None:
        page = store.list_threads(limit=limit, cursor=cursor)
        out += ids(page.threads)
        cursor = page.next_cursor
    return out


def test_last_page_has_no_cursor(store: ThreadStore) -> None:
    for i in range(3):
        store.append(store.create_thread(), [user_msg(str(i))])
    store.flush_all(timeout=10)
    page = store.list_threads(limit=3)
    assert len(page.threads) == 3 and page.next_cursor is None
    assert store.list_threads(limit=2).next_cursor is not None


def _cursor(store: ThreadStore, **query: object) -> str:
    cursor = store.list_threads(limit=1, **query).next_cursor  # type: ignore[arg-type]
    assert cursor is not None
    return cursor


@pytest.fixture
def listed_store(store: ThreadStore) -> ThreadStore:
    """A store on each backend with active, archived and empty threads, enough for two
    pages of each query."""
    return _fill_for_listing(store)


def _fill_for_listing(store: ThreadStore) -> ThreadStore:
    for i in range(3):
        store.append(store.create_thread(f"a{i}"), [user_msg(f"apple {i}")])
        store.append(store.create_thread(f"e{i}"), [plain()])
    for i in range(3):
        store.append(store.create_thread(f"z{i}"), [user_msg(f"apple zipped {i}")])
        store.archive_thread(f"z{i}")
    store.flush_all(timeout=10)
    return store


@pytest.mark.parametrize("make", [
    lambda good: "garbage!!",
    lambda good: "",
    lambda good: good[:-6],
    lambda good: good[: len(good) // 2],
    lambda good: good + "AAAA",
    lambda good: "W10",  # base64 of "[]": valid JSON, wrong shape
    lambda good: "WzEsIGZhbHNlLCBmYWxzZSwgbnVsbCwgImEiLCAiYiJd",  # wrong types inside
])
def test_garbled_cursor_is_invalid(listed_store: ThreadStore, make: object) -> None:
    bad = make(_cursor(listed_store))  # type: ignore[operator]
    with pytest.raises(InvalidCursor, match="next_cursor"):
        listed_store.list_threads(limit=1, cursor=bad)


@pytest.mark.parametrize(("made_with", "used_with"), [
    ({"archived": True}, {}),
    ({}, {"archived": True}),
    ({"search": "apple"}, {}),
    ({"search": "apple"}, {"search": "zipped"}),
    ({}, {"include_empty": True}),
])
def test_cursor_from_another_query_is_invalid(listed_store: ThreadStore, made_with: dict[str, object],
                                              used_with: dict[str, object]) -> None:
    cursor = _cursor(listed_store, **made_with)
    with pytest.raises(InvalidCursor):
        listed_store.list_threads(limit=1, cursor=cursor, **used_with)  # type: ignore[arg-type]


def test_non_string_cursor_is_invalid(listed_store: ThreadStore) -> None:
    with pytest.raises(InvalidCursor):
        listed_store.list_threads(cursor=12345)  # type: ignore[arg-type]


def test_list_query_walks_an_index_without_sorting(sqlite_store: ThreadStore) -> None:
    """EXPLAIN QUERY PLAN of the SQL list_threads really runs: no temp B-tree for ORDER BY."""
    listed_store = _fill_for_listing(sqlite_store)
    with listed_store._index._readers.connection() as conn:  # idle again: list() reuses it
        pass
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    try:
        for query in ({}, {"include_empty": True}, {"archived": True}, {"search": "apple"}):
            cursor = _cursor(listed_store, **query)
            listed_store.list_threads(limit=1, cursor=cursor, **query)  # type: ignore[arg-type]
    finally:
        conn.set_trace_callback(None)
    lists = [s for s in statements if s.startswith("SELECT") and "ORDER BY recency_us DESC" in s]
    assert len(lists) == 8
    for sql in lists:
        plan = " | ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}"))
        assert "USING INDEX threads_" in plan, plan
        assert "TEMP B-TREE" not in plan, plan


# -- filters and search ---------------------------------------------------------------------

def test_archive_moves_thread_between_listings(store: ThreadStore) -> None:
    tid = store.create_thread()
    store.append_and_flush(tid, [user_msg("to archive")])
    meta = store.archive_thread(tid)
    assert meta.archived_at is not None
    assert ids(store.list_threads().threads) == []
    assert ids(store.list_threads(archived=True).threads) == [tid]
    meta = store.unarchive_thread(tid)
    assert meta.archived_at is None
    assert ids(store.list_threads().threads) == [tid]
    assert ids(store.list_threads(archived=True).threads) == []


def test_thread_without_preview_lists_only_with_include_empty(store: ThreadStore) -> None:
    empty = store.create_thread("empty")
    store.append(empty, [plain()])
    full = store.create_thread("full")
    store.append(full, [user_msg("hi")])
    store.flush_all(timeout=10)
    assert ids(store.list_threads().threads) == ["full"]
    assert sorted(ids(store.list_threads(include_empty=True).threads)) == ["empty", "full"]
    store.append_and_flush(empty, [goal("now with a preview")])
    assert sorted(ids(store.list_threads().threads)) == ["empty", "full"]


def test_search_covers_title_preview_and_first_user_message(store: ThreadStore) -> None:
    # "goal": preview from the goal, title and first message from the later user message.
    store.append(store.create_thread("goal"), [goal("deploy the rocket"), user_msg("banana split")])
    store.append(store.create_thread("image"), [user_msg("", images=["data:..."]), user_msg("cherry pie")])
    store.append(store.create_thread("plain"), [user_msg("nothing special")])
    store.flush_all(timeout=10)
    assert store.read_thread("image").first_user_message == "[Image]"
    assert store.read_thread("image").title == "cherry pie"
    found = {q: sorted(ids(store.list_threads(search=q).threads))
             for q in ("rocket", "banana", "cherry", "image", "special", "absent")}
    assert found == {"rocket": ["goal"], "banana": ["goal"], "cherry": ["image"], "image": ["image"],
                     "special": ["plain"], "absent": []}


def test_search_follows_edits_and_archive(store: ThreadStore) -> None:
    tid = store.create_thread()
    store.append_and_flush(tid, [user_msg("walrus")])
    store.archive_thread(tid)
    assert ids(store.list_threads(search="walrus").threads) == []
    assert ids(store.list_threads(search="walrus", archived=True).threads) == [tid]


def test_search_pages_with_its_cursor(store: ThreadStore) -> None:
    for i in range(5):
        store.append(store.create_thread(f"m{i}"), [user_msg(f"match {i}")])
        store.append(store.create_thread(f"o{i}"), [user_msg(f"other {i}")])
    store.flush_all(timeout=10)
    pages = list_all(store, limit=2, search="match")
    assert sorted(t for p in pages for t in ids(p)) == [f"m{i}" for i in range(5)]


@pytest.mark.parametrize("query", ['"', '""', '"unbalanced', 'AND', 'a AND', 'OR b', 'NOT', '*', 'hel*',
                                   'NEAR(', 'NEAR(a b)', '(', ')', '-x', 'x:y', '^', '{a b}', "'", '+',
                                   'title:quote', '\\', '   '])
def test_fts_syntax_in_search_does_not_error(store: ThreadStore, query: str) -> None:
    store.append_and_flush(store.create_thread(), [user_msg('say "hello" AND goodbye (NEAR) * ok')])
    page = store.list_threads(search=query)
    assert len(page.threads) <= 1


def test_search_text_with_quotes_matches_as_words(store: ThreadStore) -> None:
    tid = store.create_thread()
    store.append_and_flush(tid, [user_msg('say "hello" AND goodbye')])
    assert ids(store.list_threads(search='"hello"').threads) == [tid]
    assert ids(store.list_threads(search='hello AND').threads) == [tid]
    assert ids(store.list_threads(search='hello NOT').threads) == []


def test_search_words_are_case_insensitive_substrings_of_name_title_preview_or_message(
        store: ThreadStore) -> None:
    pigs = store.create_thread("pigs")
    store.append_and_flush(pigs, [user_msg("Three little pigs build houses")])
    cjk = store.create_thread("cjk")
    store.append_and_flush(cjk, [user_msg("修复不稳定的测试")])
    ja = store.create_thread("ja")
    store.append_and_flush(ja, [user_msg("不安定なテストを直す")])
    named = store.create_thread("named")
    store.append_and_flush(named, [user_msg("something else")])
    store.update_metadata(named, name="Deploy Runbook")
    wild = store.create_thread("wild")
    store.append_and_flush(wild, [user_msg("100% of foo_bar")])

    def found(query: str) -> list[str]:
        return sorted(ids(store.list_threads(search=query, include_empty=True).threads))

    assert found("thr") == ["pigs"]  # a prefix, not a whole word
    assert found("THREE") == found("three") == ["pigs"]
    assert found("ttle") == ["pigs"]  # inside a word
    assert found("three pigs") == ["pigs"] and found("three wolves") == []  # words ANDed
    assert found("测试") == ["cjk"]  # two characters inside a longer CJK run
    assert found("不稳定") == ["cjk"]
    assert found("テスト") == ["ja"] and found("直す") == ["ja"]
    assert found("runbook") == ["named"] and found("ru") == ["named"]  # the user-set name
    assert found("ig") == ["pigs"] and found("IG") == ["pigs"]  # short words: LIKE, any ASCII case
    assert found("%") == ["wild"] and found("_") == ["wild"]  # LIKE's wildcards are literal here
    assert found("o_b") == ["wild"] and found("0%") == ["wild"]


def test_list_threads_filters_by_cwd_and_pages(store: ThreadStore) -> None:
    for i in range(5):
        store.append(store.create_thread(f"a{i}", metadata={"cwd": "/repo/a"}), [user_msg(f"in a {i}")])
        store.append(store.create_thread(f"b{i}", metadata={"cwd": "/repo/b"}), [user_msg(f"in b {i}")])
    store.flush_all(timeout=10)
    pages = list_all(store, limit=2, cwd="/repo/a")
    assert sorted(t for p in pages for t in ids(p)) == [f"a{i}" for i in range(5)]
    assert ids(store.list_threads(cwd="/repo").threads) == []  # exactly, not a prefix
    assert ids(store.list_threads(cwd="/repo/b", search="b 3").threads) == ["b3"]
    cursor = store.list_threads(limit=1, cwd="/repo/a").next_cursor
    with pytest.raises(InvalidCursor):
        store.list_threads(limit=1, cwd="/repo/b", cursor=cursor)


def test_an_index_from_schema_3_is_migrated_to_substring_search(store_path: Path) -> None:
    with ThreadStore.open(store_path) as store:
        store.append_and_flush(store.create_thread("pigs"), [user_msg("Three little pigs")])
    # Make index.db what version 3 wrote: a unicode61 FTS table, no cwd index, and none of
    # version 5's tables.
    db = sqlite_utils.Database(sqlite3.connect(store_path / "index.db"))
    for trigger in ("threads_ai", "threads_ad", "threads_au"):
        db.execute(f"DROP TRIGGER {trigger}")
    db.execute("DROP TABLE threads_fts")
    db.execute("DROP INDEX threads_by_cwd")
    db.execute("DROP TABLE failures")
    db.execute("DROP TABLE index_info")
    db["threads"].enable_fts(["title", "preview", "first_user_message"], fts_version="FTS5",
                             create_triggers=True)
    db.execute("PRAGMA user_version = 3")
    db.conn.close()
    with ThreadStore.open(store_path) as store:
        assert ids(store.list_threads(search="thr").threads) == ["pigs"]
    with sqlite3.connect(store_path / "index.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == INDEX_VERSION
