"""``AsyncThreadStore``: the asyncio facade over :class:`~thread_store.store.ThreadStore`.

It wraps the sync core and never re-implements it:

- Blocking calls (SQLite reads and commits, ``open``, ``close``, ``discard``) run in the
  event loop's default executor, inside a copy of the caller's ``contextvars`` context,
  so OpenTelemetry trace parents survive the thread hop.
- Barriers (``flush``, ``append_and_flush``, ``update_metadata``, ``archive_thread``,
  ``unarchive_thread``, ``flush_all``) use one executor hop to validate, append and
  register a waiter, then await an ``asyncio.Future`` that the projector resolves by push
  (``loop.call_soon_threadsafe``, guarded by ``fut.done()``). An awaiting barrier holds
  no executor thread and never blocks the loop: even the metadata read of a generation
  already projected happens in the hop. On timeout or cancellation its waiter is
  withdrawn, so nothing is left behind in ``status().waiters``.
- A timeout counts from the call, so a busy executor spends it too. A hop (of a barrier,
  ``discard``, ``delete_thread`` or ``close``) that no executor thread has started by the
  deadline moves to a thread of its own, so the call still returns on time and still
  knows whether its append happened; a hop whose caller is cancelled before it starts
  never runs.

The async barrier never runs the projection in the caller's thread (the sync store's
``caller_runs`` shortcut), since that would pin an executor thread for as long as the
projection (and its ``projection_hook``) takes. With ``projection="sync"`` the
projection runs inside ``append``, and so in the executor thread.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from concurrent.futures import Executor
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from . import _deadlines
from ._aio_hop import Hop, OwnExecutor, call_soon, in_executor, set_once
from ._options import check_open_kwargs
from ._outcomes import Outcome, Success, Waiter
from ._port_reads import complete
from .derive import NOT_GIVEN, archive_edit_item, metadata_edit_item
from .errors import DURABLE_NOTE, InvalidArgument, StorageError
from .model import (Page, ProjectorStats, StoredItem, StoreReport, ThreadMetadata, ThreadStatus,
                    check_timeout)
from .storage import NativeBarrierReads
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
        """Wrap an open :class:`ThreadStore`; usually you call :meth:`open` instead.

        :param executor: runs the blocking calls; ``None`` makes one of the store's own,
            shut down by :meth:`close`.
        """
        self._store = store
        self._barriers = store._barriers  # one barrier core, two faces (see _barriers)
        self._executor = OwnExecutor(EXECUTOR_WORKERS) if executor is None else executor
        #: The backend's native asyncio reads for barriers, once :meth:`open` opened them;
        #: ``None``: barriers read in the executor.
        self._native: NativeBarrierReads | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, executor: Executor | None = None,
             **options: Any) -> _Opening:
        """Open a store off the loop; await the result or use it with ``async with``.

        Blocking calls run on an executor of the store's own (``EXECUTOR_WORKERS``
        threads), never the loop's default one, so the application's own blocking jobs
        cannot delay an append; pass ``executor=`` to use yours (it is not shut down).

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
        timeout = check_timeout(timeout)
        def append() -> int:
            return self._barriers.append(thread_id, items, idempotency_key)

        if self._native is not None:
            loop = asyncio.get_running_loop()
            return await self._awaited(thread_id, timeout, lambda deadline: Hop(
                loop, self._executor, append).result(deadline))
        return await self._barrier(thread_id, append, timeout)

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
        timeout = check_timeout(timeout)
        native = self._native
        if native is not None:
            return await self._awaited(thread_id, timeout, lambda deadline: self._barriers.target_in(
                native, thread_id, generation))
        return await self._barrier(
            thread_id, lambda: self._barriers.target(thread_id, generation), timeout)

    async def flush_all(self, timeout: float | None = None) -> None:
        """See :meth:`ThreadStore.flush_all`; waits for every thread without holding a thread."""
        timeout = check_timeout(timeout)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout  # the hop counts too
        all_done = loop.create_future()
        resolved = 0
        total: int | None = None

        def count_one() -> None:  # runs on the loop, so the counters need no lock
            nonlocal resolved
            resolved += 1
            if total is not None and resolved >= total:
                set_once(all_done, None)

        waiters = await self._register(
            lambda: self._barriers.begin_all(lambda outcome: call_soon(loop, count_one)),
            lambda registered: registered, deadline)
        total = len(waiters)
        if resolved < total:
            try:
                async with asyncio.timeout_at(deadline):
                    await all_done
            except TimeoutError:
                pass  # settle_all withdraws the waiters and raises FlushTimeout
            except BaseException:
                for waiter in waiters:
                    self._barriers.cancel(waiter)
                raise
        # Timed out, it reads the generation projected so far: natively where it can.
        with _deadlines.until(deadline):
            await self._barriers.settle_all_in(self._native or self._barriers.port_reads, waiters,
                                               timeout)

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
            native, self._native = self._native, None
            if native is not None:
                # Shielded: a close cancelled (again) still ends the pool's connections.
                await asyncio.shield(native.close())

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

    async def _barrier(self, thread_id: str, target: Callable[[], int],
                       timeout: float | None) -> ThreadMetadata:
        """Run ``target()`` (validate, maybe append) and register in one hop, then await.

        The waiter is registered in the same executor call right after ``target()``
        returns the generation, before the check that it is projected, so no wake-up is
        lost; ``settle`` turns the outcome into metadata or the sync store's typed error.
        The deadline is taken before the hop, so a busy executor counts against it too,
        and nothing here reads SQLite on the loop's thread.
        """
        barriers = self._barriers
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        fut: asyncio.Future[Outcome] = loop.create_future()

        def begin() -> tuple[int, Waiter | None, Outcome | None]:
            generation = target()
            waiter = complete(barriers.begin_in(
                barriers.port_reads, thread_id, generation,
                lambda outcome: call_soon(loop, set_once, fut, outcome)))
            # Already projected: read the metadata here, in the executor, not on the loop.
            return generation, waiter, None if waiter is not None else barriers.read_outcome(thread_id)

        generation, waiter, outcome = await self._register(
            begin, lambda registered: [] if registered[1] is None else [registered[1]], deadline)
        with barriers.span(thread_id) as info:
            info["target"] = generation
            if waiter is not None:
                outcome = await self._outcome(waiter, fut, deadline, info)
            if isinstance(outcome, Success) and outcome.meta is None:
                # Projected, but the outcome carried no row: read it off the loop.
                outcome = await Hop(loop, self._executor,
                                     lambda: barriers.read_outcome(thread_id)).result(deadline)
            return barriers.settle(thread_id, generation, timeout, outcome, info)

    async def _awaited(self, thread_id: str, timeout: float | None,
                       generation_of: Callable[[float | None], Awaitable[int]]) -> ThreadMetadata:
        """A barrier on the backend's native reads (PostgreSQL): no executor thread.

        ``generation_of(deadline)`` gives the target (the head, read natively; or the
        generation of an append, which hops). The waiter registers on the loop, under the
        projector's lock; the target's, the checkpoint's and the metadata's reads run on
        the loop too, each bounded by the deadline, and a cancelled read is cancelled on
        the server. The projection itself still runs in the projector thread.
        """
        barriers, native = self._barriers, self._native
        assert native is not None
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        fut: asyncio.Future[Outcome] = loop.create_future()
        with _deadlines.until(deadline):
            generation = await generation_of(deadline)
            with barriers.span(thread_id) as info:
                info["target"] = generation
                try:
                    waiter = await barriers.begin_in(
                        native, thread_id, generation,
                        lambda outcome: call_soon(loop, set_once, fut, outcome))
                except StorageError as exc:
                    if deadline is None or loop.time() < deadline:
                        raise StorageError(f"{exc} {DURABLE_NOTE}") from exc
                    # Its checkpoint read ran out of the barrier's time: a timeout.
                    outcome: Outcome | None = None
                else:
                    outcome = Success(None) if waiter is None else await self._outcome(
                        waiter, fut, deadline, info)
                return await barriers.settle_in(native, thread_id, generation, timeout, outcome, info)

    async def _outcome(self, waiter: Waiter, fut: asyncio.Future[Outcome], deadline: float | None,
                       info: dict[str, Any]) -> Outcome | None:
        """Await a registered waiter's outcome until ``deadline`` (``None``: timed out);
        a timed-out or cancelled await withdraws the waiter."""
        try:
            async with asyncio.timeout_at(deadline):
                return await fut
        except TimeoutError:
            # It may have been resolved while the timeout fired; withdrawing under the
            # projector lock tells which, as the sync wait() does.
            return self._barriers.cancel(waiter)
        except BaseException:
            self._barriers.cancel(waiter)
            info["outcome"] = "cancelled"
            raise

    async def _register(self, begin: Callable[[], T], waiters_of: Callable[[T], list[Waiter]],
                        deadline: float | None) -> T:
        """Run ``begin`` (which registers waiters) off the loop and return its result.

        If the caller is cancelled before ``begin`` starts, it never runs; if while it
        runs, it still finishes and the waiters it registered (``waiters_of(result)``)
        are then withdrawn, so no waiter outlives its caller.
        """
        hop = Hop(asyncio.get_running_loop(), self._executor, begin)
        try:
            return await hop.result(deadline)
        except asyncio.CancelledError:
            def withdraw(done: asyncio.Future[T]) -> None:
                if not done.cancelled() and done.exception() is None:
                    for waiter in waiters_of(done.result()):
                        self._barriers.cancel(waiter)

            hop.done.add_done_callback(withdraw)
            raise


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
        native = store._storage.async_reads()
        if native is not None:
            try:
                await native.open()
            except BaseException:
                await native.close()
                await opened.close()
                raise
            opened._native = native
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
