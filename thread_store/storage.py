"""The storage seam: the ports the contract needs and the records that cross them.

The contract (projector, barriers, the facades) talks to storage only through these
ports; each backend under :mod:`thread_store.backends` implements them and owns its
driver, SQL, locks, files and its one error boundary. Every port method raises only
:class:`~thread_store.errors.ThreadStoreError` subclasses (a driver's own error is chained
as ``__cause__``), and a transient failure is a
:class:`~thread_store.errors.TransientStorageError`, which projections retry.

Three roles:

- :class:`HistoryLog`: the durable, append-only item log (per-thread ``seq``, tombstones,
  idempotency keys). It is the truth.
- :class:`MetadataIndex`: one projected row per thread, written with its
  ``projected_seq`` in one statement: the only truth for barriers (DESIGN §1.3).
- :class:`Storage`: one open backend: both roles plus the operations that span them
  (removal, recovery at open, fencing at close, housekeeping).
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

from .errors import InvalidCursor, ThreadStoreError
from .model import THREAD_ID_PATTERN, EncodedItem, Page, StoreReport, ThreadMetadata

#: The ``open`` target of the in-memory backend.
MEMORY = ":memory:"

# -- records ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredRow:
    """One history item as stored: its ``seq``, its timestamp in µs and its JSON text.

    ``kind`` is the item's ``type`` when the writer still knows it (items buffered by the
    projector); ``None`` for rows read back from storage.
    """

    seq: int
    ts_us: int
    text: str
    kind: str | None = None


@dataclass(frozen=True, slots=True)
class StoredPage:
    """Consecutive history items of one thread as columns: ``texts[i]`` (JSON) was
    stored at ``ts_us[i]``, the last at ``last_seq``.

    No object per item: a catch-up folds millions of them, and building a
    :class:`StoredRow` for each cost as much as reading it.
    """

    last_seq: int
    ts_us: Sequence[int]
    texts: Sequence[str]

    @classmethod
    def of(cls, rows: Sequence[Sequence[Any]]) -> StoredPage:
        """The page of ``rows``, each ``(seq, ts_us, text)`` in ``seq`` order, as a driver
        returns them; an empty page has ``last_seq`` 0."""
        if not rows:
            return cls(0, (), ())
        seqs, ts_us, texts = zip(*rows)
        return cls(int(seqs[-1]), ts_us, texts)


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    """An append's idempotency key and the digest of its items (DESIGN §3)."""

    key: str
    digest: str


@dataclass(frozen=True, slots=True)
class Appended:
    """What an append did: the generation to report, and whether it wrote anything
    (``False`` for an empty append, or a repeated one with the same idempotency key)."""

    generation: int
    written: bool


