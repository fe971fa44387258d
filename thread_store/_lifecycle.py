"""The lifecycle of open stores: closed once, drained at interpreter exit, disowned after fork.

Each store's :class:`Lifetime` knows whether it is open and lets its parts go in order.
Lifetimes register while open. At exit each is closed (draining its pending projections)
before the interpreter stops daemon threads, so nothing acknowledged waits on a worker
that is about to vanish; in a forked child each is disowned, since its locks and
connections belong to the parent. This module imports nothing above the storage ports:
it knows the projector only as a :class:`Worker`.
"""

from __future__ import annotations

import atexit
import os
import threading
import warnings
import weakref
from typing import Protocol

from .errors import StoreClosed
from .storage import Storage

EXIT_DRAIN_S = 5.0


class Worker(Protocol):
    """A store's projector, as its lifetime sees it."""

    def close(self, timeout: float | None) -> object:
        """Drain within ``timeout`` (``None``: no limit), then stop."""

    def stop_now(self) -> None:
        """Stop without draining."""

    def reset_after_fork(self) -> None:
        """In a forked child: forget the parent's threads and locks."""


class Lifetime:
    """One store from open to closed: the state its calls check, and the order in which
    its parts are let go (close, garbage collection, fork)."""

    def __init__(self, storage: Storage, projector: Worker | None) -> None:
        """:param projector: ``None`` for a read-only store."""
        self._storage = storage
        self._projector = projector
        self._closed = False
        self._why = "the thread store is closed; open it again"
        self._lock = threading.Lock()

    def closed_reason(self) -> str | None:
        """Why the store is closed, or ``None`` while it is open."""
        return self._why if self._closed else None

    def check_open(self) -> None:
        """:raises StoreClosed: the store is closed, or was opened before a fork."""
        if self._closed:
            raise StoreClosed(self._why)

    def describe(self) -> str:
        """``ThreadStore at PATH``, for messages."""
        return f"ThreadStore at {self._storage.description}"

    def close(self, timeout: float | None) -> None:
        """Stop appends, drain the projector within ``timeout``, release the storage.

        Idempotent: only the first call does anything.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._storage.reject_writes()
        try:
            if self._projector is not None:
                # What the drain leaves behind stays recorded as behind for the next open.
                self._projector.close(timeout)
        finally:
            self._storage.close()
            unregister(self)

    def abandon(self) -> bool:
        """The store is garbage: stop without draining and release its locks.

        :returns: whether it was still open (then its owner warns).
        """
        if self._closed:
            return False
        # Stop first: under -W error the owner's warning raises, and the worker must not
        # go on projecting for a store nobody can close any more.
        if self._projector is not None:
            self._projector.stop_now()
        self._storage.abandon()  # else this process could never open the store again
        unregister(self)
        return True

    def disown_after_fork(self) -> None:
        """In a forked child: every call raises :class:`StoreClosed`; the parent keeps
        the store (called by the fork handler)."""
        unregister(self)
        self._closed = True
        self._why = ("this store was opened in the parent process before fork(); "
                     "open it again in the child")
        if self._projector is not None:
            self._projector.reset_after_fork()
        self._storage.abandon()  # the parent keeps its locks; ours share their descriptions


_open: weakref.WeakSet[Lifetime] = weakref.WeakSet()


def register(lifetime: Lifetime) -> None:
    """Track an open store until :func:`unregister`."""
    _open.add(lifetime)


def unregister(lifetime: Lifetime) -> None:
    """Stop tracking a closed (or disowned) store."""
    _open.discard(lifetime)


def _close_at_exit() -> None:
    """Interpreter exit: drain what is pending, so no worker outlives the program."""
    for lifetime in list(_open):
        try:
            lifetime.close(EXIT_DRAIN_S)
        finally:
            # Warn only once it is closed: under -W error the warning raises.
            warnings.warn(f"{lifetime.describe()} was still open at exit; it was closed",
                          ResourceWarning, stacklevel=1)


def _disown_all_after_fork() -> None:
    for lifetime in list(_open):
        lifetime.disown_after_fork()


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
