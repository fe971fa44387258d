"""The projector's schedule: the threads it knows, which are due when, and how attempts settle.

Everything here runs under the projector's lock, which the projector takes around every
call: no lock of its own, no storage I/O, no clock (the time is passed in). A call after
which the sleeping worker must wake early says so in its return value. Two things leave
the module: metrics (counted into :class:`~thread_store.tracing.Telemetry`) and the
callbacks of the barriers :meth:`Schedule.resolve` answers.
"""

from __future__ import annotations

import logging
import math
import random
from collections import OrderedDict
from dataclasses import dataclass, field

from opentelemetry.trace import SpanContext

from ._due import DueQueue
from ._outcomes import AttemptOutcome, LocalStatus, Result, Waiter
from ._phases import SCHEDULABLE, Phase, RemovalKind
from ._state import Claim, ThreadState
from .errors import describe
from .model import EncodedItem, ProjectorStats, RetryPolicy, ThreadMetadata
from .storage import Failure, StoredRow
from .tracing import MAX_LINKS, Telemetry

log = logging.getLogger("thread_store.projector")  # the projector's messages, as before

#: Caught-up threads keep their state (and fold cache) until this many are idle.
IDLE_STATES = 16_384


@dataclass(slots=True)
class Counts:
    """The projector's counters since open."""

    transactions: int = 0
    rows_written: int = 0
    attempts: int = 0
    retries: int = 0
    failures: int = 0


@dataclass(frozen=True, slots=True)
class Settled:
    """What settling a batch of attempts leaves for the projector to do."""

    #: Each retry's backoff, by ``id(claim)`` (for the attempt's span).
    backoffs: dict[int, float | None] = field(default_factory=dict)
    #: The sleeping worker must wake: a thread became due before it would.
    wake: bool = False


