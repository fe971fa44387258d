"""The peer: the ``eventsourcing`` library (9.5) on SQLite, mapped onto the same workload.

The mapping follows /work/shared/notes/eventsourcing-peer.md and the library's documented
API: a ``Thread`` aggregate whose ``ItemAppended`` event carries the item, a ``Threads``
application, and a ``ThreadMetaView`` process application (the only way to keep a view
up to date on SQLite; the 9.4+ ``ProjectionRunner`` needs subscriptions, which the SQLite
recorder does not support). ``MultiThreadedRunner`` runs the follower in the background.
The view's ``thread_meta`` upsert commits in the follower's own transaction, together
with its tracking row, via the library's "extra table in a custom recorder" pattern.
The documented read-your-writes barrier is ``view.recorder.wait(app_name, notification_id)``.

Settings are the library's own defaults (WAL, ``synchronous`` left at FULL, default lock
timeout) plus ``AGGREGATE_CACHE_MAXSIZE``, the documented way to avoid replaying an
aggregate's events on every command.
"""

from __future__ import annotations

import collections
import threading
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from eventsourcing.application import Application, ProcessingEvent
from eventsourcing.dispatch import singledispatchmethod
from eventsourcing.domain import Aggregate, event
from eventsourcing.sqlite import SQLiteCursor, SQLiteProcessRecorder
from eventsourcing.system import MultiThreadedRunner, ProcessApplication, System
from eventsourcing.utils import get_topic

from .workloads import fill

_WAIT_TIMEOUT_S = 60.0


class Thread(Aggregate):
    """A conversation thread; the items live only in its events (O(1) aggregate copy)."""

    class Created(Aggregate.Created):
        """The thread was created."""

    class ItemAppended(Aggregate.Event):
        """One history item was appended."""

        item: dict[str, Any]

    @event(Created)
    def __init__(self) -> None:
        self.item_count = 0

    @event(ItemAppended)
    def append(self, item: dict[str, Any]) -> None:
        """Record one history item."""
        self.item_count += 1


class Threads(Application[uuid.UUID]):
    """The write side: one command per append."""

    def create_thread(self) -> uuid.UUID:
        """Create a thread aggregate and return its id."""
        thread: Thread = Thread()
        self.save(thread)
        return thread.id

    def append_item(self, thread_id: uuid.UUID, item: dict[str, Any]) -> int:
        """Append one item; return its position in the application sequence."""
        thread: Thread = self.repository.get(thread_id)
        thread.append(item)
        recordings = self.save(thread)
        return int(recordings[-1].notification.id)


def user_title(item: dict[str, Any]) -> str | None:
    """The title a user message gives its thread (the view's only derived text)."""
    payload = item.get("payload") or {}
    if item.get("type") == "event_msg" and payload.get("type") == "user_message":
        text = str(payload.get("message") or "").strip()
        return text or None
    return None


class ThreadMetaRecorder(SQLiteProcessRecorder):
    """The follower's process recorder plus a ``thread_meta`` view table."""

    #: Write transactions so far (one per processed event: the follower does not batch).
    #: Only the follower's thread writes it.
    commits = 0

    def construct_create_table_statements(self) -> list[str]:
        """Add the view table to the library's own tables."""
        statements = super().construct_create_table_statements()
        statements.append(
            "CREATE TABLE IF NOT EXISTS thread_meta (thread_id TEXT PRIMARY KEY, title TEXT, "
            "item_count INTEGER NOT NULL, created_at TEXT, updated_at TEXT)")
        return statements

    def _insert_events(self, c: SQLiteCursor, stored_events: Sequence[Any],
                       **kwargs: Any) -> Sequence[int] | None:
        """Write the view rows in the same transaction as the tracking row."""
        ids = super()._insert_events(c, stored_events, **kwargs)
        self.commits += 1
        for thread_id, ts in kwargs.get("meta_create", ()):
            c.execute("INSERT OR IGNORE INTO thread_meta VALUES (?, NULL, 0, ?, ?)",
                      (thread_id, ts, ts))
        for thread_id, title, ts in kwargs.get("meta_append", ()):
            c.execute(
                "INSERT INTO thread_meta VALUES (?, ?, 1, ?, ?) ON CONFLICT(thread_id) DO UPDATE "
                "SET title = COALESCE(thread_meta.title, excluded.title), "
                "item_count = thread_meta.item_count + 1, updated_at = excluded.updated_at",
                (thread_id, title, ts, ts))
        return ids

    def view(self) -> list[tuple[str, str | None, int]]:
        """Every view row as ``(thread_id, title, item_count)`` (for correctness checks)."""
        with self.datastore.transaction(commit=False) as c:
            c.execute("SELECT thread_id, title, item_count FROM thread_meta")
            return [(row[0], row[1], row[2]) for row in c.fetchall()]


