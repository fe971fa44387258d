"""The item log in PostgreSQL: ``threads`` (heads, tombstones) and ``items`` (with each
traced append's ``traceparent`` on its last item).

An append is one statement on an autocommit connection: it bumps the thread's head under
the ``threads`` row lock (so ``seq`` is gap-free whatever the concurrency) and inserts the
items from the head it returned. With an idempotency key, the same statement looks the
key up and stores it: a concurrent append with the same key blocks on the row lock, then
on the key's primary key, and its retry finds the first one's generation.
"""

from __future__ import annotations

import secrets
from itertools import groupby
from operator import itemgetter
from typing import Any, Sequence

import psycopg

from ._db import Database
from ._errors import is_outcome_unknown
from ...errors import (InvalidArgument, OutcomeUnknown, StoreClosed, ThreadDiscarded,
                       ThreadExists, ThreadNotFound)
from ...model import EncodedItem
from ...storage import Appended, IdempotencyKey, StoredPage, StoredRow, StoredTraces

_CREATE = """
WITH t AS (
  INSERT INTO {s}.threads (thread_id, incarnation, head, created_us, dirty_since)
  VALUES (%(tid)s, %(inc)s, %(n)s, %(created)s, now())
  ON CONFLICT (thread_id) DO NOTHING RETURNING thread_id),
i AS (
  INSERT INTO {s}.items (thread_id, seq, ts_us, item)
  SELECT t.thread_id, 1, %(ts)s::bigint, %(item)s::text FROM t WHERE %(item)s::text IS NOT NULL)
SELECT count(*) FROM t"""
_HEAD_BUMP = """
UPDATE {s}.threads SET head = head + %(n)s, dirty_since = coalesce(dirty_since, now())
 WHERE thread_id = %(tid)s AND discarded_us IS NULL {guard} RETURNING head"""
# The append's trace context goes on its last item only (NULL when untraced). The arrays
# go in binary: in text format psycopg escapes every quote of the JSON in Python (a
# microbenchmark on the loaded 2-vCPU machine: 170 µs per item, 18 µs in binary).
_INSERT = """
INSERT INTO {s}.items (thread_id, seq, ts_us, item, trace)
SELECT %(tid)s, h.head - %(n)s + u.ord, u.ts_us, u.item,
       CASE WHEN u.ord = %(n)s THEN %(trace)s::text END
  FROM h, unnest(%(ts)b::bigint[], %(items)b::text[]) WITH ORDINALITY AS u(ts_us, item, ord)"""
_APPEND = (f"WITH h AS ({_HEAD_BUMP.replace('{guard}', '')}), i AS ({_INSERT}) "
           "SELECT head FROM h")
#: ``_APPEND`` of one item (most appends): its values as scalars, the item's text in
#: binary. Dumping ``_APPEND``'s two one-element arrays was a quarter of a writer's Python
#: time with 8 writer processes (py-spy), and the server plans no ``unnest``.
_APPEND_ITEM = (f"WITH h AS ({_HEAD_BUMP.replace('{guard}', '')}) "
                "INSERT INTO {s}.items (thread_id, seq, ts_us, item, trace) "
                "SELECT %(tid)s, h.head, %(ts)s::bigint, %(item)b::text, %(trace)s::text FROM h RETURNING seq")
_APPEND_ONCE = (
    "WITH prior AS (SELECT digest, generation FROM {s}.append_keys "
    "WHERE thread_id = %(tid)s AND key = %(key)s), "
    f"h AS ({_HEAD_BUMP.replace('{guard}', 'AND NOT EXISTS (SELECT 1 FROM prior)')}), "
    f"i AS ({_INSERT}), "
    "k AS (INSERT INTO {s}.append_keys (thread_id, key, digest, generation) "
    "SELECT %(tid)s, %(key)s, %(digest)s, head FROM h) "
    "SELECT head, NULL FROM h UNION ALL SELECT generation, digest FROM prior")
_THREAD = ("SELECT head, created_us, discarded_us, incarnation FROM {s}.threads "
           "WHERE thread_id = %s")
#: The thread's row, as :func:`thread_of` reads it (also the barriers' native reads).
THREAD_ROW = _THREAD
_INCARNATIONS = ("SELECT thread_id, incarnation FROM {s}.threads "
                 "WHERE thread_id = ANY(%b::text[]) AND discarded_us IS NULL")
_CREATED = ("SELECT thread_id, created_us FROM {s}.threads "
            "WHERE thread_id = ANY(%b::text[]) AND discarded_us IS NULL")
