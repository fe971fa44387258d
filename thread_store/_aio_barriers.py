"""The async face of the barrier core (:mod:`thread_store._barriers`), for ``AsyncThreadStore``.

Two ways to the same core, by backend:

- **Native reads** (PostgreSQL: ``Storage.async_reads``): a ``flush`` makes no executor
  hop at all. It reads the target head, the checkpoint and the metadata on the event
  loop (one read where it does not wait: ``NativeBarrierReads.snapshot``), each read
  bounded by the deadline and cancelled on the server with its task, and registers its
  waiter on the loop, under the projector's lock. ``append_and_flush`` appends and
  registers in one hop (the sync append path; registering a thread just appended to
  reads nothing), and its reads after the wait are native.
- **One hop** (SQLite, memory): a barrier validates, appends and registers its waiter in
  one executor call, and reads an already projected generation's row there too, so no
  blocking read runs on the loop.

Either way the barrier then awaits an ``asyncio.Future`` the projector resolves by push
(``loop.call_soon_threadsafe``, guarded by ``fut.done()``), holding no thread and no
connection; on timeout or cancellation its waiter is withdrawn. The projection itself
runs in the projector thread, shared by every waiter of the thread; an async barrier
never runs it in the caller's thread (the sync store's ``caller_runs`` shortcut), since
that would pin an executor thread for as long as the projection takes. The deadline is
taken at the call, so a busy executor counts against it too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from typing import Any, TypeVar

from . import _deadlines
from ._aio_hop import Hop, call_soon, set_once
from ._barriers import Barriers
from ._outcomes import Outcome, Success, Waiter
from ._port_reads import complete
from .errors import DURABLE_NOTE, StorageError
from .model import ThreadMetadata
from .storage import AsyncBarrierReads, NativeBarrierReads, Storage

T = TypeVar("T")


class AsyncBarriers:
    """``flush``, ``append_and_flush`` and ``flush_all`` of one ``AsyncThreadStore``."""

    def __init__(self, barriers: Barriers, executor: Executor) -> None:
        """The async face of ``barriers``; blocking calls go to ``executor``."""
        self._barriers = barriers
        self._executor = executor
        #: The backend's native reads once :meth:`open_native` opened them; ``None``:
        #: barriers read in the executor.
        self.native: NativeBarrierReads | None = None

    async def open_native(self, storage: Storage) -> None:
        """Open ``storage``'s native reads on this loop, where it has them."""
        native = storage.async_reads()
        if native is not None:
            try:
                await native.open()
            except BaseException:
                await native.close()
                raise
            self.native = native

    async def close_native(self) -> None:
        """Close the native reads (their connections); shielded, so a close cancelled
        (again) still ends them."""
        native, self.native = self.native, None
        if native is not None:
            await asyncio.shield(native.close())

    async def flush(self, thread_id: str, generation: int | None,
                    timeout: float | None) -> ThreadMetadata:
        """``flush``: the target is the head (or ``generation``, validated against it)."""
        if self.native is not None:
            return await self._awaited(thread_id, generation, timeout)
        return await self._barrier(
            thread_id, lambda: self._barriers.target(thread_id, generation), timeout)

    async def append_and_flush(self, thread_id: str, items: Sequence[Mapping[str, Any]],
                               key: str | None, timeout: float | None) -> ThreadMetadata:
        """``append_and_flush``: the target is the durable append's generation.

        The waiter registers in the append's hop, right after it (on a thread just
        appended to, that reads nothing): the projection, which the append left to the
        barrier, starts without waiting for the loop to come round.
        """
        return await self._barrier(
            thread_id, lambda: self._barriers.append(thread_id, items, key), timeout)

    async def flush_all(self, timeout: float | None) -> None:
        """``flush_all``: register every thread behind in one hop (it scans the store), then
        wait for them all without holding a thread."""
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
            await self._barriers.settle_all_in(self.native or self._barriers.port_reads, waiters,
                                               timeout)

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

        # The hops copy the deadline with the caller's context: their storage waits (a
        # pooled connection while the server is down) end with it, as the native reads do.
        with _deadlines.until(deadline):
            generation, waiter, outcome = await self._register(
                begin, lambda registered: [] if registered[1] is None else [registered[1]], deadline)
            with barriers.span(thread_id) as info:
                info["target"] = generation
                if waiter is not None:
                    outcome = await self._outcome(waiter, fut, deadline, info)
                if isinstance(outcome, Success) and outcome.meta is None and self.native is None:
                    # Projected, but the outcome carried no row: read it off the loop.
                    outcome = await Hop(loop, self._executor,
                                         lambda: barriers.read_outcome(thread_id)).result(deadline)
                # The reads left (the row, or a timed-out barrier's projected generation)
                # are native where the backend has them: on the loop, within the deadline.
                return await barriers.settle_in(self.native or barriers.port_reads, thread_id,
                                                generation, timeout, outcome, info)

    async def _awaited(self, thread_id: str, generation: int | None,
                       timeout: float | None) -> ThreadMetadata:
        """A ``flush`` on the backend's native reads (PostgreSQL): no executor thread.

        The target's head, the registration's checkpoint (or incarnation) and the
        metadata are read on the loop (one read, where the barrier does not wait:
        ``snapshot``), each bounded by the deadline, and a cancelled read is cancelled on
        the server; the waiter registers on the loop, under the projector's lock. The
        projection itself still runs in the projector thread.
        """
        barriers, native = self._barriers, self.native
        assert native is not None
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        start = native.snapshot()
        with _deadlines.until(deadline):
            try:
                target = await barriers.target_in(start, thread_id, generation)
                timed_out = False
            except StorageError:
                if not _past(loop, deadline):
                    raise
                # The start's one read ran out of time (a lock on the index, say): the
                # head alone says what the barrier timed out waiting for.
                target, timed_out = await barriers.target_in(native, thread_id, generation), True
            with barriers.span(thread_id) as info:
                info["target"] = target
                outcome, reads = ((None, native) if timed_out else
                                  await self._native_wait(start, thread_id, target, deadline, info))
                return await barriers.settle_in(reads, thread_id, target, timeout, outcome, info)

    async def _native_wait(self, start: AsyncBarrierReads, thread_id: str, target: int,
                           deadline: float | None, info: dict[str, Any],
                           ) -> tuple[Outcome | None, AsyncBarrierReads]:
        """Register on the loop and await the outcome (``None``: timed out); with it, the
        reads to settle it: the start's where it did not wait, new ones after a wait."""
        native = self.native
        assert native is not None
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Outcome] = loop.create_future()
        try:
            waiter = await self._barriers.begin_in(
                start, thread_id, target, lambda outcome: call_soon(loop, set_once, fut, outcome))
        except StorageError as exc:
            if not _past(loop, deadline):
                raise StorageError(f"{exc} {DURABLE_NOTE}") from exc
            return None, native  # its checkpoint read ran out of the barrier's time
        if waiter is None:
            return Success(None), start
        return await self._outcome(waiter, fut, deadline, info), native

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


def _past(loop: asyncio.AbstractEventLoop, deadline: float | None) -> bool:
    """Whether ``deadline`` (``loop.time()``; ``None``: none) has passed."""
    return deadline is not None and loop.time() >= deadline
