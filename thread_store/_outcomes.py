"""What a projection attempt and a barrier come to: the records the projector hands on.

Pure data with no I/O. An attempt ends in a :class:`Result` (its :class:`AttemptOutcome`
and what it folded), and settling it in a :class:`Settlement`; a barrier's
:class:`Waiter` ends in an :data:`Outcome` (a :class:`Success` or the error to raise).
:class:`LocalStatus` is what this process alone knows of a thread.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass
from typing import Any, Callable

from .model import ThreadMetadata
from .storage import Failure


class AttemptOutcome(enum.Enum):
    """What one projection attempt came to (the value is its span's ``outcome``)."""

    #: Folded and written: the thread is projected up to the claim's target.
    OK = "ok"
    #: A transient error: retried after a backoff while the retry budget lasts.
    RETRY = "retry"
    #: An error for good: its waiters get ProjectionFailed, and the thread is held.
    FAILED = "failed"
    #: Its history vanished under the attempt: the thread counts as deleted.
    GONE = "gone"
    #: Fenced by close: nothing was written.
    CLOSED = "closed"
    #: A removal of the thread is under way: nothing was written.
    FENCED = "fenced"
    #: Given back unrun: its caller was interrupted, or ran out of time waiting for the
    #: index write lock.
    YIELDED = "yielded"
    #: The id was deleted and created again by another process: nothing was written, and
    #: the thread starts over from the store (at ``Result.head``).
    REBORN = "reborn"


@dataclass(slots=True)
class Result:
    """What one attempt came to, with the metadata and fold state of a successful one."""

    kind: AttemptOutcome
    meta: ThreadMetadata | None = None
    error: BaseException | None = None
    fold_state: dict[str, Any] | None = None
    state_bytes: int = 0
    incarnation: int | None = None
    #: The store's head of a ``REBORN`` thread.
    head: int = 0
    #: ``OK`` with nothing written: the stored row (another process's) covers the target.
    covered: bool = False


@dataclass(frozen=True, slots=True)
class Settlement:
    """What settling an attempt asks of the projector beyond the thread's own state."""

    #: Seconds from the first unprojected append to its projection (``OK`` only).
    lag: float | None = None
    #: Retry after this many seconds (``RETRY`` within the budget): schedule a backoff.
    backoff: float | None = None
    #: A failure for good, to record in the store.
    failure: Failure | None = None


class Success:
    """Outcome of a waiter whose generation is projected (``meta`` when known)."""

    __slots__ = ("meta",)

    def __init__(self, meta: ThreadMetadata | None) -> None:
        self.meta = meta


Outcome = Success | BaseException


class Waiter:
    """One barrier waiting for ``target``; resolved once, under the projector lock."""

    __slots__ = ("thread_id", "target", "epoch", "outcome", "callback", "cond")

    def __init__(self, thread_id: str, target: int, epoch: int,
                 callback: Callable[[Outcome], None] | None, cond: threading.Condition) -> None:
        self.thread_id = thread_id
        self.target = target
        self.epoch = epoch
        self.outcome: Outcome | None = None
        self.callback = callback
        self.cond = cond


@dataclass(frozen=True, slots=True)
class LocalStatus:
    """What this process alone knows of a thread (``status()`` adds the store's state)."""

    attempts: int
    waiters: int
    last_error: str | None
