"""Storage backends. Each package here owns its driver, its SQL, its locks, its files and
its one error boundary; nothing outside ``backends/`` imports a database driver
(``tests/test_layers.py`` checks it).

A new backend is a module or package here implementing :class:`thread_store.storage.Storage`,
plus one branch in :func:`open_storage`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ..errors import InvalidArgument
from ..storage import MEMORY, Storage
from .memory import MemoryStorage
from .sqlite import SQLiteStorage

if TYPE_CHECKING:  # imported for real on first use, by _postgres()
    from .postgres import PostgresStorage


def open_storage(target: str | Path, *, durability: str, read_only: bool,
                 rules_id: str, options: Mapping[str, Any] | None = None) -> Storage:
    """Open the backend ``target`` names: ``":memory:"``, a directory path, or a
    ``postgresql://`` URL (all validated), with that backend's own ``options``.

    :raises InvalidArgument: an option the backend does not take (DESIGN §3's table), or
        a PostgreSQL target without the ``postgres`` extra installed.
    """
    if target == MEMORY:
        return MemoryStorage.open(durability=durability, read_only=read_only, rules_id=rules_id)
    if isinstance(target, str):
        storage: Storage = _postgres().open(
            target, durability=durability, read_only=read_only, rules_id=rules_id,
            **(options or {}))
        return storage
    return SQLiteStorage.open(target, durability=durability, read_only=read_only,
                              rules_id=rules_id)


def drop_index(target: str | Path, options: Mapping[str, Any] | None = None) -> None:
    """Delete the index of the closed store ``target``, for ``rebuild_index``."""
    if target == MEMORY:
        raise InvalidArgument("an in-memory store has no index to rebuild; it lives and dies "
                              "with its ThreadStore object")
    if isinstance(target, str):
        _postgres().drop_index(target, **(options or {}))
        return
    SQLiteStorage.drop_index(target)


def _postgres() -> type[PostgresStorage]:
    """The PostgreSQL backend, imported on first use: the embedded default needs no driver.

    Typed (not a module looked up by name), so mypy checks it against :class:`Storage`.
    """
    try:
        from .postgres import PostgresStorage
    except ImportError as exc:
        raise InvalidArgument("postgresql:// stores need the PostgreSQL driver: "
                              "pip install 'thread_store[postgres]'") from exc
    return PostgresStorage


__all__ = ["drop_index", "open_storage"]
