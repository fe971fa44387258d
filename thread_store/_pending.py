"""The projector's data: per-thread pending state, waiters, claims, outcomes, policy.

Pure data with no I/O. Per thread the state is O(1) whatever the backlog: watermarks,
counters, at most :data:`~thread_store.tracing.MAX_LINKS` captured trace contexts, and a
small buffer of the newest items (:data:`BUFFER_ITEMS`, :data:`BUFFER_BYTES`); beyond it
the projector reads the items back from history.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass
from typing import Any, Callable

from opentelemetry.trace import SpanContext

from .errors import DURABLE_NOTE, InvalidArgument, ThreadDiscarded
from .model import ThreadMetadata

BUFFER_ITEMS = 16
BUFFER_BYTES = 64 * 1024

BufferedItem = tuple[int, int, str, str]  # (seq, ts_us, json text, type)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Capped exponential backoff with jitter; ``attempts`` is the budget per failure run."""

    attempts: int = 8
    base_delay: float = 0.05
    max_delay: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 1:
            raise InvalidArgument(f"RetryPolicy.attempts must be an integer >= 1, not {self.attempts!r}")
        for name in ("base_delay", "max_delay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise InvalidArgument(f"RetryPolicy.{name} must be a finite number of seconds >= 0, "
                                      f"not {value!r}")

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Backoff before retry number ``attempt`` (1-based), jittered into [50%, 100%]."""
        backoff: float = min(self.max_delay, self.base_delay * 2.0 ** (attempt - 1))
        return backoff * rng.uniform(0.5, 1.0)


@dataclass(frozen=True, slots=True)
class ProjectorStats:
    """Counters since open: group commits, rows, attempts, retries, failures, backlog."""

    transactions: int
    rows_written: int
    attempts: int
    retries: int
    failures: int
    pending_threads: int
    waiters: int


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


class ThreadState:
    """Scheduler state of one thread. Every field is guarded by the projector lock."""

    __slots__ = ("thread_id", "head", "projected", "in_flight", "ready_at", "attempts",
                 "last_error", "failure", "failed_gen", "failure_epoch", "held", "waiters",
                 "cond", "contexts", "dropped", "appends", "pending_since", "gone", "refold",
                 "buffer", "buffer_bytes", "fold_state", "backing_off")

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
        self.gone: str | None = None
        self.refold = False  # fold from the first item: no row yet, or the row ran ahead
        # Items (projected, head] while it holds them all; None once it overflowed.
        self.buffer: list[BufferedItem] | None = [] if head == projected else None
        self.buffer_bytes = 0
        self.fold_state: dict[str, Any] | None = None  # the fold at ``projected``
        self.backing_off = False  # due time is a retry backoff: only a new waiter cuts it

    def buffer_items(self, items: list[BufferedItem]) -> None:
        """Keep appended items for the next attempt, or give up past the caps."""
        if self.buffer is None:
            return
        self.buffer_bytes += sum(len(b[2]) for b in items)
        if len(self.buffer) + len(items) > BUFFER_ITEMS or self.buffer_bytes > BUFFER_BYTES:
            self.buffer, self.buffer_bytes = None, 0
        else:
            self.buffer.extend(items)

    def projected_to(self, target: int, fold_state: dict[str, Any] | None) -> None:
        """Record a successful attempt that covered ``target``."""
        self.projected = max(self.projected, target)
        self.fold_state = fold_state
        if self.buffer is not None:
            self.buffer = [b for b in self.buffer if b[0] > target]
            self.buffer_bytes = sum(len(b[2]) for b in self.buffer)
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

    def gone_error(self) -> Exception:
        """The error a call on this discarded or deleted thread gets."""
        return ThreadDiscarded(f"thread {self.thread_id!r} was {self.gone}. {DURABLE_NOTE}")

    @property
    def idle(self) -> bool:
        """Caught up with nothing pending or waiting: safe to forget."""
        return (not self.waiters and self.projected == self.head and not self.contexts
                and self.ready_at is None and self.in_flight is None and not self.held
                and not self.refold and not self.gone)


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
    items: list[BufferedItem] | None  # (base, target] when buffered, else read history


@dataclass(slots=True)
class Result:
    """What one attempt came to: ok, retry, failed, gone (discarded/deleted) or closed."""

    kind: str
    meta: ThreadMetadata | None = None
    error: BaseException | None = None
    fold_state: dict[str, Any] | None = None


def describe(error: BaseException | None) -> str:
    """``Type: message`` of an error, for status() and ProjectionFailed."""
    if error is None:
        return "unknown error"
    return f"{type(error).__name__}: {error}"
