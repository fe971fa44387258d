"""The barrier core's reads, written once as coroutines and performed by either face.

The core (target, waiter registration, outcome) awaits an
:class:`~thread_store.storage.AsyncBarrierReads`. The async face on a backend with an
asyncio driver passes that backend's native reads, which run on the event loop. The
sync face passes :class:`PortReads`, which calls the sync ports and never suspends, so
:func:`complete` runs a core coroutine to its end in the calling thread, with no event
loop: one core, two faces, no second copy of the logic.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

from .model import ThreadMetadata
from .storage import Checkpoint, Storage

T = TypeVar("T")


class PortReads:
    """:class:`~thread_store.storage.AsyncBarrierReads` over the sync ports: each read
    blocks the calling thread and returns without suspending."""

    def __init__(self, storage: Storage) -> None:
        """Read from ``storage``'s history and index."""
        self._history = storage.history
        self._index = storage.index

    async def head(self, thread_id: str) -> int:
        """The thread's head (``HistoryLog.head``)."""
        return self._history.head(thread_id)

    async def incarnation(self, thread_id: str) -> int:
        """The thread's incarnation (``HistoryLog.incarnation``)."""
        return self._history.incarnation(thread_id)

    async def created_us(self, thread_id: str) -> int:
        """When the thread was created (``HistoryLog.created_us``)."""
        return self._history.created_us(thread_id)

    async def checkpoint(self, thread_id: str) -> Checkpoint:
        """Where the thread's projection stands (``MetadataIndex.checkpoint``)."""
        return self._index.checkpoint(thread_id)

    async def read(self, thread_id: str) -> ThreadMetadata | None:
        """The thread's row (``MetadataIndex.read``)."""
        return self._index.read(thread_id)


def complete(call: Coroutine[Any, Any, T]) -> T:
    """Run a core coroutine that awaits only :class:`PortReads` to its end, here and now.

    :raises RuntimeError: it suspended (it awaited something else): a bug, not an input.
    """
    try:
        call.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    call.close()
    raise RuntimeError("a barrier step suspended outside an event loop; only PortReads may "
                       "be awaited on the sync face")
