"""The projector: per-thread scheduling, coalescing, barriers, retries and group commit.

One worker thread (``thread_store-projector``) takes every thread that is due and
projects them in one index transaction (:mod:`thread_store._attempt`). A barrier
registers a waiter before it checks, expedites its thread, and may run its thread's
projection itself when nothing else is (saving two thread hand-offs). The pending state
per thread is O(1) (:mod:`thread_store._state`).

Lock order: the projector lock is never held while calling storage. Local state is a
cache of the store: ``projected`` is a lower bound of the stored ``projected_seq``, and a
thread with no state here is not taken as caught up (a barrier reads its checkpoint).

Signals: CPython runs signal handlers only in the main thread, so a ``KeyboardInterrupt``
can land in a barrier that runs its own attempt, never in the worker. A claimed attempt
leaves flight in a ``finally`` (:meth:`Projector._run`), and a barrier interrupted between
claiming and running gives its claim back (:meth:`Projector.begin_wait`).
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
import traceback
import weakref
from collections import OrderedDict
from typing import Callable

from opentelemetry.trace import SpanContext

from ._attempt import AttemptRunner, ProjectionHook
from ._state import (Claim, LocalStatus, Outcome, Phase, Result, Success, ThreadState, Waiter,
                       describe)
from .derive import ProjectionRules
from .errors import DURABLE_NOTE, ProjectionFailed, StoreClosed
from .model import EncodedItem, ProjectorStats, RetryPolicy, ThreadMetadata
from .storage import Failure, Lag, Storage, StoredRow
from .tracing import MAX_LINKS, Projection, Telemetry

__all__ = ["Outcome", "ProjectionHook", "Projector", "Removal", "Success", "Waiter"]

log = logging.getLogger(__name__)

_HEARTBEAT_S = 1.0
_MAX_BATCH = 512
#: Caught-up threads keep their state (and fold cache) until this many are idle.
_IDLE_STATES = 2048
#: After close's deadline, how long it waits for a writer it has fenced and interrupted
#: to roll back and let go of the index (a statement stops within milliseconds).
_FENCE_GRACE_S = 1.0


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
                projector._run(claims)
            projector._housekeep()
        except Exception:  # noqa: BLE001 - _run settles its claims; the worker must live on
            log.exception("thread_store: the projector worker hit an unexpected error")
        del projector, claims


class Removal:
    """A discard or delete under way, in two phases (see :meth:`Projector.begin_removal`).

    :meth:`commit` once the history and the row are gone; :meth:`abort` if removing
    failed, which puts the thread back as it was: its pending work is scheduled again and
    its waiters keep waiting, so a failed removal has changed nothing.
    """

    __slots__ = ("_projector", "_state", "_open")

    def __init__(self, projector: Projector, state: ThreadState) -> None:
        self._projector = projector
        self._state = state
        self._open = True

    def commit(self) -> None:
        """The thread is removed: fail its waiters with ThreadDiscarded, forget it."""
        self._projector._end_removal(self, committed=True, row_deleted=True)

    def abort(self, *, row_deleted: bool) -> None:
        """Removing failed: restore the thread (re-fold it if its row was deleted)."""
        self._projector._end_removal(self, committed=False, row_deleted=row_deleted)


class Projector:
    """Keeps the index caught up with the history, and serves barriers."""

    def __init__(self, storage: Storage, rules: ProjectionRules,
                 telemetry: Telemetry, *, hook: ProjectionHook | None, retry: RetryPolicy,
                 coalesce_delay: float, caller_runs: bool) -> None:
        self._storage = storage
        self._index = storage.index
        self._telemetry = telemetry
        self._runner = AttemptRunner(storage.history, storage.index, rules, hook,
                                     on_commit=self._count_transaction)
        self._retry = retry
        self._delay = coalesce_delay
        self._caller_runs = caller_runs
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._threads: dict[str, ThreadState] = {}
        self._scheduled: dict[str, ThreadState] = {}
        self._idle_lru: OrderedDict[str, None] = OrderedDict()
        self._in_flight = 0
        self._removals = 0  # removals doing their I/O; close waits for them like for attempts
        self._paused = False
        self._closing = False
        self._stopped = False
        self._worker_wake_at: float | None = None
        self._heartbeat = time.monotonic()
        self._rng = random.Random()
        self._counts = {"transactions": 0, "rows": 0, "attempts": 0, "retries": 0, "failures": 0}
        self._failed: list[Failure] = []  # to record in the store, outside the lock
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
        with self._lock:
            for lag in behind:
                thread_id = lag.thread_id
                st = ThreadState(thread_id, lag.head, 0 if lag.refold else lag.projected or 0)
                st.refold = lag.refold
                st.pending_since = time.monotonic()
                self._threads[thread_id] = st
                self._schedule(st, 0.0)
        # Started from open(), never lazily from a request, so the worker inherits no
        # caller's context (threads start with an empty contextvars context anyway).
        self._worker.start()

    # -- events from the store (called once the history committed) -------------------

    def on_create(self, thread_id: str, first: EncodedItem | None) -> None:
        """A thread was created, with its ``first`` item or none."""
        head = 0 if first is None else 1
        with self._lock:
            raced = self._threads.get(thread_id)
            if raced is not None and raced.live:
                # An append to the new id got here first: it only lacks the fold's origin.
                raced.refold = True
                return
            st = ThreadState(thread_id, 0, 0)
            self._threads[thread_id] = st
            # A new thread folds from scratch and never reads a row (one left by a deleted
            # thread of the same id is overwritten); an empty thread still gets its row, so
            # include_empty lists it, and counts as behind until then.
            st.refold = True
            if first is not None:
                st.head = head
                st.buffer_items([StoredRow(1, first.ts_us, first.text, first.kind)])
                st.appends = 1
                st.pending_since = time.monotonic()
            self._schedule(st, self._delay)

    def on_append(self, thread_id: str, head: int, items: list[EncodedItem],
                  context: SpanContext | None, *, schedule: bool = True) -> None:
        """Items up to ``head`` are durable; schedule (and coalesce) their projection.

        ``schedule=False`` when a barrier on ``head`` follows at once (append_and_flush,
        sync mode): the barrier claims or expedites the thread, so no wake-up is spent.
        """
        first = head - len(items)
        with self._lock:
            st = self._threads.get(thread_id)
            if st is None:
                # Nothing known here: the attempt reads the stored checkpoint (projected 0
                # is a lower bound), and a fresh empty thread may buffer from its start.
                st = self._threads[thread_id] = ThreadState(thread_id, first, 0)
            elif st.removed or head <= st.projected:
                return  # an attempt that read it from history made it visible already
            # While a removal is under way the work is recorded but not scheduled
            # (_schedule skips it): if the removal fails, it is projected as usual.
            if st.buffer is not None and first != st.head:
                st.buffer, st.buffer_bytes = None, 0  # another append got here first
            if st.buffer is not None:
                st.buffer_items([StoredRow(first + n, it.ts_us, it.text, it.kind)
                                 for n, it in enumerate(items, 1)])
            st.head = max(st.head, head)
            st.appends += 1
            if context is not None:
                if len(st.contexts) < MAX_LINKS:
                    st.contexts.append((head, context))
                else:
                    st.dropped += 1
            if st.pending_since is None:
                st.pending_since = time.monotonic()
            st.unhold()
            if schedule:
                self._schedule(st, 0.0 if st.waiters else self._delay)

    # -- barriers -------------------------------------------------------------------------

    def begin_wait(self, thread_id: str, target: int,
                   callback: Callable[[Outcome], None] | None = None, *,
                   allow_caller_run: bool = True, deadline: float | None = None) -> Waiter | None:
        """Register a waiter for ``target``, or return ``None`` if it is already projected.

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
        with self._lock:
            known = thread_id in self._threads
        # No state here says nothing about the store: read where its projection stands.
        checkpoint = None if known else self._index.checkpoint(thread_id)
        try:
            with self._lock:
                if self._closing or self._stopped:
                    raise StoreClosed(f"the thread store is closed. {DURABLE_NOTE}")
                st = self._threads.get(thread_id)
                if st is None and checkpoint is not None:
                    if checkpoint.fold_state is not None and checkpoint.projected_seq >= target:
                        return None
                    st = self._threads[thread_id] = ThreadState(
                        thread_id, max(target, checkpoint.projected_seq), checkpoint.projected_seq)
                    st.refold = checkpoint.fold_state is None
                    st.pending_since = time.monotonic()
                if st is None:  # forgotten while the checkpoint was read: read it again
                    return self.begin_wait(thread_id, target, callback,
                                           allow_caller_run=allow_caller_run, deadline=deadline)
                if st.removed:
                    raise st.gone_error()
                if st.projected >= target and not st.refold:
                    return None
                waiter = Waiter(thread_id, target, st.failure_epoch, callback, self._cond(st))
                first = not st.waiters
                st.waiters.append(waiter)
                st.unhold()
                small = not self._runner.has_hook and st.bounded_work
                if (allow_caller_run and self._caller_runs and st.in_flight is None and st.live
                        and not self._paused and (small or deadline is None)):
                    claim = self._claim(st, expedited=True)
                elif st.in_flight is None and (first or st.ready_at is None):
                    self._schedule(st, 0.0, cut_backoff=True)
            if claim is not None:
                self._run([claim], deadline)
        except BaseException:
            if claim is not None and not claim.settled:  # interrupted before _run took it
                self._end_attempts([claim], {}, {})
            if waiter is not None:
                self.cancel(waiter)
            raise
        return waiter

    def wait(self, waiter: Waiter, deadline: float | None) -> Outcome | None:
        """Block until ``waiter`` resolves; ``None`` at the deadline (waiter removed)."""
        with self._lock:
            while waiter.outcome is None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    self._drop_waiter_locked(waiter)
                    return None
                waiter.cond.wait(remaining)
            return waiter.outcome

    def cancel(self, waiter: Waiter) -> None:
        """Remove a waiter that timed out or was cancelled."""
        with self._lock:
            self._drop_waiter_locked(waiter)

    def check_live(self, thread_id: str) -> None:
        """Raise :class:`ThreadDiscarded` if the thread is being discarded or deleted."""
        with self._lock:
            st = self._threads.get(thread_id)
            if st is not None and not st.live:
                raise st.gone_error()

    def behind(self) -> dict[str, int]:
        """``{thread_id: head}`` of every thread whose projection is behind.

        A thread mid-removal counts too: its removal may still fail after deleting the
        row, and then the next open must find it.
        """
        with self._lock:
            return {t: s.head for t, s in self._threads.items()
                    if (s.live and s.behind) or s.phase is Phase.REMOVING}

    def local_status(self, thread_id: str) -> LocalStatus:
        """This process's attempts, waiters and last error of the thread.

        :raises ThreadDiscarded: the thread is being (or was) discarded or deleted.
        """
        with self._lock:
            st = self._threads.get(thread_id)
            if st is None:
                return LocalStatus(0, 0, None)
            if not st.live:
                raise st.gone_error()
            return LocalStatus(st.attempts, len(st.waiters), st.last_error)

    def stats(self) -> ProjectorStats:
        """Counters since open."""
        with self._lock:
            return ProjectorStats(
                transactions=self._counts["transactions"], rows_written=self._counts["rows"],
                attempts=self._counts["attempts"], retries=self._counts["retries"],
                failures=self._counts["failures"],
                pending_threads=sum(1 for s in self._threads.values() if s.behind),
                waiters=sum(len(s.waiters) for s in self._threads.values()))

    # -- discard / delete -----------------------------------------------------------------

    def begin_removal(self, thread_id: str, kind: str, head: int,
                      timeout: float | None) -> Removal:
        """Phase one of a discard or delete: stop projecting the thread, keep everything.

        Pending work stays recorded but is not scheduled, and waiters keep waiting: both
        outlive a removal that fails (:meth:`Removal.abort`). Waits up to ``timeout`` for
        an attempt in flight; one still running after that is fenced: it re-checks the
        phase under the index write lock, which the removal takes to delete the row, and
        writes nothing.

        :param head: the thread's head as history has it, for a thread with no state here.
        :raises StoreClosed: the store is closing; the thread is left as it was.
        :raises ThreadDiscarded: another removal of the thread is under way.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            if self._closing or self._stopped:
                raise StoreClosed(f"the thread store is closed; thread {thread_id!r} was not "
                                  f"{kind}")
            st = self._threads.get(thread_id)
            if st is None:  # projected unknown (0 is a lower bound): an abort re-folds it
                st = self._threads[thread_id] = ThreadState(thread_id, head, 0)
            elif not st.live:
                raise st.gone_error()
            st.begin_removal(kind)
            self._scheduled.pop(thread_id, None)
            self._idle_lru.pop(thread_id, None)
            self._idle.notify_all()  # close() may be waiting for the schedule to empty
            while st.in_flight is not None and not self._closing:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._cond(st).wait(remaining)
            if self._closing:  # close() woke us: leave the thread to its drain, untouched
                st.abort_removal(row_deleted=False)
                self._reschedule(st)
                raise StoreClosed(f"the thread store closed; thread {thread_id!r} was not {kind}")
            self._removals += 1
        return Removal(self, st)

    def _end_removal(self, removal: Removal, *, committed: bool, row_deleted: bool) -> None:
        """Phase two of a removal: commit it or put the thread back (see :class:`Removal`)."""
        with self._lock:
            if not removal._open:
                return
            removal._open = False
            self._removals -= 1
            st = removal._state
            if committed:
                st.commit_removal()
                self._resolve(st, None)
                if self._threads.get(st.thread_id) is st:
                    del self._threads[st.thread_id]
            else:
                st.abort_removal(row_deleted=row_deleted)
                self._reschedule(st)
            self._idle.notify_all()
            if st.cond is not None:
                st.cond.notify_all()

    def _reschedule(self, st: ThreadState) -> None:
        """Schedule a thread that has work and nothing in flight, or retire it (lock held).

        An attempt in flight reschedules its thread when it ends (:meth:`_finish`).
        """
        if st.in_flight is not None:
            return
        if st.behind and not st.held and st.live and not self._stopped:
            self._schedule(st, 0.0 if st.waiters else self._delay)
        elif st.idle:
            self._retire(st)

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

        with self._lock:
            already = self._closing
            self._closing = True
            self._paused = False
            self._work.notify()
            for st in self._threads.values():  # removals waiting on an attempt give up
                if st.phase is Phase.REMOVING and st.cond is not None:
                    st.cond.notify_all()
            while self._scheduled or self._in_flight or self._removals:
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
            self._stopped = True
            for st in self._threads.values():
                self._resolve(st, None, final=True)
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
            self._closing = self._stopped = True
            self._work.notify_all()
        self._index.fence(0.0)

    def reset_after_fork(self) -> None:
        """In a forked child: new locks, no worker; every call raises StoreClosed."""
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._threads = {}
        self._scheduled = {}
        self._idle_lru = OrderedDict()
        self._closing = self._stopped = True

    # -- worker ---------------------------------------------------------------------------

    def _next_batch(self) -> list[Claim] | None:
        """Wait until some thread is due, then claim a batch; ``None`` means exit, and
        no claim means the history's acknowledgements are due.

        The batch takes every scheduled thread, not only the due ones: the first due
        thread opens one group commit for all that are waiting out their coalescing delay,
        so transactions stay about one per delay however the appends are spread over
        threads. A thread backing off after an error waits for its own due time.
        """
        with self._lock:
            while True:
                now = time.monotonic()
                self._heartbeat = now
                if self._stopped:
                    return None
                wake = math.inf
                if not self._paused:
                    eligible = []
                    for st in self._scheduled.values():
                        ready_at = st.ready_at if st.ready_at is not None else now
                        if ready_at <= now or self._closing or not st.backing_off:
                            eligible.append(st)
                        wake = min(wake, ready_at)
                    if eligible and (wake <= now or self._closing):
                        self._worker_wake_at = None
                        return [self._claim(st, expedited=bool(st.waiters))
                                for st in eligible[:_MAX_BATCH]]
                # The timed wait below is what paces the acknowledgements: no timer of
                # their own, and never a write on an append's or a barrier's path.
                acks_at = self._storage.housekeeping_due_at()
                if acks_at <= now:
                    self._worker_wake_at = None
                    return []
                wake = min(wake, acks_at)
                self._worker_wake_at = None if self._paused else wake
                self._work.wait(max(0.0, min(wake - now, _HEARTBEAT_S)))

    def _schedule(self, st: ThreadState, delay: float, *, backoff: bool = False,
                  cut_backoff: bool = False) -> None:
        """Make ``st`` due after ``delay`` (never later than it already is).

        A retry's backoff (``backoff=True``) is kept against later appends, so a busy
        thread does not burn its retry budget; only a new waiter (``cut_backoff``) cuts it.
        """
        if st.in_flight is not None or not st.live:
            return  # the attempt's end reschedules it if more work arrived
        if st.backing_off and not cut_backoff:
            return
        st.backing_off = backoff
        ready_at = time.monotonic() + delay
        self._scheduled[st.thread_id] = st
        if st.ready_at is not None and st.ready_at <= ready_at:
            return
        st.ready_at = ready_at
        # Wake the worker only if it sleeps past the new due time; a busy or paused
        # worker (wake time None) rescans the schedule before it sleeps again.
        wake = self._worker_wake_at
        if wake is not None and ready_at < wake:
            self._worker_wake_at = ready_at
            self._work.notify()

    def _claim(self, st: ThreadState, *, expedited: bool) -> Claim:
        """Start an attempt on ``st`` covering its current head (lock held)."""
        self._scheduled.pop(st.thread_id, None)
        st.ready_at = None
        st.backing_off = False
        st.in_flight = st.head
        st.attempts += 1
        self._in_flight += 1
        self._counts["attempts"] += 1
        items = None if st.buffer is None else list(st.buffer)
        return Claim(st, st.head, st.projected, [c for _, c in st.contexts],
                     st.dropped, st.appends, st.attempts, expedited, st.refold, st.pending_since,
                     None if st.refold else st.fold_state, items)

    def _run(self, claims: list[Claim], deadline: float | None = None) -> None:
        """Run one attempt per claim and commit the successful ones in one transaction.

        Every claim leaves flight in the ``finally``, whatever is raised where. In the
        worker any error fails only the batch's attempts and the worker lives on. In a
        barrier's calling thread, a ``BaseException`` that is not an ``Exception``
        (Ctrl-C, SystemExit) gives the attempts back unrun and reaches the caller.
        """
        tel = self._telemetry
        spans: dict[int, Projection] = {}
        results: dict[int, Result] = {}
        in_caller = threading.current_thread() is not self._worker
        try:
            if tel.tracing():
                for c in claims:
                    spans[id(c)] = tel.start_projection(
                        c.state.thread_id, c.contexts, c.dropped, c.appends, c.base, c.target,
                        c.attempt, c.expedited, len(claims))
            results = self._runner.run(claims, deadline, in_caller=in_caller)
        except BaseException as exc:  # noqa: BLE001 - the worker records, never dies
            if in_caller and not isinstance(exc, Exception):
                raise  # the finally hands the attempts back ("yielded")
            log.error("thread_store: projection batch failed: %s", describe(exc))
            results = {id(c): results.get(id(c)) or Result("failed", error=exc) for c in claims}
        finally:
            self._end_attempts(claims, results, spans)
            if in_caller and self._storage.housekeeping_due_at() <= time.monotonic():
                with self._lock:  # the batch is full: the worker writes it, not this caller
                    self._work.notify()

    def _housekeep(self) -> None:
        """In the worker, with no lock held: the storage's deferred bookkeeping, if due."""
        if self._storage.housekeeping_due_at() <= time.monotonic():
            self._storage.housekeep()

    def _count_transaction(self) -> None:
        """A group commit landed (called by the attempt runner, no lock held)."""
        with self._lock:
            self._counts["transactions"] += 1
        self._telemetry.transactions.add(1)

    def _end_attempts(self, claims: list[Claim], results: dict[int, Result],
                      spans: dict[int, Projection]) -> None:
        """Take claims out of flight with their results (``yielded`` when missing)."""
        outcomes = {id(c): results.get(id(c)) or Result("yielded") for c in claims}
        backoffs: dict[int, float | None] = {}
        with self._lock:
            try:
                for c in claims:
                    if not c.settled:
                        c.settled = True
                        backoffs[id(c)] = self._finish(c, outcomes[id(c)])
            finally:
                # Never leave a thread in flight, even if finishing one claim failed.
                for c in claims:
                    if not c.settled:
                        c.settled = True
                        c.state.in_flight = None
                self._in_flight -= len(claims)
                self._idle.notify_all()
                failed, self._failed = self._failed, []
        if failed:  # in the store, so status() shows it from every process
            self._index.record_failures(failed)
        # Spans end outside the lock: a coalesced projection marks up to MAX_LINKS appends
        # visible, one span each, and appends (on_append) must not wait for that.
        for c in claims:
            span = spans.get(id(c))
            if span is not None:
                result = outcomes[id(c)]
                try:
                    tel = self._telemetry
                    tel.end_projection(span, outcome=result.kind, error=result.error,
                                       backoff=backoffs.get(id(c)))
                except Exception:  # noqa: BLE001 - telemetry must not stop the projector
                    log.exception("thread_store: ending a projection span failed")

    def _finish(self, c: Claim, result: Result) -> float | None:
        """Apply one attempt's outcome to its thread and resolve waiters (lock held)."""
        st = c.state
        st.in_flight = None
        backoff = None
        now = time.monotonic()
        if result.kind == "gone" and st.live:
            st.commit_removal("deleted")  # its history vanished: never retry, fail its waiters
        if result.kind == "ok":
            self._counts["rows"] += 1
            st.projected_to(c.target, result.fold_state, result.state_bytes)
            st.refold = False
            st.failure = None
            st.attempts = 0
            st.last_error = None
            st.contexts = [(g, ctx) for g, ctx in st.contexts if g > c.target]
            st.appends -= c.appends
            st.dropped -= c.dropped
            if c.pending_since is not None:
                self._telemetry.lag.record(now - c.pending_since)
            st.pending_since = now if st.projected < st.head else None
        else:
            st.fold_state = None  # an impure rule may have changed it mid-attempt
        if result.kind in ("fenced", "yielded"):
            st.attempts = max(0, st.attempts - 1)  # it never ran: no budget spent
        if result.kind == "retry" and st.attempts < self._retry.attempts:
            self._counts["retries"] += 1
            self._telemetry.retries.add(1)
            st.last_error = describe(result.error)
            backoff = self._retry.delay(st.attempts, self._rng)
            self._schedule(st, backoff, backoff=True)
        elif result.kind in ("retry", "failed"):
            self._counts["failures"] += 1
            self._telemetry.failures.add(1)
            st.last_error = describe(result.error)
            try:
                if result.error is not None and result.error.__traceback__ is not None:
                    # The frames hold the failed batch's items and rows: keep the error only.
                    traceback.clear_frames(result.error.__traceback__)
            except Exception:  # noqa: BLE001 - a hook's error class may override __traceback__
                pass
            st.failure = result.error
            st.failed_gen = c.target
            self._failed.append(Failure(st.thread_id, c.target, describe(result.error)))
            st.failure_epoch += 1
            # Work that arrived while this attempt ran gets a fresh attempt and budget.
            st.held = st.head <= c.target
            if not st.held:
                st.attempts = 0
        self._resolve(st, result.meta)
        # A retry keeps its backoff: rescheduling it sooner here would spend the whole
        # budget in a burst while another process holds the lock (a new waiter still
        # cuts the backoff short in begin_wait).
        if backoff is None:
            self._reschedule(st)
        if st.cond is not None:
            st.cond.notify_all()
        return backoff

    def _resolve(self, st: ThreadState, meta: ThreadMetadata | None, *, final: bool = False) -> None:
        """Give every waiter of ``st`` that can be answered now its outcome (lock held)."""
        if not st.waiters:
            return
        keep = []
        for w in st.waiters:
            outcome: Outcome | None = None
            if st.removed:
                outcome = st.gone_error()
            elif st.projected >= w.target and not st.refold:
                outcome = Success(meta if meta is not None and meta.projected_seq >= w.target else None)
            elif st.failure_epoch > w.epoch and st.failed_gen >= w.target:
                error = ProjectionFailed([st.thread_id], st.failed_gen, describe(st.failure))
                error.__cause__ = st.failure
                outcome = error
            elif final:
                outcome = StoreClosed(
                    f"the store closed before thread {st.thread_id!r} reached generation "
                    f"{w.target} (projected: {st.projected}); it is caught up on the next open. "
                    + DURABLE_NOTE)
            if outcome is None:
                keep.append(w)
                continue
            w.outcome = outcome
            if w.callback is not None:
                try:
                    w.callback(outcome)
                except Exception:  # noqa: BLE001 - one waiter's callback must not hurt others
                    log.exception("thread_store: a barrier callback failed")
        st.waiters = keep
        if st.cond is not None:
            st.cond.notify_all()

    def _retire(self, st: ThreadState) -> None:
        """Remember an idle thread; forget the least recently idle past the cap.

        Memory stays O(active threads), while a thread that goes quiet for a moment
        keeps its fold state and needs no index read on its next append.
        """
        self._idle_lru[st.thread_id] = None
        self._idle_lru.move_to_end(st.thread_id)
        while len(self._idle_lru) > _IDLE_STATES:
            thread_id, _ = self._idle_lru.popitem(last=False)
            old = self._threads.get(thread_id)
            if old is not None and old.idle:
                del self._threads[thread_id]

    def _cond(self, st: ThreadState) -> threading.Condition:
        if st.cond is None:
            st.cond = threading.Condition(self._lock)
        return st.cond

    def _drop_waiter_locked(self, waiter: Waiter) -> None:
        st = self._threads.get(waiter.thread_id)
        if st is not None and waiter in st.waiters:
            st.waiters.remove(waiter)

    def _gauges(self) -> dict[str, float]:
        with self._lock:
            if self._stopped:
                return {}  # a closed store reports nothing (see Telemetry.observe)
            now = time.monotonic()
            pending = [s for s in self._threads.values() if s.behind]
            oldest = min((s.pending_since for s in pending if s.pending_since is not None),
                         default=now)
            return {"pending_threads": len(pending), "oldest_pending_age": now - oldest,
                    "waiters": sum(len(s.waiters) for s in self._threads.values()),
                    "heartbeat_age": now - self._heartbeat}
