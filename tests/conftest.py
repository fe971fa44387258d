"""Shared fixtures: real stores on every backend, always closed.

The contract suite runs on every backend through ``backend`` (and the ``store`` and
``open_store`` fixtures built on it); a test that needs what a backend cannot do skips by
the backend's declared capability (:meth:`Backend.requires`), never by its name. Tests of
one backend's own machinery (its files, locks, pragmas, crash recovery) take
``sqlite_backend`` or ``sqlite_store`` instead.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import pytest
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from _writer_child import WriterChild
from pg_server import PostgresServer, PostgresUnavailable

from thread_store import AsyncThreadStore, ThreadStore
from thread_store.backends.memory import MemoryStorage
from thread_store.backends.postgres import PostgresStorage
from thread_store.backends.sqlite import SQLiteStorage
from thread_store.storage import MEMORY, Capabilities, Storage

#: CI sets this, so that a machine that cannot start PostgreSQL fails the run, not skips.
REQUIRE_POSTGRES = os.environ.get("THREAD_STORE_REQUIRE_POSTGRES") == "1"


@pytest.fixture(autouse=True)
def projector_threads_end() -> Iterator[None]:
    """Every projector worker a test started has exited by the end of that test.

    A close whose deadline passed leaves its worker fenced, finishing its batch: it gets
    a generous grace to exit, so it never counts against a later test's thread checks.
    One that never exits (a leak, a hang) fails the test that started it.
    """
    before = set(threading.enumerate())
    yield
    started = [t for t in threading.enumerate() if t.name == "thread_store-projector" and t not in before]
    for t in started:
        t.join(30.0)
    alive = [t for t in started if t.is_alive()]
    assert not alive, f"projector threads started by this test are still running: {alive}"


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    """A fresh store directory path (not yet created)."""
    return tmp_path / "store"


#: The fold-rules identifier the port tests open storage with.
PORT_RULES_ID = "test"


@dataclass(frozen=True)
class Place:
    """Where one store lives: the ``ThreadStore.open`` target and the options that name
    the store there (PostgreSQL: its ``schema``). Opening it again finds the same store."""

    target: str | Path
    options: Mapping[str, Any] = field(default_factory=dict)

    def open(self, **options: Any) -> ThreadStore:
        """``ThreadStore.open`` of this store, with these options besides."""
        return ThreadStore.open(self.target, **self.options, **options)

    def open_async(self, **options: Any) -> Any:
        """``AsyncThreadStore.open`` of this store (await it, or ``async with`` it)."""
        return AsyncThreadStore.open(self.target, **self.options, **options)


def _sqlite_storage(place: Place) -> Storage:
    assert isinstance(place.target, Path)
    return SQLiteStorage.open(place.target, durability="normal", read_only=False, rules_id=PORT_RULES_ID)


def _memory_storage(place: Place) -> Storage:
    return MemoryStorage.open(durability="normal", read_only=False, rules_id=PORT_RULES_ID)


def _postgres_place(root: Path, server: str | None) -> Place:
    assert server is not None
    return Place(server, {"schema": new_schema()})


def _postgres_storage(place: Place) -> Storage:
    assert isinstance(place.target, str)
    return PostgresStorage.open(place.target, durability="normal", read_only=False,
                                rules_id=PORT_RULES_ID, schema=place.options["schema"])


@dataclass(frozen=True)
class BackendKind:
    """What the suite needs to know of one backend; a new backend adds one to ``BACKENDS``."""

    capabilities: Capabilities
    #: The place of a new store: given an unused directory path, and the ``server``
    #: fixture's value for a backend that has one.
    place: Callable[[Path, str | None], Place]
    #: Open the backend's :class:`~thread_store.storage.Storage` of that store, for the
    #: port tests.
    storage: Callable[[Place], Storage]
    #: The fixture of the server the stores live on, requested only by the tests of this
    #: backend (a machine without that server skips just those).
    server: str | None = None


#: Every backend the contract suite runs on.
BACKENDS: dict[str, BackendKind] = {
    "sqlite": BackendKind(SQLiteStorage.capabilities, lambda root, _: Place(root), _sqlite_storage),
    "memory": BackendKind(MemoryStorage.capabilities, lambda root, _: Place(MEMORY), _memory_storage),
    "postgres": BackendKind(PostgresStorage.capabilities, _postgres_place, _postgres_storage,
                            server="pg_url"),
}
#: What a backend without the capability cannot do, for the skip message.
_CANNOT = {
    "reopen": "reopen a store (nothing outlives the object that opened it)",
    "read_only": "open a store read-only beside its writer",
    "durability_full": "take durability='full'",
    "backup": "back a store up",
    "files": "keep a store in files on this machine",
    "exclusive_rebuild": "refuse rebuild_index beside another writer yet",
}


class Backend:
    """One backend under test: how to open stores (or its storage ports) on it, and what
    it can do. Everything it opened is closed after the test."""

    def __init__(self, name: str, root: Path, request: pytest.FixtureRequest) -> None:
        self.name = name
        self._kind = BACKENDS[name]
        self.capabilities = self._kind.capabilities
        self._root = root
        self._fresh = itertools.count(1)
        self._server: str | None = (request.getfixturevalue(self._kind.server)
                                    if self._kind.server else None)
        #: The store of the test: every :meth:`open_store` opens this same one (on a
        #: backend that can reopen, a reopen finds its data).
        self.place = self._kind.place(root, self._server)
        #: What ``ThreadStore.open`` takes (with ``place.options``).
        self.target = self.place.target
        #: What ``store.path`` reports: the directory of a store that lives in one.
        self.path = self.target if isinstance(self.target, Path) else None
        self._opened: list[ThreadStore | Storage] = []

    def open_store(self, **options: Any) -> ThreadStore:
        """Open the test's store with these ``ThreadStore.open`` options."""
        store = self.place.open(**options)
        self._opened.append(store)
        return store

    def open_async(self, **options: Any) -> Any:
        """``AsyncThreadStore.open`` of the test's store (the caller closes it)."""
        return self.place.open_async(**options)

    def open_storage(self, root: Path | None = None) -> Storage:
        """Open the backend's storage ports (no ThreadStore) of the test's store, or of
        the store a backup wrote into directory ``root``."""
        storage = self._kind.storage(self.place if root is None else self._kind.place(root, self._server))
        self._opened.append(storage)
        return storage

    def new_place(self) -> Place:
        """Another store's place, for a test that needs several (SQLite: a new directory;
        PostgreSQL: a new schema)."""
        return self._kind.place(self._root.with_name(f"{self._root.name}-{next(self._fresh)}"),
                                self._server)

    def requires(self, capability: str) -> None:
        """Skip the test unless the backend declares ``capability`` (a ``Capabilities`` field).

        Call it where the test starts to need it: what the test checked before still ran.
        """
        if not getattr(self.capabilities, capability):
            pytest.skip(f"the {self.name} backend cannot {_CANNOT[capability]}")

    def close_all(self) -> None:
        """Close everything this opened, newest first (closing twice is harmless)."""
        for opened in reversed(self._opened):
            if isinstance(opened, ThreadStore):
                opened.close(timeout=5.0)
            else:
                opened.close()