@dataclass(frozen=True, slots=True)
class StoredTraces:
    """The trace contexts appends stored with their items (:meth:`HistoryLog.traces`)."""

    #: W3C ``traceparent`` strings, one per traced append, in ``seq`` order.
    traceparents: tuple[str, ...]
    #: Traced appends in the range beyond the limit, left out.
    dropped: int = 0


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A thread's projection as stored: ``projected_seq``, the fold state at it (JSON;
    ``None`` while the thread has no row) and the last error recorded for it."""

    projected_seq: int
    fold_state: str | None
    last_error: str | None = None
    #: The incarnation of the thread the row was folded from, as
    #: :meth:`MetadataIndex.checkpoints` gives it where the backend stores it (``None``:
    #: not given).
    incarnation: int | None = None


@dataclass(frozen=True, slots=True)
class Lag:
    """A thread whose projection is behind its history, found at open."""

    thread_id: str
    head: int
    #: The row's ``projected_seq``; ``None`` when it has no row.
    projected: int | None

    @property
    def refold(self) -> bool:
        """Fold from the first item: no row yet, or a row ahead of history (power loss)."""
        return self.projected is None or self.projected > self.head


@dataclass(frozen=True, slots=True)
class RowWrite:
    """A projected row to store: the public metadata, the serialized fold state, and the
    incarnation of the thread it was folded from (see :meth:`HistoryLog.incarnation`)."""

    meta: ThreadMetadata
    fold_state: str
    incarnation: int


@dataclass(frozen=True, slots=True)
class Failure:
    """A projection that failed for good: recorded in the store for ``status()``."""

    thread_id: str
    generation: int
    error: str


class CommitOutcome(enum.Enum):
    """How a :meth:`MetadataIndex.commit` call ended as a whole."""

    #: The transaction committed (rows in ``errors`` or ``refused`` were not written).
    COMMITTED = "committed"
    #: Another writer held the index past the caller's deadline; nothing was written.
    BUSY = "busy"
    #: The index is fenced (the store is closing); nothing was written.
    FENCED = "fenced"


@dataclass(frozen=True, slots=True)
class CommitResult:
    """The result of one group commit of projected rows."""

    outcome: CommitOutcome
    #: Rows the index refused to store (a value it cannot hold), by thread id.
    errors: Mapping[str, ThreadStoreError] = field(default_factory=dict)
    #: Rows skipped because ``may_write`` said no (a removal began).
    refused: frozenset[str] = frozenset()
    #: Rows not written because their thread is no longer live at the row's incarnation
    #: (removed, or deleted and created again, possibly by another process).
    gone: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class ListQuery:
    """One ``list_threads`` call, validated: the filters and the decoded cursor."""

    limit: int
    archived: bool = False
    include_empty: bool = False
    #: Words of the search, each a case-insensitive substring (ANDed); empty: no search.
    words: tuple[str, ...] = ()
    cwd: str | None = None
    #: ``(recency_us, thread_id)`` of the last row of the previous page.
    after: tuple[int, str] | None = None

    def filters(self) -> list[object]:
        """What a cursor is bound to: the same filters must come back with it."""
        return [self.archived, self.include_empty, " ".join(self.words) or None, self.cwd]


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do beyond the contract every backend keeps.

    The contract suite skips a test by these, never by a backend's name.
    """

    #: A store can be closed and opened again with its data (files, a server).
    reopen: bool
    #: ``read_only=True`` opens it for reading beside a writer.
    read_only: bool
    #: ``durability="full"`` (survives power loss) is available.
    durability_full: bool
    #: ``store.backup(dest)`` writes a copy.
    backup: bool
    #: The store lives in files on this machine (file modes, crash tests with kill -9).
    files: bool
    #: ``rebuild_index`` refuses to run while another writer has the store open.
    exclusive_rebuild: bool = False
    #: ``AsyncThreadStore`` barriers read on the event loop (:meth:`Storage.async_reads`),
    #: not in an executor thread.
    native_async_reads: bool = False


# -- the keyset cursor, the same on every backend ---------------------------------------

_CURSOR_VERSION = 2


def encode_cursor(query: ListQuery, recency_us: int, thread_id: str) -> str:
    """The opaque ``next_cursor`` after the row ``(recency_us, thread_id)``."""
    raw = json.dumps([_CURSOR_VERSION, *query.filters(), recency_us, thread_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: object, filters: list[object]) -> tuple[int, str]:
    """Decode a cursor of a query with these ``filters``.

    Only what :func:`encode_cursor` could have written passes: a forged cursor never
    reaches a database with a value it cannot bind.

    :raises InvalidCursor: the cursor is malformed or from another query.
    """
    problem = InvalidCursor(
        "invalid cursor: pass back the next_cursor of a page from the same list_threads "
        "query (same archived, search, cwd and include_empty)")
    if not isinstance(cursor, str) or len(cursor) > 4096:
        raise problem
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        version, *got, recency_us, thread_id = json.loads(raw)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError, RecursionError) as exc:
        raise problem from exc
    if (version != _CURSOR_VERSION or got != filters or type(recency_us) is not int
            or not -(2**63) <= recency_us < 2**63 or not isinstance(thread_id, str)
            or not THREAD_ID_PATTERN.fullmatch(thread_id)):
        raise problem
    return recency_us, thread_id


class LazyPages(Mapping[str, StoredPage]):
    """:meth:`HistoryLog.read_many` by one ``read_page`` per range, when the range is
    looked up, for a backend whose reads cost no round trip: a fold reads its page just
    before folding it (reading the whole batch's first pages first held them all at
    once, and a catch-up folded about a quarter slower)."""

    def __init__(self, read_page: Callable[[str, int, int, int], StoredPage],
                 ranges: Sequence[tuple[str, int, int]], limit: int) -> None:
        self._read_page, self._limit = read_page, limit
        self._ranges = {thread_id: (after, upto) for thread_id, after, upto in ranges}

    def __getitem__(self, thread_id: str) -> StoredPage:
        after, upto = self._ranges[thread_id]
        return self._read_page(thread_id, after, upto, self._limit)

    def __iter__(self) -> Iterator[str]:
        return iter(self._ranges)

    def __len__(self) -> int:
        return len(self._ranges)


