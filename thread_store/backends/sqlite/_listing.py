"""Listing the index: one page of threads, newest recency first, by keyset pagination.

The keyset runs over ``(recency_us desc, thread_id desc)`` on covering indexes; search is
FTS5 (a trigram table over each thread's distinct searched texts, see
:mod:`._index_schema`), with LIKE for words too short for it.
"""

from __future__ import annotations

from typing import Any

from ._connections import ConnectionPool
from ._index_schema import SEARCHED, SELECT, row_to_metadata
from ...model import Page, us_from_utc
from ...storage import ListQuery, encode_cursor

#: The trigram table matches words this long; shorter ones are matched with LIKE.
_TRIGRAM = 3


def list_page(readers: ConnectionPool, query: ListQuery) -> Page:
    """One page of ``query`` (see :meth:`Index.list <thread_store.backends.sqlite.index.Index.list>`)."""
    words = query.words
    where = ["is_archived = ?"]
    params: list[Any] = [int(query.archived)]
    if not query.include_empty:
        where.append("has_preview = 1")
    if query.cwd is not None:
        where.append("cwd = ?")
        params.append(query.cwd)
    long = [w for w in words if len(w) >= _TRIGRAM]
    if long:
        where.append("rowid IN (SELECT rowid FROM threads_fts WHERE threads_fts MATCH ?)")
        # Each word a phrase: the trigram table then matches it as a substring.
        params.append(" AND ".join('"' + w.replace('"', '""') + '"' for w in long))
    for word in words:
        if len(word) < _TRIGRAM:  # too short for trigrams: LIKE (case-insensitive for ASCII)
            where.append("(" + " OR ".join(f"{c} LIKE ? ESCAPE '\\'" for c in SEARCHED) + ")")
            params.extend([_like_pattern(word)] * len(SEARCHED))
    if query.after is not None:
        where.append("(recency_us, thread_id) < (?, ?)")
        params.extend(query.after)
    sql = (f"{SELECT} WHERE {' AND '.join(where)} "
           "ORDER BY recency_us DESC, thread_id DESC LIMIT ?")
    rows = readers.fetchall("the index", sql, (*params, query.limit + 1))
    threads = [row_to_metadata(r) for r in rows[:query.limit]]
    next_cursor = None
    if len(rows) > query.limit:
        last = threads[-1]
        assert last.recency_at is not None
        next_cursor = encode_cursor(query, us_from_utc(last.recency_at), last.thread_id)
    return Page(threads=threads, next_cursor=next_cursor)


def _like_pattern(word: str) -> str:
    """``%word%`` with LIKE's own wildcards escaped."""
    escaped = word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"