@contextmanager
def opened_backend(name: str, store_path: Path, request: pytest.FixtureRequest) -> Iterator[Backend]:
    """The backend ``name`` for one test; the stores it opened are closed afterwards."""
    opened = Backend(name, store_path, request)
    try:
        yield opened
    finally:
        opened.close_all()


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest, store_path: Path) -> Iterator[Backend]:
    """Each backend in turn (the test id names it); its stores are closed after the test.

    A backend with a server starts it here, on the first test that needs it.
    """
    with opened_backend(request.param, store_path, request) as opened:
        yield opened


@pytest.fixture
def sqlite_backend(request: pytest.FixtureRequest, store_path: Path) -> Iterator[Backend]:
    """The embedded SQLite backend alone, for tests of its own files, locks and recovery."""
    with opened_backend("sqlite", store_path, request) as opened:
        yield opened


@pytest.fixture(params=["sqlite", "postgres"])
def shared_backend(request: pytest.FixtureRequest, store_path: Path) -> Iterator[Backend]:
    """Each backend that several processes share: the embedded store, and PostgreSQL."""
    with opened_backend(request.param, store_path, request) as opened:
        yield opened


#: ``spawn(open=True, **open_args)``: a writer child (see :func:`spawn`).
Spawn = Callable[..., WriterChild]


