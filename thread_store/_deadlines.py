"""The deadline of the caller's barrier, seen by the storage calls it makes.

A barrier never outlives its timeout (DESIGN §1.4), and that includes the storage reads it
makes on the way (the thread's head, its checkpoint, its row). A backend that waits for a
resource before it can even send a statement (a pooled connection while the server is
down) waits no longer than :func:`left`. The deadline travels in a context variable, so
it reaches the backend through the ports unchanged, and follows a ``contextvars`` copy
across a thread hop.
"""

from __future__ import annotations

import contextlib
import time
from contextvars import ContextVar
from typing import Iterator

_DEADLINE: ContextVar[float | None] = ContextVar("thread_store_deadline", default=None)
#: Seconds a storage call may still wait past the deadline: enough to read what a timed-out
#: barrier reports (its projected generation) from a healthy server, far inside the
#: scheduling margin DESIGN §1.4 allows.
GRACE = 0.1


@contextlib.contextmanager
def until(deadline: float | None) -> Iterator[None]:
    """Within: storage calls of this context wait for resources no longer than
    ``deadline`` (monotonic; ``None``: no deadline, or the enclosing one)."""
    outer = _DEADLINE.get()
    if deadline is None or (outer is not None and outer <= deadline):
        yield
        return
    token = _DEADLINE.set(deadline)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def after(timeout: float | None) -> float | None:
    """The deadline ``timeout`` seconds from now (``None`` for none)."""
    return None if timeout is None else time.monotonic() + timeout


def left(default: float) -> float:
    """Seconds a storage call may wait for a resource: ``default``, capped by the caller's
    deadline (plus :data:`GRACE`)."""
    deadline = _DEADLINE.get()
    if deadline is None:
        return default
    return min(default, max(0.0, deadline - time.monotonic()) + GRACE)
