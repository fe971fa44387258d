"""store.py: the ThreadStore API end to end, in async and sync projection modes, on every
backend."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider

from conftest import Backend, CloseAfterAppend, plain, user_msg
from thread_store import (ProjectionFailed, StoreClosed, ThreadDiscarded, ThreadExists, ThreadMetadata,
                          ThreadNotFound, ThreadStore)
from thread_store.errors import DURABLE_NOTE

SESSION = {"cwd": "/repo", "model_provider": "openai", "git": {"branch": "main"}}


def test_open_creates_the_store_files(store_path: Path) -> None:
    """SQLite's own: a directory holding its two database files."""
    with ThreadStore.open(store_path) as s:
        assert s.path == store_path
        assert {"history.db", "index.db"} <= {p.name for p in store_path.iterdir()}


def test_create_thread_gives_a_uuid_or_the_given_id(store: ThreadStore) -> None:
    tid = store.create_thread()
    assert str(uuid.UUID(tid)) == tid
    assert store.create_thread("my-id:1.x_Y") == "my-id:1.x_Y"
    assert store.create_thread("x" * 128) == "x" * 128
    assert store.read_thread("my-id:1.x_Y").item_count == 0


def test_create_thread_with_metadata_writes_one_session_meta_item(store: ThreadStore) -> None:
    tid = store.create_thread(metadata=SESSION)
    (first,) = store.read_history(tid)
    assert first.seq == 1
    assert first.item == {"type": "session_meta", "payload": SESSION}
    meta = store.flush(tid, timeout=10)
    assert (meta.cwd, meta.model_provider, meta.git_branch, meta.item_count) == ("/repo", "openai", "main", 1)


@pytest.mark.parametrize("metadata", [None, {}])
def test_create_thread_without_metadata_writes_nothing(store: ThreadStore,
                                                      metadata: dict[str, str] | None) -> None:
    tid = store.create_thread(metadata=metadata)
    assert store.read_history(tid) == []
    assert store.status(tid).head_seq == 0


def test_create_thread_with_taken_id_raises(store: ThreadStore) -> None:
    store.create_thread("taken")
    store.append("taken", [plain(1)])
    with pytest.raises(ThreadExists, match="taken.*already exists"):
        store.create_thread("taken", metadata=SESSION)
    assert [i.item for i in store.read_history("taken")] == [plain(1)]


def test_append_returns_the_generation(store: ThreadStore) -> None:
    tid = store.create_thread(metadata=SESSION)
    assert store.append(tid, [plain()]) == 2
    assert store.append(tid, [plain(), plain(), plain()]) == 5
    assert store.append(tid, ()) == 5
    assert store.append(tid, []) == 5
    assert len(store.read_history(tid)) == 5
    assert store.flush(tid, timeout=10).item_count == 5


def test_read_thread_shows_the_projection(store: ThreadStore) -> None:
    tid = store.create_thread()
    store.pause_projection()
    store.append(tid, [user_msg("  first question  "), user_msg("second")])
    unprojected = store.read_thread(tid)
    assert (unprojected.title, unprojected.item_count, unprojected.projected_seq) == (None, 0, 0)
    assert unprojected.created_at is not None
    store.resume_projection()
    store.flush(tid, timeout=10)
    meta = store.read_thread(tid)
    assert (meta.title, meta.preview, meta.first_user_message) == ("first question",) * 3
    assert (meta.item_count, meta.projected_seq, meta.thread_id) == (2, 2, tid)


def test_flush_and_append_and_flush_return_covering_metadata(store: ThreadStore) -> None:
    tid = store.create_thread()
    meta = store.append_and_flush(tid, [user_msg("visible now")], timeout=10)
    assert (meta.title, meta.projected_seq) == ("visible now", 1)
    assert [t.thread_id for t in store.list_threads().threads] == [tid]
    gen = store.append(tid, [plain()])
    assert store.flush(tid, generation=gen, timeout=10).projected_seq >= gen
    assert store.flush(tid, generation=0, timeout=10).thread_id == tid


def test_update_metadata_is_a_history_item(store: ThreadStore) -> None:
    tid = store.create_thread()
    store.append(tid, [user_msg("hello")])
    meta = store.update_metadata(tid, name="  Fix the flaky test ")
    assert (meta.name, meta.item_count, meta.projected_seq) == ("Fix the flaky test", 2, 2)
    assert store.read_history(tid)[-1].item["payload"] == {"name": "  Fix the flaky test "}
    assert store.read_thread(tid).name == "Fix the flaky test"
    assert store.update_metadata(tid, name=None).name is None
    assert len(store.read_history(tid)) == 3


