"""The projector's per-thread state machine: one phase, its transitions, and claims.

Pure: no lock, no I/O, no clock. The projector holds its lock around every call here and
passes the time in, so each transition can be tested alone (``tests/test_state.py``).
Per thread the state is O(1) whatever the backlog: watermarks, counters, at most
:data:`~thread_store.tracing.MAX_LINKS` captured trace contexts, and a small buffer of the
newest items (:data:`BUFFER_ITEMS`, :data:`BUFFER_BYTES`); beyond it the projector reads
the items back from history.
"""

from __future__ import annotations

import random
import threading
import traceback
from dataclasses import dataclass
from typing import Any

from opentelemetry.trace import SpanContext

from ._outcomes import AttemptOutcome, Outcome, Result, Settlement, Success, Waiter
from ._phases import LIVE, SCHEDULABLE, Phase, RemovalKind
from .errors import DURABLE_NOTE, ProjectionFailed, StoreClosed, ThreadDiscarded, describe
from .model import EncodedItem, RetryPolicy, ThreadMetadata
from .storage import Failure, StoredRow

BUFFER_ITEMS = 16
BUFFER_BYTES = 64 * 1024
#: A barrier with a deadline runs its thread's attempt itself only when the fold state
#: and the buffered items together stay below this: serializing and writing a row is
#: then a few milliseconds, so the barrier cannot outlive its timeout doing it.
CALLER_RUN_BYTES = 256 * 1024


@dataclass(slots=True, kw_only=True)
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
    incarnation: int | None  # the creation of the id that ``fold_state`` belongs to
    settled: bool = False  # the attempt has left flight (Schedule.settle)


