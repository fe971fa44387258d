"""``SQLiteStorage``: the embedded backend as one object behind the storage ports.

It owns the store directory, the store lock (shared by every writing process, exclusive
for a rebuild), both files, the recovery scan at open, and the order that makes a
removal safe against a racing projection in any process.
"""

from __future__ import annotations

import os
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from . import _directory, _filelock
from ._marks import Marked
from ._recovery import recover
from .history import LOCK_FILE as HISTORY_LOCK
from .history import History
from .index import LOCK_FILE as INDEX_LOCK
from .index import Index
from ...errors import DiscardTimeout, InvalidArgument, NotAThreadStore, StoreClosed
from ...model import BehindThread, FailedThread, StoreReport, utc
from ...storage import Capabilities, Lag


def _writing(root: Path, lock_file: str, read_only: bool) -> AbstractContextManager[object]:
    """A writers' file lock of the store, or nothing for a read-only opener."""
    return nullcontext() if read_only else _filelock.hold(root / lock_file)


CAPABILITIES = Capabilities(reopen=True, read_only=True, durability_full=True, backup=True,
                            files=True, exclusive_rebuild=True)


class SQLiteStorage:
    """A store directory holding ``history.db`` and ``index.db`` (see the package doc)."""

    capabilities = CAPABILITIES

    def __init__(self, root: Path, history: History, index: Index, lock_fd: int | None) -> None:
        """Use :meth:`open`; this only wires the parts together."""
        self.path: Path | None = root
        self.history = history
        self.index = index
        self.read_only = lock_fd is None
        self.description = str(root)
        self._lock_fd = lock_fd
        index.history = None if self.read_only else history

    @classmethod
    def open(cls, root: Path, *, durability: str, read_only: bool, rules_id: str) -> SQLiteStorage:
        """Open (creating as needed) the store in directory ``root``.

        :raises NotAThreadStore: ``root`` holds something else or cannot be written.
        :raises StoreLocked: its index is being rebuilt.
        :raises SchemaTooNew: the files come from a newer thread_store.
        :raises InvalidArgument: the index was projected with other fold rules.
        """
        root = _directory.prepare_directory(root, read_only)
        lock_fd = None if read_only else _directory.lock_directory(root)
        history = index = None
        try:
            # Under the writers' file locks: another process may be creating or migrating
            # the same files at this moment.
            with _writing(root, HISTORY_LOCK, read_only):
                history = _directory.open_history(root / _directory.HISTORY_FILE, durability,
                                                  read_only)
            with _writing(root, INDEX_LOCK, read_only):
                index = _directory.open_index(root / _directory.INDEX_FILE, durability, read_only)
            storage = cls(root, history, index, lock_fd)
            storage._check_rules(rules_id)
            return storage
        except BaseException:
            # Release everything, or this process could never open the store again.
            for part in (index, history):
                if part is not None:
                    part.close()
            if lock_fd is not None:
                os.close(lock_fd)
            raise

    @staticmethod
    def drop_index(root: Path) -> None:
        """Delete the index of the closed store at ``root`` (``rebuild_index``).

        :raises StoreLocked: the store is open for writing somewhere.
        :raises NotAThreadStore: ``root`` holds no store.
        """
        if not (root / _directory.HISTORY_FILE).is_file():
            raise NotAThreadStore(f"{root} holds no thread store (no {_directory.HISTORY_FILE}) "
                                  "to reindex")
        lock_fd = _directory.lock_directory(root, exclusive=True)
        try:
            _directory.drop_index(root)
        finally:
            os.close(lock_fd)  # open() takes it again; whoever wins finds no index and rebuilds

    def _check_rules(self, rules_id: str) -> None:
        """The rows are the fold of these rules: refuse others, adopt them on a new index."""
        stored = self.index.rules_id()
        if stored is None:
            if not self.read_only:
                self.index.set_rules_id(rules_id)
        elif stored != rules_id and not self.read_only:
            raise InvalidArgument(
                f"the store at {self.path} was projected with the fold rules {stored!r}, not "
                f"{rules_id!r}; open it with those rules, or apply the new ones with "
                "ThreadStore.rebuild_index(path, rules=...)")

    def async_reads(self) -> None:
        """None: no asyncio driver here; async barriers read in an executor thread."""
        return None

    def lagging(self) -> list[Lag]:
        """The recovery scan: threads behind (or ahead of) their history."""
        return recover(self.history, self.index)

    def _behind(self) -> tuple[list[Marked], dict[str, int]]:
        """The threads behind now, longest first, and the ``projected_seq`` of their rows.

        Marks are cleared lazily, so each marked thread is checked against its row.
        """
        marked = self.history.behind_threads()
        projected = self.index.projected_of([m.thread_id for m in marked])
        behind = sorted((m for m in marked if projected.get(m.thread_id, 0) < m.head),
                        key=lambda m: (m.since_us, m.thread_id))
        return behind, projected

    def stale(self, older_than: float) -> list[Lag]:
        """Threads marked behind for more than ``older_than`` seconds, still behind."""
        since = time.time_ns() // 1000 - int(older_than * 1_000_000)
        behind, projected = self._behind()
        return [Lag(m.thread_id, m.head, projected.get(m.thread_id)) for m in behind
                if m.since_us <= since]

    def report(self, limit: int) -> StoreReport:
        """Read the behind marks, the rows they name and the failures; write nothing."""
        behind, projected = self._behind()
        failed = [FailedThread(t, error) for t, error in self.index.failures(limit)]
        return StoreReport(
            schema_version={"history": self.history.schema_version(),
                            "index": self.index.schema_version()},
            threads=self.history.live_count(), threads_behind=len(behind),
            items_behind=sum(m.head - projected.get(m.thread_id, 0) for m in behind),
            oldest_behind_since=utc(behind[0].since_us) if behind else None,
            behind=[BehindThread(m.thread_id, m.head, projected.get(m.thread_id, 0))
                    for m in behind[:limit]],
            failed=failed)

    def remove_thread(self, thread_id: str, *, tombstone: bool,
                      deadline: float | None = None) -> None:
        """Delete the row, then the history (``Storage.remove_thread``).

        Both go under the index write lock that every group commit holds, so a commit
        sees the thread either whole or gone (and then skips its row as ``gone``). The
        row goes first: the thread is marked behind in history before, so a crash between
        the two re-projects it whole.
        """
        # Held throughout, so no commit sees half of it.
        with self.index.exclusive(deadline, await_this_process=True) as held:
            if self.index.fenced:
                raise StoreClosed(f"the store closed; thread {thread_id!r} was not removed")
            if not held:
                raise DiscardTimeout(f"thread {thread_id!r} was not removed: another process's "
                                     "projection transaction held the index past the timeout; "
                                     "nothing changed, try again")
            self.index.delete_rows([thread_id])
            self.history.remove(thread_id, tombstone=tombstone)

    def housekeeping_due_at(self) -> float:
        """When the lazy acknowledgements of projected heads are due; at once when the
        history's WAL should be checkpointed."""
        if self.history.checkpoints.due():
            return 0.0
        return self.history.acknowledgements_due_at()

    def housekeep(self) -> None:
        """Write the acknowledgements that clear history's behind marks, and checkpoint
        the history's WAL when due."""
        if self.history.acknowledgements_due_at() <= time.monotonic():
            self.history.write_acknowledgements()
        if self.history.checkpoints.due():
            self.history.checkpoints.run()

    def backup(self, dest: Path) -> None:
        """Copy both files with SQLite's online backup into the new directory ``dest``."""
        _directory.backup(self.history, self.index, dest)

    def reject_writes(self) -> None:
        """Later history writes raise :class:`StoreClosed`."""
        self.history.reject_writes()

    def close(self) -> None:
        """Close both files, then let go of the writer lock."""
        try:
            self.history.close()
            self.index.close()
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Release the writer lock (a forked child shares its description: only close it)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
