"""Search over a thread's name, title, preview and first user message, with equal and
different texts in those fields, on every backend; SQLite's index of the distinct texts
(schema version 6) and its migration from version 5.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import sqlite_utils

from conftest import user_msg
from test_index import goal, ids
from thread_store import ThreadMetadata, ThreadStore
from thread_store.backends.sqlite._index_schema import MIGRATIONS
from thread_store.backends.sqlite.index import SCHEMA_VERSION as INDEX_VERSION

SEARCHED = ("name", "title", "preview", "first_user_message")
# (name, goal objective, first user message): the goal sets the preview before the
# message does, so these give threads whose four fields are equal, or all different.
THREADS = {
    "same": (None, None, "alpha beta"),
    "named": ("alpha", None, "alpha"),
    "split": ("alpha", "beta gamma", "delta"),
    "cjk": ("修复", "不稳定的测试", "テストを直す"),
    "short": ("ab", "cd", "ef"),
    "image": (None, None, None),  # no text at all: nothing to find
}
# Substrings inside one field, at the start or end of a field, and ones that would only
# match across two fields joined together (alpha|beta, delta|alpha, 修复|不稳定...).
QUERIES = ["alpha", "ALPHA", "pha", "beta", "gamma", "a b", "delta", "lta", "elt",
           "habe", "phabe", "taalpha", "aalp", "ammadel", "gammadelta", "alphadelta",
           "修复", "复不", "复不稳", "不稳定", "测试テ", "试テスト", "テスト", "直す",
           "ab", "bc", "cd", "abc", "bcd", "cdef", "a", "e", "ph", "ha", "alpha gamma",
           "alpha delta", "beta delta", "修 测"]


def make_threads(store: ThreadStore) -> None:
    for tid, (name, objective, message) in THREADS.items():
        store.create_thread(tid)
        items: list[dict[str, object]] = []
        if objective is not None:
            items.append(goal(objective))
        items.append(user_msg(message) if message is not None else
                     {"type": "event_msg", "payload": {"type": "user_message", "images": ["x.png"]}})
        store.append(tid, items)
        if name is not None:
            store.update_metadata(tid, name=name)
    store.flush_all(timeout=10)


def expected(threads: list[ThreadMetadata], query: str) -> list[str]:
    """Threads where every word is a substring of one field (no non-ASCII case here)."""
    def has(meta: ThreadMetadata, word: str) -> bool:
        return any(word.lower() in (getattr(meta, f) or "").lower() for f in SEARCHED)
    return sorted(m.thread_id for m in threads if all(has(m, w) for w in query.split()))


def found(store: ThreadStore, query: str) -> list[str]:
    return sorted(ids(store.list_threads(search=query, include_empty=True, limit=100).threads))


def assert_search_right(store: ThreadStore, thread_ids: frozenset[str] = frozenset(THREADS)) -> None:
    """Every query finds what :func:`expected` says, from the threads' current fields."""
    threads = store.list_threads(include_empty=True, limit=100).threads
    assert {m.thread_id for m in threads} == thread_ids
    for query in QUERIES:
        assert found(store, query) == expected(threads, query), query


def test_fields_that_differ_are_each_searched_and_never_joined(store: ThreadStore) -> None:
    make_threads(store)
    split = store.read_thread("split")
    assert (split.name, split.title, split.preview, split.first_user_message) == (
        "alpha", "delta", "beta gamma", "delta")
    assert_search_right(store)
    # Checks the expectation itself: the boundary queries find nothing, the others do.
    assert found(store, "habe") == found(store, "复不稳") == found(store, "alphadelta") == []
    assert found(store, "alpha delta") == ["split"]


def test_renames_and_removals_keep_search_right(store: ThreadStore) -> None:
    make_threads(store)
    store.update_metadata("split", name="gamma")  # re-indexes the row: old text out
    store.update_metadata("named", name=None)
    store.delete_thread("cjk")
    assert found(store, "alpha") == ["named", "same"]
    assert found(store, "gamma") == ["split"]
    assert found(store, "修复") == found(store, "不稳定") == []
    assert_search_right(store, frozenset(THREADS) - {"cjk"})


def _fts_integrity(index: Path) -> None:
    with sqlite3.connect(index) as conn:
        conn.execute("INSERT INTO threads_fts (threads_fts) VALUES ('integrity-check')")


def test_an_index_from_schema_5_is_migrated_to_distinct_texts(store_path: Path) -> None:
    with ThreadStore.open(store_path) as store:
        make_threads(store)
    index = store_path / "index.db"
    # Make the search table what versions 4 and 5 had: a trigram column per field.
    db = sqlite_utils.Database(sqlite3.connect(index))
    MIGRATIONS[3](db)
    db.execute("PRAGMA user_version = 5")
    db.conn.commit()
    assert db["threads_fts"].columns_dict.keys() == set(SEARCHED)  # type: ignore[union-attr]
    db.conn.close()
    with ThreadStore.open(store_path) as store:
        assert_search_right(store)
        store.update_metadata("split", name="gamma")  # deletes the migrated text
        assert found(store, "gamma") == ["split"] and found(store, "alpha") == ["named", "same"]
    with sqlite3.connect(index) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == INDEX_VERSION == 6
        columns = [r[1] for r in conn.execute("PRAGMA table_info(threads_fts)")]
    assert columns == ["texts"]
    _fts_integrity(index)


def test_each_distinct_text_is_indexed_once(sqlite_store: ThreadStore, store_path: Path) -> None:
    make_threads(sqlite_store)
    index = store_path / "index.db"
    with sqlite3.connect(index) as conn:
        # Trigrams of "alpha beta" (the four fields of "same" hold it three times) are
        # counted once per row: the column holds each text once.
        conn.execute("CREATE VIRTUAL TABLE temp.v USING fts5vocab(main, threads_fts, 'instance')")
        counts = dict(conn.execute("SELECT doc, count(*) FROM temp.v WHERE term = 'alp' GROUP BY doc"))
        rowids = dict(conn.execute("SELECT thread_id, rowid FROM threads"))
    assert counts == {rowids["same"]: 1, rowids["named"]: 1, rowids["split"]: 1}
    _fts_integrity(index)
