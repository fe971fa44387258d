"""Leader/follower group commit: concurrent writes of one process share a transaction.

With ``durability="full"`` every commit pays an fsync, and with several processes every
commit also pays a round of the writers' file lock. So concurrent appenders of a process
queue their requests; the one that finds no leader leads: once it holds the writer locks
it takes the queue (everything that arrived while it waited for them) and commits it
with its own request as one group, while the others (followers) sleep. Then it publishes
every outcome, wakes the followers, and passes the lead to the oldest request still
queued, which takes the queue that formed meanwhile.

An uncontended request is never handed to another thread, and costs no more than two
short critical sections: its caller finds no leader and commits it alone.

This module knows nothing of SQL: the ``commit`` callable given to :class:`GroupCommit`
writes the leader's request and the requests it takes with :meth:`GroupCommit.take`,
resolves each taken one, and returns (or raises) the leader's own outcome.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Generic, TypeVar

from ...errors import OutcomeUnknown

Q = TypeVar("Q")
R = TypeVar("R")
#: What :meth:`GroupCommit.take` returns when nobody queued (never changed).
_NONE: list[Any] = []


class Pending(Generic[Q, R]):
    """A follower's request and, once its group committed, its outcome."""

    __slots__ = ("request", "_result", "_error", "_resolved", "_wake", "_lead")

    def __init__(self, request: Q) -> None:
        self.request = request
        self._result: R | None = None
        self._error: BaseException | None = None
        self._resolved = False
        #: Held while the follower sleeps; released to wake it (resolved, or made leader).
        self._wake = threading.Lock()
        self._wake.acquire()
        self._lead = False

    @property
    def resolved(self) -> bool:
        """Whether the request has its outcome."""
        return self._resolved

    def resolve(self, result: R) -> None:
        """The request committed (or needed no write) with ``result``."""
        self._result, self._resolved = result, True

    def fail(self, error: BaseException) -> None:
        """The request failed with ``error`` (one instance per request: each caller
        raises its own, with its own traceback)."""
        self._error, self._resolved = error, True

    def outcome(self) -> R:
        """The result, or raise the error."""
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]  # resolved: R, which may admit None


class GroupCommit(Generic[Q, R]):
    """The queue and the lead of one writer connection's group commits."""

    def __init__(self, commit: Callable[[Q, GroupCommit[Q, R]], R]) -> None:
        """:param commit: run by the leader with its own request: take the followers'
            requests (:meth:`take`) once it holds the writer locks, write and commit
            them all, resolve each taken one, and return the leader's own result."""
        self._commit = commit
        self._mutex = threading.Lock()  # a leaf: nothing else is taken while it is held
        self._queue: list[Pending[Q, R]] = []
        self._leading = False
        self._taken: list[Pending[Q, R]] = []
        #: Followers' requests committed in a leader's group (read by benchmarks and tests).
        self.followed = 0

    def queued(self) -> int:
        """Followers waiting for a group (for tests)."""
        return len(self._queue)

    def submit(self, request: Q) -> R:
        """Commit ``request`` in a group and return its result (or raise its error)."""
        pending: Pending[Q, R] | None
        with self._mutex:
            if not self._leading:
                self._leading = True
                pending = None
            else:
                pending = Pending(request)
                self._queue.append(pending)
        if pending is None:
            return self._lead(request)
        try:
            pending._wake.acquire()
        except BaseException:  # interrupted while following
            if not self._leaves(pending):
                self._lead(request)  # made leader meanwhile: lead, or the queue stalls
            raise
        if pending._lead:
            return self._lead(request)
        return pending.outcome()

    def take(self) -> list[Pending[Q, R]]:
        """The followers the leader commits with its own request, oldest first."""
        if not self._queue:
            return _NONE  # one that queues after this look waits for the next leader
        with self._mutex:
            self._taken, self._queue = self._queue, []
        self.followed += len(self._taken)
        return self._taken

    def _leaves(self, pending: Pending[Q, R]) -> bool:
        """A follower stops waiting: ``False`` if it was made leader (it must lead)."""
        with self._mutex:
            if pending._lead:
                return False
            if pending in self._queue:
                self._queue.remove(pending)  # no leader took it: never written
            return True

    def _lead(self, request: Q) -> R:
        try:
            result: R = self._commit(request, self)
            return result
        except BaseException as exc:
            # A broken or interrupted leader: a commit cut short may or may not have
            # reached the disk, and its followers must not wait for ever.
            for pending in self._taken:
                if not pending.resolved:
                    error = OutcomeUnknown("the group commit of this append was interrupted; "
                                           f"it may or may not be stored ({exc!r})")
                    error.__cause__ = exc
                    pending.fail(error)
            raise
        finally:
            taken = self._taken
            if taken:
                self._taken = []
            with self._mutex:
                successor = self._queue.pop(0) if self._queue else None
                if successor is None:
                    self._leading = False
                else:
                    successor._lead = True
            for pending in taken:
                pending._wake.release()
            if successor is not None:
                successor._wake.release()
