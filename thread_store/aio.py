"""``AsyncThreadStore``: the asyncio facade over :class:`~thread_store.store.ThreadStore`."""

from __future__ import annotations


class AsyncThreadStore:
    """Placeholder until the asyncio facade lands."""
