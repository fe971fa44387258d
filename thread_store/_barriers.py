"""Barrier mechanics, shared by ``ThreadStore`` and ``AsyncThreadStore``: one core, two faces.

DESIGN §1.4: a barrier validates its target generation, registers a waiter with the
projector before it checks (so no wake-up is lost), waits by push, and turns the outcome
into metadata or a typed error that says the appended items are durable. The sync face
blocks in :meth:`Barriers.wait`; the async face registers with :meth:`Barriers.begin_in`
and awaits a future its callback resolves, then settles with the same methods.

The steps that read the store (the target's head, the registration's checkpoint, the
settled metadata, a timed-out barrier's projected generation) are coroutines over an
:class:`~thread_store.storage.AsyncBarrierReads`: the sync face runs them to completion
on the sync ports (:mod:`thread_store._port_reads`), the async face awaits them on a
backend's native reads, or the sync ports in an executor hop.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

from . import _deadlines
from ._outcomes import Outcome, Success, Waiter
from ._port_reads import PortReads, complete
from .errors import (DURABLE_NOTE, FlushTimeout, InvalidArgument, ProjectionFailed, ReadOnlyStore,
                     StorageError, StoreClosed, ThreadDiscarded, ThreadStoreError, describe)
from .model import ThreadMetadata, caller_copy, check_count, check_thread_id
from .projector import Projector
from .storage import AsyncBarrierReads, Storage
from .tracing import Telemetry

#: ``closed_reason()``: why the store is closed, or ``None`` while it is open.
ClosedReason = Callable[[], str | None]
#: ``append(thread_id, items, idempotency_key) -> generation``: durable, and no wake-up is
#: spent on the projector, because the barrier that follows claims or expedites the thread.
AppendForBarrier = Callable[[str, Sequence[Mapping[str, Any]], str | None], int]
#: ``read_meta(reads, thread_id)``: the thread's metadata as ``ThreadStore.read_thread``
#: gives it, read through ``reads``.
ReadMeta = Callable[[AsyncBarrierReads, str], Awaitable[ThreadMetadata]]


class Barriers:
    """Targets, waiting and outcomes of ``flush``, ``append_and_flush`` and ``flush_all``."""

    def __init__(self, projector: Projector | None, storage: Storage, read_meta: ReadMeta,
                 telemetry: Telemetry, closed_reason: ClosedReason, append: AppendForBarrier) -> None:
        """Wire the barrier core to a store's parts.

        :param projector: the store's projector; ``None`` for a read-only store.
        :param storage: the store's backend: the sync face reads heads and checkpoints
            from its ports.
        :param read_meta: the thread's projected metadata (``ThreadStore.read_thread``).
        :param closed_reason: why the store is closed, or ``None`` while it is open.
        :param append: the store's durable append, told that a barrier follows at once.
        """
        self.append = append
        self._projector = projector
        #: The sync ports as barrier reads: what the sync face (and a hop) reads through.
        self.port_reads = PortReads(storage)
        self._stale = storage.stale
        self._read_meta = read_meta
        self._telemetry = telemetry
        self._closed_reason = closed_reason

    def projector(self) -> Projector:
        """The projector a barrier waits on.

        Often the barrier's items were just appended, so a store that closed in between
        must say they are durable: a bare "closed" would read like a rejected append and
        invite the caller to append them again.

        :raises StoreClosed: the store is closed (the message says the items are durable).
        :raises ReadOnlyStore: the store was opened read-only.
        """
        reason = self._closed_reason()
        if reason is not None:
            raise StoreClosed(f"{reason}. {DURABLE_NOTE}")
        if self._projector is None:
            raise ReadOnlyStore("this store was opened with read_only=True; open it without "
                                "read_only to write or wait on barriers")
        return self._projector

    def target(self, thread_id: str, generation: int | None) -> int:
        """:meth:`target_in` on the sync ports."""
        return complete(self.target_in(self.port_reads, thread_id, generation))

    async def target_in(self, reads: AsyncBarrierReads, thread_id: str, generation: int | None) -> int:
        """Validate a flush's target generation; ``None`` means the thread's head.

        :raises InvalidArgument: the generation is malformed or above the head.
        """
        check_thread_id(thread_id)
        self.projector()
        head = await reads.head(thread_id)
        if generation is None:
            generation = head
        check_count(generation, name="generation", minimum=0, maximum=1 << 62)
        if generation > head:
            raise InvalidArgument(
                f"generation {generation} is above thread {thread_id!r}'s head ({head}); "
                "flush the generation append() returned")
        return generation

    def wait(self, thread_id: str, generation: int, timeout: float | None) -> ThreadMetadata:
        """The sync barrier: wait until ``generation`` is projected, then settle.

        The caller may run its idle thread's projection itself (``caller_runs``), within
        the deadline.
        """
        projector = self.projector()
        deadline = _deadlines.after(timeout)
        with self.span(thread_id) as info, _deadlines.until(deadline):
            info["target"] = generation
            waiter = projector.begin_wait(thread_id, generation, deadline=deadline)
            outcome = Success(None) if waiter is None else projector.wait(waiter, deadline)
            return self.settle(thread_id, generation, timeout, outcome, info)

    async def begin_in(self, reads: AsyncBarrierReads, thread_id: str, generation: int,
                       callback: Callable[[Outcome], None] | None) -> Waiter | None:
        """Register a waiter resolved by push (``callback`` runs in the resolving thread).

        Never runs the projection in the calling thread, so an awaiting caller holds no
        thread. Returns ``None`` when ``generation`` is already projected.
        """
        return await self.projector().register(reads, thread_id, generation, callback,
                                               allow_caller_run=False)

    def cancel(self, waiter: Waiter) -> Outcome | None:
        """Withdraw a waiter (timeout, cancellation); return its outcome if it had one."""
        if self._projector is not None:
            self._projector.cancel(waiter)
        return waiter.outcome

    def span(self, thread_id: str) -> AbstractContextManager[dict[str, Any]]:
        """The barrier's span; set ``info["target"]``, and ``settle`` sets its outcome."""
        return self._telemetry.flush_span(thread_id)

    def settle(self, thread_id: str, generation: int, timeout: float | None,
               outcome: Outcome | None, info: dict[str, Any]) -> ThreadMetadata:
        """:meth:`settle_in` on the sync ports."""
        return complete(self.settle_in(self.port_reads, thread_id, generation, timeout, outcome, info))

    async def settle_in(self, reads: AsyncBarrierReads, thread_id: str, generation: int,
                        timeout: float | None, outcome: Outcome | None,
                        info: dict[str, Any]) -> ThreadMetadata:
        """Turn a barrier's outcome (``None``: timed out) into metadata or its typed error."""
        if outcome is None:
            info["outcome"] = "timeout"
            raise await self._timed_out(reads, thread_id, generation, timeout)
        if isinstance(outcome, BaseException):
            info["outcome"] = type(outcome).__name__
            raise outcome
        info["outcome"] = "ok"
        if outcome.meta is not None:
            return caller_copy(outcome.meta)
        return await self._projected_meta(reads, thread_id)

    async def _projected_meta(self, reads: AsyncBarrierReads, thread_id: str) -> ThreadMetadata:
        """Read the metadata a barrier returns when its outcome carried none.

        The barrier's generation is projected and its items are durable, so an error here
        (the store closing under the read) must say so, like every barrier error.
        """
        try:
            return await self._read_meta(reads, thread_id)
        except (StoreClosed, StorageError) as exc:
            if self._closed_reason() is None and not isinstance(exc, StoreClosed):
                raise StorageError(f"{exc} {DURABLE_NOTE}") from exc
            raise StoreClosed(f"the thread store closed before the barrier on thread {thread_id!r} "
                              f"could read its metadata. {DURABLE_NOTE}") from exc

    def read_outcome(self, thread_id: str) -> Outcome:
        """The projected metadata as a barrier outcome, or the error reading it (blocking)."""
        try:
            return Success(complete(self._projected_meta(self.port_reads, thread_id)))
        except ThreadStoreError as exc:
            return exc

    def wait_each(self, heads: Mapping[str, int], progress: Callable[[int, int], None] | None) -> None:
        """Wait for each thread in turn until its ``heads`` generation is projected
        (``rebuild_index``); a thread discarded meanwhile counts as done.

        :param progress: called as ``progress(threads_done, threads_total)``.
        """
        for done, (thread_id, head) in enumerate(heads.items(), 1):
            try:
                self.wait(thread_id, self.target(thread_id, head), None)
            except ThreadDiscarded:
                pass
            if progress is not None:
                progress(done, len(heads))

    # -- flush_all ------------------------------------------------------------------------

    def wait_all(self, timeout: float | None) -> None:
        """The sync ``flush_all``: wait for every thread behind at call time, then settle."""
        projector = self.projector()
        deadline = _deadlines.after(timeout)
        with _deadlines.until(deadline):
            waiters = self.begin_all(None)
            for waiter in waiters:
                if projector.wait(waiter, deadline) is None:
                    break
            self.settle_all(waiters, timeout)

    def begin_all(self, callback: Callable[[Outcome], None] | None) -> list[Waiter]:
        """Register one waiter per thread that is behind (``flush_all``): as this process
        knows it, and as the store has it (threads other processes appended to)."""
        projector = self.projector()
        behind = {lag.thread_id: lag.head for lag in self._stale(0.0)}
        for thread_id, head in projector.behind().items():
            behind[thread_id] = max(head, behind.get(thread_id, 0))
        waiters: list[Waiter] = []
        for thread_id, head in behind.items():
            try:
                waiter = projector.begin_wait(thread_id, head, callback, allow_caller_run=False)
            except ThreadDiscarded:
                continue
            if waiter is not None:
                waiters.append(waiter)
        return waiters

    def settle_all(self, waiters: list[Waiter], timeout: float | None) -> None:
        """:meth:`settle_all_in` on the sync ports."""
        complete(self.settle_all_in(self.port_reads, waiters, timeout))

    async def settle_all_in(self, reads: AsyncBarrierReads, waiters: list[Waiter],
                            timeout: float | None) -> None:
        """Withdraw ``flush_all``'s unresolved waiters and raise what their outcomes say."""
        failed: list[tuple[str, BaseException]] = []
        for waiter, outcome in [(w, self.cancel(w)) for w in waiters]:
            if outcome is None:
                raise await self._timed_out(reads, waiter.thread_id, waiter.target, timeout)
            if isinstance(outcome, ProjectionFailed):
                failed.append((waiter.thread_id, outcome))
            elif isinstance(outcome, StoreClosed):
                raise outcome
        if failed:
            error = ProjectionFailed([t for t, _ in failed], None,
                                     "; ".join(f"{t}: {describe(e.__cause__)}" for t, e in failed))
            raise error from failed[0][1]

    async def _timed_out(self, reads: AsyncBarrierReads, thread_id: str, target: int,
                         timeout: float | None) -> FlushTimeout:
        """The timeout error of a barrier, with the generation projected so far."""
        try:
            projected = (await reads.checkpoint(thread_id)).projected_seq
        except ThreadStoreError:  # the store closing under the read: what was known is 0
            projected = 0
        return FlushTimeout(thread_id, target, projected, timeout or 0.0)

