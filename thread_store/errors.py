"""The one error hierarchy of thread_store.

Every error a public call raises is a :class:`ThreadStoreError`. Each also inherits the
builtin it resembles, so ``except TimeoutError`` or ``except ValueError`` keep working.
Barrier errors say that the appended items are durable, so callers do not re-append.
"""

from __future__ import annotations

DURABLE_NOTE = "The appended items are durable in the history; do not append them again."


class ThreadStoreError(Exception):
    """Base class of every error raised by thread_store."""


class InvalidArgument(ThreadStoreError, ValueError):
    """A call got a malformed argument (thread id, timeout, limit, cursor, ...)."""


class InvalidItem(InvalidArgument):
    """An item is not a JSON object with a ``type``, is not serializable, or is too large."""


class InvalidCursor(InvalidArgument):
    """A ``list_threads`` cursor was not produced by the same query."""


class ThreadNotFound(ThreadStoreError, LookupError):
    """The thread id is unknown (never created, or deleted)."""


class ThreadExists(ThreadStoreError):
    """``create_thread`` was given an id that is already taken."""


class ThreadDiscarded(ThreadStoreError):
    """The thread was discarded (tombstoned) or deleted while the call waited."""


class StoreClosed(ThreadStoreError):
    """The store is closed, or was opened in a parent process before ``fork``."""


class StoreLocked(ThreadStoreError):
    """The store is in use in a way that excludes the call: ``rebuild_index`` while a
    writer has it open, or opening while its index is being rebuilt."""


class NotAThreadStore(ThreadStoreError):
    """The path exists but does not hold a thread store (or cannot be written)."""


class SchemaTooNew(ThreadStoreError):
    """The database was written by a newer thread_store; upgrade the package to open it."""


class StorageError(ThreadStoreError, OSError):
    """The storage backend failed (damaged file, I/O error, a row it cannot store).

    The driver's own error is chained as ``__cause__``.
    """


class TransientStorageError(StorageError):
    """A storage failure that may go away on its own (busy or locked database, I/O error,
    full disk, lost connection); projections retry it with backoff."""


class OutcomeUnknown(ThreadStoreError):
    """The backend cannot tell whether a write was stored (a connection lost during its
    commit). With an ``idempotency_key``, repeating the same call is safe and answers it."""


class DiscardTimeout(ThreadStoreError, TimeoutError):
    """``discard`` (or ``delete_thread``) gave up waiting for a projection in flight in
    another process; nothing was removed, and the call may be retried."""


class TransientProjectionError(ThreadStoreError):
    """Raise from a ``projection_hook`` (or rules) to ask for a retry with backoff."""


class BarrierError(ThreadStoreError):
    """Base of the errors a barrier (``flush``) can raise; the items stay durable."""


class FlushTimeout(BarrierError, TimeoutError):
    """The barrier's timeout passed before the projection reached its generation."""

    def __init__(self, thread_id: str, target: int, projected: int, timeout: float) -> None:
        self.thread_id = thread_id
        self.target = target
        self.projected = projected
        super().__init__(
            f"flush of thread {thread_id!r} timed out after {timeout:g}s: generation {target} "
            f"is not projected yet (projected generation is {projected}). {DURABLE_NOTE} "
            "Flush again with a longer timeout, or check status()."
        )


class ProjectionFailed(BarrierError):
    """The projection attempt that covered the barrier's generation failed for good."""

    def __init__(self, thread_ids: list[str], generation: int | None, cause: str) -> None:
        self.thread_ids = thread_ids
        self.generation = generation
        which = ", ".join(repr(t) for t in thread_ids)
        at = f" at generation {generation}" if generation is not None else ""
        super().__init__(
            f"projection of thread {which}{at} failed: {cause}. {DURABLE_NOTE} "
            "Pending work is kept: the next append or flush retries it."
        )


class ReadOnlyStore(ThreadStoreError):
    """A write was attempted on a store opened with ``read_only=True``."""


def describe(error: BaseException | None) -> str:
    """``Type: message`` of an error, for status(), ProjectionFailed, logs and spans.

    The error may come from user code (a hook, the rules) and be hostile: its
    ``__str__`` may raise or return a non-string, its ``__repr__`` too. This never
    raises, so nothing that reports an error can take the projector down.
    """
    if error is None:
        return "unknown error"
    name = "exception"
    try:
        raw = type(error).__name__
        if isinstance(raw, str):
            name = str.__str__(raw)  # a str subclass could override formatting too
    except Exception:  # noqa: BLE001 - a metaclass can make even the name raise
        pass
    for render in (str, repr):
        try:
            text = render(error)
            if isinstance(text, str):
                return name + ": " + str.__str__(text)
        except Exception:  # noqa: BLE001 - see the docstring
            continue
    return name + ": <unprintable " + name + " object>"
