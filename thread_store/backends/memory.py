"""The in-memory backend: the whole contract in dicts, for users' own tests.

``ThreadStore.open(":memory:")`` gives a fresh store that lives as long as the object:
no files, nothing survives it, and it shares no code with the SQLite backend beyond the
storage ports (it is also the proof that the seam is real). Each thread's items are a list;
the index is a dict of rows. One lock guards the history, and one the index writes, as a
real backend's transactions would.
"""

from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..errors import (InvalidArgument, StorageError, StoreClosed, ThreadDiscarded, ThreadExists,
                      ThreadNotFound, ThreadStoreError)
from ..model import (TEXT_FIELDS, BehindThread, EncodedItem, FailedThread, Page, StoreReport,
                     ThreadMetadata, caller_copy, us_from_utc, utc)
from ..storage import (Appended, Capabilities, Checkpoint, CommitOutcome, CommitResult, Failure,
                       IdempotencyKey, Lag, LazyPages, ListQuery, RowWrite, StoredPage, StoredRow,
                       StoredTraces, checkpoint_each, encode_cursor)

CAPABILITIES = Capabilities(reopen=False, read_only=False, durability_full=False, backup=False,
                            files=False)
#: What ``list_threads(search=...)`` looks in.
_SEARCHED = ("name", "title", "preview", "first_user_message")


@dataclass(slots=True)
class _Thread:
    created_us: int
    #: Counts the creations of ids in this store: unique, unlike a creation time.
    incarnation: int
    items: list[StoredRow] = field(default_factory=list)
    #: When each item was appended (µs): item ``seq`` n at ``n - 1``.
    appended_us: list[int] = field(default_factory=list)
    #: ``{key: (digest, generation)}`` of idempotent appends.
    keys: dict[str, tuple[str, int]] = field(default_factory=dict)
    #: ``(seq of its last item, traceparent)`` of each traced append, in ``seq`` order.
    traces: list[tuple[int, str]] = field(default_factory=list)


def _first(pair: tuple[int, str]) -> int:
    return pair[0]


