"""Appends go first: the projector worker steps aside while this process appends.

CPython hands the GIL over unfairly. A thread that released it for I/O (an append's
SQLite commit) and wants it back gets it only when the holder releases it for longer
than the waiter takes to wake up, or after the switch interval (5 ms) by a forced
switch. The worker's projection is Python with short SQLite calls in between, which
release the GIL too briefly to hand it over, so an append could wait milliseconds behind
a batch's folds, commit and settling (issue 15: the append p99 over many threads).

So the worker, between units of its work (a thread's fold, a slice of settling), asks
:meth:`AppendPriority.step_aside`: while an append of this process is under way, it
waits on a condition (holding no GIL) until that append finishes, whose end wakes it.
It waits at most as long as it worked since it last waited (plus
:data:`MAX_CREDIT_S` saved up): an append may be slow for reasons no step aside helps
(another process holds the history's file lock), and the projection must keep at least
half the worker's time however steadily appends arrive. And it steps aside only in a
batch whose appended work is younger than :data:`LAG_BUDGET_S`, and only for a lone
append: several under way already take turns on the GIL and share group commits, and
waiting for them all took half the worker's time with 8 writers appending flat out
(the projection lag p50 went from 13 to 24 ms, the appends' p99 did not improve).

Stepping aside only helps between units. A batch that starts while one caller appends
flat out (an append every few hundred microseconds, round robin over many threads) still
overlaps the next appends with its folds and commit, which made them about 3× slower at
p90. So before it claims a due batch, the worker asks :meth:`AppendPriority.hold` how
long to wait first: while a lone stream of this process's appends is under way (one
append in progress, or the last one left less than :data:`GAP_S` ago), it waits for a
gap in that stream, but only while the batch's oldest appended work is younger than
:data:`LAG_BUDGET_S`. A barrier's thread is never held, nor are several appenders (they
already share the GIL and the group commits) or work found behind. Measured side by
side with and without it: one caller round robin over 10,000 threads, append p50 50–62 →
33–38 µs and p99 420–590 → 91–524 µs; one writer over 100 threads, 9,000–10,000 →
15,600–15,900 appends/s at the same lag p99; 8 writers unchanged.

Work nobody here waits for (threads found behind at open or left by other processes,
with no append of this process and no barrier) is background: before each of its folds
the worker waits for a gap in this process's appends, not only for the append under way,
within a credit that keeps it at least :data:`BACKGROUND_SHARE` of its time. Waiting
only for the append under way let the worker fold again as each append left, beside the
caller's next one: with 30,000 threads catching up after a reopen and one caller
appending flat out, append p99 was 3.1× the idle store's; keeping a twentieth of the
time, 1.45–1.49×, the catch-up taking 124–163 s instead of 12 s while the caller never
paused (a tenth: 1.6–2.2×, 73–86 s; a fifth: 2.2–2.6×, 43 s). Appends in a server come
with gaps, which the catch-up uses at full speed; with no appends under way it never
waits. A barrier, a discard or a delete on a thread of the batch ends its background pace
(:meth:`AppendPriority.expedite`), and so does ``close`` for every batch after it
(:meth:`AppendPriority.drain`).
"""

from __future__ import annotations

import math
import threading
import time

#: The most waiting the worker saves up (while it works or sleeps) for later steps aside.
MAX_CREDIT_S = 0.005
#: The worker steps aside in a batch only while its oldest appended work is younger than
#: this (work found behind, at open or left by other processes, counts as appended by
#: no one: it may always wait).
LAG_BUDGET_S = 0.02
#: A lone append stream has a gap once no append of this process was under way for this
#: long (the time a caller takes between two appends is far shorter).
GAP_S = 0.0003
#: The least share of its time the worker keeps for background work while this process
#: appends without a gap (it waits at most ``1 / share - 1`` times as long as it worked):
#: a tenth still let the catch-up set append p99 at about 2× idle.
BACKGROUND_SHARE = 0.05
#: The most background waiting the worker saves up.
MAX_BACKGROUND_CREDIT_S = 0.05


