"""The process lifecycle of open stores: drained at interpreter exit, disowned after fork.

Stores register themselves while open. At exit each is closed (draining its pending
projections) before the interpreter stops daemon threads, so nothing acknowledged waits
on a worker that is about to vanish; in a forked child each is disowned, since its locks
and connections belong to the parent. This module imports nothing above it: it knows
stores only as :class:`Lifecycle`.
"""

from __future__ import annotations

import atexit
import os
import threading
import warnings
import weakref
from typing import Protocol

EXIT_DRAIN_S = 5.0


class Lifecycle(Protocol):
    """What an open store offers the process: a close, and a disowning after fork."""

    def close(self, timeout: float | None = ...) -> None:
        """Drain within ``timeout`` and release everything."""

    def _disown_after_fork(self) -> None:
        """In a forked child: drop the parent's locks and connections, close nothing."""

    def _describe(self) -> str:
        """A short name for messages, e.g. the store's path."""


_open: weakref.WeakSet[Lifecycle] = weakref.WeakSet()


def register(store: Lifecycle) -> None:
    """Track an open store until :func:`unregister`."""
    _open.add(store)


def unregister(store: Lifecycle) -> None:
    """Stop tracking a closed (or disowned) store."""
    _open.discard(store)


def _close_at_exit() -> None:
    """Interpreter exit: drain what is pending, so no worker outlives the program."""
    for store in list(_open):
        try:
            store.close(EXIT_DRAIN_S)
        finally:
            # Warn only once it is closed: under -W error the warning raises.
            warnings.warn(f"{store._describe()} was still open at exit; it was closed",
                          ResourceWarning, stacklevel=1)


def _disown_all_after_fork() -> None:
    for store in list(_open):
        store._disown_after_fork()


def _at_exit_before_daemon_threads_stop() -> None:
    """Register :func:`_close_at_exit` to run before the interpreter stops threads.

    ``threading._register_atexit`` runs before non-daemon threads are joined, while the
    projector (a daemon thread) still runs; it is private, so fall back to ``atexit``,
    which runs later but still drains what a live worker can reach.
    """
    register_early = getattr(threading, "_register_atexit", None)
    if callable(register_early):
        register_early(_close_at_exit)
    else:
        atexit.register(_close_at_exit)


_at_exit_before_daemon_threads_stop()
os.register_at_fork(after_in_child=_disown_all_after_fork)
