"""``ThreadStore``: the facade that validates input, owns the lifecycle and keeps the contract.

The contract itself (durable-first appends, generation barriers, retry, discard, shutdown,
recovery, trace propagation) is stated once, in the README and in DESIGN §1.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Mapping, Sequence

from opentelemetry import metrics, trace

from . import _lifecycle
from ._barriers import Barriers
from ._options import (backend_options, check_open_kwargs, check_options, check_path,
                       check_target)
from .backends import drop_index, open_storage
from .derive import (NOT_GIVEN, CodexRules, ProjectionRules, archive_edit_item, metadata_edit_item,
                     rules_id)
from .errors import InvalidArgument, ReadOnlyStore, StoreClosed, ThreadDiscarded, ThreadStoreError
from .model import (DEFAULT_MAX_ITEM_BYTES, EncodedItem, Page, ProjectorStats, RetryPolicy, StoredItem,
                    ThreadMetadata, ThreadStatus, check_count, check_thread_id, check_timeout,
                    encode_item, utc)
from .projector import Projector, ProjectionHook
from .storage import IdempotencyKey, ListQuery, Storage, decode_cursor
from .tracing import ATTR_GENERATION, Telemetry, capture

log = logging.getLogger("thread_store")


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
        self._projector = projector
        self._rules = rules
        self._telemetry = telemetry
        self._sync = projection == "sync"
        self._max_item_bytes = max_item_bytes
        self._closed = False
        self._closed_why = "the thread store is closed; open it again"
        self._close_lock = threading.Lock()
        #: The barrier core, shared with AsyncThreadStore (one core, two faces).
        self._barriers = Barriers(projector, storage, self.read_thread, telemetry,
                                  lambda: self._closed_why if self._closed else None,
                                  lambda tid, items, key: self._append(tid, items, key, barrier=True))
        _lifecycle.register(self)

    # -- opening --------------------------------------------------------------------------

    @classmethod
    def open(cls, target: str | os.PathLike[str], *, projection: str = "async",
             durability: str = "normal", tracer_provider: trace.TracerProvider | None = None,
             meter_provider: metrics.MeterProvider | None = None,
             projection_hook: ProjectionHook | None = None, rules: ProjectionRules | None = None,
             max_item_bytes: int = DEFAULT_MAX_ITEM_BYTES, coalesce_delay: float = 0.005,
             retry: RetryPolicy | None = None, caller_runs: bool = True,
             read_only: bool = False, **other: Any) -> ThreadStore:
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
        :param other: nothing else is accepted; an unknown option raises
            :class:`InvalidArgument` (DESIGN §3), as a bad value of a known one does.
        :returns: the open store.
        :raises NotAThreadStore: ``target`` holds something else or cannot be written.
        :raises StoreLocked: another process has the store open for writing.
        :raises SchemaTooNew: the files come from a newer thread_store.
        :raises InvalidArgument: a malformed target or option, an option the backend does
            not take, or other fold rules than the store's; nothing was opened or written.

        >>> with ThreadStore.open("data/threads") as store:  # doctest: +SKIP
        ...     tid = store.create_thread(metadata={"cwd": "/repo"})
        """
        where = check_target(target)
        check_open_kwargs(other)
        check_options(projection=projection, durability=durability, tracer_provider=tracer_provider,
                      meter_provider=meter_provider, projection_hook=projection_hook, rules=rules,
                      max_item_bytes=max_item_bytes, coalesce_delay=coalesce_delay, retry=retry,
                      caller_runs=caller_runs, read_only=read_only)
        rules = rules or CodexRules()
        storage = open_storage(where, durability=durability, read_only=read_only,
                               rules_id=rules_id(rules), options=backend_options(where, other))
        try:
            telemetry = Telemetry(tracer_provider, meter_provider)
            projector = None
            if not read_only:
                projector = Projector(storage, rules, telemetry, hook=projection_hook,
                                      retry=retry or RetryPolicy(), coalesce_delay=coalesce_delay,
                                      caller_runs=caller_runs)
                projector.start(storage.lagging())
        except BaseException:
            storage.close()  # or this process could never open the store again
            raise
        return cls(storage, projector, rules, telemetry, projection=projection,
                   max_item_bytes=max_item_bytes)

    @classmethod
    def rebuild_index(cls, target: str | os.PathLike[str], *,
                      progress: Callable[[int, int], None] | None = None, **options: Any) -> int:
        """Rebuild the metadata index of the closed store ``target`` from its history.

        The index is derived data: this deletes it under the store's writer lock, opens
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
        check_open_kwargs(options)
        if options.get("read_only"):
            raise InvalidArgument("rebuild_index writes the index; it cannot use read_only=True")
        if progress is not None and not callable(progress):
            raise InvalidArgument(f"progress must be a callable progress(done, total) or None, "
                                  f"not {type(progress).__name__}")
        drop_index(where, backend_options(where, options))
        with cls.open(where, **options) as store:
            # Every thread with items; the catch-up open() started may have covered some.
            heads = {t: head for t, head in store._history.heads().items() if head}
            for done, (thread_id, head) in enumerate(heads.items(), 1):
                try:
                    store.flush(thread_id, generation=head)
                except ThreadDiscarded:
                    pass
                if progress is not None:
                    progress(done, len(heads))
        return len(heads)

    # -- writes ---------------------------------------------------------------------------

    def create_thread(self, thread_id: str | None = None, *,
                      metadata: Mapping[str, Any] | None = None) -> str:
        """Create a thread and return its id (a new UUID unless ``thread_id`` is given).

        :param metadata: ``session_meta`` fields (``cwd``, ``model_provider``, ``git``, ...),
            stored as the thread's first history item; none means no item.
        :raises ThreadExists: the id is taken. :raises ThreadDiscarded: the id was discarded.
        """
        projector = self._writable()
        thread_id = str(uuid.uuid4()) if thread_id is None else check_thread_id(thread_id)
        first = None
        if metadata is not None:
            if not isinstance(metadata, Mapping):
                raise InvalidArgument(f"metadata must be a dict, not {type(metadata).__name__}")
            if metadata:
                first = self._encode([{"type": "session_meta", "payload": dict(metadata)}])[0]
        self._history.create(thread_id, created_us=_now_us(), first=first)
        projector.on_create(thread_id, first)
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
        sync = self._sync and bool(items) and not self._writable().paused
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
        return self._set_archived(thread_id, True, timeout)

    def unarchive_thread(self, thread_id: str, *, timeout: float | None = None) -> ThreadMetadata:
        """Bring an archived thread back to the default listing."""
        return self._set_archived(thread_id, False, timeout)

    def delete_thread(self, thread_id: str, *, timeout: float | None = None) -> None:
        """Remove a thread for good: history, metadata and pending work.

        Its waiters get :class:`ThreadDiscarded`; afterwards the id is unknown and may be
        reused. Pending projection work is dropped, not run (it would be deleted anyway).
        """
        self._remove(thread_id, "deleted", timeout)

    def discard(self, thread_id: str, timeout: float | None = None) -> None:
        """Drop an ephemeral thread so that it never becomes visible, and tombstone it.

        Pending projection work is dropped without running; an attempt already in flight
        is awaited up to ``timeout`` and is fenced after that, so it cannot write. Later
        calls on the id raise :class:`ThreadDiscarded`, also after a restart.
        """
        self._remove(thread_id, "discarded", timeout)

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
        return self._barriers.wait(thread_id, self._barriers.target(thread_id, generation), timeout)

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
        check_thread_id(thread_id)
        self._open_check()
        meta = self._index.read(thread_id)
        if meta is not None:
            return meta
        if self._projector is not None:
            self._projector.check_live(thread_id)  # mid-removal its row is already gone
        created = self._history.created_us(thread_id)
        return self._rules.metadata(thread_id, self._rules.initial(thread_id, created), 0)

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
        self._open_check()
        rows = self._history.read(thread_id, after_seq, self._history.head(thread_id), limit)
        return [StoredItem(row.seq, utc(row.ts_us), json.loads(row.text)) for row in rows]

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
        check_count(limit, name="limit", minimum=1, maximum=1000)
        for flag, name in ((archived, "archived"), (include_empty, "include_empty")):
            if not isinstance(flag, bool):
                raise InvalidArgument(f"{name} must be True or False, not {flag!r}")
        if search is not None and (not isinstance(search, str) or len(search) > 1000
                                   or "\x00" in search or not _encodable(search)):
            raise InvalidArgument("search must be a string of at most 1000 characters, without "
                                  "NUL characters or lone surrogates, or None")
        if cwd is not None and (not isinstance(cwd, str) or len(cwd) > 4096 or "\x00" in cwd
                                or not _encodable(cwd)):
            raise InvalidArgument("cwd must be a directory path string (at most 4096 characters, "
                                  "no NUL characters or lone surrogates) or None")
        self._open_check()
        query = ListQuery(limit=limit, archived=archived, include_empty=include_empty,
                          words=tuple(search.split()) if search else (), cwd=cwd)
        if cursor is not None:
            query = ListQuery(limit=limit, archived=archived, include_empty=include_empty,
                              words=query.words, cwd=cwd,
                              after=decode_cursor(cursor, query.filters()))
        return self._index.list(query)

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
        self._open_check()
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
        self._open_check()
        local = self._projector.local_status(thread_id) if self._projector else None
        head = self._history.head(thread_id)
        stored = self._index.checkpoint(thread_id)
        projected = stored.projected_seq
        if local is None:
            return ThreadStatus(head, projected, projected < head, 0, stored.last_error, 0)
        return ThreadStatus(head, projected, projected < head, local.attempts,
                            stored.last_error or local.last_error, local.waiters)

    def stats(self) -> ProjectorStats:
        """Projector counters since open: group commits, rows, retries, backlog."""
        return self._writable().stats()

    # -- lifecycle ------------------------------------------------------------------------

    def pause_projection(self) -> None:
        """Hold the projector still (for tests); appends still succeed and stay durable."""
        self._writable().pause()

    def resume_projection(self) -> None:
        """Undo :meth:`pause_projection`."""
        self._writable().resume()

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop appends, drain pending projections within ``timeout``, resolve every waiter.

        ``timeout=None`` means no limit: everything pending is drained. Waiters already
        projected succeed; the rest get :class:`StoreClosed`. A projection stuck past the
        deadline is fenced and can never write, and does not keep the process alive.
        Idempotent.
        """
        timeout = check_timeout(timeout)
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._storage.reject_writes()
        try:
            if self._projector is not None:
                # What the drain leaves behind stays recorded as behind for the next open.
                self._projector.close(timeout)
        finally:
            self._storage.close()
            _lifecycle.unregister(self)

    def __enter__(self) -> ThreadStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_closed", True):
            return
        # Stop first: under -W error the warning raises, and the worker must not go on
        # projecting for a store nobody can close any more.
        if self._projector is not None:
            self._projector.stop_now()
        self._storage.abandon()  # else this process could never open the store again
        warnings.warn(f"{self._describe()} was not closed; call close() or use 'with'",
                      ResourceWarning, stacklevel=2)

    # -- internals ------------------------------------------------------------------------

    def _append(self, thread_id: str, items: Sequence[Mapping[str, Any]],
                idempotency_key: str | None, *, barrier: bool = False) -> int:
        """Append durably; ``barrier=True`` when the caller waits on the result at once."""
        check_thread_id(thread_id)
        projector = self._writable()
        encoded = self._encode(items)
        key = None if idempotency_key is None else _idempotency_key(idempotency_key, encoded)
        if not self._telemetry.tracing():
            done = self._history.append(thread_id, encoded, key)
            if done.written:
                projector.on_append(thread_id, done.generation, encoded, None, schedule=not barrier)
            return done.generation
        with self._telemetry.append_span(thread_id, len(encoded)) as span:
            done = self._history.append(thread_id, encoded, key)
            if done.written:
                projector.on_append(thread_id, done.generation, encoded, capture(span),
                                    schedule=not barrier)
            if span.is_recording():
                span.set_attribute(ATTR_GENERATION, done.generation)
            return done.generation

    def _encode(self, items: Sequence[Mapping[str, Any]]) -> list[EncodedItem]:
        # A list is the common case; the ABC checks cost about a microsecond each.
        if type(items) is not list and (isinstance(items, (str, bytes, Mapping))
                                        or not isinstance(items, Sequence)):
            raise InvalidArgument("items must be a list of item dicts, e.g. [{'type': 'event_msg', ...}]")
        now = _now_us()
        return [encode_item(item, now, self._max_item_bytes) for item in items]

    def _set_archived(self, thread_id: str, archived: bool, timeout: float | None) -> ThreadMetadata:
        return self.append_and_flush(thread_id, [archive_edit_item(archived)], timeout)

    def _remove(self, thread_id: str, kind: str, timeout: float | None) -> None:
        """Discard or delete, in two phases: a removal that raises has changed nothing."""
        check_thread_id(thread_id)
        timeout = check_timeout(timeout)
        projector = self._writable()
        try:
            head = self._history.head(thread_id)  # raises for unknown or discarded ids
            removal = projector.begin_removal(thread_id, kind, head, timeout)
            removed = False
            try:
                # A closing store removes nothing: past close's fence the thread stays.
                self._storage.remove_thread(thread_id, tombstone=kind == "discarded")
                removed = True
            finally:
                if removed:
                    removal.commit()
                else:  # put everything back; the row may be gone: re-fold from history
                    removal.abort(row_deleted=True)
        except ThreadStoreError as exc:
            if self._closed and not isinstance(exc, (StoreClosed, ThreadDiscarded)):
                # close() won the race (closed connections, an interrupted statement).
                raise StoreClosed(f"the store closed; thread {thread_id!r} was not {kind}") from exc
            raise

    def _open_check(self) -> None:
        if self._closed:
            raise StoreClosed(self._closed_why)

    def _writable(self) -> Projector:
        self._open_check()
        if self._projector is None:
            raise ReadOnlyStore("this store was opened with read_only=True; open it without "
                                "read_only to write or wait on barriers")
        return self._projector

    def _describe(self) -> str:
        """``ThreadStore at PATH``, for messages."""
        return f"ThreadStore at {self._storage.description}"

    def _disown_after_fork(self) -> None:
        """In a forked child: every call raises :class:`StoreClosed`; the parent keeps
        the store (called by the fork handler)."""
        _lifecycle.unregister(self)
        self._closed = True
        self._closed_why = ("this store was opened in the parent process before fork(); "
                            "open it again in the child")
        if self._projector is not None:
            self._projector.reset_after_fork()
        self._storage.abandon()  # the parent keeps its locks; ours share their descriptions


def _idempotency_key(key: object, items: list[EncodedItem]) -> IdempotencyKey:
    """Validate a key and pair it with the digest of the items it guards."""
    if (not isinstance(key, str) or not 1 <= len(key) <= 128 or "\x00" in key
            or not _encodable(key)):
        raise InvalidArgument(f"idempotency_key must be a string of 1 to 128 characters without "
                              f"NUL characters or lone surrogates, or None; not {key!r:.80}")
    digest = hashlib.sha256()
    for item in items:
        digest.update(item.text.encode())
        digest.update(b"\x00")
    return IdempotencyKey(key, digest.hexdigest())


def _encodable(text: str) -> bool:
    """False for strings storage cannot take (lone surrogates do not encode to UTF-8)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _now_us() -> int:
    return time.time_ns() // 1000