def checkpoint_each(checkpoint: Callable[[str], Checkpoint], thread_ids: Sequence[str]) -> dict[str, Checkpoint]:
    """:meth:`MetadataIndex.checkpoints` by one ``checkpoint`` per thread, for a backend
    whose reads cost no round trip."""
    found = {thread_id: checkpoint(thread_id) for thread_id in thread_ids}
    return {thread_id: cp for thread_id, cp in found.items() if cp.fold_state is not None}


# -- what every backend's fence does ----------------------------------------------------


def stop_writer(write_lock: threading.Lock, interrupt: Callable[[float], bool],
                timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for the writer holding ``write_lock`` to let go,
    calling ``interrupt(seconds_left)`` each round to cut its running statement short (a
    new one may have started meanwhile); ``False`` if it did not let go in time, or
    ``interrupt`` says there is nothing left to interrupt. For :meth:`MetadataIndex.fence`,
    once the backend set its fenced flag.
    """
    end = time.monotonic() + timeout
    acquired = write_lock.acquire(blocking=False)
    while not acquired:
        if not interrupt(end - time.monotonic()):
            return False
        left = end - time.monotonic()
        if left <= 0:
            return False
        acquired = write_lock.acquire(timeout=min(0.05, left))
    write_lock.release()
    return True


# -- ports ------------------------------------------------------------------------------


class HistoryLog(Protocol):
    """The durable item log: per-thread ``seq`` allocation, tombstones, paging."""

    def create(self, thread_id: str, *, created_us: int, first: EncodedItem | None) -> None:
        """Create a thread, with its first item (``seq`` 1) or none, atomically.

        :raises ThreadExists: the id is taken. :raises ThreadDiscarded: it was discarded.
        :raises StoreClosed: the store is closing.
        """

    def append(self, thread_id: str, items: Sequence[EncodedItem],
               key: IdempotencyKey | None = None, trace: str | None = None) -> Appended:
        """Commit the items durably at the next ``seq`` values, atomically (all or none).

        With ``key``: a key already stored for the thread with the same digest writes
        nothing and returns the generation of that first append; with another digest it
        raises :class:`InvalidArgument`. The key is stored in the append's transaction.
        Empty ``items`` write nothing and return the head.

        ``trace`` is the W3C ``traceparent`` of the append's span: it is stored once, with
        the append's last item, in the same transaction, so a projection in any process
        can join the append's trace (:meth:`traces`). ``None`` (no tracing) stores nothing.

        :raises ThreadNotFound: unknown id. :raises ThreadDiscarded: discarded id.
        :raises StoreClosed: the store is closing. :raises StorageError: the write failed
            (nothing was stored). :raises OutcomeUnknown: the backend cannot tell.
        """

    def head(self, thread_id: str) -> int:
        """The thread's last ``seq`` in the store (0 for an empty thread).

        :raises ThreadNotFound: unknown id. :raises ThreadDiscarded: discarded id.
        """

    def created_us(self, thread_id: str) -> int:
        """When the thread was created (µs since the epoch).

        :raises ThreadNotFound: unknown id. :raises ThreadDiscarded: discarded id.
        """

    def read(self, thread_id: str, after_seq: int, upto_seq: int, limit: int) -> list[StoredRow]:
        """Up to ``limit`` items with ``after_seq < seq <= upto_seq``, in ``seq`` order;
        an unknown or removed thread has none."""

    def read_page(self, thread_id: str, after_seq: int, upto_seq: int, limit: int) -> StoredPage:
        """What :meth:`read` returns, as columns (the fold's read: no object per item)."""

    def read_many(self, ranges: Sequence[tuple[str, int, int]], limit: int) -> Mapping[str, StoredPage]:
        """For each ``(thread_id, after_seq, upto_seq)`` of distinct threads, what
        :meth:`read_page` gives with ``limit``, by thread id (a thread with none may be left
        out): a projection reads the first page of its whole batch at once where a read
        costs a round trip. A backend whose reads cost none may read each page when it is
        looked up (:class:`LazyPages`)."""

    def traces(self, thread_id: str, after_seq: int, upto_seq: int, limit: int) -> StoredTraces:
        """The ``traceparent`` stored by each append whose last item has
        ``after_seq < seq <= upto_seq``, in ``seq`` order, at most ``limit`` of them;
        ``dropped`` counts the others. Untraced appends have none; an unknown or removed
        thread has none."""

    def heads(self) -> dict[str, int]:
        """``{thread_id: head}`` of every live thread (reindex), in one read."""

    def incarnation(self, thread_id: str) -> int:
        """An identifier of this creation of the id: it differs once the thread was
        deleted and an id-equal thread created, so no fold of the old one is stored as
        the new one's row.

        :raises ThreadNotFound: unknown id. :raises ThreadDiscarded: discarded id.
        """

    def incarnations(self, thread_ids: list[str]) -> dict[str, int]:
        """``{thread_id: incarnation}`` of those of ``thread_ids`` that are live, in one
        read: a projection attempt asks for its whole batch."""

    def created_times(self, thread_ids: list[str]) -> dict[str, int]:
        """``{thread_id: created_us}`` of those of ``thread_ids`` that are live, in one
        read: a batch of folds from the first item (a catch-up) asks for all of them."""

    def position(self) -> int:
        """A mark at or above every item committed so far. Taken before a fold and passed
        to :meth:`MetadataIndex.commit`, it lets a backend detect, after a power loss,
        an index that folded items its history lost. Backends that need none return 0."""


class MetadataIndex(Protocol):
    """The projected table: one row per thread, written with its ``projected_seq``."""

    def read(self, thread_id: str) -> ThreadMetadata | None:
        """The thread's projected metadata, or ``None`` while it has no row."""

    def list(self, query: ListQuery) -> Page:
        """One page of rows, newest ``recency_at`` first, keyset-paginated (DESIGN §3)."""

    def checkpoint(self, thread_id: str) -> Checkpoint:
        """Where the thread's projection stands in the store (``projected_seq`` 0 and no
        fold state without a row), with the failure recorded for it, if any."""

    def checkpoints(self, thread_ids: Sequence[str]) -> dict[str, Checkpoint]:
        """:meth:`checkpoint` of those of ``thread_ids`` that have a row, in one read: a
        projection asks for the threads of its batch that resume no fold of its own."""

    def commit(self, rows: Sequence[RowWrite], *, position: int,
               may_write: Callable[[str], bool], deadline: float | None,
               between_rows: Callable[[], None] | None = None) -> CommitResult:
        """Write the rows in one transaction (a group commit), each with its
        ``projected_seq``; a row's write clears the failure recorded for it.

        ``may_write(thread_id)`` is asked for every row inside the writer's critical
        section, after which no removal of that thread can interleave: rows it refuses are
        skipped. A row whose thread is not live at its incarnation any more is skipped
        (``gone``), whichever process removed it. A stored row never moves back: a row
        covering less than the stored one is skipped and counts as written (the store
        holds more). A row the index cannot store fails alone (``errors``). ``deadline``
        (monotonic) bounds the wait for another writer (``BUSY``). After :meth:`fence`,
        nothing is written (``FENCED``). A backend whose rows are Python work between
        short calls that release the GIL calls ``between_rows()`` between two rows, or
        groups of rows (the projector's worker steps aside for appends there).

        :raises TransientStorageError: the transaction failed and may succeed on retry;
            nothing was written. :raises StorageError: it failed for good.
        """

    def record_failures(self, failures: Sequence[Failure]) -> None:
        """Record projections that failed for good, unless a row already covers their
        generation (a later success won the race). Best effort: never raises."""

    def fence(self, timeout: float) -> bool:
        """Stop every write of this process: after it returns ``True`` (within
        ``timeout`` seconds) no commit started here can land; ``False`` if a writer was
        still letting go (it is fenced all the same and writes nothing)."""


class AsyncBarrierReads(Protocol):
    """The reads a barrier makes, as coroutines: the barrier core (``_barriers``, the
    projector's waiter registration) is written once against this port.

    The sync face passes the ports themselves, wrapped so these never suspend; a
    backend with a native asyncio driver gives :meth:`Storage.async_reads`, whose reads
    run on the event loop and hold no thread. Each raises what the sync port raises, and
    waits no longer than the caller's barrier deadline (``_deadlines``).
    """

    async def head(self, thread_id: str) -> int:
        """As :meth:`HistoryLog.head`."""

    async def incarnation(self, thread_id: str) -> int:
        """As :meth:`HistoryLog.incarnation`."""

    async def created_us(self, thread_id: str) -> int:
        """As :meth:`HistoryLog.created_us`."""

    async def checkpoint(self, thread_id: str) -> Checkpoint:
        """As :meth:`MetadataIndex.checkpoint`."""

    async def read(self, thread_id: str) -> ThreadMetadata | None:
        """As :meth:`MetadataIndex.read`."""


class NativeBarrierReads(AsyncBarrierReads, Protocol):
    """:class:`AsyncBarrierReads` on a backend's own asyncio connections (an optional
    port: :meth:`Storage.async_reads`), opened and closed on the event loop."""

    async def open(self) -> None:
        """Get ready on the running loop (a pool sized lazily: no connection yet)."""

    async def close(self) -> None:
        """Release every connection; later reads raise :class:`StoreClosed`."""

    def snapshot(self) -> AsyncBarrierReads:
        """Reads for the start of one barrier on one thread: its target head, its
        registration's checkpoint or incarnation, and the metadata it returns if it did
        not wait, served from one read taken at the first of them. That is as good as
        reading each later (the registration only needs a lower bound of the projection);
        the metadata is served only if that read found the row caught up with the head
        (so it covers every target up to it), else read again. After a wait, read anew
        (through ``self``)."""


class Storage(Protocol):
    """One open backend: its history, its index, and what spans both."""

    @property
    def history(self) -> HistoryLog:
        """The item log."""

    @property
    def index(self) -> MetadataIndex:
        """The projected rows."""

    @property
    def capabilities(self) -> Capabilities:
        """What it can do beyond the contract."""

    @property
    def read_only(self) -> bool:
        """Opened with ``read_only=True``: it never writes (no history writes, no projection)."""

    @property
    def description(self) -> str:
        """Where it lives, for messages (a path, ``:memory:``, a URL without its password)."""

    @property
    def path(self) -> Path | None:
        """The store's directory, for the embedded backend; ``None`` for the others."""

    def async_reads(self) -> NativeBarrierReads | None:
        """New, unopened native asyncio reads for the barriers of an ``AsyncThreadStore``
        (one per store, opened and closed by it), or ``None`` when the backend has no
        asyncio driver: its async barriers then read in an executor thread."""

    def lagging(self) -> list[Lag]:
        """Threads whose projection is behind (or ahead of) their history: run once at
        open, O(threads behind); what it returns is caught up by the projector. A row
        ahead of its history (a power loss) is deleted here, so it is re-folded."""

    def stale(self, older_than: float) -> list[Lag]:
        """Threads behind for more than ``older_than`` seconds: work another process
        left (it crashed, is paused, or is slow), for this one's catch-up; O(threads
        behind). ``older_than=0`` gives every thread behind now (``flush_all``)."""

    def report(self, limit: int) -> StoreReport:
        """The store's projection health, read without writing: live threads, the threads
        behind (O(threads behind), longest first, at most ``limit``) and the recorded
        failures (at most ``limit``)."""

    def remove_thread(self, thread_id: str, *, tombstone: bool,
                      deadline: float | None = None) -> None:
        """Remove a thread's row and history; keep a tombstone (discard) or free the id.

        No projection started before can write the row afterwards (see ``may_write``).
        If it raises, the history is intact, though the row may be gone: the caller
        re-projects the thread from its first item.

        :raises StoreClosed: the index is fenced (closing); nothing was removed.
        :raises DiscardTimeout: another process's projection held the thread past
            ``deadline`` (monotonic); nothing was removed.
        :raises StorageError: the removal failed.
        """

    def housekeeping_due_at(self) -> float:
        """When :meth:`housekeep` should run (monotonic; ``inf``: nothing to do)."""

    def housekeep(self) -> None:
        """Deferred bookkeeping, run by the projector's worker off every caller's path.
        Never raises."""

    def backup(self, dest: Path) -> None:
        """Write a consistent copy into the new directory ``dest`` while writes go on.

        :raises InvalidArgument: the backend has no file copy, or ``dest`` is unusable.
        """

    def reject_writes(self) -> None:
        """Make later history writes raise :class:`StoreClosed` (the first step of close)."""

    def close(self) -> None:
        """Finish deferred bookkeeping and release everything (connections, locks)."""

    def abandon(self) -> None:
        """Release what would block another opener (locks), without I/O on shared
        connections: for garbage collection and the child of a ``fork``."""


__all__ = ["MEMORY", "Appended", "AsyncBarrierReads", "Capabilities", "Checkpoint", "CommitOutcome",
           "CommitResult", "Failure", "HistoryLog", "IdempotencyKey", "Lag", "LazyPages", "ListQuery",
           "MetadataIndex", "NativeBarrierReads", "RowWrite", "Storage", "StoredPage", "StoredRow",
           "StoredTraces", "checkpoint_each", "decode_cursor", "encode_cursor"]
