"""The projector worker's chores between batches: the storage's deferred bookkeeping, and
the catch-up of work other processes left behind (they crashed, are paused or slow).

Threads found behind in the store, at open or left by others, are adopted into this
process's schedule like any other work.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from typing import Callable

from ._phases import Phase
from ._schedule import Schedule
from ._state import ThreadState
from .errors import ThreadStoreError
from .storage import Lag, Storage

log = logging.getLogger("thread_store.projector")  # the projector's messages, as before


class CatchUp:
    """When the worker's next chore is due, and the chores themselves.

    ``adopt`` takes the projector's lock; ``run`` is called with no lock held.
    """

    def __init__(self, storage: Storage, lock: threading.Lock, schedule: Schedule,
                 notify: Callable[[], None], catch_up_after: float | None) -> None:
        self._storage = storage
        self._lock = lock
        self._schedule = schedule
        self._notify = notify  # wakes the worker (called with the lock held)
        # Work other processes left behind is looked for every catch_up_after / 2 or so
        # (jittered, so processes do not scan in step); None: no other process can leave any.
        self._after = catch_up_after
        self._at = self._next()

    def reset_after_fork(self, lock: threading.Lock, notify: Callable[[], None]) -> None:
        """In a forked child: the projector's new lock and condition."""
        self._lock, self._notify = lock, notify

    def adopt(self, lags: list[Lag]) -> None:
        """Schedule threads found behind in the store (at open, or left by others)."""
        with self._lock:
            threads = self._schedule.states
            for lag in lags:
                st = threads.get(lag.thread_id)
                if st is None:
                    st = ThreadState(lag.thread_id, lag.head, 0 if lag.refold else lag.projected or 0)
                    st.refold, st.pending_since = lag.refold, time.monotonic()
                    threads[lag.thread_id] = st
                elif st.live:
                    st.saw_head(lag.head, time.monotonic())
                if st.phase is Phase.IDLE and self._schedule.schedule(st, time.monotonic()):
                    self._notify()

    def due_at(self, *, paused: bool) -> float:
        """When the worker's next chore is due: the storage's bookkeeping, or catch-up."""
        catch_up = math.inf if paused else self._at
        return min(self._storage.housekeeping_due_at(), catch_up)

    def run(self, *, paused: bool) -> None:
        """In the worker, with no lock held: the storage's deferred bookkeeping and the
        catch-up of work other processes left, each if due."""
        now = time.monotonic()
        if self._storage.housekeeping_due_at() <= now:
            self._storage.housekeep()
        if self._at <= now and not paused and self._after is not None:
            self._at = self._next()
            try:
                stale = self._storage.stale(self._after)
            except ThreadStoreError as exc:
                log.warning("thread_store: looking for work left by other processes failed: %s", exc)
                return
            self.adopt(stale)

    def _next(self) -> float:
        if self._after is None:
            return math.inf
        return time.monotonic() + self._after * random.uniform(0.4, 0.6)
