"""The writers' lock of a PostgreSQL store: ``rebuild_index`` needs the store to itself
among writers (DESIGN §7), as on SQLite.

- Every store open for writing holds a session-level **shared** advisory lock keyed by
  its schema, on a connection of its own: a pooled connection is not dedicated, and would
  carry the lock back to the pool. Read-only stores take none.
- ``rebuild_index`` takes the same key **exclusively**, with a try-lock inside the
  transaction that empties the index. With writers open it raises ``StoreLocked`` naming
  them (their ``application_name`` carries pid and host); while it holds the key, no store
  opens for writing (``StoreLocked``, as on SQLite).
- A server restart or a killed session ends the lock with the session. Before each index
  write the store looks whether its session is still there (a poll of the socket, no
  round trip) and, if not, takes the lock again on a new one and checks the store's fold
  rules again: a rebuild with other rules that ran meanwhile stops this store's
  projections (``InvalidArgument``) instead of mixing rows of two rule sets.

PgBouncer in transaction mode cannot carry a session lock (the server connection goes back
to its pool, lock and all): the README's "Scaling out" says to give the store a URL that
reaches the server directly or through a session-mode pool.
"""

from __future__ import annotations

import os
import select
import socket
from typing import Any, Callable

import psycopg

from ._db import Database
from ...errors import StoreLocked, TransientStorageError

#: The first key of the two-int advisory lock ("tw": thread_store writers); the second is
#: the schema's ``hashtext``, as for the migration lock (whose first key differs).
_LOCK_CLASS = 0x7477
_TRY_SHARED = "SELECT pg_try_advisory_lock_shared(%s, hashtext(%s))"
_UNLOCK_SHARED = "SELECT pg_advisory_unlock_shared(%s, hashtext(%s))"
_TRY_EXCLUSIVE = "SELECT pg_try_advisory_xact_lock(%s, hashtext(%s))"
#: The sessions that hold the key, but this one. ``pg_locks`` shows a two-int advisory
#: key as ``classid``, ``objid`` (the second key as an unsigned oid), ``objsubid = 2``.
_HOLDERS = """
SELECT DISTINCT a.application_name, host(a.client_addr) FROM pg_locks l
  JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND l.classid = %s
   AND l.objid = (hashtext(%s)::bigint & 4294967295)::oid AND l.pid <> pg_backend_pid()
   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
 ORDER BY 1"""


def application_name() -> str:
    """The ``application_name`` of this process's lock sessions: it names the process in
    ``rebuild_index``'s refusal (PostgreSQL keeps 63 bytes of it)."""
    return f"thread_store writer pid {os.getpid()} on {socket.gethostname()}"[:63]


class WritersLock:
    """This store's share of the writers' lock, on a session of its own."""

    def __init__(self, db: Database, *, on_retaken: Callable[[psycopg.Connection[Any]], None]) -> None:
        """
        :param on_retaken: called on the new session after the lock was lost and taken
            again (it checks the fold rules).
        """
        self._db = db
        self._on_retaken = on_retaken
        self._conn: psycopg.Connection[Any] | None = None

    def acquire(self) -> None:
        """Take the shared lock on a new session.

        :raises StoreLocked: a ``rebuild_index`` holds the store.
        :raises TransientStorageError: the server cannot be reached.
        """
        conn = self._db.dedicated(application_name())
        try:
            with self._db.boundary("taking the store's writers' lock"):
                row = conn.execute(_TRY_SHARED, (_LOCK_CLASS, self._db.schema)).fetchone()
            if row is None or not row[0]:
                raise StoreLocked(f"the index of {self._db.description} (schema "
                                  f"{self._db.schema}) is being rebuilt; open the store once "
                                  "that is done")
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def ensure(self) -> None:
        """Before an index write: take the lock again if its session is gone.

        :raises TransientStorageError: the server cannot be reached, or a rebuild holds
            the store (the projection retries).
        :raises InvalidArgument: a rebuild applied other fold rules meanwhile.
        """
        if self._conn is not None and not _lost(self._conn):
            return
        self.release()
        try:
            self.acquire()
        except StoreLocked as exc:
            raise TransientStorageError(f"{exc} (this store's projections wait)") from exc
        assert self._conn is not None
        with self._db.boundary("checking the store's fold rules"):
            self._on_retaken(self._conn)

    def release(self) -> None:
        """Let go of the lock, then close its session. The unlock is a round trip the
        server answers once the lock is free: closing alone returns before the server
        ends the session, and a ``rebuild_index`` right after this store's ``close``
        would still find it held."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if not _lost(conn):
                conn.execute(_UNLOCK_SHARED, (_LOCK_CLASS, self._db.schema))
        except psycopg.Error:
            pass  # the session is gone, and its lock with it
        finally:
            conn.close()

    def abandon(self) -> Any:
        """Forget the session without touching it (a forked child: the socket is the
        parent's); return it, for the caller to keep from being finalized."""
        conn, self._conn = self._conn, None
        return conn


def _lost(conn: psycopg.Connection[Any]) -> bool:
    """Whether the idle lock session ended: an idle session receives nothing unless the
    server ends it (it then sends an error and closes), so a readable socket means lost."""
    if conn.closed:
        return True
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def take_exclusive(conn: psycopg.Connection[Any], db: Database) -> None:
    """In ``conn``'s transaction: hold the writers' lock exclusively until it ends.

    :raises StoreLocked: stores are open for writing (named by process and host).
    """
    row = conn.execute(_TRY_EXCLUSIVE, (_LOCK_CLASS, db.schema)).fetchone()
    if row is not None and row[0]:
        return
    holders = conn.execute(_HOLDERS, (_LOCK_CLASS, db.schema)).fetchall()
    named = [f"{name or 'an unnamed session'}{f' (from {addr})' if addr else ''}"
             for name, addr in holders]
    who = "; ".join(named) if named else "another store"
    raise StoreLocked(f"{db.description} (schema {db.schema}) is open for writing by {who}; "
                      "rebuilding its index needs it to itself: close those stores "
                      "(read-only ones may stay open)")