_READ = ("SELECT seq, ts_us, item FROM {s}.items WHERE thread_id = %s AND seq > %s AND seq <= %s "
         "ORDER BY seq LIMIT %s")
#: The first ``limit`` items of each range, in one statement (the ranges in binary arrays).
_READ_MANY = ("SELECT r.tid, i.seq, i.ts_us, i.item FROM unnest(%b::text[], %b::bigint[], %b::bigint[]) "
              "AS r(tid, after, upto) CROSS JOIN LATERAL (SELECT seq, ts_us, item FROM {s}.items "
              "WHERE thread_id = r.tid AND seq > r.after AND seq <= r.upto ORDER BY seq LIMIT %b) i "
              "ORDER BY r.tid, i.seq")
_HEADS = "SELECT thread_id, head FROM {s}.threads WHERE discarded_us IS NULL"
# The window counts every traced append in the range before LIMIT cuts: one read.
_TRACES = ("SELECT trace, count(*) OVER () FROM {s}.items WHERE thread_id = %s AND seq > %s "
           "AND seq <= %s AND trace IS NOT NULL ORDER BY seq LIMIT %s")


class History:
    """The durable item log of one store (``HistoryLog``)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._closed = False
        self._create = db.q(_CREATE)
        self._append = db.q(_APPEND)
        self._append_item = db.q(_APPEND_ITEM)
        self._append_once = db.q(_APPEND_ONCE)
        self._thread = db.q(_THREAD)
        self._incarnations = db.q(_INCARNATIONS)
        self._created = db.q(_CREATED)
        self._read = db.q(_READ)
        self._read_many = db.q(_READ_MANY)
        self._heads = db.q(_HEADS)
        self._traces = db.q(_TRACES)

    def create(self, thread_id: str, *, created_us: int, first: EncodedItem | None) -> None:
        """Insert the thread's row (and its first item) in one statement."""
        self._check_open()
        params = {"tid": thread_id, "inc": secrets.randbits(63), "created": created_us,
                  "n": 0 if first is None else 1, "ts": None if first is None else first.ts_us,
                  "item": None if first is None else first.text}
        with self._db.connection("creating a thread") as conn:
            row = self._write(conn, self._create, params, "creating thread")
            if row is not None and row[0] == 1:
                return
            found = conn.execute(self._thread, (thread_id,)).fetchone()
        if found is not None and found[2] is not None:
            raise ThreadDiscarded(f"thread {thread_id!r} was discarded; its id cannot be reused")
        raise ThreadExists(f"thread {thread_id!r} already exists; pick another id or omit it")

    def append(self, thread_id: str, items: Sequence[EncodedItem],
               key: IdempotencyKey | None = None, trace: str | None = None) -> Appended:
        """Commit the items at the next ``seq`` values (``HistoryLog.append``)."""
        self._check_open()
        if not items:
            return Appended(self.head(thread_id), written=False)
        params: dict[str, object]
        one_item = key is None and len(items) == 1
        if one_item:
            params = {"tid": thread_id, "n": 1, "ts": items[0].ts_us, "item": items[0].text,
                      "trace": trace}
        else:
            params = {"tid": thread_id, "n": len(items), "ts": [it.ts_us for it in items],
                      "items": [it.text for it in items], "trace": trace}
        with self._db.connection("appending") as conn:
            if key is None:
                query = self._append_item if one_item else self._append
                row = self._write(conn, query, params, "appending to thread")
                if row is not None:
                    return Appended(int(row[0]), written=True)
            else:
                params.update(key=key.key, digest=key.digest)
                for attempt in range(2):
                    try:
                        row = self._write(conn, self._append_once, params, "appending to thread")
                        break
                    except psycopg.errors.UniqueViolation:
                        # The same key committed meanwhile: this retry's snapshot sees it.
                        if attempt:
                            raise
                if row is not None:
                    if row[1] is None:
                        return Appended(int(row[0]), written=True)
                    if row[1] != key.digest:
                        raise InvalidArgument(
                            f"idempotency key {key.key!r} of thread {thread_id!r} was used for "
                            f"other items (generation {row[0]}); use a new key for new items")
                    return Appended(int(row[0]), written=False)
        self._thread_row(thread_id)  # raises: unknown or discarded
        raise ThreadNotFound(f"thread {thread_id!r} does not exist")

    def _write(self, conn: psycopg.Connection[Any], query: bytes,
               params: dict[str, object], what: str) -> Any:
        """Run one autocommit write; a connection lost meanwhile is ``OutcomeUnknown``."""
        try:
            return conn.execute(query, params).fetchone()
        except psycopg.OperationalError as exc:
            if is_outcome_unknown(exc):
                raise OutcomeUnknown(
                    f"{what} {params['tid']!r}: the connection to {self._db.description} broke "
                    "before the server answered; the write may or may not be stored (retry "
                    "with the same idempotency_key to find out)") from exc
            raise

    def head(self, thread_id: str) -> int:
        """The thread's last ``seq``."""
        return self._thread_row(thread_id)[0]

    def created_us(self, thread_id: str) -> int:
        """When the thread was created."""
        return self._thread_row(thread_id)[1]

    def incarnation(self, thread_id: str) -> int:
        """The random incarnation drawn when this creation of the id was made."""
        return self._thread_row(thread_id)[2]

    def incarnations(self, thread_ids: list[str]) -> dict[str, int]:
        """``{thread_id: incarnation}`` of those of ``thread_ids`` that are live, in one read."""
        with self._db.connection("reading incarnations") as conn:
            return {str(t): int(i) for t, i in conn.execute(self._incarnations, (thread_ids,))}

    def created_times(self, thread_ids: list[str]) -> dict[str, int]:
        """``{thread_id: created_us}`` of those of ``thread_ids`` that are live, in one read."""
        with self._db.connection("reading creation times") as conn:
            return {str(t): int(c) for t, c in conn.execute(self._created, (thread_ids,))}

    def _thread_row(self, thread_id: str) -> tuple[int, int, int]:
        with self._db.connection("reading a thread") as conn:
            return thread_of(thread_id, conn.execute(self._thread, (thread_id,)).fetchone())

    def read(self, thread_id: str, after_seq: int, upto_seq: int, limit: int) -> list[StoredRow]:
        """Items ``after_seq < seq <= upto_seq``, at most ``limit``, in ``seq`` order."""
        with self._db.connection("reading history") as conn:
            rows = conn.execute(self._read, (thread_id, after_seq, upto_seq, limit)).fetchall()
        return [StoredRow(int(seq), int(ts), str(text)) for seq, ts, text in rows]

    def read_page(self, thread_id: str, after_seq: int, upto_seq: int, limit: int) -> StoredPage:
        """What :meth:`read` returns, as columns."""
        with self._db.connection("reading history") as conn:
            return StoredPage.of(conn.execute(self._read, (thread_id, after_seq, upto_seq,
                                                           limit)).fetchall())

    def read_many(self, ranges: Sequence[tuple[str, int, int]], limit: int) -> dict[str, StoredPage]:
        """The first ``limit`` items of each ``(thread_id, after_seq, upto_seq)`` as a page,
        in one round trip (``HistoryLog.read_many``); threads with none are left out."""
        params = ([t for t, _, _ in ranges], [a for _, a, _ in ranges], [u for _, _, u in ranges], limit)
        with self._db.connection("reading history") as conn:
            rows = conn.execute(self._read_many, params).fetchall()
        # The statement orders by thread, so each thread's items are consecutive.
        return {str(tid): StoredPage.of([row[1:] for row in items])
                for tid, items in groupby(rows, key=itemgetter(0))}

    def traces(self, thread_id: str, after_seq: int, upto_seq: int, limit: int) -> StoredTraces:
        """The traceparents of appends ending in ``(after_seq, upto_seq]``, at most ``limit``."""
        with self._db.connection("reading trace contexts") as conn:
            rows = conn.execute(self._traces, (thread_id, after_seq, upto_seq, limit)).fetchall()
        return StoredTraces(tuple(str(t) for t, _ in rows), int(rows[0][1]) - len(rows) if rows else 0)

    def heads(self) -> dict[str, int]:
        """Every live thread's head, in one read."""
        with self._db.connection("reading heads") as conn:
            return {str(t): int(h) for t, h in conn.execute(self._heads).fetchall()}

    def position(self) -> int:
        """0: PostgreSQL's WAL keeps commit order, so no index can outlive the items it
        folded (there is no lost tail to detect)."""
        return 0

    def reject_writes(self) -> None:
        """Later writes raise :class:`StoreClosed`."""
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed("the thread store is closed; open it again to write")


def thread_of(thread_id: str, row: tuple[Any, ...] | None) -> tuple[int, int, int]:
    """``(head, created_us, incarnation)`` from the answer to :data:`THREAD_ROW`.

    :raises ThreadNotFound: no row. :raises ThreadDiscarded: a tombstone.
    """
    if row is None:
        raise ThreadNotFound(f"thread {thread_id!r} does not exist; create it with "
                             "create_thread() first")
    if row[2] is not None:
        raise ThreadDiscarded(f"thread {thread_id!r} was discarded")
    return int(row[0]), int(row[1]), int(row[3])