def test_archive_and_unarchive_are_history_items(store: ThreadStore) -> None:
    tid = store.create_thread()
    store.append(tid, [user_msg("hello")])
    archived = store.archive_thread(tid)
    assert archived.archived_at is not None and archived.item_count == 2
    assert store.read_thread(tid).archived_at == archived.archived_at
    assert store.unarchive_thread(tid).archived_at is None
    assert len(store.read_history(tid)) == 3


def test_delete_thread_forgets_the_id(backend: Backend) -> None:
    with backend.open_store() as s:
        tid = s.create_thread("gone")
        s.append_and_flush(tid, [user_msg("bye")])
        s.delete_thread(tid)
        _assert_not_found(s, tid)
        assert s.list_threads(include_empty=True).threads == []
    backend.requires("reopen")
    with backend.open_store() as s:
        _assert_not_found(s, tid)
        assert s.create_thread("gone") == "gone"  # the id is free again, with a fresh history
        assert s.append(tid, [user_msg("again")]) == 1
        assert s.flush(tid, timeout=10).title == "again"


def _assert_not_found(store: ThreadStore, tid: str) -> None:
    for call in (lambda: store.read_thread(tid), lambda: store.read_history(tid),
                 lambda: store.append(tid, [plain()]), lambda: store.flush(tid, timeout=1),
                 lambda: store.status(tid), lambda: store.delete_thread(tid)):
        with pytest.raises(ThreadNotFound, match=tid):
            call()


@pytest.fixture
def discarded(backend: Backend) -> Iterator[tuple[ThreadStore, str]]:
    """A store where thread 'eph' was discarded (with pending work) and 'kept' lives on."""
    with backend.open_store() as s:
        s.append_and_flush(s.create_thread("kept"), [user_msg("stay")])
        tid = s.create_thread("eph", metadata=SESSION)
        s.pause_projection()
        s.append(tid, [user_msg("never visible")])
        s.discard(tid, timeout=10)
        s.resume_projection()
        yield s, tid


def _assert_discarded(store: ThreadStore, tid: str) -> None:
    for call in (lambda: store.append(tid, [plain()]), lambda: store.read_thread(tid),
                 lambda: store.read_history(tid), lambda: store.flush(tid, timeout=1),
                 lambda: store.status(tid), lambda: store.create_thread(tid),
                 lambda: store.append_and_flush(tid, [plain()], timeout=1)):
        with pytest.raises(ThreadDiscarded, match=tid):
            call()
    assert [t.thread_id for t in store.list_threads(include_empty=True).threads] == ["kept"]


def test_discard_tombstones_the_thread(discarded: tuple[ThreadStore, str]) -> None:
    store, tid = discarded
    store.flush_all(timeout=10)
    _assert_discarded(store, tid)


def test_discard_survives_reopen(discarded: tuple[ThreadStore, str], backend: Backend) -> None:
    store, tid = discarded
    store.close()
    backend.requires("reopen")
    with backend.open_store() as s:
        s.flush_all(timeout=10)
        _assert_discarded(s, tid)
        assert s.read_thread("kept").title == "stay"


def test_status_reports_head_projected_and_pending(store: ThreadStore) -> None:
    tid = store.create_thread()
    store.flush(tid, timeout=10)  # the new thread's own row: no attempt of it is left running
    store.pause_projection()
    store.append(tid, [plain(), plain(), plain()])
    st = store.status(tid)
    assert (st.head_seq, st.projected_seq, st.pending, st.attempts, st.last_error, st.waiters) == \
        (3, 0, True, 0, None, 0)
    store.resume_projection()
    store.flush(tid, timeout=10)
    st = store.status(tid)
    assert (st.head_seq, st.projected_seq, st.pending, st.last_error, st.waiters) == (3, 3, False, None, 0)


def test_status_records_a_failed_projection(backend: Backend) -> None:
    def hook(thread_id: str, generation: int) -> None:
        raise RuntimeError(f"no projection for {thread_id}")

    with backend.open_store(projection_hook=hook) as s:
        tid = s.create_thread()
        s.append(tid, [plain()])
        with pytest.raises(ProjectionFailed):
            s.flush(tid, timeout=10)
        st = s.status(tid)
        assert (st.head_seq, st.projected_seq, st.pending) == (1, 0, True)
        assert st.last_error is not None and "no projection for" in st.last_error


# -- projection="sync" ----------------------------------------------------------------------

def test_sync_append_projects_before_returning(backend: Backend) -> None:
    with backend.open_store(projection="sync") as s:
        tid = s.create_thread(metadata=SESSION)
        assert s.read_thread(tid).cwd == "/repo"
        assert s.append(tid, [user_msg("projected already")]) == 2
        meta = s.read_thread(tid)
        assert (meta.title, meta.item_count, meta.projected_seq) == ("projected already", 2, 2)
        assert [t.thread_id for t in s.list_threads().threads] == [tid]
        assert s.status(tid).pending is False
        assert s.flush(tid, timeout=0) == meta  # already covered: returns at once
        assert s.append_and_flush(tid, [plain()], timeout=0).item_count == 3


