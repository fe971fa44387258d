"""Issue 12 point 1: ``AsyncThreadStore`` barriers on PostgreSQL wait natively (DESIGN §6).

Against a real server: a PostgreSQL async barrier reads on psycopg's asyncio connections
in the event loop, so it takes no executor job at all; each of its reads is bounded by
the barrier's deadline, also when another session's lock blocks it on the server; a
cancelled barrier's statement is cancelled on the server; a barrier in one process
waits for another (killed) process's appends; and ``close`` ends every asyncio
connection, also when it is cancelled; while the server is down, barriers still return
on time with a typed error, and succeed once it is back.

No timeout here measures speed: each only catches a hang, or bounds a call by its own
timeout plus DESIGN §1.4's scheduling margin.
"""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import contextmanager
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from _writer_child import WriterChild
from conftest import new_schema, plain, started_server, user_msg
from pg_server import PostgresServer

from thread_store import (AsyncThreadStore, FlushTimeout, ReadOnlyStore, ThreadStore,
                          ThreadStoreError)
from thread_store.backends.postgres._async_reads import _UNKNOWN, _Start, _close_enough
from thread_store.backends.postgres._db import ASYNC_APPLICATION_NAME
from thread_store.errors import DURABLE_NOTE

#: Waits that only catch a hang.
HANG = 30.0
#: DESIGN §1.4's scheduling margin of a barrier past its timeout.
MARGIN_S = 2.0


class CountingExecutor(ThreadPoolExecutor):
    """A real thread pool that counts the jobs submitted to it."""

    submitted = 0

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


@pytest.fixture
def schema() -> str:
    return new_schema()


@pytest.fixture
def writer(pg_url: str, schema: str) -> Iterator[ThreadStore]:
    """Another store on the same schema: it appends with its projection paused, so only
    the async store's projector makes its threads visible."""
    with ThreadStore.open(pg_url, schema=schema) as store:
        store.pause_projection()
        yield store


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """Holds the executor's blocked job until set; set at the end, so none outlives its test."""
    event = threading.Event()
    yield event
    event.set()


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = HANG) -> None:
    """Poll ``check`` until it holds (test-side only), failing after ``timeout``."""
    end = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < end, f"timed out waiting for: {what}"
        await asyncio.sleep(0.01)


def activity(pg_url: str, where: str) -> list[tuple[Any, ...]]:
    """Rows of ``pg_stat_activity`` of the store's asyncio pool matching ``where``."""
    with psycopg.connect(pg_url, autocommit=True) as admin:
        return admin.execute(f"SELECT pid, state, query FROM pg_stat_activity "
                             f"WHERE application_name = %s AND {where}",
                             (ASYNC_APPLICATION_NAME,)).fetchall()


