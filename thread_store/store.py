"""``ThreadStore``: the facade that validates input, owns the lifecycle and keeps the contract.

The contract itself (durable-first appends, generation barriers, retry, discard, shutdown,
recovery, trace propagation) is stated once, in the README and in DESIGN §1.
"""

from __future__ import annotations

import os
import uuid
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Mapping, Sequence

from opentelemetry import metrics, trace

from . import _deadlines, _lifecycle
from ._attempt import ProjectionHook
from ._barriers import Barriers
from ._inputs import check_idempotency_key, encode_items, from_cursor, list_query, session_meta_item
from ._lifecycle import Lifetime
from ._opening import open_parts
from ._options import backend_options, check_path, check_rebuild_options, check_target
from ._phases import RemovalKind
from ._port_reads import PortReads, complete
from ._reads import Reads
from ._writes import Writes
from .backends import drop_index
from .derive import NOT_GIVEN, ProjectionRules, archive_edit_item, metadata_edit_item
from .errors import ReadOnlyStore
from .model import (DEFAULT_MAX_ITEM_BYTES, Page, ProjectorStats, RetryPolicy, StoredItem,
                    StoreReport, ThreadMetadata, ThreadStatus, check_count, check_thread_id,
                    check_timeout)
from .projector import Projector
from .storage import AsyncBarrierReads, Storage
from .tracing import Telemetry


