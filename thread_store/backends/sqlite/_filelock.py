"""Exclusive file locks (``flock``) that serialize the writers of several processes.

SQLite lets one connection write a database at a time; a second writer waits in its busy
handler, which sleeps and polls. Writers here take a file lock first instead: the kernel
wakes a blocked waiter the moment the holder lets go (or dies: a lock never outlives its
process), so a barrier waiting on another process's group commit is woken by push.

A wait may need a bound (a barrier's deadline) or a way out (``close`` fencing the
writer): a blocked ``flock`` has neither, so a contended wait blocks in a helper thread
while the caller waits on an event in slices, and gives up on its own terms.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading
import time
from pathlib import Path
from typing import Callable

#: The count of critical sections at the start of a lock file (see ProcessLock).
_COUNTER = struct.Struct("<Q")
#: How often a waiter with no deadline checks whether it was cancelled (fenced).
_SLICE_S = 0.05


def _open(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


class HeldLock:
    """A lock taken by :func:`acquire` or :meth:`FileLock.acquire`; :meth:`release` lets
    it go (once)."""

    __slots__ = ("_release",)

    def __init__(self, release: Callable[[], None]) -> None:
        self._release: Callable[[], None] | None = release

    def release(self) -> None:
        """Let the lock go."""
        release, self._release = self._release, None
        if release is not None:
            release()

    def __enter__(self) -> HeldLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class _Waiter:
    """A helper thread blocked in ``flock`` on its own descriptor for one acquisition."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.got = threading.Event()
        self._lock = threading.Lock()
        self._abandoned = False
        threading.Thread(target=self._wait, name="thread_store-filelock", daemon=True).start()

    def _wait(self) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError:
            pass  # the descriptor was closed: the caller gave up
        with self._lock:
            if self._abandoned:
                os.close(self.fd)  # nobody wants it any more: let the next one in
            else:
                self.got.set()

    def abandon(self) -> bool:
        """Give up; ``True`` if the lock was taken meanwhile (the caller then holds it)."""
        with self._lock:
            if self.got.is_set():
                return True
            self._abandoned = True
            return False


def acquire(path: Path, *, deadline: float | None = None,
            cancelled: Callable[[], bool] = lambda: False) -> HeldLock | None:
    """Take the exclusive lock on ``path``; ``None`` past ``deadline`` (monotonic) or
    once ``cancelled()`` says so. Uncontended, it is two system calls."""
    fd = _open(path)
    held = HeldLock(lambda: os.close(fd))  # closing the descriptor releases the flock
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return held
    except BlockingIOError:
        pass
    except BaseException:
        os.close(fd)
        raise
    waiter = _Waiter(fd)
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if cancelled() or (left is not None and left <= 0):
            return held if waiter.abandon() else None
        if waiter.got.wait(_SLICE_S if left is None else min(_SLICE_S, left)):
            return held


class FileLock:
    """The lock on ``path`` for an owner that takes it one thread at a time (under a
    mutex of its own). Uncontended it is a ``flock`` on a descriptor kept open, one
    system call each way; contended, the wait of :func:`acquire`, which a deadline or a
    cancellation can end."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd = _open(path)
        self._closed = False

    def acquire(self, *, deadline: float | None = None,
                cancelled: Callable[[], bool] = lambda: False) -> HeldLock | None:
        """Take the lock (see :func:`acquire`)."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return HeldLock(lambda: fcntl.flock(self._fd, fcntl.LOCK_UN))
        except BlockingIOError:
            return acquire(self._path, deadline=deadline, cancelled=cancelled)

    def close(self) -> None:
        """Close the kept descriptor; idempotent."""
        if not self._closed:
            self._closed = True
            os.close(self._fd)


def hold(path: Path) -> HeldLock:
    """Take the lock on ``path``, waiting as long as it takes (short critical sections)."""
    lock = acquire(path)
    assert lock is not None  # no deadline and never cancelled
    return lock


class ProcessLock:
    """The lock on ``path`` through one descriptor kept open, for short critical sections
    that its owner enters one thread at a time (under a mutex of its own): a blocking
    ``flock`` and its release, two system calls.

    The file also counts the critical sections of all processes (8 bytes, mapped into
    memory): on entering, a changed count tells that another process wrote meanwhile, so
    ``on_others_wrote`` runs (its caches are stale). Reading it costs no system call,
    where SQLite's ``PRAGMA data_version`` is a statement per look.
    """

    def __init__(self, path: Path, on_others_wrote: Callable[[], None]) -> None:
        self._fd = _open(path)
        try:
            if os.fstat(self._fd).st_size < _COUNTER.size:
                os.ftruncate(self._fd, _COUNTER.size)  # never shrinks: a racing opener is safe
            self._count = mmap.mmap(self._fd, _COUNTER.size)
        except BaseException:
            os.close(self._fd)
            raise
        self._on_others_wrote = on_others_wrote
        self._seen = -1  # nothing seen: the first look runs on_others_wrote
        self._closed = False

    def __enter__(self) -> ProcessLock:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        self.look()
        return self

    def __exit__(self, *exc: object) -> None:
        self._seen = _COUNTER.unpack(self._count)[0] + 1
        _COUNTER.pack_into(self._count, 0, self._seen)
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def unchanged(self) -> bool:
        """Whether no other process wrote since this one last looked (no side effect;
        also without the lock held)."""
        return bool(_COUNTER.unpack(self._count)[0] == self._seen)

    def look(self) -> None:
        """Run ``on_others_wrote`` if another process wrote since this one last looked
        (also without the lock held: a read of an aligned 8-byte word)."""
        count = _COUNTER.unpack(self._count)[0]
        if count != self._seen:
            self._seen = count
            self._on_others_wrote()

    def close(self) -> None:
        """Close the descriptor (releasing the lock if held); idempotent."""
        if not self._closed:
            self._closed = True
            self._count.close()
            os.close(self._fd)
