"""The projector's schedule: the threads it knows, which are due when, which idle ones it keeps.

Pure over ``(now, states)``: no lock, no I/O, no clock. The projector holds its lock
around every call and passes the time in; a call after which the sleeping worker must
wake early says so in its return value. Only :meth:`Schedule.resolve` runs user code:
the callbacks of the barriers it answers.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict

from ._state import SCHEDULABLE, Claim, Phase, RemovalKind, ThreadState
from .model import ThreadMetadata

log = logging.getLogger("thread_store.projector")  # the projector's messages, as before

#: Caught-up threads keep their state (and fold cache) until this many are idle.
IDLE_STATES = 2048


class Schedule:
    """The thread states of one projector, the due-time queue and the idle cache."""

    def __init__(self, coalesce_delay: float) -> None:
        #: Every thread this process knows something about, by id.
        self.states: dict[str, ThreadState] = {}
        self._due: dict[str, ThreadState] = {}  # exactly the DUE and BACKING_OFF states
        self._idle: OrderedDict[str, None] = OrderedDict()
        self._delay = coalesce_delay
        #: When the sleeping worker wakes up; ``None`` while it runs or is paused.
        self.wake_at: float | None = None

    @property
    def has_due(self) -> bool:
        """Some thread is scheduled (``close`` drains until none is)."""
        return bool(self._due)

    def schedule(self, st: ThreadState, due_at: float, *, backoff: bool = False,
                 cut_backoff: bool = False) -> bool:
        """Make ``st`` due at ``due_at`` (never later than it already is); see
        :meth:`ThreadState.schedule`. Returns whether the sleeping worker must wake.

        A retry's ``backoff`` is kept against later appends, so a busy thread does not
        burn its retry budget; only a new waiter (``cut_backoff``) cuts it.
        """
        if not st.schedule(due_at, backoff=backoff, cut_backoff=cut_backoff):
            return False
        self._due[st.thread_id] = st
        # A busy or paused worker (wake time None) rescans the schedule before it sleeps.
        if self.wake_at is not None and due_at < self.wake_at:
            self.wake_at = due_at
            return True
        return False

    def reschedule(self, st: ThreadState, now: float, *, stopped: bool) -> bool:
        """Schedule a thread that has work and nothing in flight, or retire it.

        An attempt in flight reschedules its thread when it settles. Returns whether the
        sleeping worker must wake.
        """
        if st.in_flight:
            return False
        if st.phase in SCHEDULABLE and st.behind and not stopped:
            return self.schedule(st, now + (0.0 if st.waiters else self._delay))
        if st.forgettable:
            self._retire(st)
        return False

    def claim(self, st: ThreadState, *, expedited: bool) -> Claim:
        """Take ``st`` off the queue and start its attempt (:meth:`ThreadState.claim`)."""
        self._due.pop(st.thread_id, None)
        return st.claim(expedited=expedited)

    def due(self, now: float, *, closing: bool, limit: int) -> tuple[list[ThreadState], float]:
        """The threads to claim now (at most ``limit``), and the earliest due time.

        Once one thread is due the batch takes every scheduled thread, not only the due
        ones: the first due thread opens one group commit for all that are waiting out
        their coalescing delay, so transactions stay about one per delay however the
        appends are spread over threads. A thread backing off waits for its own due time,
        except while closing, when every scheduled thread is due.
        """
        eligible = []
        wake = math.inf
        for st in self._due.values():
            due_at = st.due_at if st.due_at is not None else now
            if due_at <= now or closing or st.phase is not Phase.BACKING_OFF:
                eligible.append(st)
            wake = min(wake, due_at)
        if eligible and (wake <= now or closing):
            return eligible[:limit], wake
        return [], wake

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
        self._due.pop(thread_id, None)
        self._idle.pop(thread_id, None)
        return st

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

    def behind(self) -> dict[str, int]:
        """``{thread_id: head}`` of every thread whose projection is behind, counting a
        thread mid-removal: the removal may still fail after deleting the row."""
        return {t: s.head for t, s in self.states.items()
                if (s.live and s.behind) or s.phase is Phase.REMOVING}

    def pending(self) -> list[ThreadState]:
        """The threads whose projection has work left."""
        return [s for s in self.states.values() if s.behind]

    def waiters(self) -> int:
        """How many barriers wait."""
        return sum(len(s.waiters) for s in self.states.values())

    def forget(self, st: ThreadState) -> None:
        """Drop a removed thread's state, unless a new one took its id."""
        if self.states.get(st.thread_id) is st:
            del self.states[st.thread_id]

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