def test_a_flush_takes_no_executor_job(pg_url: str, schema: str, writer: ThreadStore,
                                       gate: threading.Event) -> None:
    """The executor's one thread is kept busy, and the flush still returns the fold of
    another store's appends without submitting it anything; append_and_flush hops once,
    for its append."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        executor = CountingExecutor(max_workers=1)
        try:
            async with AsyncThreadStore.open(pg_url, schema=schema, executor=executor) as store:
                tid = writer.create_thread()
                head = writer.append(tid, [user_msg("from the writer"), plain(1)])
                started = threading.Event()

                def block() -> None:
                    started.set()
                    gate.wait(HANG)

                busy = loop.run_in_executor(executor, block)
                await until(lambda: asyncio.sleep(0, started.is_set()), "executor taken")
                before = executor.submitted
                meta = await store.flush(tid, timeout=HANG)
                assert (meta.projected_seq, meta.title) == (head, "from the writer")
                assert executor.submitted == before, "the flush gave the executor a job"
                # Projected already: the fast path reads natively too.
                assert (await store.flush(tid, generation=1, timeout=HANG)).projected_seq == head
                assert executor.submitted == before
                gate.set()
                await busy
                before = executor.submitted
                meta = await store.append_and_flush(tid, [plain(2)], timeout=HANG)
                assert meta.projected_seq == head + 1
                assert executor.submitted == before + 1  # the append's hop, nothing else
        finally:
            executor.shutdown()

    asyncio.run(main())


@contextmanager
def locked_meta(pg_url: str, schema: str) -> Iterator[psycopg.Connection[Any]]:
    """Another session holding the store's ``meta`` table ``ACCESS EXCLUSIVE``: every read
    of a checkpoint or a row waits on the server; ``rollback()`` (or the end) releases it."""
    with psycopg.connect(pg_url) as admin:
        admin.execute(f"LOCK TABLE {schema}.meta IN ACCESS EXCLUSIVE MODE")
        yield admin


def _behind_thread(writer: ThreadStore) -> tuple[str, int]:
    """A thread the async store holds no state for, behind its head: its barrier must
    read the checkpoint from the store."""
    tid = writer.create_thread()
    return tid, writer.append(tid, [user_msg("blocked")])


def test_a_read_blocked_on_the_server_times_out_on_time(pg_url: str, schema: str,
                                                         writer: ThreadStore) -> None:
    async def main() -> None:
        # catch_up_after: the store learns of the thread from its barrier alone.
        async with AsyncThreadStore.open(pg_url, schema=schema, catch_up_after=600) as store:
            tid, head = _behind_thread(writer)
            with locked_meta(pg_url, schema):
                start = time.monotonic()
                with pytest.raises(FlushTimeout) as caught:
                    await store.flush(tid, timeout=0.5)
                took = time.monotonic() - start
            assert took < 0.5 + MARGIN_S, took
            assert (caught.value.target, caught.value.projected) == (head, 0)
            assert DURABLE_NOTE in str(caught.value)
            assert (await store.status(tid)).waiters == 0
            # The server side let go of the read, and the pool serves the next barrier.
            assert (await store.flush(tid, timeout=HANG)).title == "blocked"

    asyncio.run(main())


def test_a_cancelled_read_is_cancelled_on_the_server(pg_url: str, schema: str,
                                                      writer: ThreadStore) -> None:
    blocked = "state = 'active' AND wait_event_type = 'Lock'"

    async def main() -> None:
        async with AsyncThreadStore.open(pg_url, schema=schema, catch_up_after=600) as store:
            tid, _ = _behind_thread(writer)
            with locked_meta(pg_url, schema):
                task = asyncio.create_task(store.flush(tid, timeout=HANG))
                await until(lambda: asyncio.to_thread(lambda: bool(activity(pg_url, blocked))),
                            "the flush's read blocked on the lock")
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                # Gone while the lock is still held: cancelled, not finished.
                await until(lambda: asyncio.to_thread(lambda: not activity(pg_url, blocked)),
                            "the cancelled statement gone from the server")
            assert (await store.status(tid)).waiters == 0
            assert (await store.flush(tid, timeout=HANG)).title == "blocked"

    asyncio.run(main())


def test_a_flush_waits_for_a_killed_process_s_appends(pg_url: str, schema: str) -> None:
    child = WriterChild()
    try:
        child.call("open", path=pg_url, options={"schema": schema})
        child.call("pause")
        tid = child.call("create")
        head = child.call("append", thread_id=tid, items=[user_msg("from the child"), plain(1)])
        child.kill()  # its work is left behind, unprojected
    finally:
        child.close()

    async def main() -> None:
        async with AsyncThreadStore.open(pg_url, schema=schema, catch_up_after=600) as store:
            meta = await store.flush(tid, timeout=HANG)
            assert (meta.projected_seq, meta.title, meta.item_count) == (head, "from the child", 2)

    asyncio.run(main())


def test_close_ends_every_asyncio_connection(pg_url: str, schema: str, writer: ThreadStore) -> None:
    async def no_connections() -> bool:
        return await asyncio.to_thread(activity, pg_url, "true") == []

    async def main() -> None:
        tid = writer.create_thread()
        writer.append(tid, [user_msg("hi")])
        store = await AsyncThreadStore.open(pg_url, schema=schema)
        await store.flush(tid, timeout=HANG)
        assert await asyncio.to_thread(activity, pg_url, "true"), "the flush read on no asyncio connection"
        await store.close()
        await until(no_connections, "the asyncio connections ended by close")

        # A close cancelled while it drains still ends them.
        store = await AsyncThreadStore.open(pg_url, schema=schema)
        await store.flush(tid, timeout=HANG)
        closing = asyncio.create_task(store.close())
        await asyncio.sleep(0)
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        await until(no_connections, "the asyncio connections ended by a cancelled close")

    asyncio.run(main())


@pytest.fixture(scope="module")
def crashable_server() -> Iterator[PostgresServer]:
    """A server of this module's own, which its test may crash."""
    with started_server(PostgresServer) as server:
        yield server


def test_barriers_return_on_time_while_the_server_is_down(crashable_server: PostgresServer) -> None:
    server = crashable_server

    async def main() -> None:
        # A connect_timeout far past the barriers' timeout: their deadline bounds each wait.
        async with AsyncThreadStore.open(server.url, schema=new_schema(), connect_timeout=20) as store:
            tid = await store.create_thread()
            await store.append_and_flush(tid, [user_msg("up")], timeout=HANG)
            await asyncio.to_thread(server.crash)
            try:
                calls: dict[str, Callable[[], Awaitable[object]]] = {
                    "flush": lambda: store.flush(tid, timeout=1.0),
                    "append_and_flush": lambda: store.append_and_flush(tid, [plain()], timeout=1.0),
                }
                for name, call in [*calls.items(), *calls.items()]:  # broken connections, then none
                    start = time.monotonic()
                    with pytest.raises(ThreadStoreError):
                        await call()
                    took = time.monotonic() - start
                    assert took < 1.0 + MARGIN_S, (name, took)
            finally:
                await asyncio.to_thread(server.start_again)

            async def flushed() -> bool:
                try:
                    meta = await store.flush(tid, timeout=HANG)
                except ThreadStoreError:
                    return False  # the pools reconnect in the background
                return meta.title == "up"

            await until(flushed, "a flush once the server is back")

    asyncio.run(main())


