"""A thread's phases in the projector, and how a thread is removed: the vocabulary of
:class:`~thread_store._state.ThreadState`'s transitions, which only it changes."""

from __future__ import annotations

import enum


class Phase(enum.Enum):
    """Where one thread stands in the projector. :class:`~thread_store._state.ThreadState` moves it::

        IDLE -schedule-> DUE | BACKING_OFF -claim-> IN_FLIGHT -settle-> IDLE | HELD | REMOVED
        IDLE -claim-> IN_FLIGHT      (a barrier runs the attempt in its own thread)
        HELD -unhold-> IDLE          (an append or a barrier after a failure for good)
        live -begin_removal-> REMOVING -commit_removal-> REMOVED
                              REMOVING -abort_removal-> IDLE | HELD | IN_FLIGHT (as before)
    """

    #: Nothing scheduled or running: caught up, or its work waits for the barrier that
    #: follows at once (or, once the projector stopped, for the next open).
    IDLE = "idle"
    #: Scheduled: an attempt starts at ``due_at`` (after its coalescing delay), or sooner
    #: when another thread opens a batch.
    DUE = "due"
    #: Scheduled after a transient error: starts at ``due_at`` and not sooner. Appends keep
    #: the backoff, so a busy thread does not burn its retry budget; a new waiter cuts it.
    BACKING_OFF = "backing_off"
    #: An attempt runs, in the worker or in a barrier's calling thread.
    IN_FLIGHT = "in_flight"
    #: Failed for good: no attempt until an append or a barrier brings new work.
    HELD = "held"
    #: A removal is under way: nothing new starts, no attempt writes; its waiters wait
    #: for the outcome, because a removal that fails must change nothing.
    REMOVING = "removing"
    #: History and row are gone: every call and waiter gets ThreadDiscarded.
    REMOVED = "removed"


#: The phases of a thread no removal has touched: it may be projected and written.
LIVE = frozenset({Phase.IDLE, Phase.DUE, Phase.BACKING_OFF, Phase.IN_FLIGHT, Phase.HELD})
#: The phases an attempt may be scheduled or claimed from.
SCHEDULABLE = frozenset({Phase.IDLE, Phase.DUE, Phase.BACKING_OFF})


class RemovalKind(enum.Enum):
    """How a thread is removed: its id kept as a tombstone (discard), or freed (delete)."""

    DISCARDED = "discarded"
    DELETED = "deleted"
