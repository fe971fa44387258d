"""The write path of a writable store: thread creation, durable appends, removals.

Every write commits to the history first and then tells the projector, so what a call
acknowledged is durable whatever the projection does (DESIGN §1.1). ``ThreadStore`` has
validated the arguments before; a read-only store has no write path.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ._inputs import now_us
from ._phases import RemovalKind
from .errors import StoreClosed, ThreadDiscarded, ThreadStoreError
from .model import EncodedItem
from .projector import Projector
from .storage import IdempotencyKey, Storage
from .tracing import ATTR_GENERATION, Telemetry, capture, traceparent


class Writes:
    """Creates, appends and removals of one store, each told to its projector."""

    def __init__(self, storage: Storage, projector: Projector, telemetry: Telemetry,
                 closed_reason: Callable[[], str | None]) -> None:
        """Wire the write path to a store's parts.

        :param closed_reason: why the store is closed, or ``None`` while it is open.
        """
        #: The projector each write is told of.
        self.projector = projector
        self._storage = storage
        self._history = storage.history
        self._telemetry = telemetry
        self._closed_reason = closed_reason

    def create(self, thread_id: str, first: EncodedItem | None) -> None:
        """Create a thread, with its ``first`` item or none."""
        self._history.create(thread_id, created_us=now_us(), first=first)
        self.projector.on_create(thread_id, first)

    def append(self, thread_id: str, items: list[EncodedItem], key: IdempotencyKey | None, *,
               barrier: bool) -> int:
        """Append durably and return the generation; ``barrier=True`` when the caller
        waits on the result at once (the barrier then claims or expedites the thread)."""
        priority = self.projector.priority
        priority.enter()
        try:
            return self._append(thread_id, items, key, barrier=barrier)
        finally:
            priority.leave()

    def _append(self, thread_id: str, items: list[EncodedItem], key: IdempotencyKey | None, *,
                barrier: bool) -> int:
        if not self._telemetry.tracing():
            done = self._history.append(thread_id, items, key)
            if done.written:
                self.projector.on_append(thread_id, done.generation, items, None,
                                         schedule=not barrier)
            return done.generation
        with self._telemetry.append_span(thread_id, len(items)) as span:
            context = capture(span)
            # Stored with the items, so a projection in another process joins this trace.
            done = self._history.append(thread_id, items, key,
                                        None if context is None else traceparent(context))
            if done.written:
                self.projector.on_append(thread_id, done.generation, items, context,
                                         schedule=not barrier)
            if span.is_recording():
                span.set_attribute(ATTR_GENERATION, done.generation)
            return done.generation

    def remove(self, thread_id: str, kind: RemovalKind, timeout: float | None) -> None:
        """Discard or delete, in two phases: a removal that raises has changed nothing.

        :param kind: ``DISCARDED`` keeps a tombstone; ``DELETED`` frees the id.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            head = self._history.head(thread_id)  # raises for unknown or discarded ids
            removal = self.projector.begin_removal(thread_id, kind, head, timeout)
            removed = False
            try:
                # A closing store removes nothing: past close's fence the thread stays.
                self._storage.remove_thread(thread_id, tombstone=kind is RemovalKind.DISCARDED,
                                            deadline=deadline)
                removed = True
            finally:
                if removed:
                    removal.commit()
                else:  # put everything back; the row may be gone: re-fold from history
                    removal.abort(row_deleted=True)
        except ThreadStoreError as exc:
            if (self._closed_reason() is not None
                    and not isinstance(exc, (StoreClosed, ThreadDiscarded))):
                # close() won the race (closed connections, an interrupted statement).
                raise StoreClosed(f"the store closed; thread {thread_id!r} was not {kind.value}") from exc
            raise