def test_a_flush_of_a_projected_thread_is_one_statement(pg_url: str, schema: str,
                                                        postgres_server: PostgresServer) -> None:
    """Its head, the check that it is projected and the row it returns come from one read
    (``snapshot``), counted in the server's statement log of the asyncio sessions."""
    database = pg_url.rsplit("/", 1)[1]

    async def main() -> None:
        async with AsyncThreadStore.open(pg_url, schema=schema, catch_up_after=3600.0) as store:
            tid = await store.create_thread()
            await store.append_and_flush(tid, [user_msg("projected")], timeout=HANG)
            with psycopg.connect(pg_url, autocommit=True) as admin:
                admin.execute(f"ALTER DATABASE {database} SET log_statement = 'all'")
                try:
                    await store.flush(tid, timeout=HANG)  # its asyncio session connects, logged
                finally:
                    admin.execute(f"ALTER DATABASE {database} RESET log_statement")
            pids = [row[0] for row in await asyncio.to_thread(activity, pg_url, "true")]
            assert len(pids) == 1
            await store.flush(tid, timeout=HANG)
            mark = len(postgres_server.log())
            meta = await store.flush(tid, timeout=HANG)
            statements = [line for line in postgres_server.log()[mark:].splitlines()
                          if f"[{pids[0]}] " in line and ("LOG:  statement:" in line
                                                           or "LOG:  execute" in line)]
            assert (meta.title, meta.projected_seq) == ("projected", 1)
            assert len(statements) == 1, "\n".join(statements)

    asyncio.run(main())


def test_a_start_read_that_a_projection_overtook_is_not_returned(
        pg_url: str, schema: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The projection covering the target commits between the flush's one start read and
    its registration: the registration sees it projected, and the row the flush returns
    is read again (the start's row was behind), never the older one."""
    gate = threading.Event()
    gate.set()

    def hook(thread_id: str, generation: int) -> None:
        assert gate.wait(HANG)

    real_row = _Start._row

    async def row_then_projected(self: _Start, thread_id: str) -> tuple[Any, ...] | None:
        row = await real_row(self, thread_id)
        gate.set()  # the projection of generation 2 commits now, after this read
        await until(lambda: asyncio.to_thread(projected, thread_id, 2), "generation 2 projected")
        return row

    def projected(thread_id: str, generation: int) -> bool:
        with psycopg.connect(pg_url, autocommit=True) as admin:
            row = admin.execute(f"SELECT projected_seq FROM {schema}.meta WHERE thread_id = %s",
                                (thread_id,)).fetchone()
        return row is not None and row[0] >= generation

    async def main() -> None:
        async with AsyncThreadStore.open(pg_url, schema=schema, projection_hook=hook) as store:
            tid = await store.create_thread()
            await store.append_and_flush(tid, [user_msg("one")], timeout=HANG)
            gate.clear()
            await store.append(tid, [plain(2)])  # its projection waits in the hook
            monkeypatch.setattr(_Start, "_row", row_then_projected)
            meta = await store.flush(tid, timeout=HANG)
            assert meta.projected_seq == 2

    asyncio.run(main())


@pytest.mark.parametrize(("current", "bound", "close"), [
    (30_000, 30_000, True), (30_000, 20_001, True), (30_000, 20_000, True),
    (30_000, 19_999, False),  # more than 1.5x the time left: sent again
    (500, 30_000, False),  # shorter than the time left would cancel the read early
    (0, 500, False), (0, 0, True), (30_000, 0, False),  # 0: no limit
    (_UNKNOWN, 30_000, False)])  # a read that may have set it failed: sent again
def test_a_connection_s_statement_timeout_is_sent_again_only_when_it_must(
        current: int, bound: int, close: bool) -> None:
    assert _close_enough(current, bound) is close


def test_a_read_only_store_s_barriers_refuse_and_connect_nothing(pg_url: str, schema: str,
                                                                 writer: ThreadStore) -> None:
    tid = writer.create_thread()
    writer.append(tid, [user_msg("hi")])

    async def main() -> None:
        async with AsyncThreadStore.open(pg_url, schema=schema, read_only=True) as store:
            with pytest.raises(ReadOnlyStore):
                await store.flush(tid, timeout=HANG)
            assert (await store.read_thread(tid)).thread_id == tid
            assert await asyncio.to_thread(activity, pg_url, "true") == []

    asyncio.run(main())