class MemoryHistory:
    """The item log: a list of rows per thread, and the ids of discarded threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: dict[str, _Thread] = {}
        self._discarded: set[str] = set()
        self._closed = False
        self._creations = 0

    def create(self, thread_id: str, *, created_us: int, first: EncodedItem | None) -> None:
        """Create a thread, with its first item or none."""
        with self._lock:
            self._check_open()
            if thread_id in self._discarded:
                raise ThreadDiscarded(f"thread {thread_id!r} was discarded; its id cannot be reused")
            if thread_id in self._threads:
                raise ThreadExists(f"thread {thread_id!r} already exists; pick another id or omit it")
            self._creations += 1
            thread = self._threads[thread_id] = _Thread(created_us, self._creations)
            if first is not None:
                thread.items.append(StoredRow(1, first.ts_us, first.text))
                thread.appended_us.append(created_us)

    def append(self, thread_id: str, items: Sequence[EncodedItem],
               key: IdempotencyKey | None = None, trace: str | None = None) -> Appended:
        """Append the items at the next ``seq`` values (see ``HistoryLog.append``)."""
        with self._lock:
            self._check_open()
            thread = self._live(thread_id)
            head = len(thread.items)
            if not items:
                return Appended(head, written=False)
            if key is not None and key.key in thread.keys:
                digest, generation = thread.keys[key.key]
                if digest != key.digest:
                    raise InvalidArgument(
                        f"idempotency key {key.key!r} of thread {thread_id!r} was used for "
                        f"other items (generation {generation}); use a new key for new items")
                return Appended(generation, written=False)
            thread.items.extend(StoredRow(head + n, it.ts_us, it.text)
                                for n, it in enumerate(items, 1))
            thread.appended_us.extend([time.time_ns() // 1000] * len(items))
            if key is not None:
                thread.keys[key.key] = (key.digest, len(thread.items))
            if trace is not None:
                thread.traces.append((len(thread.items), trace))
            return Appended(len(thread.items), written=True)

    def head(self, thread_id: str) -> int:
        """The thread's last ``seq``."""
        with self._lock:
            return len(self._live(thread_id).items)

    def created_us(self, thread_id: str) -> int:
        """When the thread was created."""
        with self._lock:
            return self._live(thread_id).created_us

    def incarnation(self, thread_id: str) -> int:
        """Which creation of the id the live thread is."""
        with self._lock:
            return self._live(thread_id).incarnation

    def incarnations(self, thread_ids: list[str]) -> dict[str, int]:
        """``{thread_id: incarnation}`` of those of ``thread_ids`` that are live."""
        with self._lock:
            return {t: self._threads[t].incarnation for t in thread_ids if t in self._threads}

    def created_times(self, thread_ids: list[str]) -> dict[str, int]:
        """``{thread_id: created_us}`` of those of ``thread_ids`` that are live."""
        with self._lock:
            return {t: self._threads[t].created_us for t in thread_ids if t in self._threads}

    def is_live(self, thread_id: str, incarnation: int) -> bool:
        """Whether that creation of the thread is the live one."""
        with self._lock:
            thread = self._threads.get(thread_id)
            return thread is not None and thread.incarnation == incarnation

    def read(self, thread_id: str, after_seq: int, upto_seq: int, limit: int) -> list[StoredRow]:
        """Items ``after_seq < seq <= upto_seq``, at most ``limit``; ``seq`` n is at n - 1."""
        with self._lock:
            thread = self._threads.get(thread_id)
            if thread is None:
                return []
            return thread.items[after_seq:min(upto_seq, after_seq + limit)]

    def read_page(self, thread_id: str, after_seq: int, upto_seq: int, limit: int) -> StoredPage:
        """What :meth:`read` returns, as columns."""
        return StoredPage.of([(r.seq, r.ts_us, r.text)
                              for r in self.read(thread_id, after_seq, upto_seq, limit)])

    def read_many(self, ranges: Sequence[tuple[str, int, int]], limit: int) -> Mapping[str, StoredPage]:
        """:meth:`read_page` for each range (``HistoryLog.read_many``)."""
        return LazyPages(self.read_page, ranges, limit)

    def traces(self, thread_id: str, after_seq: int, upto_seq: int, limit: int) -> StoredTraces:
        """The traceparents of appends ending in ``(after_seq, upto_seq]``, at most ``limit``."""
        with self._lock:
            thread = self._threads.get(thread_id)
            if thread is None:
                return StoredTraces(())
            stored = thread.traces
            found = stored[bisect.bisect_right(stored, after_seq, key=_first):
                           bisect.bisect_right(stored, upto_seq, key=_first)]
        return StoredTraces(tuple(t for _, t in found[:limit]), max(0, len(found) - limit))

    def heads(self) -> dict[str, int]:
        """Every live thread's head."""
        with self._lock:
            return {t: len(thread.items) for t, thread in self._threads.items()}

    def position(self) -> int:
        """Nothing to detect: memory loses no tail while the object lives."""
        return 0

    def behind(self, projected: Callable[[str], int]) -> list[tuple[int, BehindThread]]:
        """``(since_us, thread)`` of the threads whose ``projected(thread_id)`` is below
        their head; since: when the first item past it was appended."""
        with self._lock:
            found = []
            for thread_id, thread in self._threads.items():
                done = projected(thread_id)
                if done < len(thread.items):
                    found.append((thread.appended_us[done],
                                  BehindThread(thread_id, len(thread.items), done)))
            return found

    def live_count(self) -> int:
        """How many live threads it holds."""
        with self._lock:
            return len(self._threads)

    def remove(self, thread_id: str, *, tombstone: bool) -> None:
        """Forget the thread; remember a discarded id."""
        with self._lock:
            self._check_open()
            self._live(thread_id)
            del self._threads[thread_id]
            if tombstone:
                self._discarded.add(thread_id)

    def reject_writes(self) -> None:
        """Later writes raise :class:`StoreClosed`."""
        with self._lock:
            self._closed = True

    def _live(self, thread_id: str) -> _Thread:
        thread = self._threads.get(thread_id)
        if thread is not None:
            return thread
        if thread_id in self._discarded:
            raise ThreadDiscarded(f"thread {thread_id!r} was discarded")
        raise ThreadNotFound(f"thread {thread_id!r} does not exist; create it with create_thread() first")

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed("the thread store is closed; open it again to write")


@dataclass(frozen=True, slots=True)
class _Row:
    meta: ThreadMetadata
    fold_state: str
    recency_us: int


