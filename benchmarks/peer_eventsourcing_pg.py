"""The peer on PostgreSQL: the ``eventsourcing`` library (9.5) with its 9.4+ projection API.

On PostgreSQL the library supports subscriptions, so the view is kept up to date the way
its projection docs show: a ``Projection`` whose ``process_event`` writes a materialised
view, a ``PostgresTrackingRecorder`` subclass that holds the view's table and writes each
update in one transaction with its tracking row (exactly once), and a
``ProjectionRunner`` that subscribes to the ``Threads`` application (LISTEN/NOTIFY plus
pulls) and runs the projection in a background thread. The documented read-your-writes
barrier is ``ProjectionRunner.wait(notification_id)``, which calls the view's
``TrackingRecorder.wait``: it polls ``max_tracking_id``, sleeping 100, 200, 400 then 800 ms.

The write side (``Thread`` aggregate, ``Threads`` application) is the SQLite peer's
(:mod:`benchmarks.peer_eventsourcing`). Settings: ``PERSISTENCE_MODULE=eventsourcing.postgres``,
one schema per peer, the library's defaults (its pool, its ``LOCK TABLE`` per insert and
its NOTIFY), ``synchronous_commit`` inherited from the benchmark database (see
:mod:`benchmarks.pg_systems`), and ``AGGREGATE_CACHE_MAXSIZE`` as on SQLite.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from eventsourcing.dispatch import singledispatchmethod
from eventsourcing.persistence import Tracking
from eventsourcing.postgres import PostgresDatastore, PostgresTrackingRecorder
from eventsourcing.projection import Projection, ProjectionRunner
from eventsourcing.utils import get_topic
from psycopg.sql import SQL, Identifier

from .peer_eventsourcing import PeerSystem, Thread, Threads, user_title


class ThreadMetaPgView(PostgresTrackingRecorder):
    """The materialised view: a ``thread_meta`` table beside the tracking table."""

    #: Write transactions so far (one per processed event); only the runner's thread writes it.
    commits = 0

    def __init__(self, datastore: PostgresDatastore, **kwargs: Any) -> None:
        super().__init__(datastore, **kwargs)
        schema = Identifier(self.datastore.schema)
        self.sql_create_statements.append(SQL(
            "CREATE TABLE IF NOT EXISTS {0}.thread_meta (thread_id text PRIMARY KEY, title text, "
            "item_count bigint NOT NULL, created_at text, updated_at text)").format(schema))
        self._create = SQL("INSERT INTO {0}.thread_meta VALUES (%s, NULL, 0, %s, %s) "
                           "ON CONFLICT (thread_id) DO NOTHING").format(schema)
        self._append = SQL(
            "INSERT INTO {0}.thread_meta VALUES (%s, %s, 1, %s, %s) ON CONFLICT (thread_id) DO UPDATE "
            "SET title = coalesce(thread_meta.title, excluded.title), "
            "item_count = thread_meta.item_count + 1, updated_at = excluded.updated_at").format(schema)
        self._rows = SQL("SELECT thread_id, title, item_count FROM {0}.thread_meta").format(schema)

    def _write(self, statement: Any, params: tuple[Any, ...], tracking: Tracking) -> None:
        with self.datastore.transaction(commit=True) as curs:
            curs.execute(statement, params, prepare=True)
            self._insert_tracking(curs, tracking)
        self.commits += 1

    def created(self, thread_id: str, ts: str, tracking: Tracking) -> None:
        """An empty row for a new thread."""
        self._write(self._create, (thread_id, ts, ts), tracking)

    def appended(self, thread_id: str, title: str | None, ts: str, tracking: Tracking) -> None:
        """One more item: count it, keep the first title, move ``updated_at``."""
        self._write(self._append, (thread_id, title, ts, ts), tracking)

    def view(self) -> list[tuple[str, str | None, int]]:
        """Every view row as ``(thread_id, title, item_count)`` (for correctness checks)."""
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(self._rows)
            return [(r["thread_id"], r["title"], int(r["item_count"])) for r in curs.fetchall()]


class ThreadMetaProjection(Projection[ThreadMetaPgView]):
    """Folds each ``Thread`` event into the view."""

    name = "threadmetaview"
    topics = (get_topic(Thread.Created), get_topic(Thread.ItemAppended))

    @singledispatchmethod
    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        """Events without a rule only advance the tracking position."""
        self.view.insert_tracking(tracking)

    @process_event.register
    def _(self, domain_event: Thread.Created, tracking: Tracking) -> None:
        self.view.created(domain_event.originator_id.hex, domain_event.timestamp.isoformat(), tracking)

    @process_event.register
    def _(self, domain_event: Thread.ItemAppended, tracking: Tracking) -> None:
        self.view.appended(domain_event.originator_id.hex, user_title(domain_event.item),
                           domain_event.timestamp.isoformat(), tracking)


class PgPeerSystem(PeerSystem):
    """The peer on PostgreSQL behind the benchmark's system interface; the SQLite peer's
    methods apply unchanged (``view.wait`` is what ``ProjectionRunner.wait`` calls)."""

    name = "eventsourcing peer (PostgreSQL)"

    def __init__(self, url: str, schema: str) -> None:
        parts = urlsplit(url)
        env = {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": parts.path.lstrip("/"), "POSTGRES_HOST": parts.hostname or "",
            "POSTGRES_PORT": str(parts.port or 5432), "POSTGRES_USER": parts.username or "",
            "POSTGRES_PASSWORD": parts.password or "", "POSTGRES_SCHEMA": schema,
            "AGGREGATE_CACHE_MAXSIZE": "20000",
        }
        with PostgresDatastore(env["POSTGRES_DBNAME"], env["POSTGRES_HOST"], env["POSTGRES_PORT"],
                               env["POSTGRES_USER"], env["POSTGRES_PASSWORD"]) as datastore, \
                datastore.transaction(commit=True) as curs:
            curs.execute(SQL("CREATE SCHEMA IF NOT EXISTS {0}").format(Identifier(schema)))
        self._runner: ProjectionRunner[Threads, ThreadMetaPgView] = ProjectionRunner(
            application_class=Threads, projection_class=ThreadMetaProjection,
            view_class=ThreadMetaPgView, env=env)
        self._runner.__enter__()
        self._setup(self._runner.app, self._runner.view)

    def close(self) -> None:
        """Stop the runner (its subscription and thread) and close the application."""
        self._runner.__exit__(None, None, None)

