"""The projector's queue of scheduled threads: arrival order plus the earliest due time.

Pure, like :mod:`thread_store._schedule`, which owns one queue for threads waiting out
their coalescing delay and one for threads backing off. Every operation costs O(log n)
or O(what it returns), never O(threads queued): the worker looks at the queue once per
batch and appends touch it under the projector lock, so a scan of every pending thread
there would make both slower the more threads are behind (30,000 after a reopen).
"""

from __future__ import annotations

import heapq
import itertools
import math
from ._state import ThreadState


class DueQueue:
    """Threads with a due time, in the order they were queued.

    Due times sit in a heap with lazy deletion: an entry whose thread left the queue, or
    whose due time moved (it only ever moves earlier while queued), is dropped when it
    reaches the top. Each queuing pushes at most one entry, so the heap holds O(queued +
    recent reschedules) entries.
    """

    def __init__(self) -> None:
        self._states: dict[str, ThreadState] = {}
        self._times: list[tuple[float, int, ThreadState]] = []
        self._order = itertools.count()  # ties of the heap never compare states

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, thread_id: object) -> bool:
        return thread_id in self._states

    def put(self, st: ThreadState) -> None:
        """Queue ``st`` (at the end, unless queued already) at its current ``due_at``."""
        assert st.due_at is not None, "a queued thread has a due time"
        self._states[st.thread_id] = st  # a thread queued already keeps its place
        heapq.heappush(self._times, (st.due_at, next(self._order), st))

    def discard(self, thread_id: str) -> None:
        """Take a thread off the queue (its heap entries go stale)."""
        self._states.pop(thread_id, None)

    def earliest(self) -> float:
        """The earliest due time of a queued thread; ``inf`` when none is queued."""
        times = self._times
        while times:
            due_at, _, st = times[0]
            if self._states.get(st.thread_id) is st and st.due_at == due_at:
                return due_at
            heapq.heappop(times)
        return math.inf

    def first(self, n: int) -> list[ThreadState]:
        """The first ``n`` threads in queue order."""
        return list(itertools.islice(self._states.values(), n))

    def due_by(self, now: float, n: int) -> list[ThreadState]:
        """Up to ``n`` queued threads due at ``now`` or before, earliest first, left queued."""
        found: dict[str, ThreadState] = {}  # a thread queued again may have two entries
        taken: list[tuple[float, int, ThreadState]] = []
        while len(found) < n and self.earliest() <= now and self._times:
            entry = heapq.heappop(self._times)
            taken.append(entry)
            found.setdefault(entry[2].thread_id, entry[2])
        for entry in taken:
            heapq.heappush(self._times, entry)
        return list(found.values())

    def clear(self) -> None:
        """Forget everything (a forked child)."""
        self._states.clear()
        self._times.clear()
