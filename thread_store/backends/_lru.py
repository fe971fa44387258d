"""A mapping that keeps only its most recently used entries: the bound of per-thread caches.

A long-lived process may touch millions of threads; a cache keyed by thread id that
never forgets grows with them. Pure, with no lock: each owner guards its own.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LRU(OrderedDict[K, V]):
    """An ``OrderedDict`` of at most ``capacity`` entries: setting one past it forgets
    the least recently used, and :meth:`get` counts as a use.

    >>> cache = LRU[str, int](2)
    >>> cache["a"], cache["b"] = 1, 2
    >>> cache.get("a")
    1
    >>> cache["c"] = 3  # forgets "b", the least recently used
    >>> sorted(cache)
    ['a', 'c']
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        if capacity < 1:
            raise ValueError(f"an LRU cache holds at least one entry, not {capacity}")
        #: The most entries it holds.
        self.capacity = capacity

    def get(self, key: K, default: V | None = None) -> V | None:  # type: ignore[override]
        """The value of ``key`` (now the most recently used), or ``default``."""
        if key not in self:
            return default
        self.move_to_end(key)
        return self[key]

    def __setitem__(self, key: K, value: V) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        if len(self) > self.capacity:
            self.popitem(last=False)
