"""The barriers' native reads: psycopg's asyncio connections, on the event loop (DESIGN §6).

An ``AsyncThreadStore`` on PostgreSQL reads a barrier's target head, its checkpoint and
its metadata here, so an awaiting barrier holds no executor thread. Each read takes a
connection of the store's asyncio pool only while its statement runs, and is bounded by
the barrier's deadline (``_deadlines``) three ways: the wait for a pooled connection, a
``statement_timeout`` of about the time left (sent with the statement, in one pipeline,
one round trip, when the connection's is not close enough already), and an ``asyncio``
timeout over both, for a server that does not answer at all. Cancelling the
awaiting task (or its deadline passing) makes psycopg cancel the statement on the server.
"""

from __future__ import annotations

import asyncio
import math
import weakref
from typing import Any

import psycopg_pool

from ._db import Database
from .history import THREAD_ROW, thread_of
from .index import CHECKPOINT_ROW, META_COLUMNS, META_ROW, checkpoint_of, metadata_of
from ... import _deadlines
from ...errors import TransientStorageError
from ...model import ThreadMetadata
from ...storage import Checkpoint

#: Sent before each read, in the same pipeline: its ``statement_timeout`` (ms, as text).
_BOUND = "SELECT set_config('statement_timeout', %s, false)"
#: The start of a barrier in one read: the thread's row (as ``THREAD_ROW``), its checkpoint
#: (as ``CHECKPOINT_ROW``) and its projected row (as ``META_ROW``); no row without a thread.
_START = ("SELECT t.head, t.created_us, t.discarded_us, t.incarnation, m.projected_seq, m.state, "
          "(SELECT error FROM {s}.failures f WHERE f.thread_id = t.thread_id), "
          f"{META_COLUMNS} FROM {{s}}.threads t LEFT JOIN {{s}}.meta m "
          "ON m.thread_id = t.thread_id WHERE t.thread_id = %(t)s")
#: A connection's ``statement_timeout`` serves a read whose own bound is up to this much
#: shorter: barriers with one timeout then send it only now and then (each send is a
#: second statement in the read's round trip).
_SLACK = 1.5
#: A connection's ``statement_timeout`` after a read that may or may not have set it.
_UNKNOWN = -1
#: Seconds ``close`` waits for reads still running before it ends their connections.
_CLOSE_WAIT_S = 1.0


class AsyncReads:
    """``NativeBarrierReads`` of one PostgreSQL store, on its own asyncio pool."""

    def __init__(self, db: Database) -> None:
        """Make the (unopened) pool; :meth:`open` on the loop that will read."""
        self._db = db
        self._pool: psycopg_pool.AsyncConnectionPool = db.async_pool()
        self._thread = db.q(THREAD_ROW)
        self._checkpoint = db.q(CHECKPOINT_ROW)
        self._meta = db.q(META_ROW)
        self._start = db.q(_START)
        #: The statements' tasks still running: referenced, so none is collected midway.
        self._running: set[asyncio.Future[Any]] = set()
        #: The ``statement_timeout`` (ms) each connection has now, where a read set it;
        #: a new connection has the store's own (``_configured_ms``).
        self._bounds: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self._configured_ms = self._statement_ms(math.inf)

    async def open(self) -> None:
        """Open the pool without connecting: the first read makes the first connection."""
        with self._db.boundary("opening the asyncio connection pool"):
            await self._pool.open(wait=False)

    async def close(self) -> None:
        """Cancel the statements still running, then close the pool and every connection
        it made."""
        for running in list(self._running):
            running.cancel()
        await self._pool.close(timeout=_CLOSE_WAIT_S)

    async def head(self, thread_id: str) -> int:
        """The thread's last ``seq`` (``HistoryLog.head``)."""
        return (await self._thread_row(thread_id))[0]

    async def incarnation(self, thread_id: str) -> int:
        """The thread's incarnation (``HistoryLog.incarnation``)."""
        return (await self._thread_row(thread_id))[2]

    async def created_us(self, thread_id: str) -> int:
        """When the thread was created (``HistoryLog.created_us``)."""
        return (await self._thread_row(thread_id))[1]

    def snapshot(self) -> _Start:
        """Reads of one barrier's start, from one read (``NativeBarrierReads.snapshot``)."""
        return _Start(self)

    async def start_row(self, thread_id: str) -> tuple[Any, ...] | None:
        """The thread's row, checkpoint and projected row in one read (``None``: no thread)."""
        return await self._fetch("reading a thread and its projection", self._start, {"t": thread_id})

    async def _thread_row(self, thread_id: str) -> tuple[int, int, int]:
        return thread_of(thread_id, await self._fetch("reading a thread", self._thread, (thread_id,)))

    async def checkpoint(self, thread_id: str) -> Checkpoint:
        """Where the thread's projection stands (``MetadataIndex.checkpoint``)."""
        return checkpoint_of(await self._fetch("reading a projection checkpoint", self._checkpoint,
                                               {"t": thread_id}))

    async def read(self, thread_id: str) -> ThreadMetadata | None:
        """The thread's projected metadata, or ``None`` without a row (``MetadataIndex.read``)."""
        return metadata_of(await self._fetch("reading thread metadata", self._meta, {"t": thread_id}))

    async def _fetch(self, what: str, query: bytes, params: Any) -> tuple[Any, ...] | None:
        """The first row of one statement, within the barrier's deadline (see the module doc).

        The statement runs in a task of its own: a caller past its deadline, or cancelled,
        returns at once, while psycopg cancels the statement on the server in that task
        (which can take a round trip, or seconds from a server that stopped answering).

        :raises TransientStorageError: no connection or no answer in time, or the server
            failed; the driver's error is chained.
        """
        left = _deadlines.left(math.inf)
        running = asyncio.ensure_future(self._statement(what, query, params, left))
        self._running.add(running)
        running.add_done_callback(self._finished)
        expiry = asyncio.timeout(None if math.isinf(left) else left)
        try:
            async with expiry:
                return await asyncio.shield(running)
        except TimeoutError as exc:
            if not expiry.expired():
                raise
            running.cancel()
            raise TransientStorageError(
                f"{what} at {self._db.description}: no answer within the barrier's deadline "
                "(PostgreSQL unreachable, busy or restarting; retry later)") from exc
        except asyncio.CancelledError:
            running.cancel()
            raise

    async def _statement(self, what: str, query: bytes, params: Any,
                         left: float) -> tuple[Any, ...] | None:
        """Run one statement with a ``statement_timeout`` of about ``left`` seconds."""
        with self._db.boundary(what):
            async with self._pool.connection(timeout=self._db.pool_wait()) as conn:
                bound = self._statement_ms(left)
                if _close_enough(self._bounds.get(conn, self._configured_ms), bound):
                    cursor = await conn.execute(query, params)
                else:
                    # Unknown until the pipeline ends: a failed or cancelled one may have set it.
                    self._bounds[conn] = _UNKNOWN
                    async with conn.pipeline():
                        await conn.execute(_BOUND, (str(bound),))
                        cursor = await conn.execute(query, params)
                    self._bounds[conn] = bound
                return await cursor.fetchone()

    def _finished(self, running: asyncio.Future[Any]) -> None:
        """Forget a statement's task; the error of one nobody awaits any more is dropped
        (its caller already raised its own)."""
        self._running.discard(running)
        if not running.cancelled():
            running.exception()

    def _statement_ms(self, left: float) -> int:
        """The ``statement_timeout`` of a read with ``left`` seconds to go (0: none)."""
        limits = [s for s in (self._db.statement_timeout, left) if 0 < s < math.inf]
        return max(1, int(min(limits) * 1000)) if limits else 0


