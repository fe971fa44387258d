"""Reads that combine a store's parts: a thread's metadata (projected, else its initial
one), pages of its history, and where its projection stands."""

from __future__ import annotations

import json

from .derive import ProjectionRules
from .model import StoredItem, ThreadMetadata, ThreadStatus, utc
from .projector import Projector
from .storage import AsyncBarrierReads, Storage


class Reads:
    """The reads of one store; ``ThreadStore`` has validated the arguments before."""

    def __init__(self, storage: Storage, projector: Projector | None,
                 rules: ProjectionRules) -> None:
        """Wire the reads to a store's parts (``projector`` is ``None`` when read-only)."""
        self._history = storage.history
        self._index = storage.index
        self._projector = projector
        self._rules = rules

    async def metadata(self, reads: AsyncBarrierReads, thread_id: str) -> ThreadMetadata:
        """The thread's projected metadata, or its initial metadata without a row, read
        through ``reads`` (the sync ports, or a barrier's native reads)."""
        meta = await reads.read(thread_id)
        if meta is not None:
            return meta
        if self._projector is not None:
            self._projector.check_live(thread_id)  # mid-removal its row is already gone
        created = await reads.created_us(thread_id)
        return self._rules.metadata(thread_id, self._rules.initial(thread_id, created), 0)

    def history(self, thread_id: str, after_seq: int, limit: int) -> list[StoredItem]:
        """Up to ``limit`` items with ``seq > after_seq``, decoded, in order."""
        rows = self._history.read(thread_id, after_seq, self._history.head(thread_id), limit)
        return [StoredItem(row.seq, utc(row.ts_us), json.loads(row.text)) for row in rows]

    def status(self, thread_id: str) -> ThreadStatus:
        """The store's head and checkpoint of the thread, with this process's own counts."""
        local = self._projector.local_status(thread_id) if self._projector else None
        head = self._history.head(thread_id)
        stored = self._index.checkpoint(thread_id)
        projected = stored.projected_seq
        if local is None:
            return ThreadStatus(head, projected, projected < head, 0, stored.last_error, 0)
        # The store records failures for good; an error this process is still retrying
        # shows too, while the thread is behind (a success anywhere clears both).
        retrying = local.last_error if projected < head else None
        return ThreadStatus(head, projected, projected < head, local.attempts,
                            stored.last_error or retrying, local.waiters)
