"""WAL checkpoints of ``history.db``, moved off the append path into the projector's worker.

SQLite checkpoints a WAL file in whichever connection's COMMIT takes the log past
``wal_autocheckpoint`` pages (1,000 by default): one append in every few hundred copied
up to 4 MB back into the database and fsynced it, inside the caller's ``append``. Measured
(one caller round robin over 10,000 threads): the slowest 1.5 % of appends took 1.7 ms on
average with SQLite's own checkpoints, 0.5 ms without them, and p99.9 fell from about
4.5 ms to under 1 ms once the worker checkpointed instead.

So the history's writer connection checkpoints only as a safety net, at
:data:`SAFETY_NET_PAGES` (the worker is paused, stalled by a hook, or another process
writes far more), and the worker runs a PASSIVE checkpoint, which never blocks writers or
readers, after every :data:`EVERY_COMMITS` commits of this process's appends (a few pages
each). Each process of a shared store checkpoints after its own appends.
"""

from __future__ import annotations

import logging
import sqlite3

from ._connections import ConnectionPool
from ...errors import ThreadStoreError

log = logging.getLogger("thread_store")

#: The writer connection's ``wal_autocheckpoint``: 16 MiB of log at 4 KiB pages.
SAFETY_NET_PAGES = 4096
#: The worker checkpoints after this many history commits (about 1,000 pages).
EVERY_COMMITS = 256


class Checkpoints:
    """When the worker should checkpoint the history's WAL, and doing it.

    The history's writer counts its commits under its lock (:meth:`committed`); only the
    worker calls :meth:`run`. An unlocked read of the count is at worst one commit old.
    """

    def __init__(self, readers: ConnectionPool) -> None:
        self._readers = readers
        self._commits = 0
        self._done_at = 0
        #: Checkpoints run since open (for tests and stats).
        self.runs = 0

    def committed(self) -> None:
        """The history's writer committed a transaction."""
        self._commits += 1

    def due(self) -> bool:
        """Whether enough commits came since the last checkpoint."""
        return self._commits - self._done_at >= EVERY_COMMITS

    def run(self) -> None:
        """A PASSIVE checkpoint on a pooled connection. Never raises: a failed one only
        leaves the log longer, and the safety net still bounds it."""
        self._done_at = self._commits
        try:
            with self._readers.connection() as conn:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except (sqlite3.Error, ThreadStoreError) as exc:  # the pool closed, a full disk
            log.warning("thread_store: checkpointing history.db failed (%s)", exc)
        self.runs += 1
