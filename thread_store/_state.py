"""The projector's data: per-thread pending state, waiters, claims, outcomes, policy.

Pure data with no I/O. Per thread the state is O(1) whatever the backlog: watermarks,
counters, at most :data:`~thread_store.tracing.MAX_LINKS` captured trace contexts, and a
small buffer of the newest items (:data:`BUFFER_ITEMS`, :data:`BUFFER_BYTES`); beyond it
the projector reads the items back from history.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass
from typing import Any, Callable

from opentelemetry.trace import SpanContext

from .errors import DURABLE_NOTE, ThreadDiscarded
from .model import ThreadMetadata
from .storage import StoredRow

BUFFER_ITEMS = 16
BUFFER_BYTES = 64 * 1024
#: A barrier with a deadline runs its thread's attempt itself only when the fold state
#: and the buffered items together stay below this: serializing and writing a row is
#: then a few milliseconds, so the barrier cannot outlive its timeout doing it.
CALLER_RUN_BYTES = 256 * 1024



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


class Phase(enum.Enum):
    """Where a thread stands between live and removed (discard, delete_thread)."""

    LIVE = "live"
    #: A removal is under way: nothing new starts, no attempt writes; its waiters wait
    #: for the outcome, because a removal that fails must change nothing.
    REMOVING = "removing"
    #: History and row are gone: every call and waiter gets ThreadDiscarded.
    REMOVED = "removed"


class ThreadState:
    """Scheduler state of one thread. Every field is guarded by the projector lock."""

    __slots__ = ("thread_id", "head", "projected", "in_flight", "ready_at", "attempts",
                 "last_error", "failure", "failed_gen", "failure_epoch", "held", "waiters",
                 "cond", "contexts", "dropped", "appends", "pending_since", "phase", "removal",
                 "refold", "buffer", "buffer_bytes", "fold_state", "state_bytes", "backing_off")

    def __init__(self, thread_id: str, head: int, projected: int) -> None:
        self.thread_id = thread_id
        self.head = head
        self.projected = projected
        self.in_flight: int | None = None
        self.ready_at: float | None = None
        self.attempts = 0
        self.last_error: str | None = None
        self.failure: BaseException | None = None
        self.failed_gen = 0
        self.failure_epoch = 0
        self.held = False  # failed for good; waits for the next append or flush
        self.waiters: list[Waiter] = []
        self.cond: threading.Condition | None = None  # made by the first waiter: saves memory
        self.contexts: list[tuple[int, SpanContext]] = []
        self.dropped = 0
        self.appends = 0
        self.pending_since: float | None = None
        self.phase = Phase.LIVE
        self.removal: str | None = None  # "discarded" or "deleted" once a removal began
        self.refold = False  # fold from the first item: no row yet, or the row ran ahead
        # Items (projected, head] while it holds them all; None once it overflowed.
        self.buffer: list[StoredRow] | None = [] if head == projected else None
        self.buffer_bytes = 0
        self.fold_state: dict[str, Any] | None = None  # the fold at ``projected``
        self.state_bytes = 0  # size of fold_state as last written
        self.backing_off = False  # due time is a retry backoff: only a new waiter cuts it

    def buffer_items(self, items: list[StoredRow]) -> None:
        """Keep appended items for the next attempt, or give up past the caps."""
        if self.buffer is None:
            return
        self.buffer_bytes += sum(len(b.text) for b in items)
        if len(self.buffer) + len(items) > BUFFER_ITEMS or self.buffer_bytes > BUFFER_BYTES:
            self.buffer, self.buffer_bytes = None, 0
        else:
            self.buffer.extend(items)

    def projected_to(self, target: int, fold_state: dict[str, Any] | None,
                     state_bytes: int = 0) -> None:
        """Record a successful attempt that covered ``target``."""
        self.projected = max(self.projected, target)
        self.fold_state = fold_state
        self.state_bytes = state_bytes
        if self.buffer is not None:
            self.buffer = [b for b in self.buffer if b.seq > target]
            self.buffer_bytes = sum(len(b.text) for b in self.buffer)
        elif self.head == self.projected:
            self.buffer, self.buffer_bytes = [], 0

    @property
    def behind(self) -> bool:
        """Its projection has work left: items past ``projected``, or no row yet."""
        return self.projected < self.head or self.refold

    def unhold(self) -> None:
        """New work arrived after a failure for good: start a fresh retry budget."""
        if self.held:
            self.held = False
            self.attempts = 0

    @property
    def bounded_work(self) -> bool:
        """The next attempt only folds buffered items onto a small known state (no
        history or index read, no big row): a caller with a deadline may run it."""
        if self.buffer is None:
            return False
        if self.refold:
            return self.projected == 0  # folds the buffered items onto the initial state
        return (self.fold_state is not None
                and self.state_bytes + self.buffer_bytes <= CALLER_RUN_BYTES)

    # -- removal: LIVE -> REMOVING -> REMOVED, or back to LIVE when the removal failed --

    @property
    def live(self) -> bool:
        """No removal is under way or done: the thread may be projected and written."""
        return self.phase is Phase.LIVE

    @property
    def removed(self) -> bool:
        """The removal is done: calls and waiters get :meth:`gone_error`."""
        return self.phase is Phase.REMOVED

    def begin_removal(self, kind: str) -> None:
        """LIVE -> REMOVING: stop scheduling; pending work and waiters are kept."""
        assert self.phase is Phase.LIVE, self.phase
        self.phase, self.removal = Phase.REMOVING, kind
        self.ready_at, self.backing_off = None, False

    def commit_removal(self, kind: str | None = None) -> None:
        """REMOVING (or LIVE, when history vanished under an attempt) -> REMOVED."""
        self.phase = Phase.REMOVED
        self.removal = kind or self.removal or "deleted"

    def abort_removal(self, *, row_deleted: bool) -> None:
        """REMOVING -> LIVE: the removal failed and must have changed nothing.

        If it got as far as deleting the index row, the thread re-folds from its first
        item, so no barrier can be served by a row that no longer exists.
        """
        assert self.phase is Phase.REMOVING, self.phase
        self.phase, self.removal = Phase.LIVE, None
        if row_deleted:
            self.refold = True
            self.projected, self.fold_state, self.state_bytes = 0, None, 0
            self.buffer, self.buffer_bytes = None, 0
            self.held = False
            self.attempts = 0

    def gone_error(self) -> Exception:
        """The error a call on this discarded or deleted thread gets."""
        what = self.removal if self.removed else f"being {self.removal or 'removed'}"
        return ThreadDiscarded(f"thread {self.thread_id!r} was {what}. {DURABLE_NOTE}")

    @property
    def idle(self) -> bool:
        """Caught up with nothing pending or waiting: safe to forget."""
        return (not self.waiters and self.projected == self.head and not self.contexts
                and self.ready_at is None and self.in_flight is None and not self.held
                and not self.refold and self.live)


@dataclass(frozen=True, slots=True)
class LocalStatus:
    """What this process alone knows of a thread (``status()`` adds the store's state)."""

    attempts: int
    waiters: int
    last_error: str | None


@dataclass(slots=True)
class Claim:
    """One thread's projection attempt: what it covers, snapshotted at its start."""

    state: ThreadState
    target: int
    base: int
    contexts: list[SpanContext]
    dropped: int
    appends: int
    attempt: int
    expedited: bool
    refold: bool
    pending_since: float | None
    fold_state: dict[str, Any] | None
    items: list[StoredRow] | None  # (base, target] when buffered, else read history
    settled: bool = False  # the attempt has left flight (Projector._end_attempts)


@dataclass(slots=True)
class Result:
    """What one attempt came to.

    ``ok``, ``retry``, ``failed``, ``gone`` (its history vanished), ``closed`` (fenced by
    close), ``fenced`` (a removal is under way) or ``yielded`` (its caller gave the work
    back unrun: interrupted, or out of time waiting for the index write lock).
    """

    kind: str
    meta: ThreadMetadata | None = None
    error: BaseException | None = None
    fold_state: dict[str, Any] | None = None
    state_bytes: int = 0


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
