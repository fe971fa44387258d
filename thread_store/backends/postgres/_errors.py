"""The one error boundary of the PostgreSQL backend: psycopg errors in, typed errors out.

Everything that can fail in a way the retry policy should see again (a lost or refused
connection, a server shutting down, a serialization failure, a deadlock, a lock or
statement timeout, an exhausted pool) becomes :class:`TransientStorageError`; anything
else (integrity, data, programming errors, a server limit exceeded) a
:class:`StorageError`. The driver's error is always chained as ``__cause__``. Nothing
above the seam looks at psycopg errors or their text. Messages never carry a password:
the connection URL is redacted where it is kept, and the driver's text is scrubbed of
the password as a second guard.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import psycopg
import psycopg_pool

from ...errors import StorageError, StoreClosed, ThreadStoreError, TransientStorageError


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for ``description`` and messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def password_of(url: str) -> str | None:
    """The URL's password, to scrub from driver messages (``None`` without one)."""
    try:
        return urlsplit(url).password or None
    except ValueError:
        return None


#: The SQLSTATE class of errors that retrying cannot cure: a value or a statement over
#: one of the server's fixed limits.
_PROGRAM_LIMIT = "54"


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same work may succeed (see the module doc)."""
    # OperationalError covers connection failures, AdminShutdown, QueryCanceled
    # (statement timeouts), LockNotAvailable, and TransactionRollback (serialization
    # failures, deadlocks); PoolTimeout is one too. It also covers class 54,
    # program_limit_exceeded (an index row or a statement too large): the same work
    # fails the same way every time.
    return (isinstance(exc, psycopg.OperationalError)
            and not isinstance(exc, psycopg_pool.PoolClosed)
            and not str(getattr(exc, "sqlstate", None) or "").startswith(_PROGRAM_LIMIT))


def is_outcome_unknown(exc: BaseException) -> bool:
    """The connection broke with no answer from the server (no SQLSTATE): a write sent
    on it may or may not have committed."""
    return (isinstance(exc, psycopg.OperationalError) and getattr(exc, "sqlstate", None) is None
            and not isinstance(exc, psycopg_pool.PoolTimeout))


def translate(exc: BaseException, what: str, *, secret: str | None = None) -> ThreadStoreError:
    """The typed error for a driver error ``exc`` raised while doing ``what``.

    The caller raises it ``from exc``.
    """
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if secret:
        text = text.replace(secret, "***")
    detail = f"{what}: {type(exc).__name__}: {text}"
    if isinstance(exc, psycopg_pool.PoolClosed):
        return StoreClosed(f"{what}: the store's connection pool is closed")
    if is_transient(exc):
        return TransientStorageError(f"{detail} (PostgreSQL unreachable, busy or restarting; "
                                     "retry later)")
    return StorageError(detail)
