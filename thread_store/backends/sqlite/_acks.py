"""Projected heads waiting to be acknowledged in history: a bounded in-memory batch.

After each index commit the projected ``(thread_id, seq)`` heads and the index epoch are
added here, in memory, and the projector's worker writes the batch to history about once
per second (or sooner when it is full), off every barrier's path, in transactions of at
most :data:`SLICE` heads: each holds the history's write lock, which appends wait for. An
acknowledgement is only an optimisation of the next open: one lost or late (a crash, a
full batch) leaves the thread marked behind in history, and open re-checks it.
"""

from __future__ import annotations

import itertools
import math
import threading
import time

#: Distinct threads the batch holds; heads of further threads are left out until the
#: worker has written it (their marks stay: open re-checks them).
LIMIT = 4096
#: How long the oldest entry waits before the worker writes the batch: writes to history
#: come at most about this often, however many index commits there are.
INTERVAL_S = 1.0
#: Heads written per transaction: clearing 4,096 marks at once held the history's write
#: lock for over 15 ms, and every append of the process waited for it.
SLICE = 128


class AckBatch:
    """``{thread_id: projected seq}`` (the highest per thread) and the newest index epoch.

    Thread-safe; its lock is a leaf (nothing else is taken while it is held).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._heads: dict[str, int] = {}
        self._epoch: int | None = None
        self._since: float | None = None  # when the oldest unwritten entry came
        self._limit = LIMIT
        self._interval = INTERVAL_S
        self.left_out = 0

    def add(self, projected: list[tuple[str, int]], epoch: int | None) -> None:
        """Remember heads the index committed (in transaction ``epoch``)."""
        with self._lock:
            heads = self._heads
            for thread_id, seq in projected:
                old = heads.get(thread_id)
                if old is None:
                    if len(heads) >= self._limit:
                        self.left_out += 1
                        continue
                    heads[thread_id] = seq
                elif seq > old:
                    heads[thread_id] = seq
            if epoch is not None and (self._epoch is None or epoch > self._epoch):
                # Raised even for heads left out: their threads stay marked, which is
                # all the epoch needs (see _files.recover).
                self._epoch = epoch
            if self._since is None and (heads or self._epoch is not None):
                self._since = time.monotonic()

    def forget(self, thread_ids: list[str]) -> None:
        """Drop the heads of threads whose row is about to go (discard, delete, recovery).

        An acknowledgement written later would clear the mark that must stay until the
        removal is done, or the mark of a new thread that took a deleted thread's id.
        """
        with self._lock:
            for thread_id in thread_ids:
                self._heads.pop(thread_id, None)

    def due_at(self) -> float:
        """The monotonic time the batch should be written at: ``inf`` while it is empty,
        at once when it is full."""
        with self._lock:
            if self._since is None:
                return math.inf
            if len(self._heads) >= self._limit:
                return self._since
            return self._since + self._interval

    def __bool__(self) -> bool:
        """Something is left to write."""
        with self._lock:
            return bool(self._heads) or self._epoch is not None

    def take(self, limit: int = SLICE) -> tuple[list[tuple[str, int]], int | None]:
        """Take up to ``limit`` heads out of the batch, oldest first, with the newest
        epoch: it covers every head taken, so each slice written is a whole
        acknowledgement of its own. The epoch leaves the batch with its last head."""
        with self._lock:
            heads = self._heads
            if len(heads) <= limit:
                taken, self._heads = list(heads.items()), {}
            else:
                taken = list(itertools.islice(heads.items(), limit))
                for thread_id, _ in taken:
                    del heads[thread_id]
            epoch = self._epoch
            if not self._heads:
                self._epoch, self._since = None, None
            return taken, epoch
