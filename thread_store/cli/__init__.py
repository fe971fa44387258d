"""``thread-store [--store PATH] COMMAND``: a thin click group over the public API.

Each command opens the store, calls public methods and formats the result; ``--json``
sits beside the table output. The store path comes from ``--store``, else
``$THREAD_STORE``, else ``./thread-store-data``. A :class:`ThreadStoreError` or a usage
error prints one line ``error: ...`` on stderr and exits non-zero, without a traceback.

The group is in ``_app``; the commands, by concern, in ``_reading``, ``_managing``,
``_import_codex`` and ``_workloads``; what they share in ``_stores`` (opening a store,
resolving an id prefix) and ``_output`` (tables, JSON, progress bars, errors).

Only the console script loads this package, so the library itself never needs click.
"""

from ._app import DEFAULT_STORE, cli, main
from ._import_codex import import_codex_command
from ._managing import archive, backup, delete, reindex, rename, unarchive
from ._reading import export, list_threads, show, status
from ._workloads import bench, demo

__all__ = [
    "DEFAULT_STORE",
    "archive",
    "backup",
    "bench",
    "cli",
    "delete",
    "demo",
    "export",
    "import_codex_command",
    "list_threads",
    "main",
    "reindex",
    "rename",
    "show",
    "status",
    "unarchive",
]
