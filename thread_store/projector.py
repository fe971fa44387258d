"""The projector: the worker, its lock and lifecycle, and the events and barriers it serves.

One worker thread (``thread_store-projector``) takes every thread that is due
(:mod:`thread_store._schedule`) and projects them in one index transaction
(:mod:`thread_store._attempt`). A barrier registers a waiter before it checks, expedites
its thread, and may run its thread's projection itself when nothing else is (saving two
thread hand-offs). Each thread's phase and its transitions are pure
(:mod:`thread_store._state`), and so is the bookkeeping over all threads
(:mod:`thread_store._schedule`); this module runs them under its lock, and
:mod:`thread_store._removal` borrows that lock for discard and delete.

Lock order: the projector lock is never held while calling storage. Local state is a
cache of the store: ``projected`` is a lower bound of the stored ``projected_seq``, and a
thread with no state here is not taken as caught up (a barrier reads its checkpoint).

Signals: CPython runs signal handlers only in the main thread, so a ``KeyboardInterrupt``
can land in a barrier that runs its own attempt, never in the worker. A claimed attempt
leaves flight in a ``finally`` (:meth:`AttemptRunner.run`), and a barrier interrupted between
claiming and running gives its claim back (:meth:`Projector.begin_wait`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from typing import Callable, Iterable

from opentelemetry.trace import SpanContext

from ._attempt import AttemptRunner, ProjectionHook
from ._catch_up import CatchUp
from ._outcomes import AttemptOutcome, LocalStatus, Outcome, Result, Waiter
from ._phases import SCHEDULABLE, Phase, RemovalKind
from ._port_reads import PortReads, complete
from ._priority import AppendPriority
from ._removal import Removal, Removals
from ._schedule import Schedule
from ._state import Claim, ThreadState
from .derive import ProjectionRules
from .errors import DURABLE_NOTE, StoreClosed
from .model import EncodedItem, ProjectorStats, RetryPolicy
from .storage import AsyncBarrierReads, Lag, Storage
from .tracing import Telemetry

__all__ = ["Projector"]

log = logging.getLogger(__name__)

_HEARTBEAT_S = 1.0
#: Threads per group commit. Settling a batch, claiming it and building its rows are
#: stretches of Python that hold the GIL (settling also the projector lock), and an
#: append in another thread waits for them: at 512 they took milliseconds and set the
#: append p99 with many threads pending. A commit per 64 rows costs little more.
_MAX_BATCH = 64
#: Claims settled per hold of the projector lock in the worker (see _end_attempts).
_SETTLE_SLICE = 8
#: After close's deadline, how long it waits for a writer it has fenced and interrupted
#: to roll back and let go of the index (a statement stops within milliseconds).
_FENCE_GRACE_S = 1.0


def _oldest_append(work: Iterable[Claim | ThreadState]) -> float | None:
    """When the oldest work appended in this process among ``work`` came (``None``: all
    of it was found behind), for :class:`AppendPriority`."""
    return min((w.pending_since for w in work if w.appends and w.pending_since is not None),
               default=None)


def _worker_main(ref: weakref.ReferenceType[Projector]) -> None:
    """The worker thread's target; it holds only a weak reference to its projector."""
    while True:
        projector = ref()
        if projector is None:
            return
        claims = projector._next_batch()
        if claims is None:
            return
        try:
            if claims:
                projector.priority.start_batch(_oldest_append(claims), time.monotonic())
                projector._run(claims)
            # A slice of the storage's bookkeeping may hold the history's write lock.
            projector._step_aside()
            projector._catch_up.run(paused=projector._paused)
        except Exception:  # noqa: BLE001 - _run settles its claims; the worker must live on
            log.exception("thread_store: the projector worker hit an unexpected error")
        del projector, claims


