"""The embedded SQLite backend: a directory holding ``history.db`` (the durable item log)
and ``index.db`` (the projected metadata), shared by the writer processes of one machine.

- ``_storage``: :class:`SQLiteStorage`, the backend behind the storage ports;
- ``_connections``: connections, the reader pool, pragmas, migrations, and the one place
  SQLite errors become ``StorageError`` / ``TransientStorageError``;
- ``history``: the item log, per-thread ``seq``, tombstones and idempotency keys;
  ``_marks``: its behind marks and their acknowledgements; ``_history_schema``: its
  tables and migrations;
- ``index``: projected rows, failures, fencing; ``_listing``: keyset listing and trigram
  search; ``_index_schema``: its tables, the row of a thread's metadata, and migrations;
- ``_acks``: the lazy acknowledgements that clear behind marks;
- ``_directory``: the store directory, the store lock, opening the files, backup;
- ``_filelock``: the file locks that serialize writers across processes;
- ``_recovery``: the scan at open for threads whose projection is behind.
"""

from ._storage import SQLiteStorage

__all__ = ["SQLiteStorage"]