class ThreadState:
    """Scheduler state of one thread. Every field is guarded by the projector lock.

    :attr:`phase` says what the projector may do with the thread, and only the
    transitions below change it, each asserting the phases it may leave (see
    :class:`Phase`). ``refold`` is a separate fact: the next attempt folds from the first
    item, because there is no row yet or the row ran ahead of history.
    """

    __slots__ = ("thread_id", "head", "projected", "phase", "due_at", "resume", "attempts",
                 "last_error", "failure", "failed_gen", "failure_epoch", "waiters", "cond",
                 "contexts", "dropped", "appends", "pending_since", "removal", "refold",
                 "buffer", "buffer_bytes", "fold_state", "state_bytes", "incarnation")

    def __init__(self, thread_id: str, head: int, projected: int) -> None:
        self.thread_id = thread_id
        self.head = head
        self.projected = projected
        self.phase = Phase.IDLE
        self.due_at: float | None = None  # DUE, BACKING_OFF: when the attempt may start
        self.resume = Phase.IDLE  # REMOVING: where an aborted removal returns to
        self.attempts = 0
        self.last_error: str | None = None
        self.failure: BaseException | None = None
        self.failed_gen = 0
        self.failure_epoch = 0
        self.waiters: list[Waiter] = []
        self.cond: threading.Condition | None = None  # made by the first waiter: saves memory
        self.contexts: list[tuple[int, SpanContext]] = []
        self.dropped = 0
        self.appends = 0
        self.pending_since: float | None = None
        self.removal: RemovalKind | None = None  # set once a removal began
        self.refold = False
        # Items (projected, head] while it holds them all; None once it overflowed.
        self.buffer: list[StoredRow] | None = [] if head == projected else None
        self.buffer_bytes = 0
        self.fold_state: dict[str, Any] | None = None  # the fold at ``projected``
        self.state_bytes = 0  # size of fold_state as last written
        self.incarnation: int | None = None  # the creation of the id fold_state belongs to

    def saw_head(self, head: int, now: float) -> None:
        """The store's head is at least ``head``: another process appended items this
        one never saw, so they are read from history, not from the buffer."""
        if head > self.head:
            self.head = head
            self.buffer, self.buffer_bytes = None, 0
            if self.pending_since is None:
                self.pending_since = now

    def rebase(self, head: int) -> None:
        """The id was deleted and created again elsewhere: what this process knew is
        another thread's. Start over from the store (its checkpoint, its ``head``)."""
        self.head, self.projected, self.refold = head, 0, False
        self.fold_state, self.state_bytes, self.incarnation = None, 0, None
        self.buffer, self.buffer_bytes = None, 0
        self.contexts, self.appends, self.dropped = [], 0, 0

    # -- what the phase says ----------------------------------------------------------

    @property
    def live(self) -> bool:
        """No removal is under way or done: the thread may be projected and written."""
        return self.phase in LIVE

    @property
    def removed(self) -> bool:
        """The removal is done: calls and waiters get :meth:`gone_error`."""
        return self.phase is Phase.REMOVED

    @property
    def in_flight(self) -> bool:
        """An attempt runs: IN_FLIGHT, or REMOVING while an attempt the removal did not
        wait out still runs (it is fenced: it writes nothing)."""
        return self.phase is Phase.IN_FLIGHT or (self.phase is Phase.REMOVING
                                                 and self.resume is Phase.IN_FLIGHT)

    @property
    def behind(self) -> bool:
        """Its projection has work left: items past ``projected``, or no row yet."""
        return self.projected < self.head or self.refold

    @property
    def forgettable(self) -> bool:
        """Caught up, with nothing scheduled, running, held or waiting: safe to forget."""
        return (self.phase is Phase.IDLE and not self.waiters and self.projected == self.head
                and not self.contexts and not self.refold)

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

    # -- work arriving ----------------------------------------------------------------

    def buffer_items(self, items: list[StoredRow]) -> None:
        """Keep appended items for the next attempt, or give up past the caps."""
        if self.buffer is None:
            return
        self.buffer_bytes += sum(len(b.text) for b in items)
        if len(self.buffer) + len(items) > BUFFER_ITEMS or self.buffer_bytes > BUFFER_BYTES:
            self.buffer, self.buffer_bytes = None, 0
        else:
            self.buffer.extend(items)

    def record_append(self, first: int, head: int, items: list[EncodedItem],
                      context: SpanContext | None, *, now: float, max_links: int) -> None:
        """Items ``(first, head]`` are durable: buffer them, count the append, keep its
        trace context (up to ``max_links``), and give a held thread a fresh budget."""
        if self.buffer is not None and first != self.head:
            self.buffer, self.buffer_bytes = None, 0  # another append got here first
        if self.buffer is not None:
            self.buffer_items([StoredRow(first + n, it.ts_us, it.text, it.kind)
                               for n, it in enumerate(items, 1)])
        self.head = max(self.head, head)
        self.appends += 1
        if context is not None:
            if len(self.contexts) < max_links:
                self.contexts.append((head, context))
            else:
                self.dropped += 1
        if self.pending_since is None:
            self.pending_since = now
        self.unhold()

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

    # -- scheduling: IDLE -> DUE | BACKING_OFF -> IN_FLIGHT -> IDLE | HELD ---------------

    def schedule(self, due_at: float, *, backoff: bool = False, cut_backoff: bool = False) -> bool:
        """IDLE, DUE or BACKING_OFF -> DUE (BACKING_OFF with ``backoff``), due no later
        than it already was. Returns whether ``due_at`` is now its due time.

        No-op while an attempt runs (its settle reschedules), during a removal, and while
        it backs off unless ``cut_backoff`` (a new waiter).
        """
        if self.phase not in SCHEDULABLE:
            assert self.phase is not Phase.HELD, "unhold() a held thread before scheduling it"
            return False
        if self.phase is Phase.BACKING_OFF and not cut_backoff:
            return False
        self.phase = Phase.BACKING_OFF if backoff else Phase.DUE
        if self.due_at is not None and self.due_at <= due_at:
            return False
        self.due_at = due_at
        return True

    def claim(self, *, expedited: bool) -> Claim:
        """IDLE, DUE or BACKING_OFF -> IN_FLIGHT: start an attempt covering the head."""
        assert self.phase in SCHEDULABLE, self.phase
        self.phase, self.due_at = Phase.IN_FLIGHT, None
        self.attempts += 1
        return Claim(state=self, target=self.head, base=self.projected,
                     contexts=[c for _, c in self.contexts], dropped=self.dropped,
                     appends=self.appends, attempt=self.attempts, expedited=expedited,
                     refold=self.refold, pending_since=self.pending_since,
                     fold_state=None if self.refold else self.fold_state,
                     items=None if self.buffer is None else list(self.buffer),
                     incarnation=self.incarnation)

    def end_flight(self) -> None:
        """IN_FLIGHT -> IDLE: the attempt left flight (during a removal, an abort then
        returns to IDLE). A removed thread stays REMOVED."""
        if self.phase is Phase.IN_FLIGHT:
            self.phase = Phase.IDLE
        elif self.phase is Phase.REMOVING and self.resume is Phase.IN_FLIGHT:
            self.resume = Phase.IDLE
        else:
            assert self.phase is Phase.REMOVED, self.phase

    def settle(self, claim: Claim, result: Result, *, retry: RetryPolicy,
               rng: random.Random, now: float) -> Settlement:
        """IN_FLIGHT -> IDLE, HELD or REMOVED: apply what the claimed attempt came to.

        A retry within the budget leaves the thread IDLE with a ``backoff`` for the
        projector to schedule; a failure for good holds it unless work arrived meanwhile.
        Waiters are left to :meth:`outcome_for`.
        """
        self.end_flight()
        kind = result.kind
        if kind is AttemptOutcome.GONE and self.live:
            self.commit_removal(RemovalKind.DELETED)  # history vanished: never retry
        lag = None
        if kind is AttemptOutcome.OK:
            self.projected_to(claim.target, result.fold_state, result.state_bytes)
            self.incarnation = result.incarnation
            self.refold, self.failure, self.attempts, self.last_error = False, None, 0, None
            self.contexts = [(g, ctx) for g, ctx in self.contexts if g > claim.target]
            self.appends -= claim.appends
            self.dropped -= claim.dropped
            if claim.pending_since is not None:
                lag = now - claim.pending_since
            self.pending_since = now if self.projected < self.head else None
        else:
            self.fold_state = None  # an impure rule may have changed it mid-attempt
        if kind in (AttemptOutcome.FENCED, AttemptOutcome.YIELDED, AttemptOutcome.REBORN):
            self.attempts = max(0, self.attempts - 1)  # it never ran: no budget spent
        if kind is AttemptOutcome.REBORN and self.live:
            self.rebase(result.head)
        if kind is AttemptOutcome.RETRY and self.attempts < retry.attempts:
            self.last_error = describe(result.error)
            return Settlement(backoff=retry.delay(self.attempts, rng))
        if kind in (AttemptOutcome.RETRY, AttemptOutcome.FAILED):
            return Settlement(failure=self._fail(claim.target, result.error))
        return Settlement(lag=lag)

    def _fail(self, target: int, error: BaseException | None) -> Failure:
        """Record a failure for good at ``target``; hold the thread unless work arrived
        meanwhile, which gets a fresh attempt and budget."""
        self.last_error = describe(error)
        try:
            if error is not None and error.__traceback__ is not None:
                # The frames hold the failed batch's items and rows: keep the error only.
                traceback.clear_frames(error.__traceback__)
        except Exception:  # noqa: BLE001 - a hook's error class may override __traceback__
            pass
        self.failure, self.failed_gen = error, target
        self.failure_epoch += 1
        if self.head <= target:
            if not self.removed:
                self.hold()
        else:
            self.attempts = 0
        return Failure(self.thread_id, target, self.last_error)

    def hold(self) -> None:
        """IDLE -> HELD: failed for good, no attempt until new work (REMOVING: an abort
        then returns to HELD)."""
        if self.phase is Phase.REMOVING:
            self.resume = Phase.HELD
        else:
            assert self.phase is Phase.IDLE, self.phase
            self.phase = Phase.HELD

    def unhold(self) -> None:
        """HELD -> IDLE with a fresh retry budget: new work arrived after a failure for
        good. No-op in any other phase."""
        if self.phase is Phase.HELD:
            self.phase, self.attempts = Phase.IDLE, 0
        elif self.phase is Phase.REMOVING and self.resume is Phase.HELD:
            self.resume, self.attempts = Phase.IDLE, 0

    # -- removal: live -> REMOVING -> REMOVED, or back where it was when it failed -------

    def begin_removal(self, kind: RemovalKind) -> None:
        """Any live phase -> REMOVING: stop scheduling; pending work and waiters are
        kept, and an attempt in flight runs on, fenced."""
        assert self.live, self.phase
        self.resume = self.phase if self.phase in (Phase.IN_FLIGHT, Phase.HELD) else Phase.IDLE
        self.phase, self.removal, self.due_at = Phase.REMOVING, kind, None

    def commit_removal(self, kind: RemovalKind | None = None) -> None:
        """REMOVING -> REMOVED; or IDLE -> REMOVED when history vanished under an attempt."""
        assert self.phase in (Phase.REMOVING, Phase.IDLE), self.phase
        self.phase = Phase.REMOVED
        self.removal = kind or self.removal or RemovalKind.DELETED

    def abort_removal(self, *, row_deleted: bool) -> None:
        """REMOVING -> where it was (IDLE, HELD, IN_FLIGHT): the removal failed and must
        have changed nothing.

        If it got as far as deleting the index row, the thread re-folds from its first
        item, so no barrier can be served by a row that no longer exists.
        """
        assert self.phase is Phase.REMOVING, self.phase
        self.phase, self.removal = self.resume, None
        if row_deleted:
            self.refold = True
            self.projected, self.fold_state, self.state_bytes = 0, None, 0
            self.buffer, self.buffer_bytes = None, 0
            if self.phase is Phase.HELD:
                self.phase = Phase.IDLE
            self.attempts = 0

    def condition(self, lock: threading.Lock) -> threading.Condition:
        """The condition its waiters and its removal wait on (on the projector's lock),
        made on first use: most threads never need one."""
        if self.cond is None:
            self.cond = threading.Condition(lock)
        return self.cond

    # -- answers ----------------------------------------------------------------------

    def gone_error(self) -> Exception:
        """The error a call on this discarded or deleted thread gets."""
        kind = None if self.removal is None else self.removal.value
        what = kind if self.removed else f"being {kind or 'removed'}"
        return ThreadDiscarded(f"thread {self.thread_id!r} was {what}. {DURABLE_NOTE}")

    def outcome_for(self, waiter: Waiter, meta: ThreadMetadata | None, *,
                    final: bool = False) -> Outcome | None:
        """The outcome ``waiter`` gets now, or ``None`` while it must wait on.

        :param meta: the metadata the last attempt wrote, if it reaches the waiter's target.
        :param final: the projector stopped: a waiter it cannot answer gets StoreClosed.
        """
        if self.removed:
            return self.gone_error()
        if self.projected >= waiter.target and not self.refold:
            return Success(meta if meta is not None and meta.projected_seq >= waiter.target else None)
        if self.failure_epoch > waiter.epoch and self.failed_gen >= waiter.target:
            error = ProjectionFailed([self.thread_id], self.failed_gen, describe(self.failure))
            error.__cause__ = self.failure
            return error
        if final:
            return StoreClosed(
                f"the store closed before thread {self.thread_id!r} reached generation "
                f"{waiter.target} (projected: {self.projected}); it is caught up on the next "
                "open. " + DURABLE_NOTE)
        return None