@pytest.fixture
def spawn(shared_backend: Backend) -> Iterator[Spawn]:
    """Start writer children (``_writer_child.py``); ``spawn(open=True, **open_args)`` opens
    the test's store in the child first. Every child is killed (if still alive) and reaped
    after the test."""
    children: list[WriterChild] = []
    place = shared_backend.place

    def start(open: bool = True, **open_args: Any) -> WriterChild:
        child = WriterChild()
        children.append(child)
        if open:
            open_args["options"] = {**place.options, **open_args.get("options", {})}
            child.call("open", path=str(place.target), **open_args)
        return child

    try:
        yield start
    finally:
        for child in children:
            child.close()


@pytest.fixture
def open_store(backend: Backend) -> Callable[..., ThreadStore]:
    """Open stores on each backend with the given options; all closed after the test."""
    return backend.open_store


@pytest.fixture
def store(backend: Backend) -> ThreadStore:
    """An open async-projection store on each backend, closed after the test."""
    return backend.open_store()


@pytest.fixture
def sqlite_store(sqlite_backend: Backend) -> ThreadStore:
    """An open async-projection SQLite store in ``store_path``, closed after the test."""
    return sqlite_backend.open_store()


@pytest.fixture
def no_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide any ``OTEL_*`` settings of the machine running the tests."""
    for name in [n for n in os.environ if n.startswith("OTEL_")]:
        monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server for the whole session, started on first use.

    Skipped (one line in the summary) where the machine has no PostgreSQL, unless
    ``THREAD_STORE_REQUIRE_POSTGRES=1`` (CI), which makes that a failure.
    """
    with started_server(PostgresServer) as server:
        yield server


@contextmanager
def started_server(make: Callable[[], PostgresServer]) -> Iterator[PostgresServer]:
    """A started server (``make()``), stopped afterwards; where PostgreSQL cannot start,
    the test is skipped, or fails under ``THREAD_STORE_REQUIRE_POSTGRES=1``."""
    try:
        server = make()
        server.__enter__()
    except PostgresUnavailable as exc:
        if REQUIRE_POSTGRES:
            pytest.fail(f"THREAD_STORE_REQUIRE_POSTGRES=1 but PostgreSQL cannot start: {exc}")
        pytest.skip(f"PostgreSQL tests skipped: {str(exc).splitlines()[0]}")
    try:
        yield server
    finally:
        server.stop()


#: The database the stores of the tests live in (a schema each); the server's own test
#: database stays as initdb made it, for the server's own checks.
STORES_DATABASE = "thread_store_stores"


@pytest.fixture(scope="session")
def pg_url(postgres_server: PostgresServer) -> str:
    """A ``postgresql://`` URL of a database for stores; give each store its own ``schema``."""
    import psycopg  # the postgres extra: only tests that use a server need it

    with psycopg.connect(postgres_server.url, autocommit=True, connect_timeout=30) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {STORES_DATABASE}")
        conn.execute(f"CREATE DATABASE {STORES_DATABASE}")
    return postgres_server.url.rsplit("/", 1)[0] + "/" + STORES_DATABASE


def new_schema() -> str:
    """A fresh schema name, so each PostgreSQL store of a test starts empty."""
    return f"t_{uuid.uuid4().hex[:12]}"


def user_msg(text: str, **extra: object) -> dict[str, object]:
    """A minimal ``event_msg`` / ``user_message`` item."""
    return {"type": "event_msg", "payload": {"type": "user_message", "message": text, **extra}}


def plain(n: int = 0) -> dict[str, object]:
    """A ``response_item`` that changes nothing but counts and times."""
    return {"type": "response_item", "payload": {"type": "message", "n": n}}


class CloseAfterAppend(SpanProcessor):
    """Closes the store as an append's span ends: after the commit, before its barrier.

    Add it to the ``tracer_provider`` of the store, then set ``close``.
    """

    def __init__(self) -> None:
        self.close: Callable[[], object] | None = None

    def on_end(self, span: ReadableSpan) -> None:
        if span.name == "thread_store.append" and self.close is not None:
            close, self.close = self.close, None
            close()


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll a test condition until it holds (tests may poll; the library never does).

    ``timeout`` is generous: it only catches hangs.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, dict[str, object]]:
    """Run ``fn`` in a thread; its result or exception lands in the returned dict."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    return t, out