class ThreadMetaView(ProcessApplication[uuid.UUID]):
    """The follower: folds each event into the ``thread_meta`` view."""

    @singledispatchmethod
    def policy(self, domain_event: Any, processing_event: ProcessingEvent[uuid.UUID]) -> None:
        """Events without a rule change nothing (the tracking row still advances)."""

    @policy.register
    def _(self, domain_event: Thread.Created, processing_event: ProcessingEvent[uuid.UUID]) -> None:
        processing_event.collect_events(
            meta_create=[(domain_event.originator_id.hex, domain_event.timestamp.isoformat())])

    @policy.register
    def _(self, domain_event: Thread.ItemAppended,
          processing_event: ProcessingEvent[uuid.UUID]) -> None:
        item = domain_event.item
        processing_event.collect_events(meta_append=[
            (domain_event.originator_id.hex, user_title(item), domain_event.timestamp.isoformat())])


class PeerSystem:
    """Adapter with the benchmark's system interface (see :mod:`benchmarks.systems`)."""

    name = "eventsourcing peer"
    has_projection = True

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        env = {
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "THREADS_SQLITE_DBNAME": str(root / "threads.db"),
            "THREADMETAVIEW_SQLITE_DBNAME": str(root / "view.db"),
            "THREADMETAVIEW_PROCESS_RECORDER_TOPIC": get_topic(ThreadMetaRecorder),
            "AGGREGATE_CACHE_MAXSIZE": "20000",
        }
        self._runner: MultiThreadedRunner[uuid.UUID] = MultiThreadedRunner(
            System([[Threads, ThreadMetaView]]), env=env)
        self._runner.start()
        self._setup(self._runner.get(Threads), self._runner.get(ThreadMetaView).recorder)

    def _setup(self, threads: Threads, recorder: Any) -> None:
        """Keep the write side and the view's recorder (it has ``wait``, ``max_tracking_id``,
        ``commits`` and ``view()``), and start counting."""
        self._threads = threads
        self._recorder = recorder
        self._ids: dict[str, uuid.UUID] = {}
        self._last = 0
        self._lock = threading.Lock()
        # Per-thread append counts; each writer thread owns its threads, so no lock.
        self.appended: collections.Counter[str] = collections.Counter()

    def populate(self, thread_ids: list[str]) -> None:
        """Create the threads with their opening messages, then settle."""
        fill(self, thread_ids)
        self.quiesce()

    def create(self, thread_id: str) -> None:
        """Create a thread (one ``Created`` event)."""
        self._ids[thread_id] = self._threads.create_thread()

    def append(self, thread_id: str, item: dict[str, Any]) -> int:
        """Append one item; returns its notification id."""
        self.appended[thread_id] += 1
        nid = self._threads.append_item(self._ids[thread_id], item)
        with self._lock:
            self._last = max(self._last, nid)
        return nid

    def append_and_flush(self, thread_id: str, item: dict[str, Any]) -> None:
        """Append, then the library's documented wait until the view has processed it."""
        nid = self.append(thread_id, item)
        self._recorder.wait(self._threads.name, nid, timeout=_WAIT_TIMEOUT_S)

    def progress(self, thread_ids: Iterable[str]) -> dict[str, int]:
        """Visible position per thread: the follower's one global tracking id."""
        seen = self._recorder.max_tracking_id(self._threads.name) or 0
        return {t: seen for t in thread_ids}

    def quiesce(self) -> None:
        """Wait until the view has processed everything appended so far (untimed)."""
        with self._lock:
            last = self._last
        if last:
            self._recorder.wait(self._threads.name, last, timeout=_WAIT_TIMEOUT_S)

    def transactions(self) -> int:
        """Follower write transactions so far."""
        return self._recorder.commits

    def commits(self) -> None:
        """The application's own commits are not counted (one per ``save()``)."""
        return None

    def verify(self) -> None:
        """Raise if the view disagrees with the appends made (the peer must be correct)."""
        self.quiesce()
        counts = {tid: n for tid, _title, n in self._recorder.view()}
        for thread_id, expected in self.appended.items():
            got = counts.get(self._ids[thread_id].hex)
            if got != expected:
                raise AssertionError(f"peer view has {got} items for {thread_id}, expected {expected}")

    def close(self) -> None:
        """Stop the runner and close its databases."""
        self._runner.stop()
