"""Issue 12 point 4: the PostgreSQL backend under server faults, against a real server.

- The server crashes (``pg_ctl stop -m immediate``) and comes back under a load of
  ``durability="full"`` appends: typed errors while it is down, never a hang; appends
  succeed again without reopening the store; no acknowledged append is lost or stored
  twice. That server is a dedicated one with durability on (fsync), module-scoped.
- The server ends the projector's session mid-projection (``pg_terminate_backend``): the
  attempt is retried and the barrier gets the right metadata.
- The connection breaks during an append's COMMIT: ``OutcomeUnknown``, and the retry with
  the same idempotency key stores the items once.

No timeout here measures speed: each only catches a hang, or bounds a call by its own
configured timeouts plus a generous margin.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from typing import Any, Iterator

import psycopg
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from _child import assert_converged
from conftest import new_schema, plain, started_server, user_msg, wait_for
from pg_server import DURABLE, PostgresServer

from thread_store import OutcomeUnknown, ThreadStore, ThreadStoreError
from thread_store.errors import StorageError
from thread_store.tracing import EVENT_RETRY

#: Barrier timeouts and waits: they only catch hangs.
HANG = 60.0
#: The store's ``connect_timeout`` in the crash test: how long an append waits for a
#: connection while the server is down.
CONNECT_TIMEOUT = 2.0
#: DESIGN §1.4's scheduling margin of a barrier past its timeout.
SCHEDULING = 2.0
#: What a call may take beyond its own timeouts on a loaded machine.
MARGIN = 10.0


@pytest.fixture(scope="module")
def durable_server() -> Iterator[PostgresServer]:
    """A server of this module's own, with durability on, that its tests may crash."""
    with started_server(lambda: PostgresServer(DURABLE)) as server:
        yield server


class _Writer:
    """A thread that makes ``count`` acknowledged appends to its threads, each with its own
    idempotency key, repeating a call (with the same key) after any typed error."""

    def __init__(self, store: ThreadStore, name: str, thread_ids: list[str], count: int) -> None:
        self.store, self.name, self.thread_ids, self.count = store, name, thread_ids, count
        #: ``(key, thread_id, generation)`` of each acknowledged append.
        self.acked: list[tuple[str, str, int]] = []
        #: ``(error class name, seconds the failed call took)``.
        self.errors: list[tuple[str, float]] = []
        self.unexpected: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"writer-{name}")

    def _run(self) -> None:
        try:
            for n in range(self.count):
                key = f"{self.name}/{n}"
                tid = self.thread_ids[n % len(self.thread_ids)]
                while True:
                    started = time.monotonic()
                    try:
                        generation = self.store.append(
                            tid, [user_msg(key) if n == 0 else plain(n)], idempotency_key=key)
                    except (StorageError, OutcomeUnknown) as exc:
                        self.errors.append((type(exc).__name__, time.monotonic() - started))
                        continue
                    self.acked.append((key, tid, generation))
                    break
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.unexpected = exc


def test_a_server_crash_under_load_loses_no_acknowledged_append(durable_server: PostgresServer) -> None:
    """Writers append with ``durability="full"`` while the server crashes and restarts:
    while it is down every call raises a typed error within its timeouts; once it is back,
    appends succeed on the same store; every acknowledged append is stored exactly once,
    at its generation, with no gaps; barriers resolve and the rows are the fold."""
    with psycopg.connect(durable_server.url, autocommit=True) as admin:
        admin.execute("CREATE DATABASE crash_test")
    url = durable_server.url.rsplit("/", 1)[0] + "/crash_test"
    with ThreadStore.open(url, schema=new_schema(), durability="full",
                          connect_timeout=CONNECT_TIMEOUT) as store:
        writers = [_Writer(store, f"w{w}", [store.create_thread() for _ in range(2)], 80)
                   for w in range(3)]
        for writer in writers:
            writer.thread.start()
        wait_for(lambda: all(len(w.acked) >= 10 for w in writers), "appends before the crash", HANG)
        durable_server.crash()
        # Down long enough for every writer to wait out the pool's connect_timeout once.
        wait_for(lambda: all(any(kind == "TransientStorageError" for kind, _ in w.errors)
                             for w in writers), "errors while down", HANG)
        acked_before_restart = sum(len(w.acked) for w in writers)
        started = time.monotonic()
        with pytest.raises(ThreadStoreError) as down:  # a barrier keeps its own timeout
            store.flush(writers[0].thread_ids[0], timeout=0.5)
        assert time.monotonic() - started < 0.5 + SCHEDULING, down.value
        durable_server.start_again()
        for writer in writers:
            writer.thread.join(HANG * 3)
            assert not writer.thread.is_alive(), f"{writer.name} hung"
            assert writer.unexpected is None, writer.unexpected

        assert sum(len(w.acked) for w in writers) > acked_before_restart  # succeeded after
        for writer in writers:
            for kind, took in writer.errors:
                assert kind in {"StorageError", "TransientStorageError", "OutcomeUnknown"}, kind
                assert took < CONNECT_TIMEOUT + MARGIN, (kind, took)
            for tid in writer.thread_ids:
                history = store.read_history(tid, limit=1000)
                assert [s.seq for s in history] == list(range(1, len(history) + 1)), tid
                stored = [s.item for s in history]
                assert len(stored) == writer.count // len(writer.thread_ids), tid
            for key, tid, generation in writer.acked:
                item = store.read_history(tid, after_seq=generation - 1, limit=1)[0].item
                n = int(key.rsplit("/", 1)[1])
                assert item == (user_msg(key) if n == 0 else plain(n)), (key, generation)
        assert assert_converged(store, timeout=HANG) == 6
        assert store.flush(writers[0].thread_ids[0], timeout=HANG).title == "w0/0"