class ThreadStore:
    """A durable store of conversation threads with a projected, listable metadata index.

    Open it with :meth:`open`; use it as a context manager or call :meth:`close`. All
    methods are thread-safe. See the README for the full contract.
    """

    def __init__(self, storage: Storage, projector: Projector | None,
                 rules: ProjectionRules, telemetry: Telemetry, *, projection: str,
                 max_item_bytes: int) -> None:
        """Use :meth:`ThreadStore.open`; this constructor only wires the parts together."""
        #: The store's directory (embedded SQLite), else ``None``.
        self.path: Path | None = storage.path
        self._storage = storage
        self._history = storage.history
        self._index = storage.index
        self._sync = projection == "sync"
        self._max_item_bytes = max_item_bytes
        self._lifetime = lifetime = Lifetime(storage, projector)
        self._reads = Reads(storage, projector, rules)
        self._port_reads = PortReads(storage)
        self._writes = None if projector is None else Writes(storage, projector, telemetry,
                                                              lifetime.closed_reason)
        #: The barrier core, shared with AsyncThreadStore (one core, two faces).
        self._barriers = Barriers(projector, storage, self._read_thread, telemetry, lifetime.closed_reason,
                                  lambda tid, items, key: self._append(tid, items, key, barrier=True))
        _lifecycle.register(lifetime)

    # -- opening --------------------------------------------------------------------------

    @classmethod
    def open(cls, target: str | os.PathLike[str], *, projection: str = "async",
             durability: str = "normal", tracer_provider: trace.TracerProvider | None = None,
             meter_provider: metrics.MeterProvider | None = None,
             projection_hook: ProjectionHook | None = None, rules: ProjectionRules | None = None,
             max_item_bytes: int = DEFAULT_MAX_ITEM_BYTES, coalesce_delay: float = 0.005,
             retry: RetryPolicy | None = None, caller_runs: bool = True,
             read_only: bool = False, catch_up_after: float | None = None,
             **other: Any) -> ThreadStore:
        """Open (creating as needed) the store ``target`` names (DESIGN §6).

        :param target: a directory path (the embedded SQLite store, created as needed),
            ``":memory:"``: a fresh in-memory store for tests, living as long as the object,
            or a ``postgresql://`` URL (the ``postgres`` extra; options ``schema``,
            ``pool_min_size``, ``pool_max_size``, ``connect_timeout``,
            ``statement_timeout``: see the README).
        :param projection: ``"async"`` (default) projects in the background; ``"sync"``
            projects inside ``append`` (the baseline design, and an escape hatch).
        :param durability: ``"normal"`` (survives a process crash) or ``"full"`` (also
            survives power loss; not for ``":memory:"``).
        :param tracer_provider: OpenTelemetry tracer provider; default the global one.
        :param meter_provider: OpenTelemetry meter provider; default the global one.
        :param projection_hook: ``hook(thread_id, generation)`` runs before each thread's
            projection is written; raise :class:`TransientProjectionError` to get a retry.
        :param rules: the metadata fold; default :class:`~thread_store.derive.CodexRules`.
        :param max_item_bytes: largest item accepted, as serialized JSON.
        :param coalesce_delay: seconds an append waits for company before projection;
            barriers skip it.
        :param retry: retry budget and backoff of transient projection errors.
        :param caller_runs: let a barrier project its own idle thread in the calling
            thread, saving two thread hand-offs.
        :param read_only: open for reading while another process writes (not for
            ``":memory:"``).
        :param catch_up_after: seconds after which work another process left behind (it
            crashed, is paused or slow) is caught up by this one, with no barrier; default
            5 (not for ``":memory:"``).
        :param other: nothing else is accepted; an unknown option raises
            :class:`InvalidArgument` (DESIGN §3), as a bad value of a known one does.
        :returns: the open store.
        :raises NotAThreadStore: ``target`` holds something else or cannot be written.
        :raises StoreLocked: its index is being rebuilt.
        :raises SchemaTooNew: the files come from a newer thread_store.
        :raises InvalidArgument: a malformed target or option, an option the backend does
            not take, or other fold rules than the store's; nothing was opened or written.

        >>> with ThreadStore.open("data/threads") as store:  # doctest: +SKIP
        ...     tid = store.create_thread(metadata={"cwd": "/repo"})
        """
        storage, projector, rules, telemetry = open_parts(
            target, other, projection=projection, durability=durability,
            tracer_provider=tracer_provider, meter_provider=meter_provider,
            projection_hook=projection_hook, rules=rules, max_item_bytes=max_item_bytes,
            coalesce_delay=coalesce_delay, retry=retry, caller_runs=caller_runs,
            read_only=read_only, catch_up_after=catch_up_after)
        return cls(storage, projector, rules, telemetry, projection=projection,
                   max_item_bytes=max_item_bytes)

    @classmethod
    def rebuild_index(cls, target: str | os.PathLike[str], *,
                      progress: Callable[[int, int], None] | None = None, **options: Any) -> int:
        """Rebuild the metadata index of the closed store ``target`` from its history.

        The index is derived data: this deletes it under the store's lock, opens
        the store (which re-projects every thread from its first item) and waits for each
        thread in turn.

        :param progress: called as ``progress(threads_done, threads_total)``.
        :param options: keyword options of :meth:`open` (``rules=`` to apply new rules).
        :returns: the number of threads re-projected.
        :raises StoreLocked: the store is open for writing somewhere.
        :raises ProjectionFailed: a thread's projection failed; the rebuild stops there
            (the index stays derived data: run it again once the cause is fixed).
        :raises InvalidArgument: a malformed target or option, or ``":memory:"``; nothing
            was removed.
        """
        where = check_target(target)
        check_rebuild_options(options, progress)
        drop_index(where, backend_options(where, options))
        with cls.open(where, **options) as store:
            # Every thread with items; the catch-up open() started may have covered some.
            heads = {t: head for t, head in store._history.heads().items() if head}
            store._barriers.wait_each(heads, progress)
        return len(heads)

    # -- writes ---------------------------------------------------------------------------

    def create_thread(self, thread_id: str | None = None, *,
                      metadata: Mapping[str, Any] | None = None) -> str:
        """Create a thread and return its id (a new UUID unless ``thread_id`` is given).

        :param metadata: ``session_meta`` fields (``cwd``, ``model_provider``, ``git``, ...),
            stored as the thread's first history item; none means no item.
        :raises ThreadExists: the id is taken. :raises ThreadDiscarded: the id was discarded.
        """
        writes = self._writable()
        thread_id = str(uuid.uuid4()) if thread_id is None else check_thread_id(thread_id)
        first = session_meta_item(metadata, self._max_item_bytes)
        writes.create(thread_id, first)
        if first is not None and self._sync:
            self._barriers.wait(thread_id, 1, None)
        return thread_id

    def append(self, thread_id: str, items: Sequence[Mapping[str, Any]], *,
               idempotency_key: str | None = None) -> int:
        """Append items durably and return the thread's new generation (its last ``seq``).

        Returns as soon as the items are committed to the history; the metadata follows
        in the background (in ``projection="sync"`` mode, before returning). An empty list
        writes nothing and returns the current generation.

        :param idempotency_key: 1 to 128 characters, scoped to the thread: an append
            repeated with the same key and items writes nothing and returns the first's
            generation; the same key with other items raises :class:`InvalidArgument`.

        :raises InvalidItem: an item is malformed; nothing was written.
        :raises ThreadNotFound: unknown thread. :raises ThreadDiscarded: discarded thread.
        :raises ProjectionFailed: sync mode only; the items are durable all the same.
        :raises OutcomeUnknown: the backend cannot tell whether the items were stored;
            with a key, the same call again gives the answer.
        """
        # A paused projector (a test's tool) defers even sync projection: items stay durable.
        sync = self._sync and bool(items) and not self._writable().projector.paused
        generation = self._append(thread_id, items, idempotency_key, barrier=sync)
        if sync:
            self._barriers.wait(thread_id, generation, None)
        return generation

    def append_and_flush(self, thread_id: str, items: Sequence[Mapping[str, Any]],
                         timeout: float | None = None, *,
                         idempotency_key: str | None = None) -> ThreadMetadata:
        """Append durably, then wait until the metadata covers the append.

        Use it for threads that must be list-visible at once (e.g. a goal-first thread).

        :param items: the items, as for :meth:`append`.
        :param timeout: seconds to wait for the projection; ``None`` waits as long as needed.
        :param idempotency_key: as for :meth:`append`.
        :returns: the projected metadata, list-visible when this returns.
        :raises FlushTimeout: see :meth:`flush`; the items are durable.
        :raises ProjectionFailed: the projection covering them failed; they are durable.
        """
        timeout = check_timeout(timeout)
        generation = self._append(thread_id, items, idempotency_key, barrier=True)
        return self._barriers.wait(thread_id, generation, timeout)

    def update_metadata(self, thread_id: str, *, name: str | None = NOT_GIVEN,
                        timeout: float | None = None) -> ThreadMetadata:
        """Record an explicit edit as a history item, then wait until it is projected.

        :param name: the thread's user-given name; ``None`` clears it.
        """
        return self.append_and_flush(thread_id, [metadata_edit_item(name)], timeout)

    def archive_thread(self, thread_id: str, *, timeout: float | None = None) -> ThreadMetadata:
        """Archive a thread (hide it from the default listing) and seal its metadata.

        The archive is a history item, flushed before returning, so no later read of the
        thread pays for catch-up.
        """
        return self.append_and_flush(thread_id, [archive_edit_item(True)], timeout)

    def unarchive_thread(self, thread_id: str, *, timeout: float | None = None) -> ThreadMetadata:
        """Bring an archived thread back to the default listing."""
        return self.append_and_flush(thread_id, [archive_edit_item(False)], timeout)

    def delete_thread(self, thread_id: str, *, timeout: float | None = None) -> None:
        """Remove a thread for good: history, metadata and pending work.

        Its waiters get :class:`ThreadDiscarded`; afterwards the id is unknown and may be
        reused. Pending projection work is dropped, not run (it would be deleted anyway).
        """
        self._remove(thread_id, RemovalKind.DELETED, timeout)

    def discard(self, thread_id: str, timeout: float | None = None) -> None:
        """Drop an ephemeral thread so that it never becomes visible, and tombstone it.

        Pending projection work is dropped without running; an attempt already in flight
        is awaited up to ``timeout`` and is fenced after that, so it cannot write. Later
        calls on the id raise :class:`ThreadDiscarded`, also after a restart.
        """
        self._remove(thread_id, RemovalKind.DISCARDED, timeout)

    # -- barriers -------------------------------------------------------------------------

    def flush(self, thread_id: str, *, generation: int | None = None,
              timeout: float | None = None) -> ThreadMetadata:
        """Wait until the thread's metadata covers ``generation`` (default: the current one).

        :returns: the projected metadata.
        :raises FlushTimeout: ``timeout`` passed first (carries target and projected).
        :raises ProjectionFailed: the attempt covering the generation failed for good.
        :raises ThreadDiscarded: the thread was discarded or deleted.
        :raises StoreClosed: the store closed first.
        """
        timeout = check_timeout(timeout)
        with _deadlines.until(_deadlines.after(timeout)):  # the target's read counts too
            return self._barriers.wait(thread_id, self._barriers.target(thread_id, generation),
                                       timeout)

    def flush_all(self, timeout: float | None = None) -> None:
        """Wait until every thread's metadata covers its current generation.

        :raises FlushTimeout: the deadline passed. :raises ProjectionFailed: names the
            threads whose projection failed.
        """
        self._barriers.wait_all(check_timeout(timeout))

    # -- reads ----------------------------------------------------------------------------

    def read_thread(self, thread_id: str) -> ThreadMetadata:
        """Return the thread's projected metadata (possibly behind its history).

        A thread with nothing projected yet reads as its empty initial metadata.

        :raises ThreadNotFound: unknown id. :raises ThreadDiscarded: discarded or being removed.
        """
        return complete(self._read_thread(self._port_reads, thread_id))

    def read_history(self, thread_id: str, after_seq: int = 0, limit: int = 1000) -> list[StoredItem]:
        """Return up to ``limit`` items with ``seq > after_seq``, in order.

        Page through a long history by passing the last ``seq`` back as ``after_seq``.

        :param after_seq: return items after this seq (0: from the start).
        :param limit: at most this many items (1 to 100,000).
        :returns: ``StoredItem(seq, ts, item)`` entries.
        :raises ThreadNotFound: unknown id. :raises ThreadDiscarded: discarded thread.
        """
        check_thread_id(thread_id)
        check_count(after_seq, name="after_seq", minimum=0, maximum=1 << 62)
        check_count(limit, name="limit", minimum=1, maximum=100_000)
        self._lifetime.check_open()
        return self._reads.history(thread_id, after_seq, limit)

    def list_threads(self, limit: int = 50, cursor: str | None = None, archived: bool = False,
                     search: str | None = None, include_empty: bool = False,
                     cwd: str | None = None) -> Page:
        """Return a page of threads, newest recency first.

        :param cursor: ``next_cursor`` of the previous page of the same query.
        :param archived: list archived threads instead of active ones.
        :param search: words, each a case-insensitive substring (ANDed) of the name,
            title, preview or first user message; Chinese and Japanese text matches any
            substring. Words under three characters match case-insensitively for ASCII only.
        :param include_empty: also list threads with no preview yet.
        :param cwd: only threads whose working directory is exactly this.
        :raises InvalidCursor: the cursor is not from this query.
        """
        query = list_query(limit, archived=archived, search=search, include_empty=include_empty,
                           cwd=cwd)
        self._lifetime.check_open()
        return self._index.list(from_cursor(query, cursor))

    def backup(self, dest: str | os.PathLike[str]) -> None:
        """Write a consistent copy of the store into the new directory ``dest``.

        Appends (in this or other processes) go on meanwhile: each file is copied as one
        snapshot with SQLite's online backup. The copy opens as a normal store; opening it
        catches up whatever its index missed. Works on read-only stores too; an in-memory
        store has no files to copy.

        :param dest: a path that does not exist yet, or an empty directory.
        :raises InvalidArgument: ``dest`` is malformed, not empty, or cannot be created;
            or the store is in memory.
        :raises StorageError: the store could not be read or the copy written.
        """
        target = check_path(dest)
        self._lifetime.check_open()
        self._storage.backup(target)

    def status(self, thread_id: str) -> ThreadStatus:
        """Return where the thread's projection stands, as the store has it (DESIGN §1.11).

        :returns: ``ThreadStatus``: ``head_seq`` and ``projected_seq`` from the store;
            ``pending`` is ``projected_seq < head_seq``; ``last_error`` is the error of the
            last attempt that failed for good, recorded in the store until an attempt
            succeeds (or, while this process retries, the error it retries); ``attempts``
            and ``waiters`` are this process's own.
        :raises ThreadNotFound: unknown id.
        :raises ThreadDiscarded: discarded thread, or one being discarded or deleted.
        """
        check_thread_id(thread_id)
        self._lifetime.check_open()
        return self._reads.status(thread_id)

    def report(self, limit: int = 100) -> StoreReport:
        """The store's projection health, read from the store without writing (works on
        read-only stores, beside a writer): live threads, the threads behind (longest
        first) and by how much, and the threads whose projection failed for good.

        :param limit: at most this many threads in ``behind`` and in ``failed`` (1 to 10,000).
        """
        check_count(limit, name="limit", minimum=1, maximum=10_000)
        self._lifetime.check_open()
        return self._storage.report(limit)

    def stats(self) -> ProjectorStats:
        """Projector counters since open: group commits, rows, retries, backlog."""
        return self._writable().projector.stats()

    # -- lifecycle ------------------------------------------------------------------------

    def pause_projection(self) -> None:
        """Hold the projector still (for tests); appends still succeed and stay durable."""
        self._writable().projector.pause()

    def resume_projection(self) -> None:
        """Undo :meth:`pause_projection`."""
        self._writable().projector.resume()

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop appends, drain pending projections within ``timeout``, resolve every waiter.

        ``timeout=None`` means no limit: everything pending is drained. Waiters already
        projected succeed; the rest get :class:`StoreClosed`. A projection stuck past the
        deadline is fenced and can never write, and does not keep the process alive.
        Idempotent.
        """
        self._lifetime.close(check_timeout(timeout))

    def __enter__(self) -> ThreadStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        lifetime: Lifetime | None = getattr(self, "_lifetime", None)
        # abandon() stops the worker before the warning, which raises under -W error.
        if lifetime is not None and lifetime.abandon():
            warnings.warn(f"{lifetime.describe()} was not closed; call close() or use 'with'",
                          ResourceWarning, stacklevel=2)

    # -- internals ------------------------------------------------------------------------

    def _append(self, thread_id: str, items: Sequence[Mapping[str, Any]],
                idempotency_key: str | None, *, barrier: bool = False) -> int:
        """Append durably; ``barrier=True`` when the caller waits on the result at once."""
        check_thread_id(thread_id)
        writes = self._writable()
        encoded = encode_items(items, self._max_item_bytes)
        key = None if idempotency_key is None else check_idempotency_key(idempotency_key, encoded)
        return writes.append(thread_id, encoded, key, barrier=barrier)

    async def _read_thread(self, reads: AsyncBarrierReads, thread_id: str) -> ThreadMetadata:
        """:meth:`read_thread` through ``reads`` (a barrier's native reads, or the ports)."""
        check_thread_id(thread_id)
        self._lifetime.check_open()
        return await self._reads.metadata(reads, thread_id)

    def _remove(self, thread_id: str, kind: RemovalKind, timeout: float | None) -> None:
        check_thread_id(thread_id)
        timeout = check_timeout(timeout)
        self._writable().remove(thread_id, kind, timeout)

    def _writable(self) -> Writes:
        self._lifetime.check_open()
        if self._writes is None:
            raise ReadOnlyStore("this store was opened with read_only=True; open it without "
                                "read_only to write or wait on barriers")
        return self._writes
