"""The thread hop of the asyncio facade: blocking calls run in an executor, results come
back to the loop.

A call runs in a copy of the caller's ``contextvars`` context, so trace parents survive
the hop. Results and resolutions reach the loop by ``call_soon_threadsafe``, guarded by
``fut.done()``: an await that gave up (timeout, cancellation) is never resolved twice.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Hop(Generic[T]):
    """One blocking call handed to the store's executor, bounded by a deadline.

    If no executor thread has started the call by the deadline (they are all busy), the
    call moves to a thread of its own: a barrier that appended must
    still tell whether its items are durable, and it returns on time only if its hop
    cannot queue indefinitely. A call whose caller is cancelled before it starts never
    runs. The result reaches the loop by ``call_soon_threadsafe``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, executor: Executor, fn: Callable[[], T]) -> None:
        self._loop = loop
        self._executor = executor
        self._fn = fn
        self._context = contextvars.copy_context()  # trace parents survive the hop
        self._lock = threading.Lock()
        self._taken = False
        self.done: asyncio.Future[T] = loop.create_future()

    def _take(self) -> bool:
        """Claim the call, for the executor, a thread of its own, or a cancellation."""
        with self._lock:
            taken, self._taken = self._taken, True
            return not taken

    def _run(self) -> None:
        try:
            result = self._context.run(self._fn)
        except BaseException as exc:  # noqa: BLE001 - the awaiting caller gets it, whatever it is
            call_soon(self._loop, fail_once, self.done, exc)
        else:
            call_soon(self._loop, set_once, self.done, result)

    def _run_if_untaken(self) -> None:
        if self._take():
            self._run()

    def _run_elsewhere(self) -> None:
        if self._take():
            threading.Thread(target=self._run, name="thread_store-aio-hop").start()

    async def result(self, deadline: float | None, *, cancellable: bool = True) -> T:
        """Await the call's result; past ``deadline`` it runs on a thread of its own.

        :param cancellable: ``False`` for a call that must run even if its caller is
            cancelled before it started (``close``: else the store would stay open).
        """
        try:
            self._loop.run_in_executor(self._executor, self._run_if_untaken)
        except RuntimeError:  # the executor is shut down
            self._run_elsewhere()
        expiry = asyncio.timeout_at(deadline)
        try:
            async with expiry:
                # shield: a cancelled caller must not cancel the result that tells which
                # waiters to withdraw.
                return await asyncio.shield(self.done)
        except TimeoutError:
            if not expiry.expired():
                raise  # the call's own TimeoutError
        except asyncio.CancelledError:
            if cancellable:
                self._take()  # not started yet: it never will be
            else:
                self._run_elsewhere()
            raise
        self._run_elsewhere()
        return await asyncio.shield(self.done)  # bounded by the call's own work now


async def in_executor(executor: Executor, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking call in ``executor``, in a copy of the caller's context."""
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    loop = asyncio.get_running_loop()
    try:
        future = loop.run_in_executor(executor, call)
    except RuntimeError:
        # The store's own executor ends with close(); a call after that only raises
        # StoreClosed, which the loop's default executor can tell it at once.
        future = loop.run_in_executor(None, call)
    return await future


class OwnExecutor(ThreadPoolExecutor):
    """An executor a store made for itself (and shuts down): appends never queue behind
    the application's jobs on the loop's default executor."""

    def __init__(self, workers: int) -> None:
        super().__init__(max_workers=workers, thread_name_prefix="thread_store-aio")


def set_once(fut: asyncio.Future[T], value: T) -> None:
    """Resolve ``fut`` with ``value``, unless it is done."""
    if not fut.done():  # a cancelled or timed-out await already gave up on it
        fut.set_result(value)


def fail_once(fut: asyncio.Future[T], error: BaseException) -> None:
    """Fail ``fut`` with ``error``, unless it is done."""
    if not fut.done():
        fut.set_exception(error)


def call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: Any) -> None:
    """Hand a resolution to the loop from the projector's thread (under its lock)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass  # the loop is closed: nobody awaits this barrier any more