def test_sync_append_raises_projection_failed_with_items_durable(backend: Backend) -> None:
    failing = {"on": True}

    def hook(thread_id: str, generation: int) -> None:
        if failing["on"]:
            raise ValueError("index is broken")

    with backend.open_store(projection="sync", projection_hook=hook) as s:
        tid = s.create_thread()
        with pytest.raises(ProjectionFailed, match="durable") as info:
            s.append(tid, [user_msg("kept anyway")])
        assert isinstance(info.value.__cause__, ValueError)
        assert [i.item for i in s.read_history(tid)] == [user_msg("kept anyway")]
        assert s.read_thread(tid).projected_seq == 0
        failing["on"] = False
        assert s.append(tid, [plain()]) == 2  # a later append retries the pending work
        assert s.read_thread(tid).title == "kept anyway"
    backend.requires("reopen")
    with backend.open_store() as s:
        assert len(s.read_history(tid)) == 2


def _wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30.0
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.002)


def test_returned_metadata_items_and_pages_are_the_callers_own(store: ThreadStore) -> None:
    usage = {"total_tokens": 7, "details": {"cached": {"input": 3}}}
    counted = {"type": "event_msg", "payload": {"type": "token_count", "info": {"total_token_usage": usage}}}
    tid = store.create_thread()
    store.pause_projection()
    store.append(tid, [user_msg("hi"), counted])
    got: list[ThreadMetadata] = []
    # Two waiters served by one attempt, so both get the row that attempt built.
    flushers = [threading.Thread(target=lambda: got.append(store.flush(tid, timeout=30))) for _ in range(2)]
    for t in flushers:
        t.start()
    _wait_until(lambda: store.status(tid).waiters == 2, "both waiters registered")
    store.resume_projection()
    for t in flushers:
        t.join(30)
    assert len(got) == 2 and got[0].token_usage == got[1].token_usage == usage
    for n, meta in enumerate(got + [store.read_thread(tid), store.list_threads().threads[0]]):
        assert meta.token_usage is not None
        meta.to_json()["token_usage"]["details"]["x"] = 1
        assert meta.token_usage == usage
        meta.token_usage["details"]["cached"]["input"] = -1
        meta.token_usage["total_tokens"] = -1
        if n == 0:
            assert got[1].token_usage == usage  # the other waiter's row is its own
    # Neither the cached fold state nor a later projection saw the mutations.
    assert store.append_and_flush(tid, [plain()], timeout=30).token_usage == usage
    assert store.read_thread(tid).token_usage == usage
    (first, *_) = store.read_history(tid)
    first.item["payload"]["message"] = "changed"
    assert store.read_history(tid)[0].item == user_msg("hi")


@pytest.mark.parametrize("call", ["append_and_flush", "update_metadata", "archive_thread",
                                  "unarchive_thread", "sync-mode append"])
def test_store_closed_between_append_and_barrier_says_the_items_are_durable(
        backend: Backend, call: str) -> None:
    closer = CloseAfterAppend()
    provider = TracerProvider()
    provider.add_span_processor(closer)
    calls: dict[str, Callable[[ThreadStore, str], object]] = {
        "append_and_flush": lambda s, t: s.append_and_flush(t, [plain()], timeout=30),
        "update_metadata": lambda s, t: s.update_metadata(t, name="n", timeout=30),
        "archive_thread": lambda s, t: s.archive_thread(t, timeout=30),
        "unarchive_thread": lambda s, t: s.unarchive_thread(t, timeout=30),
        "sync-mode append": lambda s, t: s.append(t, [plain()]),
    }
    projection = "sync" if call.startswith("sync") else "async"
    with backend.open_store(tracer_provider=provider, projection=projection) as s:
        tid = s.create_thread()
        closer.close = s.close
        with pytest.raises(StoreClosed) as info:
            calls[call](s, tid)
        assert DURABLE_NOTE in str(info.value)
    provider.shutdown()
    backend.requires("reopen")
    with backend.open_store() as reopened:
        assert len(reopened.read_history(tid)) == 1  # durable, as the error said


def test_a_barrier_on_a_closed_store_says_earlier_items_are_durable(backend: Backend) -> None:
    s = backend.open_store()
    tid = s.create_thread()
    s.pause_projection()
    s.append(tid, [plain()])
    s.close(timeout=0)
    for barrier in (lambda: s.flush(tid, timeout=1), lambda: s.flush_all(timeout=1)):
        with pytest.raises(StoreClosed) as info:
            barrier()
        assert DURABLE_NOTE in str(info.value)