class MemoryIndex:
    """The projected rows in a dict; listing sorts the matching rows (fine for tests).

    A row shares no mutable value (``token_usage``) with its writer or its readers, as a
    row read back from a database would not: each side gets its own copy.
    """

    def __init__(self, history: MemoryHistory) -> None:
        self.write_lock = threading.Lock()
        self._history = history
        self._rows: dict[str, _Row] = {}
        self._failures: dict[str, Failure] = {}
        self._fenced = False

    def read(self, thread_id: str) -> ThreadMetadata | None:
        """The row's metadata, or ``None``."""
        row = self._rows.get(thread_id)
        return None if row is None else caller_copy(row.meta)

    def list(self, query: ListQuery) -> Page:
        """Filter, sort newest first, and cut one page after the cursor."""
        words = [w.casefold() for w in query.words]
        rows = [r for r in list(self._rows.values()) if _listed(r, query, words)]
        rows.sort(key=lambda r: (r.recency_us, r.meta.thread_id), reverse=True)
        page = rows[:query.limit + 1]
        threads = [caller_copy(r.meta) for r in page[:query.limit]]
        next_cursor = None
        if len(page) > query.limit:
            last = page[query.limit - 1]
            next_cursor = encode_cursor(query, last.recency_us, last.meta.thread_id)
        return Page(threads=threads, next_cursor=next_cursor)

    def checkpoint(self, thread_id: str) -> Checkpoint:
        """The row's ``projected_seq`` and fold state, and the recorded failure."""
        row = self._rows.get(thread_id)
        failure = self._failures.get(thread_id)
        error = None if failure is None else failure.error
        if row is None:
            return Checkpoint(0, None, error)
        return Checkpoint(row.meta.projected_seq, row.fold_state, error)

    def checkpoints(self, thread_ids: Sequence[str]) -> dict[str, Checkpoint]:
        """:meth:`checkpoint` of those with a row (``MetadataIndex.checkpoints``)."""
        return checkpoint_each(self.checkpoint, thread_ids)

    def commit(self, rows: Sequence[RowWrite], *, position: int,
               may_write: Callable[[str], bool], deadline: float | None,
               between_rows: Callable[[], None] | None = None) -> CommitResult:
        """Store the rows under the write lock, all at once (``MetadataIndex.commit``;
        no I/O, so ``between_rows`` is not called)."""
        del between_rows
        wait = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        if not self.write_lock.acquire(timeout=wait):
            return CommitResult(CommitOutcome.BUSY)
        try:
            if self._fenced:
                return CommitResult(CommitOutcome.FENCED)
            refused = frozenset(r.meta.thread_id for r in rows if not may_write(r.meta.thread_id))
            gone = frozenset(r.meta.thread_id for r in rows if r.meta.thread_id not in refused
                             and not self._history.is_live(r.meta.thread_id, r.incarnation))
            errors: dict[str, ThreadStoreError] = {}
            for row in rows:
                thread_id = row.meta.thread_id
                if thread_id in refused or thread_id in gone:
                    continue
                problem = _unstorable(row.meta)
                if problem is not None:
                    errors[thread_id] = StorageError(problem)
                    continue
                if self.projected(thread_id) > row.meta.projected_seq:
                    continue  # the stored row covers more: it never moves back
                recency = row.meta.recency_at
                self._rows[thread_id] = _Row(caller_copy(row.meta), row.fold_state,
                                             0 if recency is None else us_from_utc(recency))
                failure = self._failures.get(thread_id)
                if failure is not None and failure.generation <= row.meta.projected_seq:
                    del self._failures[thread_id]
            return CommitResult(CommitOutcome.COMMITTED, errors, refused, gone)
        finally:
            self.write_lock.release()

    def projected(self, thread_id: str) -> int:
        """The row's ``projected_seq``, 0 without a row."""
        row = self._rows.get(thread_id)
        return 0 if row is None else row.meta.projected_seq

    def failures(self, limit: int) -> Sequence[FailedThread]:
        """Up to ``limit`` recorded failures, by thread id."""
        with self.write_lock:
            recorded = sorted(self._failures.values(), key=lambda f: f.thread_id)
        return [FailedThread(f.thread_id, f.error) for f in recorded[:limit]]

    def record_failures(self, failures: Sequence[Failure]) -> None:
        """Record each failure unless a row already covers its generation; after
        :meth:`fence`, nothing (a fenced index takes no write)."""
        with self.write_lock:
            if self._fenced:
                return
            for failure in failures:
                row = self._rows.get(failure.thread_id)
                if row is None or row.meta.projected_seq < failure.generation:
                    self._failures[failure.thread_id] = failure

    def delete_row(self, thread_id: str) -> None:
        """Forget a thread's row and failure (the caller holds ``write_lock``)."""
        self._rows.pop(thread_id, None)
        self._failures.pop(thread_id, None)

    def fence(self, timeout: float) -> bool:
        """No commit lands after this returns; waits for one under way up to ``timeout``."""
        self._fenced = True
        if not self.write_lock.acquire(timeout=timeout):
            return False
        self.write_lock.release()
        return True

    @property
    def fenced(self) -> bool:
        """Whether :meth:`fence` ran."""
        return self._fenced