class AppendPriority:
    """Counts this process's appends under way and lets the worker wait them out.

    Appends call :meth:`enter` and :meth:`leave` (two uncontended lock round trips);
    only the worker calls :meth:`start_batch` and :meth:`step_aside`. Thread-safe; its lock is a leaf (nothing
    else is taken while it is held).
    """

    __slots__ = ("_cond", "_started", "_finished", "_awaited", "_credit", "_since", "_fresh",
                 "_last_left", "_background_credit", "_expedited", "_draining", "steps")

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._started = 0  # appends that entered
        self._finished = 0  # appends that left
        self._awaited = 0  # the worker waits until this many have left; 0: it does not wait
        self._credit = MAX_CREDIT_S  # how long the worker may still wait
        self._since = time.monotonic()  # when the worker last stopped waiting
        self._fresh = True  # the worker's batch may wait (see start_batch)
        self._last_left = -math.inf  # when the last append left
        self._background_credit = MAX_BACKGROUND_CREDIT_S  # how long it may wait for a gap
        self._expedited = False  # a barrier waits on the batch: no background pace
        self._draining = False  # the store closes: no batch is paced any more
        #: How many times the worker stepped aside (waited) since open: for tests.
        self.steps = 0

    @property
    def under_way(self) -> int:
        """How many appends are under way now."""
        return self._started - self._finished

    def enter(self) -> None:
        """An append begins (call :meth:`leave` in a ``finally``)."""
        with self._cond:
            self._started += 1

    def leave(self) -> None:
        """An append ended, however: wake the worker if it waits for this one."""
        with self._cond:
            self._finished += 1
            self._last_left = time.monotonic()
            if self._awaited and self._finished >= self._awaited:
                self._awaited = 0
                self._cond.notify()

    def hold(self, oldest_append: float | None, now: float) -> float:
        """How long the worker should wait before it claims a due batch whose oldest
        appended work came at ``oldest_append`` (``None``: none was appended here): a
        slice of :data:`GAP_S` while a lone append stream is under way and that work is
        younger than :data:`LAG_BUDGET_S`, else 0 (see the module docstring); never once
        the store is closing (:meth:`drain`)."""
        if oldest_append is None or self._draining:
            return 0.0
        left = oldest_append + LAG_BUDGET_S - now
        under_way = self._started - self._finished  # unlocked: at worst one append old
        if left <= 0.0 or under_way > 1 or (under_way == 0 and now - self._last_left >= GAP_S):
            return 0.0
        return min(GAP_S, left)

    def start_batch(self, oldest_append: float | None, now: float) -> None:
        """The worker starts a batch whose oldest appended work came at ``oldest_append``
        (monotonic; ``None``: none was appended here): it steps aside in this batch only
        while that is younger than :data:`LAG_BUDGET_S`."""
        self._fresh = oldest_append is None or now - oldest_append < LAG_BUDGET_S
        self._expedited = self._draining

    def expedite(self) -> None:
        """A barrier or a removal waits on a thread of the worker's batch: stop pacing it
        as background (and end a wait for a gap now)."""
        with self._cond:
            self._expedited = True
            self._cond.notify()

    def drain(self) -> None:
        """The store is closing: no batch is held or paced as background from now on."""
        with self._cond:
            self._draining = self._expedited = True
            self._cond.notify()

    def step_aside(self, background: bool = False) -> None:
        """In the worker, holding no other lock: wait until the append under way now has
        finished, within the credit the worker has earned; return at once when none or
        several are under way. Before ``background`` work, wait for a gap in this
        process's appends instead (see the module docstring)."""
        now = time.monotonic()
        if background and not self._expedited:
            earned = (now - self._since) * (1.0 / BACKGROUND_SHARE - 1.0)
            self._background_credit = min(MAX_BACKGROUND_CREDIT_S, self._background_credit + earned)
            self._wait_for_gap(now)  # sets _since when it ends
            return
        self._credit = min(MAX_CREDIT_S, self._credit + (now - self._since))
        self._since = now
        if self._started - self._finished != 1 or self._credit <= 0.0 or not self._fresh:
            return  # read without the lock: an append missed here waits one unit at most
        with self._cond:
            if self._started - self._finished != 1:
                return
            self._awaited = self._started
            self.steps += 1
            self._cond.wait(self._credit)
            self._awaited = 0
        end = time.monotonic()
        self._credit -= end - now
        self._since = end

    def _wait_for_gap(self, now: float) -> None:
        """Wait until no append was under way for :data:`GAP_S`, within the background
        credit, or until the batch is expedited."""
        with self._cond:
            while self._background_credit > 0.0 and not self._expedited:
                if self._started == self._finished:
                    quiet = now - self._last_left
                    if quiet >= GAP_S:
                        break
                    wait = min(GAP_S - quiet, self._background_credit)
                else:
                    self._awaited = self._started  # its end wakes us
                    wait = self._background_credit
                self.steps += 1
                self._cond.wait(wait)
                self._awaited = 0
                end = time.monotonic()
                self._background_credit -= end - now
                now = end
        self._since = now