def _backends_waiting_on_a_lock(admin: psycopg.Connection[Any], database: str) -> list[int]:
    """The pids of the store's sessions (``application_name`` thread_store) of ``database``
    blocked on a lock."""
    rows = admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'thread_store' "
        "AND datname = %s AND wait_event_type = 'Lock'", (database,)).fetchall()
    return [int(pid) for pid, in rows]


def test_a_projection_whose_session_the_server_ends_is_retried(pg_url: str) -> None:
    """``pg_terminate_backend`` on the projector's session in the middle of its
    transaction (blocked on the thread's row, which the test holds): the attempt fails
    with a transient error, is retried (a retry span event), and the barrier returns the
    metadata of the whole history."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    schema = new_schema()
    database = pg_url.rsplit("/", 1)[1]
    with ThreadStore.open(pg_url, schema=schema, tracer_provider=provider) as store, \
            psycopg.connect(pg_url, autocommit=True) as admin, psycopg.connect(pg_url) as holder:
        tid = store.create_thread()
        store.append_and_flush(tid, [user_msg("first")], timeout=HANG)
        holder.execute(f"SELECT 1 FROM {schema}.meta WHERE thread_id = %s FOR UPDATE", (tid,))
        assert store.append(tid, [plain(1), user_msg("second")]) == 3
        wait_for(lambda: len(_backends_waiting_on_a_lock(admin, database)) == 1,
                 "the projection blocked on the held row", HANG)
        victim, = _backends_waiting_on_a_lock(admin, database)
        assert admin.execute("SELECT pg_terminate_backend(%s)", (victim,)).fetchone() == (True,)
        holder.rollback()
        meta = store.flush(tid, timeout=HANG)
        assert (meta.title, meta.item_count, meta.projected_seq) == ("first", 3, 3)
        assert store.stats().retries >= 1
        assert store.status(tid).last_error is None
        assert assert_converged(store, timeout=HANG) == 1
    events = [e for span in exporter.get_finished_spans() for e in span.events]
    assert any(e.name == EVENT_RETRY for e in events), [e.name for e in events]


#: PostgreSQL's ReadyForQuery message when idle: the server sends it after the commit.
_READY_FOR_QUERY = b"Z\x00\x00\x00\x05I"


class CommitCutter:
    """A TCP proxy between the store and the server that forwards everything until it is
    armed, then cuts the connection that sends the armed marker (a byte string of the
    statement, such as an idempotency key):

    - ``after_commit=True``: it forwards the statement, waits for the server's
      ReadyForQuery (sent once the statement's transaction committed), drops it and cuts
      both sockets: the server committed, the client never hears;
    - ``after_commit=False``: it cuts both sockets instead of forwarding the statement:
      the server never sees it.
    """

    def __init__(self, upstream_port: int) -> None:
        self._upstream = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._armed: tuple[bytes, bool] | None = None
        #: Set when the armed cut happened.
        self.cut = threading.Event()
        threading.Thread(target=self._accept, name="commit-cutter", daemon=True).start()

    def arm(self, marker: bytes, *, after_commit: bool) -> None:
        """Cut the next connection that sends ``marker``, once."""
        self.cut.clear()
        with self._lock:
            self._armed = (marker, after_commit)

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            server = socket.create_connection(("127.0.0.1", self._upstream))
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _take(self, data: bytes) -> bool | None:
        """``after_commit`` of the armed cut if ``data`` carries its marker (disarming it)."""
        with self._lock:
            if self._armed is None or self._armed[0] not in data:
                return None
            after_commit = self._armed[1]
            self._armed = None
            return after_commit

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        try:
            if self._forward(client, server):
                self.cut.set()
        except OSError:
            pass  # either end went away: so does the other
        finally:
            for sock in (client, server):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def _forward(self, client: socket.socket, server: socket.socket) -> bool:
        """Forward both ways until either end closes (``False``) or the armed cut is due
        (``True``)."""
        held: bytes | None = None  # the server's answer to the armed statement, kept back
        while True:
            readable, _, _ = select.select([client, server], [], [])
            for sock in readable:
                data = sock.recv(65536)
                if not data:
                    return False
                if sock is client:
                    after_commit = self._take(data)
                    if after_commit is False:
                        return True
                    if after_commit:
                        held = b""
                    server.sendall(data)
                elif held is not None:
                    held += data
                    if _READY_FOR_QUERY in held:
                        return True
                else:
                    client.sendall(data)


@pytest.fixture
def cutter(pg_url: str) -> Iterator[CommitCutter]:
    proxy = CommitCutter(int(pg_url.rsplit(":", 1)[1].split("/", 1)[0]))
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.mark.parametrize("after_commit", [True, False], ids=["committed", "never-sent"])
def test_a_connection_cut_at_commit_gives_outcome_unknown_and_the_keyed_retry_stores_once(
        pg_url: str, cutter: CommitCutter, after_commit: bool) -> None:
    """The connection breaks at the append's commit, once after the server committed it
    and once before the statement reached the server: either way the client cannot tell,
    so the append raises ``OutcomeUnknown``; retrying it with the same idempotency key
    returns generation 2 and the thread holds the items once."""
    schema = new_schema()
    proxied = pg_url.replace(f":{pg_url.rsplit(':', 1)[1].split('/', 1)[0]}/", f":{cutter.port}/")
    with ThreadStore.open(proxied, schema=schema) as store, \
            ThreadStore.open(pg_url, schema=schema) as direct:
        tid = store.create_thread()
        assert store.append(tid, [user_msg("first")]) == 1
        cutter.arm(b"the-cut-append", after_commit=after_commit)
        with pytest.raises(OutcomeUnknown, match="idempotency_key"):
            store.append(tid, [plain(1)], idempotency_key="the-cut-append")
        assert cutter.cut.is_set()
        assert direct.status(tid).head_seq == (2 if after_commit else 1)  # what the server did
        assert store.append(tid, [plain(1)], idempotency_key="the-cut-append") == 2
        assert store.append(tid, [plain(1)], idempotency_key="the-cut-append") == 2
        assert [s.item for s in direct.read_history(tid)] == [user_msg("first"), plain(1)]
        meta = store.flush(tid, timeout=HANG)
        assert (meta.title, meta.item_count, meta.projected_seq) == ("first", 2, 2)


def test_a_barrier_keeps_its_timeout_while_the_server_is_down(durable_server: PostgresServer) -> None:
    """Found by the crash test: a barrier's reads waited for a pooled connection for the
    whole ``connect_timeout`` (10 s by default) whatever the barrier's own timeout. While
    the server is down, ``flush`` and ``flush_all`` now raise a typed error within their
    timeout plus DESIGN §1.4's scheduling margin."""
    with psycopg.connect(durable_server.url, autocommit=True) as admin:
        admin.execute("CREATE DATABASE barrier_test")
    url = durable_server.url.rsplit("/", 1)[0] + "/barrier_test"
    with ThreadStore.open(url, schema=new_schema(), pool_min_size=1) as store:
        tid = store.create_thread()
        store.append(tid, [user_msg("hi")])
        store.pause_projection()  # so the barriers below have to wait
        store.append(tid, [plain(1)])
        durable_server.crash()
        try:
            for barrier in (lambda: store.flush(tid, timeout=0.5),
                            lambda: store.flush(tid, generation=1, timeout=0.5),
                            lambda: store.flush_all(timeout=0.5)):
                started = time.monotonic()
                with pytest.raises(ThreadStoreError):
                    barrier()
                assert time.monotonic() - started < 0.5 + SCHEDULING
        finally:
            durable_server.start_again()
        store.resume_projection()
        assert store.flush(tid, timeout=HANG).item_count == 2