class Projector:
    """Keeps the index caught up with the history, and serves barriers."""

    def __init__(self, storage: Storage, rules: ProjectionRules,
                 telemetry: Telemetry, *, hook: ProjectionHook | None, retry: RetryPolicy,
                 coalesce_delay: float, caller_runs: bool, catch_up_after: float | None) -> None:
        self._storage = storage
        self._index = storage.index
        self._port_reads = PortReads(storage)
        self._telemetry = telemetry
        #: This process's appends under way, which the worker steps aside for.
        self.priority = AppendPriority()
        self._runner = AttemptRunner(storage.history, storage.index, rules, hook, telemetry,
                                     on_commit=self._count_transaction,
                                     step_aside=self._step_aside)
        self._delay = coalesce_delay
        self._caller_runs = caller_runs
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._schedule = Schedule(coalesce_delay, retry, telemetry)  # guarded by the lock
        self._threads = self._schedule.states
        self._removals = Removals(self._lock, self._idle, self._schedule, self._work.notify)
        self._paused = False
        self._holding = False  # the worker waits before claiming a due batch (_hold)
        self._heartbeat = time.monotonic()
        self._catch_up = CatchUp(storage, self._lock, self._schedule, self._work.notify, catch_up_after)
        # A daemon thread: after close() has fenced it, a worker stuck in a projection_hook
        # can never write again, and it must not keep the process alive (as a non-daemon
        # thread would, since interpreter exit joins those). Exiting without waiting for
        # it loses nothing acknowledged: append returns only once the items are durable,
        # and every store still open at exit is closed, so drained within its deadline,
        # by the threading atexit hook in store.py, which runs before daemon threads stop.
        self._worker = threading.Thread(target=_worker_main, args=(weakref.ref(self),),
                                        name="thread_store-projector", daemon=True)
        telemetry.observe(self._gauges)

    def start(self, behind: list[Lag]) -> None:
        """Schedule catch-up of the threads found behind at open, and start."""
        self._catch_up.adopt(behind)
        # Started from open(), never lazily from a request, so the worker inherits no
        # caller's context (threads start with an empty contextvars context anyway).
        self._worker.start()

    # -- events from the store (called once the history committed) -------------------

    def on_create(self, thread_id: str, first: EncodedItem | None) -> None:
        """A thread was created, with its ``first`` item or none."""
        with self._lock:
            if self._schedule.created(thread_id, first, time.monotonic()):
                self._work.notify()

    def on_append(self, thread_id: str, head: int, items: list[EncodedItem],
                  context: SpanContext | None, *, schedule: bool = True) -> None:
        """Items up to ``head`` are durable; schedule (and coalesce) their projection.

        ``schedule=False`` when a barrier on ``head`` follows at once (append_and_flush,
        sync mode): the barrier claims or expedites the thread, so no wake-up is spent.
        """
        with self._lock:
            if self._schedule.appended(thread_id, head, items, context, time.monotonic(),
                                       schedule=schedule):
                self._work.notify()

    # -- barriers -------------------------------------------------------------------------

    def begin_wait(self, thread_id: str, target: int,
                   callback: Callable[[Outcome], None] | None = None, *,
                   allow_caller_run: bool = True, deadline: float | None = None) -> Waiter | None:
        """:meth:`register` with the sync ports' reads, in the calling thread."""
        return complete(self.register(self._port_reads, thread_id, target, callback,
                                      allow_caller_run=allow_caller_run, deadline=deadline))

    async def register(self, reads: AsyncBarrierReads, thread_id: str, target: int,
                       callback: Callable[[Outcome], None] | None = None, *,
                       allow_caller_run: bool = True, deadline: float | None = None) -> Waiter | None:
        """Register a waiter for ``target``, or return ``None`` if it is already projected.

        What it must know from the store (the checkpoint of a thread this process holds
        no state for, the incarnation of one it holds) comes from ``reads``: the sync
        ports, or an async face's native reads, awaited on the event loop, never under
        the projector lock.

        The waiter is registered before the check, under the same lock the projector
        resolves waiters with, so no wake-up can be lost. With ``allow_caller_run`` the
        caller may run its idle thread's projection itself. A caller with a ``deadline``
        only does so when the work is small and cannot block (no hook, buffered items on
        a small cached fold state), and gives it back rather than wait for the index write
        lock past the deadline, so a barrier never outlives its timeout.

        A ``BaseException`` that is not an ``Exception`` (Ctrl-C) raised while the caller
        runs the attempt propagates, after the attempt is handed back to the worker and
        the waiter withdrawn.
        """
        claim: Claim | None = None
        waiter: Waiter | None = None
        forgotten = False
        with self._lock:
            st = self._threads.get(thread_id)
            known = st is not None
            # Known projected as far: the same thread still, not one that took its id?
            cached = (st.incarnation if st is not None and st.projected >= target
                      and not st.refold else None)
        # No state here says nothing about the store: read where its projection stands.
        checkpoint = None if known else await reads.checkpoint(thread_id)
        current = None if cached is None else await reads.incarnation(thread_id)
        try:
            with self._lock:
                if self._schedule.closing or self._schedule.stopped:
                    raise StoreClosed(f"the thread store is closed. {DURABLE_NOTE}")
                st = self._threads.get(thread_id)
                if st is None and checkpoint is not None:
                    if checkpoint.fold_state is not None and checkpoint.projected_seq >= target:
                        return None
                    st = self._threads[thread_id] = ThreadState(
                        thread_id, max(target, checkpoint.projected_seq), checkpoint.projected_seq)
                    st.refold, st.pending_since = checkpoint.fold_state is None, time.monotonic()
                # Forgotten while the checkpoint was read: read it again, out of the lock
                # (it is not reentrant, and a native read must never hold it).
                forgotten = st is None
                if st is not None:
                    waiter, claim = self._add_waiter(st, target, cached, current, callback,
                                                     allow_caller_run, deadline is None)
            if forgotten:
                return await self.register(reads, thread_id, target, callback,
                                           allow_caller_run=allow_caller_run, deadline=deadline)
            if claim is not None:
                self._run([claim], deadline)
        except BaseException:
            if claim is not None and not claim.settled:  # interrupted before _run took it
                self._end_attempts([claim], {id(claim): Result(AttemptOutcome.YIELDED)})
            if waiter is not None:
                self.cancel(waiter)
            raise
        return waiter

    def _add_waiter(self, st: ThreadState, target: int, cached: int | None, current: int | None,
                    callback: Callable[[Outcome], None] | None, allow_caller_run: bool,
                    no_deadline: bool) -> tuple[Waiter | None, Claim | None]:
        """Under the lock: register a waiter on ``st`` for ``target`` (``None``: already
        projected), and claim the thread for the caller to run when it may."""
        if st.removed:
            raise st.gone_error()
        if cached is not None and current != cached and st.incarnation == cached:
            st.rebase(target)  # re-created by another process since
        if st.projected >= target and not st.refold:
            return None, None
        st.saw_head(target, time.monotonic())  # another process may have appended
        waiter = Waiter(st.thread_id, target, st.failure_epoch, callback, st.condition(self._lock))
        first = not st.waiters
        st.waiters.append(waiter)
        st.unhold()
        small = not self._runner.has_hook and st.bounded_work
        if (allow_caller_run and self._caller_runs and st.phase in SCHEDULABLE
                and not self._paused and (small or no_deadline)):
            return waiter, self._schedule.claim(st, expedited=True)
        if st.phase is Phase.IDLE or (first and st.due_at is not None):
            self._make_due(st, 0.0, cut_backoff=True)
        if self._holding:
            self._work.notify()
        elif st.phase is Phase.IN_FLIGHT:
            self.priority.expedite()  # its batch may be paced as background
        return waiter, None

    def wait(self, waiter: Waiter, deadline: float | None) -> Outcome | None:
        """Block until ``waiter`` resolves; ``None`` at the deadline (waiter removed)."""
        with self._lock:
            while waiter.outcome is None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    self._schedule.drop_waiter(waiter)
                    return None
                waiter.cond.wait(remaining)
            return waiter.outcome

    def cancel(self, waiter: Waiter) -> None:
        """Remove a waiter that timed out or was cancelled."""
        with self._lock:
            self._schedule.drop_waiter(waiter)

    def check_live(self, thread_id: str) -> None:
        """Raise :class:`ThreadDiscarded` if the thread is being discarded or deleted."""
        with self._lock:
            st = self._threads.get(thread_id)
            if st is not None and not st.live:
                raise st.gone_error()

    def behind(self) -> dict[str, int]:
        """``{thread_id: head}`` of every thread whose projection is behind (see
        :meth:`Schedule.behind`)."""
        with self._lock:
            return self._schedule.behind()

    def local_status(self, thread_id: str) -> LocalStatus:
        """This process's attempts, waiters and last error of the thread.

        :raises ThreadDiscarded: the thread is being (or was) discarded or deleted.
        """
        with self._lock:
            return self._schedule.local_status(thread_id)

    def stats(self) -> ProjectorStats:
        """Counters since open."""
        with self._lock:
            return self._schedule.stats()

    # -- discard / delete -----------------------------------------------------------------

    def begin_removal(self, thread_id: str, kind: RemovalKind, head: int,
                      timeout: float | None) -> Removal:
        """Phase one of a discard or delete (see :meth:`Removals.begin`)."""
        self.priority.expedite()  # the thread may be in a batch paced as background
        return self._removals.begin(thread_id, kind, head, timeout)

    # -- lifecycle ------------------------------------------------------------------------

    def pause(self) -> None:
        """Hold the projector still: no new attempt starts until :meth:`resume`."""
        with self._lock:
            self._paused = True

    @property
    def paused(self) -> bool:
        """Whether :meth:`pause` holds the projector."""
        return self._paused

    def resume(self) -> None:
        """Let the projector run again."""
        with self._lock:
            self._paused = False
            self._work.notify()

    def close(self, timeout: float | None) -> dict[str, int]:
        """Drain within ``timeout`` (``None``: no limit), fence the index, resolve waiters,
        join the worker.

        Returns ``{thread_id: head}`` of the threads still behind (for the next open).
        """
        deadline = None if timeout is None else time.monotonic() + timeout

        def remaining() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        schedule = self._schedule
        with self._lock:
            already = schedule.closing
            schedule.closing = True
            self.priority.drain()
            self._paused = False
            self._work.notify()
            self._removals.give_up()
            while schedule.has_due or schedule.in_flight or self._removals.active:
                left = remaining()
                if left == 0.0:
                    break
                self._idle.wait(left)
        if not already:
            # Past the deadline a group commit may still hold the write lock: the fence
            # makes it roll back (it is checked for every row and before COMMIT), and the
            # interrupt cuts its running statement short, so this returns on time.
            if not self._index.fence(_FENCE_GRACE_S):
                log.warning("thread_store: the index writer did not stop at close; it is "
                            "fenced and will write nothing")
        with self._lock:
            schedule.stopped = True
            for st in self._threads.values():
                schedule.resolve(st, None, final=True)
            self._work.notify_all()
        if self._worker.is_alive() and self._worker is not threading.current_thread():
            self._worker.join(remaining())
            if self._worker.is_alive():
                log.warning("thread_store: projector still busy at close (a projection_hook "
                            "or an index write is running); it is fenced and will write nothing")
        return self.behind()

    def stop_now(self) -> None:
        """Stop without draining (garbage collection, fork): history keeps everything."""
        with self._lock:
            self._schedule.closing = self._schedule.stopped = True
            self._work.notify_all()
        self._index.fence(0.0)

    def reset_after_fork(self) -> None:
        """In a forked child: new locks, no worker; every call raises StoreClosed."""
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self.priority = AppendPriority()
        self._schedule.clear()
        self._threads = self._schedule.states
        self._removals = Removals(self._lock, self._idle, self._schedule, self._work.notify)
        self._catch_up.reset_after_fork(self._lock, self._work.notify)
        self._schedule.closing = self._schedule.stopped = True

    # -- worker ---------------------------------------------------------------------------

    def _next_batch(self) -> list[Claim] | None:
        """Wait until some thread is due, then claim a batch (see :meth:`Schedule.due`);
        ``None`` means exit, and no claim means the history's acknowledgements are due."""
        with self._lock:
            while True:
                now = time.monotonic()
                self._heartbeat = now
                if self._schedule.stopped:
                    return None
                wake = math.inf
                if not self._paused:
                    batch, wake = self._schedule.due(now, limit=_MAX_BATCH)
                    hold = self._hold(batch, now)
                    if hold:  # for a gap in this process's appends; a new waiter ends it
                        self._holding = True
                        self._work.wait(hold)
                        self._holding = False
                        continue
                    if batch:
                        self._schedule.wake_at = None
                        return [self._schedule.claim(st, expedited=bool(st.waiters)) for st in batch]
                # The timed wait below is what paces the acknowledgements: no timer of
                # their own, and never a write on an append's or a barrier's path.
                acks_at = self._catch_up.due_at(paused=self._paused)
                if acks_at <= now:
                    self._schedule.wake_at = None
                    return []
                wake = min(wake, acks_at)
                self._schedule.wake_at = None if self._paused else wake
                self._work.wait(max(0.0, min(wake - now, _HEARTBEAT_S)))

    def _hold(self, batch: list[ThreadState], now: float) -> float:
        """Under the lock: how long to wait before claiming ``batch`` (see
        :meth:`AppendPriority.hold`); never for a waiter's thread."""
        if not batch or any(st.waiters for st in batch):
            return 0.0
        return self.priority.hold(_oldest_append(batch), now)

    def _make_due(self, st: ThreadState, delay: float, *, backoff: bool = False,
                  cut_backoff: bool = False) -> None:
        """Schedule ``st`` after ``delay`` (lock held); wake the worker if it sleeps past it."""
        if self._schedule.schedule(st, time.monotonic() + delay, backoff=backoff,
                                   cut_backoff=cut_backoff):
            self._work.notify()

    def _run(self, claims: list[Claim], deadline: float | None = None) -> None:
        """Run the claims' attempts; each leaves flight in :meth:`_end_attempts` whatever
        is raised where (see :meth:`AttemptRunner.run`)."""
        in_caller = threading.current_thread() is not self._worker
        try:
            self._runner.run(claims, self._end_attempts, deadline, in_caller=in_caller)
        finally:
            if in_caller and self._catch_up.due_at(paused=self._paused) <= time.monotonic():
                with self._lock:  # the batch is full: the worker writes it, not this caller
                    self._work.notify()

    def _count_transaction(self) -> None:
        """A group commit landed (called by the attempt runner, no lock held)."""
        with self._lock:
            self._schedule.counts.transactions += 1
        self._telemetry.transactions.add(1)

    def _end_attempts(self, claims: list[Claim], results: dict[int, Result]) -> dict[int, float | None]:
        """Take claims out of flight with their results (:meth:`Schedule.settle`);
        returns each retry's backoff.

        A failure for good is recorded in the store first, so that status() shows it,
        from every process, by the time a waiter hears of it. The worker settles a batch
        in slices, stepping aside for appends between them: settling holds the lock an
        append needs, and the GIL.
        """
        failed = self._schedule.failures_for_good(claims, results)
        if failed:
            self._index.record_failures(failed)
        worker = threading.current_thread() is self._worker
        step = _SETTLE_SLICE if worker else max(1, len(claims))
        backoffs: dict[int, float | None] = {}
        done = 0
        try:
            while done < len(claims):
                if done:
                    self.priority.step_aside()
                part = claims[done:done + step]
                done += len(part)
                backoffs.update(self._settle(part, results))
        finally:
            if done < len(claims):  # a slice raised: the rest leave flight all the same
                self._settle(claims[done:], results)
        return backoffs

    def _settle(self, claims: list[Claim], results: dict[int, Result]) -> dict[int, float | None]:
        with self._lock:
            try:
                settled = self._schedule.settle(claims, results, now=time.monotonic())
            finally:
                self._idle.notify_all()
            if settled.wake:
                self._work.notify()
        return settled.backoffs

    def _step_aside(self, background: bool = False) -> None:
        """Between two folds of a batch, in the worker: let appends go first (see
        :meth:`AppendPriority.step_aside`)."""
        self.priority.step_aside(background)

    def _gauges(self) -> dict[str, float]:
        with self._lock:
            if self._schedule.stopped:
                return {}  # a closed store reports nothing (see Telemetry.observe)
            now = time.monotonic()
            return {**self._schedule.gauges(now), "heartbeat_age": now - self._heartbeat}
