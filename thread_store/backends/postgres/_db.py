"""The connection pool of one store, its settings, and the error boundary around its use."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Iterator

import psycopg
import psycopg_pool
from psycopg import sql

from ._errors import password_of, redact, translate
from ... import _deadlines
from ...errors import InvalidArgument, ThreadStoreError


#: The longest ``lock_timeout`` PostgreSQL takes, in milliseconds (a 32-bit integer).
_MAX_LOCK_TIMEOUT_MS = 2**31 - 1


def lock_timeout_ms(deadline: float) -> str:
    """The ``lock_timeout`` (milliseconds, as the setting's text) that ends a wait for
    another session's row lock at ``deadline`` (monotonic)."""
    return str(min(max(1, int((deadline - time.monotonic()) * 1000)), _MAX_LOCK_TIMEOUT_MS))


def wait_for_locks_until(conn: psycopg.Connection[Any], deadline: float) -> None:
    """In a transaction: wait for another session's row lock at most until ``deadline``
    (monotonic), after which the statement fails with ``LockNotAvailable``."""
    conn.execute(f"SET LOCAL lock_timeout = {lock_timeout_ms(deadline)}")


@dataclass(frozen=True, slots=True)
class PoolOptions:
    """The connection options of ``ThreadStore.open`` for PostgreSQL, with their defaults."""

    #: Connections the pool keeps open (the projector uses one, appends share the rest).
    pool_min_size: int = 1
    #: Most connections the pool opens; a caller waits for one up to ``connect_timeout``.
    pool_max_size: int = 10
    #: Seconds to connect to the server, and to wait for a free pooled connection.
    connect_timeout: float = 10.0
    #: Seconds any one statement may run (``statement_timeout``); 0 for no limit.
    statement_timeout: float = 30.0


#: Most connections of a store's asyncio pool: its barrier reads are single short
#: statements, and each holds a connection only while it runs (never while it waits).
ASYNC_POOL_MAX_SIZE = 4
#: The ``application_name`` of the asyncio pool's connections (``pg_stat_activity``).
ASYNC_APPLICATION_NAME = "thread_store-aio"
#: Seconds a session may sit idle inside a transaction before the server ends it: a
#: backstop for a process that hangs holding a row lock.
_IDLE_IN_TRANSACTION_S = 60
#: libpq TCP keepalives: a vanished client or server is noticed in about 25 s.
_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
               "keepalives_count": 3}


class Database:
    """A pool of autocommit connections to one store's schema, and its error boundary."""

    def __init__(self, url: str, schema: str, *, durability: str, read_only: bool,
                 options: PoolOptions) -> None:
        try:
            psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise InvalidArgument(f"malformed PostgreSQL URL {redact(url)!r}: pass "
                                  "postgresql://user@host:port/database") from exc
        self.description = redact(url)
        self.schema = schema
        self.secret = password_of(url)
        self._schema_sql = sql.Identifier(schema)
        settings = {
            "statement_timeout": int(options.statement_timeout * 1000),
            "idle_in_transaction_session_timeout": _IDLE_IN_TRANSACTION_S * 1000,
            # DESIGN §6: "normal" survives a server crash, "full" also waits for standbys.
            "synchronous_commit": "on" if durability == "full" else "local",
        }
        if read_only:
            settings["default_transaction_read_only"] = "on"
        kwargs: dict[str, Any] = {
            "autocommit": True, "application_name": "thread_store",
            "connect_timeout": max(1, round(options.connect_timeout)),
            "options": " ".join(f"-c {k}={v}" for k, v in settings.items()), **_KEEPALIVES}
        self.pool = psycopg_pool.ConnectionPool(
            url, min_size=options.pool_min_size, max_size=options.pool_max_size, kwargs=kwargs,
            timeout=options.connect_timeout, open=False, name="thread_store")
        self._url = url
        self._kwargs = kwargs
        self._pool_wait = options.connect_timeout
        #: ``statement_timeout`` in seconds (0: none), which a deadline may only shorten.
        self.statement_timeout = options.statement_timeout
        self._max_size = options.pool_max_size

    def open(self, timeout: float) -> None:
        """Open the pool, waiting for its first connections."""
        with self.boundary("connecting to PostgreSQL"):
            self.pool.open(wait=True, timeout=timeout)

    def async_pool(self) -> psycopg_pool.AsyncConnectionPool:
        """An asyncio pool with the sync pool's connection settings (timeouts, keepalives,
        read-only transactions), named ``thread_store-aio`` on the server: sized lazily
        (no connection until the first read) up to :data:`ASYNC_POOL_MAX_SIZE`. Create and
        open it on the event loop that uses it."""
        return psycopg_pool.AsyncConnectionPool(
            self._url, min_size=0, max_size=min(ASYNC_POOL_MAX_SIZE, self._max_size),
            kwargs={**self._kwargs, "application_name": ASYNC_APPLICATION_NAME},
            timeout=self._pool_wait, open=False, name=ASYNC_APPLICATION_NAME)

    def pool_wait(self) -> float:
        """Seconds to wait for a pooled connection: ``connect_timeout``, cut short by the
        caller's barrier deadline (``_deadlines``)."""
        return _deadlines.left(self._pool_wait)

    def dedicated(self, application_name: str) -> psycopg.Connection[Any]:
        """A connection of its own, outside the pool, with the pool's settings: for a
        session-level lock, which a pooled connection would carry back to the pool.

        :raises TransientStorageError: the server cannot be reached.
        """
        with self.boundary("connecting to PostgreSQL"):
            return psycopg.connect(self._url, **{**self._kwargs,
                                                 "application_name": application_name})

    def q(self, text: str) -> bytes:
        """``text`` with ``{s}`` naming the store's schema (quoted)."""
        return text.replace("{s}", self._schema_sql.as_string(None)).encode()

    @contextlib.contextmanager
    def boundary(self, what: str) -> Iterator[None]:
        """Translate the driver's errors raised inside into typed ones (``from`` them)."""
        try:
            yield
        except ThreadStoreError:
            raise
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            raise translate(exc, f"{what} at {self.description}", secret=self.secret) from exc

    @contextlib.contextmanager
    def connection(self, what: str) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection inside the error boundary, waited for no longer than the
        caller's barrier deadline (``_deadlines``): while the server is down, the pool
        has none to give."""
        with self.boundary(what), self.pool.connection(timeout=self.pool_wait()) as conn:
            yield conn
