"""Storage backends. Each package here owns its driver, its SQL, its locks, its files and
its one error boundary; nothing outside ``backends/`` imports a database driver
(``tests/test_layers.py`` checks it).

A new backend is a module or package here implementing :class:`thread_store.storage.Storage`,
plus one branch in :func:`open_storage`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InvalidArgument
from ..storage import MEMORY, Storage
from .memory import MemoryStorage
from .sqlite import SQLiteStorage

def open_storage(target: str | Path, *, durability: str, read_only: bool,
                 rules_id: str) -> Storage:
    """Open the backend ``target`` names: ``":memory:"`` or a directory path (validated).

    :raises InvalidArgument: an option the backend does not take (DESIGN §3's table).
    """
    if target == MEMORY:
        return MemoryStorage.open(durability=durability, read_only=read_only, rules_id=rules_id)
    assert isinstance(target, Path)
    return SQLiteStorage.open(target, durability=durability, read_only=read_only,
                              rules_id=rules_id)


def drop_index(target: str | Path) -> None:
    """Delete the index of the closed store ``target``, for ``rebuild_index``."""
    if target == MEMORY:
        raise InvalidArgument("an in-memory store has no index to rebuild; it lives and dies "
                              "with its ThreadStore object")
    assert isinstance(target, Path)
    SQLiteStorage.drop_index(target)


__all__ = ["drop_index", "open_storage"]
