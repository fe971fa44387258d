"""AsyncThreadStore: the full API as coroutines, barriers awaited without holding threads,
on every backend."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import Backend, CloseAfterAppend, plain, user_msg
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from thread_store import (
    AsyncThreadStore,
    FlushTimeout,
    InvalidArgument,
    ProjectionFailed,
    StoreClosed,
    StoreLocked,
    ThreadDiscarded,
    ThreadMetadata,
    ThreadNotFound,
)
from thread_store.errors import DURABLE_NOTE


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10.0) -> None:
    """Yield to the loop until ``check()`` holds; a generous deadline only catches hangs."""
    try:
        async with asyncio.timeout(timeout):
            while not await check():
                await asyncio.sleep(0.002)
    except TimeoutError:
        pytest.fail(f"timed out waiting until: {what}")


async def waiters(store: AsyncThreadStore, thread_id: str) -> int:
    return (await store.status(thread_id)).waiters


def test_full_api_smoke(backend: Backend) -> None:
    async def main() -> None:
        store = await backend.open_async()
        try:
            assert store.path == backend.path
            tid = await store.create_thread(metadata={"cwd": "/repo", "model_provider": "openai"})
            assert await store.append(tid, [user_msg("Fix the flaky test")]) == 2
            meta = await store.append_and_flush(tid, [plain(1)], timeout=5.0)
            assert (meta.title, meta.cwd, meta.item_count, meta.projected_seq) == (
                "Fix the flaky test", "/repo", 3, 3)
            assert (await store.flush(tid, generation=2, timeout=5.0)).projected_seq >= 2
            assert (await store.read_thread(tid)).preview == "Fix the flaky test"
            assert [s.seq for s in await store.read_history(tid, after_seq=1, limit=10)] == [2, 3]
            assert [t.thread_id for t in (await store.list_threads()).threads] == [tid]
            assert (await store.update_metadata(tid, name="Renamed", timeout=5.0)).name == "Renamed"
            assert (await store.archive_thread(tid)).archived_at is not None
            assert (await store.list_threads()).threads == []
            assert len((await store.list_threads(archived=True)).threads) == 1
            assert (await store.unarchive_thread(tid)).archived_at is None
            other = await store.create_thread("other-1")
            await store.pause_projection()
            await store.append(other, [user_msg("second")])
            assert (await store.status(other)).pending
            await store.resume_projection()
            await store.flush_all(timeout=5.0)
            status = await store.status(other)
            assert (status.head_seq, status.projected_seq, status.pending) == (1, 1, False)
            assert (await store.stats()).rows_written >= 2
            await store.discard(other)
            with pytest.raises(ThreadDiscarded):
                await store.read_thread(other)
            await store.delete_thread(tid)
            with pytest.raises(ThreadNotFound):
                await store.flush(tid)
            with pytest.raises(InvalidArgument):
                await store.flush("bad id!")
            with pytest.raises(InvalidArgument):
                await store.update_metadata(other)
        finally:
            await store.close()
        with pytest.raises(StoreClosed):
            await store.list_threads()

    asyncio.run(main())


def test_async_with_opens_and_closes(backend: Backend) -> None:
    async def main() -> AsyncThreadStore:
        async with backend.open_async(projection="sync") as store:
            tid = await store.create_thread()
            await store.append(tid, [user_msg("hello")])
            assert (await store.read_thread(tid)).title == "hello"  # sync mode projects in append
        with pytest.raises(StoreClosed):
            await store.append(tid, [plain()])
        backend.requires("reopen")
        async with await backend.open_async() as again:
            assert (await again.list_threads()).threads[0].thread_id == tid
        return again

    closed = asyncio.run(main())
    with pytest.raises(StoreClosed):
        asyncio.run(closed.read_thread("x"))


def test_loop_stays_responsive_while_flush_waits_on_blocked_projection(backend: Backend) -> None:
    release = threading.Event()
    blocked = threading.Event()

    def hook(thread_id: str, generation: int) -> None:
        if thread_id == "slow":
            blocked.set()
            release.wait(30)

    async def main() -> None:
        async with backend.open_async(projection_hook=hook) as store:
            await store.create_thread("slow")
            flush = asyncio.create_task(store.append_and_flush("slow", [user_msg("hi")], timeout=30))
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.001)
                    ticks += 1

            tick_task = asyncio.create_task(ticker())
            await until(lambda: asyncio.to_thread(blocked.is_set), "projection blocked in hook")
            await until(lambda: _ge(lambda: ticks, 50), "ticker ticked while the flush waited")
            assert not flush.done()
            assert await waiters(store, "slow") == 1
            release.set()
            meta = await flush
            tick_task.cancel()
            assert meta.title == "hi" and meta.projected_seq == 1

    try:
        asyncio.run(main())
    finally:
        release.set()


async def _ge(value: Callable[[], int], minimum: int) -> bool:
    return value() >= minimum


def test_waiting_flushes_hold_no_executor_thread(backend: Backend) -> None:
    async def main() -> None:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=2))
        async with backend.open_async() as store:
            ids = [await store.create_thread(f"t{i}") for i in range(50)]
            await store.pause_projection()
            gens = [await store.append(t, [user_msg(f"message {t}")]) for t in ids]
            flushes = [asyncio.create_task(store.flush(t, timeout=30)) for t in ids]

            async def all_waiting() -> bool:
                return (await store.stats()).waiters == 50

            await until(all_waiting, "all 50 flushes registered")
            # Both executor threads are free: other blocking work still runs.
            assert await asyncio.get_running_loop().run_in_executor(None, lambda: 42) == 42
            assert not any(f.done() for f in flushes)
            await store.resume_projection()
            metas = await asyncio.gather(*flushes)
            assert [m.projected_seq for m in metas] == gens
            assert [m.title for m in metas] == [f"message {t}" for t in ids]
            assert (await store.stats()).waiters == 0

    asyncio.run(main())


def test_cancelled_flush_removes_its_waiter(backend: Backend) -> None:
    async def main() -> None:
        async with backend.open_async() as store:
            tid = await store.create_thread()
            await store.pause_projection()
            await store.append(tid, [plain()])
            task = asyncio.create_task(store.flush(tid))
            await until(lambda: _ge_waiters(store, tid, 1), "flush registered")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await waiters(store, tid) == 0
            await store.resume_projection()

    asyncio.run(main())


class CountingExecutor(ThreadPoolExecutor):
    """A real thread pool that counts the calls submitted to it."""

    submitted = 0

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


def test_cancel_during_registration_leaves_no_waiter(backend: Backend, gate: threading.Event) -> None:
    if backend.capabilities.native_async_reads:
        pytest.skip("its flush registers on the loop, with no hop to cancel; "
                    "test_postgres_async cancels a flush during its native reads")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        executor = CountingExecutor(max_workers=1)
        async with backend.open_async(executor=executor) as store:
            tid = await store.create_thread()
            await store.pause_projection()
            await store.append(tid, [plain()])
            busy = loop.run_in_executor(executor, gate.wait, 30)  # the only worker is taken
            queued = executor.submitted
            task = asyncio.create_task(store.flush(tid))
            # The flush's registration hop is queued behind the busy worker.
            await until(lambda: _ge(lambda: executor.submitted, queued + 1), "flush hop queued")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            gate.set()
            await busy
            await loop.run_in_executor(executor, lambda: None)  # queued behind the hop: it has run
            # The hop registered a waiter after the cancel; it must be withdrawn (soon, as
            # the loop sees the hop end), not left until the thread is projected.
            await until(lambda: _no_waiters(store, tid), "late waiter withdrawn", timeout=3)
            await store.resume_projection()

    asyncio.run(main())


async def _no_waiters(store: AsyncThreadStore, thread_id: str) -> bool:
    return await waiters(store, thread_id) == 0


async def _ge_waiters(store: AsyncThreadStore, thread_id: str, n: int) -> bool:
    return await waiters(store, thread_id) >= n


def test_timeout_carries_generations_and_removes_waiter(backend: Backend) -> None:
    async def main() -> None:
        async with backend.open_async() as store:
            tid = await store.create_thread()
            await store.append_and_flush(tid, [plain()])
            await store.pause_projection()
            gen = await store.append(tid, [plain(), plain()])
            with pytest.raises(FlushTimeout) as info:
                await store.flush(tid, timeout=0.05)
            assert (info.value.target, info.value.projected) == (gen, 1)
            assert isinstance(info.value, TimeoutError)
            assert await waiters(store, tid) == 0
            with pytest.raises(FlushTimeout):
                await store.flush_all(timeout=0.05)
            assert (await store.stats()).waiters == 0
            await store.resume_projection()
            assert (await store.flush(tid, timeout=5)).projected_seq == gen

    asyncio.run(main())


def test_flush_all_waits_for_every_thread(backend: Backend) -> None:
    async def main() -> None:
        async with backend.open_async() as store:
            ids = [await store.create_thread() for _ in range(5)]
            await store.pause_projection()
            for t in ids:
                await store.append(t, [user_msg(t)])
            task = asyncio.create_task(store.flush_all(timeout=30))
            await until(lambda: _stats_waiters(store, 5), "flush_all registered 5 waiters")
            assert not task.done()
            await store.resume_projection()
            await task
            assert sorted(m.thread_id for m in (await store.list_threads()).threads) == sorted(ids)

    asyncio.run(main())


async def _stats_waiters(store: AsyncThreadStore, n: int) -> bool:
    return (await store.stats()).waiters == n


def test_barrier_errors_are_the_sync_ones(backend: Backend) -> None:
    def hook(thread_id: str, generation: int) -> None:
        if thread_id == "broken":
            raise RuntimeError("rules exploded")

    async def main() -> None:
        async with backend.open_async(projection_hook=hook) as store:
            await store.create_thread("broken")
            with pytest.raises(ProjectionFailed) as failed:
                await store.append_and_flush("broken", [plain()], timeout=10)
            assert isinstance(failed.value.__cause__, RuntimeError)
            with pytest.raises(ProjectionFailed):
                await store.flush_all(timeout=10)
            tid = await store.create_thread()
            await store.pause_projection()
            await store.append(tid, [plain()])
            task = asyncio.create_task(store.flush(tid, timeout=30))
            await until(lambda: _ge_waiters(store, tid, 1), "flush registered")
            await store.discard(tid)
            with pytest.raises(ThreadDiscarded):
                await task

    asyncio.run(main())


def test_close_resolves_waiters_with_store_closed(backend: Backend) -> None:
    release = threading.Event()

    def hook(thread_id: str, generation: int) -> None:
        release.wait(30)

    async def main() -> None:
        store = await backend.open_async(projection_hook=hook)
        tid = await store.create_thread()
        flush = asyncio.create_task(store.append_and_flush(tid, [plain()], timeout=30))
        await until(lambda: _ge_waiters(store, tid, 1), "flush registered")
        await store.close(timeout=0.1)
        with pytest.raises(StoreClosed):
            await flush

    try:
        asyncio.run(main())
    finally:
        release.set()


def test_trace_parent_survives_the_executor_hop(backend: Backend) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")

    async def main() -> None:
        async with backend.open_async(tracer_provider=provider) as store:
            tid = await store.create_thread()
            with tracer.start_as_current_span("agent-turn") as parent:
                await store.append(tid, [plain()])
                await store.flush(tid, timeout=5)
            parent_id = parent.get_span_context().span_id
        spans = exporter.get_finished_spans()
        children = [s for s in spans if s.parent is not None and s.parent.span_id == parent_id]
        assert len(children) >= 2, [s.name for s in spans]
        assert all(s.context.trace_id == parent.get_span_context().trace_id for s in children)

    try:
        asyncio.run(main())
    finally:
        provider.shutdown()


# -- deadlines cover the executor hop; no blocking I/O on the loop's thread ---------------

@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """Holds blocked executor jobs until set; set at the end, so none outlives its test."""
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture
def busy_executor(gate: threading.Event) -> Iterator[Callable[[int], ThreadPoolExecutor]]:
    """Makes executors of N workers for a test to keep busy; released and shut down after."""
    made: list[ThreadPoolExecutor] = []

    def make(workers: int) -> ThreadPoolExecutor:
        made.append(ThreadPoolExecutor(max_workers=workers))
        return made[-1]

    yield make
    gate.set()
    for executor in made:
        executor.shutdown()


MARGIN_S = 2.0  # DESIGN §1.4: a barrier returns within its timeout plus a scheduling margin


async def _is_set(event: threading.Event) -> bool:
    return event.is_set()


async def _fill_executor(loop: asyncio.AbstractEventLoop, executor: ThreadPoolExecutor | None,
                         workers: int, gate: threading.Event) -> list[asyncio.Future[bool]]:
    """Take every worker of ``executor`` (``None``: the loop's default) until ``gate`` is set."""
    started = [threading.Event() for _ in range(workers)]

    def block(mine: threading.Event) -> bool:
        mine.set()
        return gate.wait(60)

    jobs = [loop.run_in_executor(executor, block, mine) for mine in started]
    for mine in started:
        await until(lambda mine=mine: _is_set(mine), "executor worker taken")  # type: ignore[misc]
    return jobs


async def _timed(call: Awaitable[object]) -> tuple[object, float]:
    start = time.monotonic()
    try:
        result: object = await call
    except Exception as exc:  # noqa: BLE001 - the caller asserts on it
        result = exc
    return result, time.monotonic() - start


def test_barriers_return_within_their_timeout_while_the_executor_is_busy(backend: Backend, gate: threading.Event,
        busy_executor: Callable[[int], ThreadPoolExecutor]) -> None:
    busy = busy_executor(2)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with backend.open_async(executor=busy) as store:
            tid = await store.create_thread()
            await store.append_and_flush(tid, [user_msg("hi")], timeout=30)
            await store.pause_projection()
            await store.append(tid, [plain(1)])
            jobs = await _fill_executor(loop, busy, 2, gate)
            calls: dict[str, Callable[[], Awaitable[object]]] = {
                "flush": lambda: store.flush(tid, timeout=0.1),
                "append_and_flush": lambda: store.append_and_flush(tid, [plain(2)], timeout=0.1),
                "update_metadata": lambda: store.update_metadata(tid, name="n", timeout=0.1),
                "archive_thread": lambda: store.archive_thread(tid, timeout=0.1),
                "flush_all": lambda: store.flush_all(timeout=0.1),
            }
            for name, call in calls.items():
                error, took = await _timed(call())
                assert isinstance(error, FlushTimeout), (name, error)
                assert DURABLE_NOTE in str(error), name
                assert took < 0.1 + MARGIN_S, (name, took)
            # A generation already projected: the barrier reads its row off the loop, on time.
            meta, took = await _timed(store.flush(tid, generation=1, timeout=0.1))
            assert isinstance(meta, ThreadMetadata) and meta.title == "hi", meta
            assert took < 0.1 + MARGIN_S
            gate.set()
            assert await asyncio.gather(*jobs) == [True, True]
            assert await waiters(store, tid) == 0  # every timed-out barrier withdrew its waiter
            await store.resume_projection()
            meta = await store.flush(tid, timeout=30)
            # The appends of the timed-out barriers are durable and projected, once each.
            assert [i.item for i in await store.read_history(tid)][1:3] == [plain(1), plain(2)]
            assert (meta.item_count, meta.name, meta.archived_at is not None) == (5, "n", True)

    asyncio.run(main())


def test_a_cancelled_barrier_whose_hop_never_started_writes_nothing(backend: Backend, gate: threading.Event,
        busy_executor: Callable[[int], ThreadPoolExecutor]) -> None:
    busy = busy_executor(1)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with backend.open_async(executor=busy) as store:
            tid = await store.create_thread()
            jobs = await _fill_executor(loop, busy, 1, gate)
            task = asyncio.create_task(store.append_and_flush(tid, [plain()], timeout=30))
            await asyncio.sleep(0)  # let it queue its hop
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            gate.set()
            await asyncio.gather(*jobs)
            assert await store.read_history(tid) == []
            assert await waiters(store, tid) == 0

    asyncio.run(main())


def _lock_index_readers(store_path: Path) -> subprocess.Popen[str]:
    """Another process takes every WAL read mark of index.db: SQLite readers then wait
    (busy timeout) and fail, as under a real external lock."""
    code = ("import fcntl, os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDWR)\n"
            "fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 5, 123)\n"
            "print('locked', flush=True)\n"
            "sys.stdin.readline()\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(store_path / "index.db-shm")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    return holder


def test_a_barrier_on_a_projected_generation_never_reads_sqlite_on_the_loop(store_path: Path) -> None:
    """SQLite's own: another process holds its index's read marks."""
    async def main() -> None:
        async with AsyncThreadStore.open(store_path) as store:
            tid = await store.create_thread()
            await store.append_and_flush(tid, [user_msg("hi")], timeout=30)
            holder = _lock_index_readers(store_path)
            try:
                flush = asyncio.create_task(store.flush(tid, timeout=30))
                ticks = [0]
                ticker = asyncio.create_task(_tick(ticks))
                # Give the flush time to pass its hop and reach the read. Had it read the
                # index on the loop's thread, it would have held the loop for the whole busy
                # timeout, failed, and be done before the ticker ran again.
                await until(lambda: _ge_list(ticks, 25), "the loop kept running")
                assert not flush.done()
                ticker.cancel()
            finally:
                holder.communicate("\n", timeout=30)
            assert (await flush).title == "hi"

    asyncio.run(main())


async def _tick(ticks: list[int]) -> None:
    while True:
        await asyncio.sleep(0.01)
        ticks[0] += 1


async def _ge_list(ticks: list[int], n: int) -> bool:
    return ticks[0] >= n


# -- every barrier error after a durable append says the items are durable ----------------

@pytest.mark.parametrize("call", ["append_and_flush", "update_metadata", "archive_thread",
                                  "unarchive_thread"])
def test_store_closed_between_append_and_barrier_says_the_items_are_durable(
        backend: Backend, call: str) -> None:
    closer = CloseAfterAppend()
    provider = TracerProvider()
    provider.add_span_processor(closer)
    calls: dict[str, Callable[[AsyncThreadStore, str], Awaitable[object]]] = {
        "append_and_flush": lambda s, t: s.append_and_flush(t, [plain()], timeout=30),
        "update_metadata": lambda s, t: s.update_metadata(t, name="n", timeout=30),
        "archive_thread": lambda s, t: s.archive_thread(t, timeout=30),
        "unarchive_thread": lambda s, t: s.unarchive_thread(t, timeout=30),
    }

    async def main() -> str:
        loop = asyncio.get_running_loop()
        store = await backend.open_async(tracer_provider=provider)
        tid = await store.create_thread()
        closer.close = lambda: asyncio.run_coroutine_threadsafe(store.close(), loop).result(30)
        with pytest.raises(StoreClosed, match="durable") as info:
            await calls[call](store, tid)
        assert DURABLE_NOTE in str(info.value)
        await store.close()
        return tid

    tid = asyncio.run(main())
    provider.shutdown()
    backend.requires("reopen")
    with backend.open_store() as reopened:
        assert len(reopened.read_history(tid)) == 1  # durable, as the error said


def test_discard_and_close_return_within_their_timeout_while_the_executor_is_busy(
        backend: Backend, gate: threading.Event,
        busy_executor: Callable[[int], ThreadPoolExecutor]) -> None:
    busy = busy_executor(1)

    async def main() -> tuple[str, str]:
        loop = asyncio.get_running_loop()
        store = await backend.open_async(executor=busy)
        gone, kept = await store.create_thread(), await store.create_thread()
        await store.append(kept, [plain()])
        jobs = await _fill_executor(loop, busy, 1, gate)
        for call in (store.discard(gone, timeout=0.1), store.close(timeout=0.1)):
            error, took = await _timed(call)
            assert error is None and took < 0.1 + MARGIN_S, (error, took)
        gate.set()
        await asyncio.gather(*jobs)
        return gone, kept

    gone, kept = asyncio.run(main())
    backend.requires("reopen")
    with backend.open_store() as reopened:
        with pytest.raises(ThreadDiscarded):
            reopened.read_history(gone)
        assert reopened.flush(kept, timeout=30).item_count == 1


def test_a_close_cancelled_before_its_hop_started_still_closes(backend: Backend, gate: threading.Event,
        busy_executor: Callable[[int], ThreadPoolExecutor]) -> None:
    busy = busy_executor(1)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        store = await backend.open_async(executor=busy)
        await store.create_thread()
        jobs = await _fill_executor(loop, busy, 1, gate)
        closing = asyncio.create_task(store.close())
        await asyncio.sleep(0)  # let it queue its hop
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        gate.set()
        await asyncio.gather(*jobs)
        backend.requires("reopen")
        await until(lambda: _reopens(backend), "the store closed all the same")

    asyncio.run(main())


async def _reopens(backend: Backend) -> bool:
    try:
        backend.open_store().close()
    except StoreLocked:
        return False
    return True


def test_calls_never_queue_behind_the_applications_jobs_on_the_default_executor(
        backend: Backend, gate: threading.Event) -> None:
    """The store runs its blocking calls on an executor of its own (issue: a busy default
    executor delayed appends by a second)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=2))
        jobs = await _fill_executor(loop, None, 2, gate)  # the application's blocking jobs
        async with backend.open_async() as store:
            tid = await asyncio.wait_for(store.create_thread(), 60)
            assert await asyncio.wait_for(store.append(tid, [user_msg("not delayed")]), 60) == 1
            meta = await asyncio.wait_for(store.flush(tid), 60)
            page = await asyncio.wait_for(store.list_threads(), 60)
            assert meta.title == "not delayed" and [m.thread_id for m in page.threads] == [tid]
            assert not gate.is_set() and not any(job.done() for job in jobs)
            names = await asyncio.wait_for(store._call(lambda: threading.current_thread().name), 60)
            assert names.startswith("thread_store-aio")
        gate.set()
        await asyncio.gather(*jobs)

    asyncio.run(main())


def test_a_given_executor_runs_the_calls_and_outlives_the_store(backend: Backend) -> None:
    mine = ThreadPoolExecutor(max_workers=1, thread_name_prefix="app-pool")

    async def main() -> None:
        async with backend.open_async(executor=mine) as store:
            assert (await store._call(lambda: threading.current_thread().name)).startswith("app-pool")
        assert mine.submit(lambda: 7).result(timeout=60) == 7  # close() left it running

    try:
        asyncio.run(main())
    finally:
        mine.shutdown()
    with pytest.raises(InvalidArgument):
        backend.open_async(executor="four threads")  # type: ignore[arg-type]
