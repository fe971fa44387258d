"""The embedded SQLite backend: a directory holding ``history.db`` (the durable item log)
and ``index.db`` (the projected metadata), opened by one writer process at a time.

- ``_connections``: connections, the reader pool, pragmas, migrations, and the one place
  SQLite errors become ``StorageError`` / ``TransientStorageError``;
- ``history``: the item log, per-thread ``seq``, tombstones and behind marks;
- ``index``: projected rows, keyset listing, FTS5 search, fencing;
- ``_acks``: the lazy acknowledgements that clear behind marks;
- ``_files``: the store directory, the writer lock, backup and the recovery scan at open.
"""
