"""A mapping that keeps only its most recently written entries: the bound of per-thread
caches.

A long-lived process may touch millions of threads; a cache keyed by thread id that
never forgets grows with them. Pure, with no lock: its owner serializes writes, while
reads may run without the owner's lock (the SQLite history reads cached heads so, to
never wait for a group commit): a read is one ``dict.get``, atomic under the GIL, and
never reorders the entries.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LRU(OrderedDict[K, V]):
    """An ``OrderedDict`` of at most ``capacity`` entries: setting one moves it to the
    end, and setting one past the capacity forgets the least recently *set*. Reads do
    not count as uses (see the module docstring): a head is set by every append, so the
    threads in use stay.

    >>> cache = LRU[str, int](2)
    >>> cache["a"], cache["b"] = 1, 2
    >>> cache["a"] = 3
    >>> cache["c"] = 4  # forgets "b", the least recently set
    >>> sorted(cache.items())
    [('a', 3), ('c', 4)]
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        if capacity < 1:
            raise ValueError(f"an LRU cache holds at least one entry, not {capacity}")
        #: The most entries it holds.
        self.capacity = capacity

    def __setitem__(self, key: K, value: V) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        if len(self) > self.capacity:
            self.popitem(last=False)