class Schedule:
    """The thread states of one projector, its due-time queue, idle cache and counters."""

    def __init__(self, coalesce_delay: float, retry: RetryPolicy, telemetry: Telemetry) -> None:
        #: Every thread this process knows something about, by id.
        self.states: dict[str, ThreadState] = {}
        # Exactly the DUE states, and exactly the BACKING_OFF ones.
        self._due, self._backing_off = DueQueue(), DueQueue()
        self._idle: OrderedDict[str, None] = OrderedDict()
        self._delay = coalesce_delay
        self._retry = retry
        self._rng = random.Random()
        self._telemetry = telemetry
        #: When the sleeping worker wakes up; ``None`` while it runs or is paused.
        self.wake_at: float | None = None
        #: Attempts claimed and not settled yet (``close`` drains them).
        self.in_flight = 0
        self.counts = Counts()
        #: Set by the projector's close (or stop): every scheduled thread is due, and a
        #: removal waiting for an attempt gives up.
        self.closing = False
        #: Set once the projector stopped (always after ``closing``): nothing is
        #: scheduled any more, and the worker exits.
        self.stopped = False

    def clear(self) -> None:
        """Forget every thread (in a forked child, whose states belong to the parent)."""
        self.states, self._idle = {}, OrderedDict()
        self._due.clear()
        self._backing_off.clear()

    @property
    def has_due(self) -> bool:
        """Some thread is scheduled (``close`` drains until none is)."""
        return bool(self._due) or bool(self._backing_off)

    # -- events from the store ----------------------------------------------------------

    def created(self, thread_id: str, first: EncodedItem | None, now: float) -> bool:
        """A thread was created, with its ``first`` item or none. Returns whether the
        sleeping worker must wake."""
        raced = self.states.get(thread_id)
        if raced is not None and raced.live:
            # An append to the new id got here first: it only lacks the fold's origin.
            raced.refold = True
            return False
        # A new thread folds from scratch and never reads a row (one left by a deleted
        # thread of the same id is overwritten); an empty thread still gets its row, so
        # include_empty lists it, and counts as behind until then.
        st = self.states[thread_id] = ThreadState(thread_id, 0, 0)
        st.refold = True
        if first is not None:
            st.head = 1
            st.buffer_items([StoredRow(1, first.ts_us, first.text, first.kind)])
            st.appends = 1
            st.pending_since = now
        return self.schedule(st, now + self._delay)

    def appended(self, thread_id: str, head: int, items: list[EncodedItem],
                 context: SpanContext | None, now: float, *, schedule: bool) -> bool:
        """Items up to ``head`` are durable: record them, and schedule the thread unless
        told not to. Returns whether the sleeping worker must wake."""
        first = head - len(items)
        st = self.states.get(thread_id)
        if st is None:
            # Nothing known here: the attempt reads the stored checkpoint (projected 0
            # is a lower bound), and a fresh empty thread may buffer from its start.
            st = self.states[thread_id] = ThreadState(thread_id, first, 0)
        elif st.removed or head <= st.projected:
            return False  # an attempt that read it from history made it visible already
        # While a removal is under way the work is recorded but not scheduled: if the
        # removal fails, it is projected as usual.
        st.record_append(first, head, items, context, now=now, max_links=MAX_LINKS)
        return schedule and self.schedule(st, now + (0.0 if st.waiters else self._delay))

    # -- scheduling -------------------------------------------------------------------

    def schedule(self, st: ThreadState, due_at: float, *, backoff: bool = False,
                 cut_backoff: bool = False) -> bool:
        """Make ``st`` due at ``due_at``, never later than it already is (see
        :meth:`ThreadState.schedule`). Returns whether the sleeping worker must wake.

        A retry's ``backoff`` is kept against later appends, so a busy thread does not
        burn its retry budget; only a new waiter (``cut_backoff``) cuts it.
        """
        moved = st.schedule(due_at, backoff=backoff, cut_backoff=cut_backoff)
        if st.phase not in (Phase.DUE, Phase.BACKING_OFF):
            return False
        queue, other = ((self._backing_off, self._due) if st.phase is Phase.BACKING_OFF
                        else (self._due, self._backing_off))
        if moved or st.thread_id not in queue:
            other.discard(st.thread_id)  # a new waiter cut its backoff short
            queue.put(st)
        if not moved:
            return False
        # A busy or paused worker (wake time None) rescans the schedule before it sleeps.
        if self.wake_at is not None and due_at < self.wake_at:
            self.wake_at = due_at
            return True
        return False

    def reschedule(self, st: ThreadState, now: float) -> bool:
        """Schedule a thread that has work and nothing in flight, or retire it.

        An attempt in flight reschedules its thread when it settles. Returns whether the
        sleeping worker must wake.
        """
        if st.in_flight:
            return False
        if st.phase in SCHEDULABLE and st.behind and not self.stopped:
            return self.schedule(st, now + (0.0 if st.waiters else self._delay))
        if st.forgettable:
            self._retire(st)
        return False

    def due(self, now: float, *, limit: int) -> tuple[list[ThreadState], float]:
        """The threads to claim now (at most ``limit``), and the earliest due time.

        Once one thread is due the batch takes every scheduled thread, not only the due
        ones: the first due thread opens one group commit for all that are waiting out
        their coalescing delay, so transactions stay about one per delay however the
        appends are spread over threads. A thread backing off waits for its own due time,
        except while closing, when every scheduled thread is due.
        """
        wake = min(self._due.earliest(), self._backing_off.earliest())
        if wake > now and not (self.closing and self.has_due):
            return [], wake
        # Retries first: a steady stream of new work must not starve them.
        batch = self._backing_off.due_by(math.inf if self.closing else now, limit)
        return batch + self._due.first(limit - len(batch)), wake

    # -- attempts ---------------------------------------------------------------------

    def claim(self, st: ThreadState, *, expedited: bool) -> Claim:
        """Take ``st`` off the queue and start its attempt (:meth:`ThreadState.claim`)."""
        self._due.discard(st.thread_id)
        self._backing_off.discard(st.thread_id)
        self.in_flight += 1
        self.counts.attempts += 1
        return st.claim(expedited=expedited)

    def settle(self, claims: list[Claim], results: dict[int, Result], *, now: float) -> Settled:
        """Take claims out of flight with their results (by ``id(claim)``): settle each
        thread, count it, answer its waiters and schedule what comes next.

        Every claim leaves flight, even if settling one of them raises.
        """
        backoffs: dict[int, float | None] = {}
        wake = False
        try:
            for c in claims:
                if not c.settled:
                    c.settled = True
                    backoffs[id(c)], woke = self._settle(c, results[id(c)], now)
                    wake = wake or woke
        finally:
            for c in claims:
                if not c.settled:
                    c.settled = True
                    if c.state.in_flight:
                        c.state.end_flight()
            self.in_flight -= len(claims)
        return Settled(backoffs, wake)

    def failures_for_good(self, claims: list[Claim], results: dict[int, Result]) -> list[Failure]:
        """The attempts among these that fail for good once settled: an error that is
        not transient, or a transient one with the retry budget spent (as
        :meth:`ThreadState.settle` decides), for the store to record first."""
        failed = []
        for c in claims:
            result = results.get(id(c))
            if result is not None and (result.kind is AttemptOutcome.FAILED or (
                    result.kind is AttemptOutcome.RETRY and c.attempt >= self._retry.attempts)):
                failed.append(Failure(c.state.thread_id, c.target, describe(result.error)))
        return failed

    def _settle(self, claim: Claim, result: Result, now: float) -> tuple[float | None, bool]:
        """Settle one attempt (:meth:`ThreadState.settle`); returns the retry's backoff and
        whether the sleeping worker must wake."""
        st = claim.state
        settled = st.settle(claim, result, retry=self._retry, rng=self._rng, now=now)
        tel = self._telemetry
        wake = False
        if result.kind is AttemptOutcome.OK:
            self.counts.rows_written += not result.covered
            if settled.lag is not None:
                tel.lag.record(settled.lag)
        if settled.backoff is not None:
            self.counts.retries += 1
            tel.retries.add(1)
            wake = self.schedule(st, now + settled.backoff, backoff=True)
        elif settled.failure is not None:
            self.counts.failures += 1
            tel.failures.add(1)
        self.resolve(st, result.meta)
        # A retry keeps its backoff: rescheduling it sooner here would spend the whole
        # budget in a burst while another process holds the lock (a new waiter still
        # cuts the backoff short in begin_wait).
        if settled.backoff is None:
            wake = self.reschedule(st, now)
        if st.cond is not None:
            st.cond.notify_all()
        return settled.backoff, wake

    def resolve(self, st: ThreadState, meta: ThreadMetadata | None, *, final: bool = False) -> None:
        """Give every waiter of ``st`` that can be answered now its outcome, and wake them
        (:meth:`ThreadState.outcome_for`)."""
        if not st.waiters:
            return
        keep = []
        for w in st.waiters:
            outcome = st.outcome_for(w, meta, final=final)
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

    # -- removal ----------------------------------------------------------------------

    def begin_removal(self, thread_id: str, kind: RemovalKind, head: int) -> ThreadState:
        """Start removing a thread: off the queue and the idle cache, its work and waiters
        kept (:meth:`ThreadState.begin_removal`).

        :param head: the thread's head as history has it, for a thread with no state here.
        :raises ThreadDiscarded: the thread is being (or was) removed already.
        """
        st = self.states.get(thread_id)
        if st is None:  # projected unknown (0 is a lower bound): an abort re-folds it
            st = self.states[thread_id] = ThreadState(thread_id, head, 0)
        elif not st.live:
            raise st.gone_error()
        st.begin_removal(kind)
        self._due.discard(thread_id)
        self._backing_off.discard(thread_id)
        self._idle.pop(thread_id, None)
        return st

    def commit_removal(self, st: ThreadState) -> None:
        """The thread is removed: fail its waiters with ThreadDiscarded, forget it."""
        st.commit_removal()
        self.resolve(st, None)
        if self.states.get(st.thread_id) is st:  # unless a new thread took its id
            del self.states[st.thread_id]

    # -- what the projector reports ---------------------------------------------------

    def behind(self) -> dict[str, int]:
        """``{thread_id: head}`` of every thread whose projection is behind, counting a
        thread mid-removal: the removal may still fail after deleting the row."""
        return {t: s.head for t, s in self.states.items()
                if (s.live and s.behind) or s.phase is Phase.REMOVING}

    def local_status(self, thread_id: str) -> LocalStatus:
        """This process's attempts, waiters and last error of the thread.

        :raises ThreadDiscarded: the thread is being (or was) discarded or deleted.
        """
        st = self.states.get(thread_id)
        if st is None:
            return LocalStatus(0, 0, None)
        if not st.live:
            raise st.gone_error()
        return LocalStatus(st.attempts, len(st.waiters), st.last_error)

    def stats(self) -> ProjectorStats:
        """The counters since open, and the backlog now."""
        c = self.counts
        return ProjectorStats(transactions=c.transactions, rows_written=c.rows_written,
                              attempts=c.attempts, retries=c.retries, failures=c.failures,
                              pending_threads=sum(1 for s in self.states.values() if s.behind),
                              waiters=self._waiters())

    def gauges(self, now: float) -> dict[str, float]:
        """The backlog now: threads behind, the oldest pending append's age, waiters."""
        pending = [s for s in self.states.values() if s.behind]
        oldest = min((s.pending_since for s in pending if s.pending_since is not None),
                     default=now)
        return {"pending_threads": len(pending), "oldest_pending_age": now - oldest,
                "waiters": self._waiters()}

    def drop_waiter(self, waiter: Waiter) -> None:
        """Withdraw a waiter that timed out or was cancelled."""
        st = self.states.get(waiter.thread_id)
        if st is not None and waiter in st.waiters:
            st.waiters.remove(waiter)

    def _waiters(self) -> int:
        return sum(len(s.waiters) for s in self.states.values())

    def _retire(self, st: ThreadState) -> None:
        """Remember an idle thread; forget the least recently idle past the cap.

        Memory stays O(active threads), while a thread that goes quiet for a moment
        keeps its fold state and needs no index read on its next append.
        """
        self._idle[st.thread_id] = None
        self._idle.move_to_end(st.thread_id)
        while len(self._idle) > IDLE_STATES:
            thread_id, _ = self._idle.popitem(last=False)
            old = self.states.get(thread_id)
            if old is not None and old.forgettable:
                del self.states[thread_id]