def _listed(row: _Row, query: ListQuery, words: list[str]) -> bool:
    meta = row.meta
    if (meta.archived_at is not None) != query.archived:
        return False
    if not query.include_empty and not meta.preview:
        return False
    if query.cwd is not None and meta.cwd != query.cwd:
        return False
    if query.after is not None and (row.recency_us, meta.thread_id) >= query.after:
        return False
    texts = [t.casefold() for t in (getattr(meta, c) for c in _SEARCHED) if t]
    return all(any(w in t for t in texts) for w in words)


def _unstorable(meta: ThreadMetadata) -> str | None:
    """Why a row cannot be stored as text (lone surrogates do not encode), or ``None``."""
    for name in TEXT_FIELDS:
        value = getattr(meta, name)
        if value is not None:
            try:
                value.encode()
            except UnicodeEncodeError:
                return f"the thread's {name} cannot be stored: it is not valid Unicode text"
    return None


class MemoryStorage:
    """A fresh in-memory store (see the module doc)."""

    capabilities = CAPABILITIES
    read_only = False
    description = ":memory:"
    path: Path | None = None

    def __init__(self) -> None:
        """Use :meth:`open`."""
        self.history = MemoryHistory()
        self.index = MemoryIndex(self.history)

    @classmethod
    def open(cls, *, durability: str, read_only: bool, rules_id: str) -> MemoryStorage:
        """A fresh store; the options that do not apply are refused.

        :raises InvalidArgument: ``read_only=True`` or ``durability="full"``.
        """
        if read_only:
            raise InvalidArgument("read_only=True does not apply to ':memory:': an in-memory "
                                  "store has no other writer to read beside")
        if durability != "normal":
            raise InvalidArgument("durability='full' does not apply to ':memory:': nothing in "
                                  "memory survives power loss; use a directory path")
        del rules_id  # a fresh store holds no rows of other rules
        return cls()

    def async_reads(self) -> None:
        """None: no asyncio driver here; async barriers read in an executor thread."""
        return None

    def lagging(self) -> list[Lag]:
        """Nothing: a fresh store is caught up."""
        return []

    def stale(self, older_than: float) -> list[Lag]:
        """The threads behind whose first unprojected item is older than ``older_than``
        seconds (in one process, only a paused or failing projector leaves any)."""
        since = time.time_ns() // 1000 - int(older_than * 1_000_000)
        return [Lag(b.thread_id, b.head_seq, b.projected_seq)
                for appended_us, b in self.history.behind(self.index.projected)
                if appended_us <= since]

    def report(self, limit: int) -> StoreReport:
        """Compare every thread's head with its row (memory holds few threads)."""
        behind = sorted(self.history.behind(self.index.projected),
                        key=lambda found: (found[0], found[1].thread_id))
        return StoreReport(
            schema_version={"memory": 1}, threads=self.history.live_count(),
            threads_behind=len(behind),
            items_behind=sum(b.head_seq - b.projected_seq for _, b in behind),
            oldest_behind_since=utc(behind[0][0]) if behind else None,
            behind=[b for _, b in behind[:limit]], failed=list(self.index.failures(limit)))

    def remove_thread(self, thread_id: str, *, tombstone: bool,
                      deadline: float | None = None) -> None:
        """Drop the row and the history under the index write lock, so no commit sees
        half of it. ``deadline`` bounds waiting on other processes: there are none."""
        del deadline
        with self.index.write_lock:
            if self.index.fenced:
                raise StoreClosed(f"the store closed; thread {thread_id!r} was not removed")
            self.index.delete_row(thread_id)
            self.history.remove(thread_id, tombstone=tombstone)

    def housekeeping_due_at(self) -> float:
        """Never: there is no deferred bookkeeping."""
        return float("inf")

    def housekeep(self) -> None:
        """Nothing to do."""

    def backup(self, dest: Path) -> None:
        """Refused: there are no files to copy."""
        raise InvalidArgument("an in-memory store has no files to back up; use a directory "
                              "path store for backup()")

    def reject_writes(self) -> None:
        """Later history writes raise :class:`StoreClosed`."""
        self.history.reject_writes()

    def close(self) -> None:
        """Nothing to release: the dicts go with the object."""

    def abandon(self) -> None:
        """Nothing to release."""
