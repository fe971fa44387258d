"""A discard or delete under way: the handle of its second phase.

:meth:`Projector.begin_removal <thread_store.projector.Projector.begin_removal>` stops
projecting the thread and returns a :class:`Removal`; the store removes the history and
the row, then commits or aborts it.
"""

from __future__ import annotations

from typing import Protocol

from ._state import ThreadState


class EndRemoval(Protocol):
    """Ends a removal, under the projector lock (``Projector._end_removal``)."""

    def __call__(self, removal: Removal, *, committed: bool, row_deleted: bool) -> None: ...


class Removal:
    """A discard or delete under way, in two phases.

    :meth:`commit` once the history and the row are gone; :meth:`abort` if removing
    failed, which puts the thread back as it was: its pending work is scheduled again and
    its waiters keep waiting, so a failed removal has changed nothing. Only the first of
    the two calls counts.
    """

    __slots__ = ("state", "open", "_end")

    def __init__(self, end: EndRemoval, state: ThreadState) -> None:
        self.state = state
        #: Neither committed nor aborted yet (read and cleared under the projector lock).
        self.open = True
        self._end = end

    def commit(self) -> None:
        """The thread is removed: fail its waiters with ThreadDiscarded, forget it."""
        self._end(self, committed=True, row_deleted=True)

    def abort(self, *, row_deleted: bool) -> None:
        """Removing failed: restore the thread (re-fold it if its row was deleted)."""
        self._end(self, committed=False, row_deleted=row_deleted)