class _Start:
    """``AsyncBarrierReads`` of one barrier's start: its target head, its registration's
    checkpoint or incarnation, and the metadata it returns when it did not wait, all from
    one read of the thread taken at the first of them (one round trip, where the ports
    make three). The row is served only if it was caught up at that read (it then covers
    any target up to that head); else it is read again."""

    def __init__(self, reads: AsyncReads) -> None:
        self._reads = reads
        self._rows: dict[str, tuple[Any, ...] | None] = {}

    async def _row(self, thread_id: str) -> tuple[Any, ...] | None:
        if thread_id not in self._rows:
            self._rows[thread_id] = await self._reads.start_row(thread_id)
        return self._rows[thread_id]

    async def head(self, thread_id: str) -> int:
        """The thread's head at the snapshot."""
        return thread_of(thread_id, await self._row(thread_id))[0]

    async def incarnation(self, thread_id: str) -> int:
        """The thread's incarnation at the snapshot."""
        return thread_of(thread_id, await self._row(thread_id))[2]

    async def created_us(self, thread_id: str) -> int:
        """When the thread was created."""
        return thread_of(thread_id, await self._row(thread_id))[1]

    async def checkpoint(self, thread_id: str) -> Checkpoint:
        """The thread's checkpoint at the snapshot (projected 0 without a row)."""
        row = await self._row(thread_id)
        return checkpoint_of((None, None, None) if row is None else row[4:7])

    async def read(self, thread_id: str) -> ThreadMetadata | None:
        """The snapshot's row if it was caught up with the head then, else a new read."""
        row = await self._row(thread_id)
        meta = None if row is None else metadata_of(row[7:] if row[7] is not None else None)
        if meta is not None and row is not None and meta.projected_seq >= int(row[0]):
            return meta
        return await self._reads.read(thread_id)


def _close_enough(current_ms: int, bound_ms: int) -> bool:
    """Whether a connection whose ``statement_timeout`` is ``current_ms`` (0: none;
    :data:`_UNKNOWN`: set it again) bounds
    a read that wants ``bound_ms`` closely enough: never shorter (that would cancel the
    read early), at most :data:`_SLACK` times longer (the asyncio timeout ends the read
    at its deadline anyway; the server's bound is the backstop)."""
    if bound_ms == 0:
        return current_ms == 0
    return bound_ms <= current_ms <= bound_ms * _SLACK
