"""The append path of :class:`~.history.History`: appends committed in groups.

Concurrent appenders of a process share one transaction (:mod:`._group`): the leader
holds the in-process writer lock and the writers' file lock once for the group, writes
every append, and commits once, so with ``durability="full"`` the group pays one fsync,
and with several processes one round of the file lock. Each append stays all or
nothing: one that fails (an unknown thread, an idempotency conflict, a SQLite error of
its own statements) is rolled back alone and gets its error; a failed COMMIT fails every
append of the group, and none of them is stored. No append returns before the COMMIT of
its group did.

A mixin of :class:`~.history.History`, on its writer connection and under its locks.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Callable, Sequence, TypeVar

from . import _connections
from ._checkpoints import Checkpoints
from ._group import GroupCommit, Pending
from ...errors import InvalidArgument, StorageError, StoreClosed, ThreadStoreError
from ...model import EncodedItem
from ...storage import Appended, IdempotencyKey

T = TypeVar("T")
INSERT = "INSERT INTO items (thread_id, seq, ts_us, item) VALUES (?, ?, ?, ?)"
# Only a traced append binds the trace column: an untraced one runs the INSERT it always did.
_INSERT_TRACED = "INSERT INTO items (thread_id, seq, ts_us, item, trace) VALUES (?, ?, ?, ?, ?)"
_KEY_FIND = "SELECT digest, generation FROM idempotency WHERE thread_id = ? AND key = ?"
_KEY_STORE = "INSERT INTO idempotency (thread_id, key, digest, generation) VALUES (?, ?, ?, ?)"
#: Why a write is refused once close began.
CLOSED = "the thread store is closed; open it again to write"


#: One append waiting for its group commit: ``(thread_id, items, key, trace)``. A plain
#: tuple, not a record: it never leaves this module, and it is built on every append.
_Append = tuple[str, Sequence[EncodedItem], IdempotencyKey | None, str | None]
#: Rows of the items table, without and with the trace column.
_Row = tuple[str, int, int, str]
_TracedRow = tuple[str, int, int, str, str]


#: What one append of a group wrote (its outcome and last rowid), or why it failed alone.
_Written = tuple[Appended, int | None] | ThreadStoreError


def _insert(thread_id: str, head: int, items: Sequence[EncodedItem],
            trace: str | None) -> tuple[str, list[tuple[str | int | None, ...]]]:
    """The INSERT of an append's items and its parameters: the trace context, if any, on
    the last item."""
    if trace is None:
        return INSERT, [(thread_id, head + i, it.ts_us, it.text) for i, it in enumerate(items, 1)]
    last = len(items)
    return _INSERT_TRACED, [(thread_id, head + i, it.ts_us, it.text, trace if i == last else None)
                            for i, it in enumerate(items, 1)]


def _append_error(exc: sqlite3.Error | ThreadStoreError) -> ThreadStoreError:
    """The error of one append whose group's transaction SQLite failed or rolled back,
    chained to it (each append of a group gets its own instance, raised in its own
    caller's thread). None of the group is stored, so it is never ``OutcomeUnknown``."""
    error = (_connections.storage_error(exc, "append") if isinstance(exc, sqlite3.Error)
             else StorageError(f"append: the group's transaction was rolled back ({exc}); "
                               "nothing of it was stored"))
    error.__cause__ = exc
    return error


class _RowsFailed(Exception):
    """A statement of rows written together failed: the transaction is redone one append
    at a time, to find the append at fault."""


class GroupAppends:
    """The append path of :class:`~.history.History`, which provides the attributes and
    the helpers declared here."""

    lock: threading.Lock
    last_rowid: int
    _conn: sqlite3.Connection
    _closed: bool
    _heads: dict[str, int]
    checkpoints: Checkpoints

    if TYPE_CHECKING:  # History's write path and head cache
        def _writers(self) -> AbstractContextManager[object]: ...

        def _write(self, body: Callable[[], T], what: str, *, txn: bool = True) -> T: ...

        def _load_head(self, thread_id: str) -> int: ...

        def _raise_last_rowid(self, rowid: int | None) -> None: ...

    def _start_appends(self) -> None:
        """Set up the queue (from ``History.__init__``)."""
        self._group: GroupCommit[_Append, Appended] = GroupCommit(self._commit_group)
        #: While a commit is in flight, a rowid at or above every row it writes; else 0.
        self.rowid_bound = 0
        #: Transactions that committed appended items (with ``full``, one fsync each).
        self.append_commits = 0

    def append(self, thread_id: str, items: Sequence[EncodedItem],
               key: IdempotencyKey | None = None, trace: str | None = None) -> Appended:
        """Append items durably at the next ``seq`` values (see ``HistoryLog.append``).

        Concurrent appends of this process commit together: one transaction (and one
        fsync) for the group, each append all or nothing in it.
        """
        return self._group.submit((thread_id, items, key, trace))

    def _commit_group(self, own: _Append, group: GroupCommit[_Append, Appended]) -> Appended:
        """Lead a group commit: take the queued appends once both writer locks are held
        (so appends that queued while the leader waited for them join), write and commit
        them with the leader's own; resolve each, and return the leader's outcome."""
        with self.lock:
            if self._closed:
                for pending in group.take():
                    pending.fail(StoreClosed(CLOSED))
                raise StoreClosed(CLOSED)
            with self._writers():
                followers = group.take()
                # SQLite gives each new row the highest rowid plus one, and no other
                # process writes now: until this commit is published, position() (read
                # without the lock) answers at least the rowids it may write.
                rows = len(own[1])
                if followers:
                    rows += sum(len(pending.request[1]) for pending in followers)
                self.rowid_bound = self.last_rowid + rows
                try:
                    if not followers:
                        return self._commit_alone(own)
                    return self._commit_together(own, followers)
                finally:
                    self.rowid_bound = 0

    def _commit_alone(self, append: _Append) -> Appended:
        """One append in its own transaction; a single item in autocommit (one statement
        is one transaction: no BEGIN/COMMIT round trips)."""
        thread_id, items, key, _ = append
        head = self._heads.get(thread_id)
        if head is None:
            head = self._load_head(thread_id)
        try:
            if len(items) > 1 or (key is not None and items):
                done, rowid = _connections.in_transaction(
                    self._conn, lambda: self._write_one(append, head))
            else:
                done, rowid = self._write_one(append, head)
        except sqlite3.Error as exc:
            raise _connections.storage_error(exc, "append") from exc
        if rowid is not None:
            self._published(rowid)
            self._heads[thread_id] = done.generation
        return done

    def _commit_together(self, own: _Append,
                         followers: list[Pending[_Append, Appended]]) -> Appended:
        """Several appends in one transaction (see the module docstring)."""
        appends = [own, *(pending.request for pending in followers)]
        written: list[_Written] = []
        try:
            try:
                heads, top = self._write_group(appends, written, batched=True)
            except _RowsFailed:
                # One of the rows written together failed: write the appends one by one
                # (each alone in its savepoint when it needs one) to fail only its own.
                written.clear()
                heads, top = self._write_group(appends, written, batched=False)
        except (sqlite3.Error, ThreadStoreError) as exc:
            # Written and rolled back, or never reached: none is stored. (An append's own
            # error that ended the whole transaction is re-raised by _write_isolated.)
            outcomes: list[Appended | ThreadStoreError] = [
                w if isinstance(w, ThreadStoreError) else _append_error(exc) for w in written]
            outcomes += [_append_error(exc) for _ in appends[len(written):]]
        else:
            if top is not None:
                self._published(top)
                self._heads.update(heads)
            outcomes = [w if isinstance(w, ThreadStoreError) else w[0] for w in written]
        for pending, outcome in zip(followers, outcomes[1:]):
            if isinstance(outcome, ThreadStoreError):
                pending.fail(outcome)
            else:
                pending.resolve(outcome)
        if isinstance(outcomes[0], ThreadStoreError):
            raise outcomes[0]
        return outcomes[0]

    def _write_group(self, appends: list[_Append], written: list[_Written], *,
                     batched: bool) -> tuple[dict[str, int], int | None]:
        """Write the appends in one transaction, each outcome into ``written``; return
        the heads written and the highest rowid (``None``: nothing was written).

        ``batched``: appends of one item and no key, the usual ones, are written
        together in one ``executemany`` (each statement releases the GIL, and on a busy
        process every reacquisition can wait for another thread's switch interval);
        if one of those rows fails, :class:`_RowsFailed` says which transaction to redo.
        """
        heads: dict[str, int] = {}
        tops: list[int] = []

        def body() -> None:
            rows: list[_Row] = []
            traced: list[_TracedRow] = []
            for append in appends:
                thread_id, items, key, trace = append
                if batched and len(items) == 1 and key is None:
                    try:
                        head = self._group_head(thread_id, heads)
                    except ThreadStoreError as exc:
                        written.append(exc)
                        continue
                    heads[thread_id] = head + 1
                    item = items[0]
                    if trace is None:
                        rows.append((thread_id, head + 1, item.ts_us, item.text))
                    else:
                        traced.append((thread_id, head + 1, item.ts_us, item.text, trace))
                    written.append((Appended(head + 1, written=True), None))
                    continue
                self._write_rows(rows, traced, tops)  # the rows before it come first
                outcome = self._write_isolated(append, heads)
                written.append(outcome)
                if not isinstance(outcome, ThreadStoreError) and outcome[1] is not None:
                    tops.append(outcome[1])
            self._write_rows(rows, traced, tops)

        _connections.in_transaction(self._conn, body)
        return heads, max(tops, default=None)

    def _write_rows(self, rows: list[_Row], traced: list[_TracedRow], tops: list[int]) -> None:
        """Insert the batched rows (then forget them); their last rowid goes to ``tops``."""
        if not rows and not traced:
            return
        try:
            if rows:
                self._conn.executemany(INSERT, rows)
            if traced:
                self._conn.executemany(_INSERT_TRACED, traced)
        except sqlite3.Error as exc:
            raise _RowsFailed from exc
        tops.append(int(self._conn.execute("SELECT last_insert_rowid()").fetchone()[0]))
        rows.clear()
        traced.clear()

    def _group_head(self, thread_id: str, heads: dict[str, int]) -> int:
        """The head an append of the group writes after: what the group wrote to the
        thread so far, else the committed head."""
        head = heads.get(thread_id)
        if head is None:
            head = self._heads.get(thread_id)
        if head is None:
            head = self._load_head(thread_id)
        return head

    def _write_isolated(self, append: _Append, heads: dict[str, int]) -> _Written:
        """Write one append of a group (transaction open), or return why it failed
        alone, having written nothing. A SQLite error that ended the whole transaction
        raises."""
        # A single INSERT is atomic by itself (SQLite's statement journal undoes a failed
        # statement), and every check comes before the first write: only appends of
        # several statements pay for a savepoint.
        thread_id, items, key, _ = append
        savepoint = len(items) > 1 or key is not None
        if savepoint:
            self._conn.execute("SAVEPOINT one_append")
        try:
            outcome = self._write_one(append, self._group_head(thread_id, heads))
        except (ThreadStoreError, sqlite3.Error) as exc:
            if not self._conn.in_transaction:
                raise  # SQLite rolled the whole transaction back (a full disk, I/O)
            if savepoint:
                self._conn.execute("ROLLBACK TO one_append")
                self._conn.execute("RELEASE one_append")
            return _append_error(exc) if isinstance(exc, sqlite3.Error) else exc
        if savepoint:
            self._conn.execute("RELEASE one_append")
        if outcome[1] is not None:
            heads[thread_id] = outcome[0].generation
        return outcome

    def _write_one(self, append: _Append, head: int) -> tuple[Appended, int | None]:
        """Write one append's statements after ``head`` (locks held); return its outcome
        and the last rowid it wrote (``None``: it wrote nothing)."""
        thread_id, items, key, trace = append
        if not items:
            return Appended(head, written=False), None
        if key is not None:
            found = self._conn.execute(_KEY_FIND, (thread_id, key.key)).fetchone()
            if found is not None:
                if found[0] != key.digest:
                    raise InvalidArgument(
                        f"idempotency key {key.key!r} of thread {thread_id!r} was used for "
                        f"other items (generation {found[1]}); use a new key for new items")
                return Appended(int(found[1]), written=False), None
        generation = head + len(items)
        if len(items) == 1:
            # The hot path: its parameters are built inline (the helper costs ~0.5 µs).
            item = items[0]
            row: tuple[str | int, ...] = (thread_id, generation, item.ts_us, item.text)
            insert, row = (INSERT, row) if trace is None else (_INSERT_TRACED, (*row, trace))
            rowid = self._conn.execute(insert, row).lastrowid
        else:
            insert, rows = _insert(thread_id, head, items, trace)
            self._conn.executemany(insert, rows)
            # executemany sets no lastrowid; the key's table is WITHOUT ROWID, so
            # storing the key below leaves last_insert_rowid() alone
            rowid = int(self._conn.execute("SELECT last_insert_rowid()").fetchone()[0])
        if key is not None:
            self._conn.execute(_KEY_STORE, (thread_id, key.key, key.digest, generation))
        return Appended(generation, written=True), rowid

    def _published(self, rowid: int) -> None:
        """After a commit that wrote items (lock held), before the heads it wrote are
        cached: count it, and raise the position."""
        self.append_commits += 1
        self.checkpoints.committed()
        self._raise_last_rowid(rowid)
