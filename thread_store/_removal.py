"""Discard and delete, in two phases, so that a removal that fails has changed nothing.

Phase one (:meth:`Removals.begin`) stops projecting the thread and waits for its attempt
in flight; the store then removes the history and the row, and phase two commits or
aborts (:class:`Removal`). Both phases run under the projector's lock, which
:class:`Removals` borrows with the projector's schedule.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from ._phases import Phase, RemovalKind
from ._schedule import Schedule
from ._state import ThreadState
from .errors import StoreClosed


class Removal:
    """A discard or delete under way, in two phases (see :meth:`Removals.begin`).

    :meth:`commit` once the history and the row are gone; :meth:`abort` if removing
    failed, which puts the thread back as it was: its pending work is scheduled again and
    its waiters keep waiting, so a failed removal has changed nothing. Only the first of
    the two calls counts.
    """

    __slots__ = ("_removals", "_state", "_open")

    def __init__(self, removals: Removals, state: ThreadState) -> None:
        self._removals = removals
        self._state = state
        self._open = True

    def commit(self) -> None:
        """The thread is removed: fail its waiters with ThreadDiscarded, forget it."""
        self._removals._end(self, committed=True, row_deleted=True)

    def abort(self, *, row_deleted: bool) -> None:
        """Removing failed: restore the thread (re-fold it if its row was deleted)."""
        self._removals._end(self, committed=False, row_deleted=row_deleted)


class Removals:
    """The removals of one projector.

    :param lock: the projector's lock, which guards ``schedule``.
    :param idle: the projector's condition that ``close`` waits on until the schedule is
        empty and no attempt or removal is under way.
    :param wake_worker: wakes the sleeping worker, with the lock held.
    """

    def __init__(self, lock: threading.Lock, idle: threading.Condition, schedule: Schedule,
                 wake_worker: Callable[[], None]) -> None:
        self._lock = lock
        self._idle = idle
        self._schedule = schedule
        self._wake_worker = wake_worker
        #: Removals doing their I/O; ``close`` waits for them as for attempts (lock held).
        self.active = 0

    def give_up(self) -> None:
        """``close`` began: a removal waiting for an attempt in flight stops waiting, and
        leaves the thread to the drain (lock held)."""
        for st in self._schedule.states.values():
            if st.phase is Phase.REMOVING and st.cond is not None:
                st.cond.notify_all()

    def begin(self, thread_id: str, kind: RemovalKind, head: int,
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
        schedule = self._schedule
        with self._lock:
            if schedule.closing or schedule.stopped:
                raise StoreClosed(f"the thread store is closed; thread {thread_id!r} was not "
                                  f"{kind.value}")
            st = schedule.begin_removal(thread_id, kind, head)
            self._idle.notify_all()  # close() may be waiting for the schedule to empty
            while st.in_flight and not schedule.closing:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                st.condition(self._lock).wait(remaining)
            if schedule.closing:  # close() woke us: leave the thread to its drain, untouched
                st.abort_removal(row_deleted=False)
                if schedule.reschedule(st, time.monotonic()):
                    self._wake_worker()
                raise StoreClosed(f"the thread store closed; thread {thread_id!r} was not "
                                  f"{kind.value}")
            self.active += 1
        return Removal(self, st)

    def _end(self, removal: Removal, *, committed: bool, row_deleted: bool) -> None:
        """Phase two: commit the removal or put the thread back (see :class:`Removal`)."""
        with self._lock:
            if not removal._open:
                return
            removal._open = False
            self.active -= 1
            st = removal._state
            if committed:
                self._schedule.commit_removal(st)
            else:
                st.abort_removal(row_deleted=row_deleted)
                if self._schedule.reschedule(st, time.monotonic()):
                    self._wake_worker()
            self._idle.notify_all()
            if st.cond is not None:
                st.cond.notify_all()
