"""``AsyncThreadStore``: the asyncio facade over :class:`~thread_store.store.ThreadStore`.

It wraps the sync core and never re-implements it:

- Blocking calls (reads and commits, ``open``, ``close``, ``discard``) run in the
  store's executor (its own, or the one given to ``open``), inside a copy of the
  caller's ``contextvars`` context, so OpenTelemetry trace parents survive the hop.
- Barriers (``flush``, ``append_and_flush``, ``update_metadata``, ``archive_thread``,
  ``unarchive_thread``, ``flush_all``) are the async face of the barrier core
  (:mod:`thread_store._aio_barriers`): they await a future the projector resolves, holding
  no executor thread; on PostgreSQL a ``flush`` makes no executor hop at all.
- A timeout counts from the call, so a busy executor spends it too. A hop (of a barrier,
  ``discard``, ``delete_thread`` or ``close``) that no executor thread has started by the
  deadline moves to a thread of its own, so the call still returns on time and still
  knows whether its append happened; a hop whose caller is cancelled before it starts
  never runs.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Generator, Mapping, Sequence
from concurrent.futures import Executor
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from ._aio_barriers import AsyncBarriers
from ._aio_hop import Hop, OwnExecutor, in_executor
from ._options import check_open_kwargs
from .derive import NOT_GIVEN, archive_edit_item, metadata_edit_item
from .errors import InvalidArgument
from .model import (Page, ProjectorStats, StoredItem, StoreReport, ThreadMetadata, ThreadStatus,
                    check_timeout)
from .store import ThreadStore

T = TypeVar("T")
#: Threads of the executor an AsyncThreadStore makes for itself: enough for concurrent
#: reads (the SQLite pool holds 8 connections per file) besides appends and barriers.
EXECUTOR_WORKERS = 8


class AsyncThreadStore:
    """The :class:`ThreadStore` API as coroutines; barriers are awaited, never blocked on.

    >>> async with AsyncThreadStore.open("data/threads") as store:  # doctest: +SKIP
    ...     tid = await store.create_thread()
    ...     meta = await store.append_and_flush(tid, [item], timeout=5.0)

    ``store = await AsyncThreadStore.open(path)`` works too; then ``await store.close()``.
    """

    def __init__(self, store: ThreadStore, executor: Executor | None = None) -> None:
        """Wrap an open :class:`ThreadStore`; usually you call :meth:`open` instead (only
        it opens a PostgreSQL store's native barrier reads; wrapped here, barriers hop).

        :param executor: runs the blocking calls; ``None`` makes one of the store's own,
            shut down by :meth:`close`.
        """
        self._store = store
        self._executor = OwnExecutor(EXECUTOR_WORKERS) if executor is None else executor
        #: The async face of the store's barrier core (one core, two faces: see _barriers).
        self._face = AsyncBarriers(store._barriers, self._executor)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, executor: Executor | None = None,
             **options: Any) -> _Opening:
        """Open a store off the loop; await the result or use it with ``async with``.

        Blocking calls run on an executor of the store's own (``EXECUTOR_WORKERS``
        threads), never the loop's default one, so the application's own blocking jobs
        cannot delay an append; pass ``executor=`` to use yours (it is not shut down).
        On PostgreSQL it also opens the store's asyncio pool, on which barriers read
        without any executor thread; :meth:`close` closes it.

        :param executor: a :class:`concurrent.futures.Executor` for the blocking calls.
        :param options: the keyword options of :meth:`ThreadStore.open`.
        :returns: an awaitable that is also an async context manager (which closes).
        :raises InvalidArgument: ``executor`` is not an Executor, or a bad option.
        """
        if executor is not None and not isinstance(executor, Executor):
            raise InvalidArgument(f"executor must be a concurrent.futures.Executor or None, not "
                                  f"{type(executor).__name__}")
        return _Opening(cls, path, options, executor)

    @property
    def path(self) -> Path | None:
        """The store directory."""
        return self._store.path

    # -- writes ---------------------------------------------------------------------------

    async def create_thread(self, thread_id: str | None = None, *,
                            metadata: Mapping[str, Any] | None = None) -> str:
        """See :meth:`ThreadStore.create_thread`."""
        return await self._call(self._store.create_thread, thread_id, metadata=metadata)

    async def append(self, thread_id: str, items: Sequence[Mapping[str, Any]], *,
                     idempotency_key: str | None = None) -> int:
        """See :meth:`ThreadStore.append`: returns once the items are durable."""
        return await self._call(self._store.append, thread_id, items,
                                idempotency_key=idempotency_key)

    async def append_and_flush(self, thread_id: str, items: Sequence[Mapping[str, Any]],
                               timeout: float | None = None, *,
                               idempotency_key: str | None = None) -> ThreadMetadata:
        """See :meth:`ThreadStore.append_and_flush`; the wait holds no thread."""
        return await self._face.append_and_flush(thread_id, items, idempotency_key,
                                                 check_timeout(timeout))

    async def update_metadata(self, thread_id: str, *, name: str | None = NOT_GIVEN,
                              timeout: float | None = None) -> ThreadMetadata:
        """See :meth:`ThreadStore.update_metadata`."""
        return await self.append_and_flush(thread_id, [metadata_edit_item(name)], timeout)

    async def archive_thread(self, thread_id: str, *, timeout: float | None = None) -> ThreadMetadata:
        """See :meth:`ThreadStore.archive_thread`."""
        return await self.append_and_flush(thread_id, [archive_edit_item(True)], timeout)

    async def unarchive_thread(self, thread_id: str, *,
                               timeout: float | None = None) -> ThreadMetadata:
        """See :meth:`ThreadStore.unarchive_thread`."""
        return await self.append_and_flush(thread_id, [archive_edit_item(False)], timeout)

    async def delete_thread(self, thread_id: str, *, timeout: float | None = None) -> None:
        """See :meth:`ThreadStore.delete_thread` (waits for an in-flight attempt off the loop)."""
        await self._within(lambda remaining: self._store.delete_thread(thread_id, timeout=remaining),
                           timeout)

    async def discard(self, thread_id: str, timeout: float | None = None) -> None:
        """See :meth:`ThreadStore.discard` (waits for an in-flight attempt off the loop)."""
        await self._within(lambda remaining: self._store.discard(thread_id, remaining), timeout)

    # -- barriers -------------------------------------------------------------------------

    async def flush(self, thread_id: str, *, generation: int | None = None,
                    timeout: float | None = None) -> ThreadMetadata:
        """See :meth:`ThreadStore.flush`; raises the same typed errors.

        :raises FlushTimeout: carries the target and projected generations.
        """
        return await self._face.flush(thread_id, generation, check_timeout(timeout))

    async def flush_all(self, timeout: float | None = None) -> None:
        """See :meth:`ThreadStore.flush_all`; waits for every thread without holding a thread."""
        await self._face.flush_all(check_timeout(timeout))

    # -- reads ----------------------------------------------------------------------------

    async def read_thread(self, thread_id: str) -> ThreadMetadata:
        """See :meth:`ThreadStore.read_thread`."""
        return await self._call(self._store.read_thread, thread_id)

    async def read_history(self, thread_id: str, after_seq: int = 0,
                           limit: int = 1000) -> list[StoredItem]:
        """See :meth:`ThreadStore.read_history`."""
        return await self._call(self._store.read_history, thread_id, after_seq, limit)

    async def list_threads(self, limit: int = 50, cursor: str | None = None, archived: bool = False,
                           search: str | None = None, include_empty: bool = False,
                           cwd: str | None = None) -> Page:
        """See :meth:`ThreadStore.list_threads`."""
        return await self._call(self._store.list_threads, limit, cursor, archived, search,
                                include_empty, cwd)

    async def backup(self, dest: str | os.PathLike[str]) -> None:
        """See :meth:`ThreadStore.backup` (the copy runs off the loop)."""
        await self._call(self._store.backup, dest)

    async def status(self, thread_id: str) -> ThreadStatus:
        """See :meth:`ThreadStore.status`."""
        return await self._call(self._store.status, thread_id)

    async def report(self, limit: int = 100) -> StoreReport:
        """See :meth:`ThreadStore.report`."""
        return await self._call(self._store.report, limit)

    async def stats(self) -> ProjectorStats:
        """See :meth:`ThreadStore.stats`."""
        return await self._call(self._store.stats)

    # -- lifecycle ------------------------------------------------------------------------

    async def pause_projection(self) -> None:
        """See :meth:`ThreadStore.pause_projection`."""
        await self._call(self._store.pause_projection)

    async def resume_projection(self) -> None:
        """See :meth:`ThreadStore.resume_projection`."""
        await self._call(self._store.resume_projection)

    async def close(self, timeout: float | None = 10.0) -> None:
        """See :meth:`ThreadStore.close` (``None``: no limit): drains off the loop, resolves
        every waiter."""
        try:
            await self._within(self._store.close, timeout, cancellable=False)
        finally:
            if isinstance(self._executor, OwnExecutor):
                self._executor.shutdown(wait=False)  # its threads end once idle
            await self._face.close_native()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # -- internals ------------------------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await in_executor(self._executor, fn, *args, **kwargs)

    async def _within(self, call: Callable[[float | None], T], timeout: float | None, *,
                      cancellable: bool = True) -> T:
        """Run ``call(remaining)`` off the loop, its ``timeout`` counting the hop too.

        A busy executor spends the time first; what is left when the call starts is what
        it gets (past the deadline the hop moves to a thread of its own, with 0).
        """
        timeout = check_timeout(timeout)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout

        def run() -> T:
            return call(None if deadline is None else max(0.0, deadline - loop.time()))

        return await Hop(loop, self._executor, run).result(deadline, cancellable=cancellable)


class _Opening:
    """What :meth:`AsyncThreadStore.open` returns: awaitable, and an async context manager."""

    def __init__(self, cls: type[AsyncThreadStore], path: str | os.PathLike[str],
                 options: dict[str, Any], executor: Executor | None) -> None:
        self._cls = cls
        self._path = path
        self._options = options
        self._executor = executor
        self._store: AsyncThreadStore | None = None

    async def _open(self) -> AsyncThreadStore:
        # Passed through **options, an unknown name would otherwise be a TypeError.
        check_open_kwargs(self._options)
        executor = OwnExecutor(EXECUTOR_WORKERS) if self._executor is None else self._executor
        try:
            store = await in_executor(executor, ThreadStore.open, self._path, **self._options)
        except BaseException:
            if isinstance(executor, OwnExecutor):
                executor.shutdown(wait=False)
            raise
        opened = self._cls(store, executor)
        try:
            await opened._face.open_native(store._storage)
        except BaseException:
            await opened.close()
            raise
        return opened

    def __await__(self) -> Generator[Any, None, AsyncThreadStore]:
        return self._open().__await__()

    async def __aenter__(self) -> AsyncThreadStore:
        self._store = await self._open()
        return self._store

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._store is not None:
            await self._store.close()
