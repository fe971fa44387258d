"""The storage ports (``thread_store.storage``) tested directly, with no ThreadStore above.

Every guarantee the ports' docstrings state, on every backend: a new backend must pass
these before the contract suite can mean anything on it. The rows are built by hand.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterator

import pytest
from conftest import Backend, in_thread

from thread_store import InvalidArgument, StoreClosed, ThreadDiscarded, ThreadExists, ThreadNotFound
from thread_store.model import (BehindThread, EncodedItem, FailedThread, ThreadMetadata,
                                us_from_utc)
from thread_store.storage import (Appended, Capabilities, Checkpoint, CommitOutcome, CommitResult,
                                  Failure, IdempotencyKey, Lag, ListQuery, RowWrite, Storage,
                                  StoredPage, StoredRow, StoredTraces, decode_cursor)

HANG = 30.0  # generous timeout that only catches hangs
MARGIN = 2.0  # a bounded wait returns within its bound plus this
BASE = datetime(2024, 5, 1, tzinfo=timezone.utc)
CREATED_US = us_from_utc(BASE)


@pytest.fixture
def storage(backend: Backend) -> Storage:
    """A fresh, writable storage of each backend (closed after the test)."""
    return backend.open_storage()


def item(n: int) -> EncodedItem:
    """An encoded item whose text and time tell ``n``."""
    return EncodedItem(f'{{"type":"response_item","payload":{{"n":{n}}}}}', CREATED_US + n, "response_item")


def row(thread_id: str, projected_seq: int, *, minutes: int = 0, state: str = '{"s": 1}',
        **fields: object) -> RowWrite:
    """A projected row written by hand: ``recency_at`` is ``BASE`` plus ``minutes``."""
    meta = ThreadMetadata(thread_id=thread_id, created_at=BASE, updated_at=BASE,
                          recency_at=BASE + timedelta(minutes=minutes), item_count=projected_seq,
                          projected_seq=projected_seq, **fields)  # type: ignore[arg-type]
    return RowWrite(meta, state, incarnation=UNKNOWN_INCARNATION)


#: ``row()`` leaves the incarnation to :func:`commit`, which reads the live thread's.
UNKNOWN_INCARNATION = -1


def thread(storage: Storage, thread_id: str, head: int) -> None:
    """Make the thread's history hold at least ``head`` items (creating the thread)."""
    try:
        have = storage.history.head(thread_id)
    except ThreadNotFound:
        storage.history.create(thread_id, created_us=CREATED_US, first=None)
        have = 0
    if have < head:
        storage.history.append(thread_id, [item(n) for n in range(have + 1, head + 1)])


def commit(storage: Storage, *rows: RowWrite, may_write: Callable[[str], bool] = lambda t: True,
           deadline: float | None = None) -> CommitResult:
    """One group commit of the rows, as the projector makes it: of threads whose history
    holds each row's ``projected_seq`` (written here first where it does not)."""
    for written in rows:
        thread(storage, written.meta.thread_id, written.meta.projected_seq)
    rows = tuple(replace(r, incarnation=storage.history.incarnation(r.meta.thread_id))
                 if r.incarnation == UNKNOWN_INCARNATION else r for r in rows)
    return storage.index.commit(rows, position=storage.history.position(), may_write=may_write,
                                deadline=deadline)


def seqs(storage: Storage, thread_id: str, after: int = 0, upto: int = 1000, limit: int = 1000) -> list[int]:
    return [r.seq for r in storage.history.read(thread_id, after, upto, limit)]


def gone(storage: Storage, thread_id: str, error: type[Exception]) -> None:
    """Every history call on the thread raises ``error``; reads find nothing."""
    for call in (lambda: storage.history.head(thread_id),
                 lambda: storage.history.created_us(thread_id),
                 lambda: storage.history.append(thread_id, [item(1)])):
        with pytest.raises(error, match=re.escape(repr(thread_id))):
            call()
    assert storage.history.read(thread_id, 0, 1000, 1000) == []
    assert thread_id not in storage.history.heads()


# -- HistoryLog --------------------------------------------------------------------------------

def test_create_with_or_without_a_first_item(storage: Storage) -> None:
    history = storage.history
    history.create("empty", created_us=CREATED_US, first=None)
    history.create("one", created_us=CREATED_US + 5, first=item(7))
    assert (history.head("empty"), history.created_us("empty")) == (0, CREATED_US)
    assert (history.head("one"), history.created_us("one")) == (1, CREATED_US + 5)
    assert history.read("one", 0, 10, 10) == [StoredRow(1, item(7).ts_us, item(7).text)]
    assert history.heads() == {"empty": 0, "one": 1}


def test_a_taken_id_is_refused_and_left_alone(storage: Storage) -> None:
    storage.history.create("t", created_us=CREATED_US, first=item(1))
    with pytest.raises(ThreadExists, match="'t'"):
        storage.history.create("t", created_us=CREATED_US + 9, first=item(2))
    assert (storage.history.head("t"), storage.history.created_us("t")) == (1, CREATED_US)
    assert storage.history.read("t", 0, 10, 10)[0].text == item(1).text


def test_unknown_threads_are_not_found(storage: Storage) -> None:
    gone(storage, "nobody", ThreadNotFound)


def test_a_discarded_id_stays_discarded(storage: Storage) -> None:
    storage.history.create("t", created_us=CREATED_US, first=item(1))
    storage.remove_thread("t", tombstone=True)
    gone(storage, "t", ThreadDiscarded)
    with pytest.raises(ThreadDiscarded, match="'t'"):
        storage.history.create("t", created_us=CREATED_US, first=None)
    gone(storage, "t", ThreadDiscarded)


def test_a_deleted_id_is_free_again_with_a_new_history(storage: Storage) -> None:
    storage.history.create("t", created_us=CREATED_US, first=item(1))
    storage.history.append("t", [item(2)], IdempotencyKey("k", "digest-1"))
    storage.remove_thread("t", tombstone=False)
    gone(storage, "t", ThreadNotFound)
    storage.history.create("t", created_us=CREATED_US + 1, first=None)
    assert (storage.history.head("t"), storage.history.created_us("t")) == (0, CREATED_US + 1)
    # The key went with the old thread: the same key with other items is a new append.
    assert storage.history.append("t", [item(3)], IdempotencyKey("k", "digest-2")) == Appended(1, True)


def test_append_allocates_contiguous_seqs_per_thread(storage: Storage) -> None:
    history = storage.history
    history.create("a", created_us=CREATED_US, first=item(0))
    history.create("b", created_us=CREATED_US, first=None)
    assert history.append("a", [item(1), item(2), item(3)]) == Appended(4, written=True)
    assert history.append("b", [item(4)]) == Appended(1, written=True)
    assert history.append("a", [item(5)]) == Appended(5, written=True)
    rows = history.read("a", 0, 100, 100)
    assert rows == [StoredRow(seq, it.ts_us, it.text)
                    for seq, it in enumerate([item(0), item(1), item(2), item(3), item(5)], 1)]
    assert [r.kind for r in rows] == [None] * 5  # read back from storage: the type is not kept
    assert history.heads() == {"a": 5, "b": 1}


@pytest.mark.parametrize(("after", "upto", "limit"), [(0, 100, 100), (1, 4, 100), (1, 100, 2),
                                                     (5, 100, 100), (0, 0, 100)])
def test_a_page_is_the_read_as_columns(storage: Storage, after: int, upto: int, limit: int) -> None:
    history = storage.history
    history.create("a", created_us=CREATED_US, first=item(0))
    history.append("a", [item(1), item(2), item(3), item(4)])
    rows = history.read("a", after, upto, limit)
    page = history.read_page("a", after, upto, limit)
    assert (list(page.texts), list(page.ts_us)) == ([r.text for r in rows], [r.ts_us for r in rows])
    assert page.last_seq == (rows[-1].seq if rows else 0)
    assert history.read_page("nobody", 0, 10, 10) == StoredPage(0, (), ())


def test_creation_times_are_read_for_live_threads_only(storage: Storage) -> None:
    history = storage.history
    for n, thread_id in enumerate(["a", "b", "gone", "deleted"]):
        history.create(thread_id, created_us=CREATED_US + n, first=None)
    storage.remove_thread("gone", tombstone=True)
    storage.remove_thread("deleted", tombstone=False)
    asked = ["a", "b", "gone", "deleted", "nobody"]
    assert history.created_times(asked) == {"a": CREATED_US, "b": CREATED_US + 1}
    assert history.created_times(asked) == {t: history.created_us(t) for t in ("a", "b")}


def test_an_empty_append_writes_nothing_and_returns_the_head(storage: Storage) -> None:
    storage.history.create("t", created_us=CREATED_US, first=item(1))
    assert storage.history.append("t", []) == Appended(1, written=False)
    assert storage.history.append("t", [], IdempotencyKey("k", "d")) == Appended(1, written=False)
    assert seqs(storage, "t") == [1]
    # The empty append recorded no key: the key is still free for other items.
    assert storage.history.append("t", [item(2)], IdempotencyKey("k", "other")) == Appended(2, True)


def test_a_repeated_idempotency_key_returns_the_first_generation(storage: Storage) -> None:
    history = storage.history
    history.create("t", created_us=CREATED_US, first=None)
    history.create("u", created_us=CREATED_US, first=None)
    first = history.append("t", [item(1), item(2)], IdempotencyKey("turn-1", "d1"))
    assert first == Appended(2, written=True)
    assert history.append("t", [item(3)]) == Appended(3, written=True)
    assert history.append("t", [item(1), item(2)], IdempotencyKey("turn-1", "d1")) == Appended(2, False)
    with pytest.raises(InvalidArgument, match="turn-1"):
        history.append("t", [item(9)], IdempotencyKey("turn-1", "d9"))
    assert seqs(storage, "t") == [1, 2, 3] and history.head("t") == 3
    # Keys are scoped to their thread.
    assert history.append("u", [item(9)], IdempotencyKey("turn-1", "d9")) == Appended(1, True)


def test_read_pages_within_its_bounds(storage: Storage) -> None:
    storage.history.create("t", created_us=CREATED_US, first=None)
    storage.history.append("t", [item(n) for n in range(1, 11)])
    assert seqs(storage, "t", after=2, upto=6) == [3, 4, 5, 6]
    assert seqs(storage, "t", after=2, upto=6, limit=2) == [3, 4]
    assert seqs(storage, "t", after=0, upto=10, limit=1) == [1]
    assert seqs(storage, "t", after=9) == [10]
    assert seqs(storage, "t", after=10) == []
    assert seqs(storage, "t", after=5, upto=5) == []
    assert seqs(storage, "t", after=6, upto=3) == []
    assert [r.text for r in storage.history.read("t", 4, 6, 10)] == [item(5).text, item(6).text]


def traceparent(n: int) -> str:
    """A distinct W3C traceparent for append ``n``."""
    return f"00-{n:032x}-{n:016x}-01"


def test_read_many_gives_each_range_what_read_page_gives(storage: Storage) -> None:
    thread(storage, "a", 5)
    thread(storage, "b", 3)
    storage.history.create("empty", created_us=CREATED_US, first=None)
    ranges = [("a", 1, 5), ("b", 0, 2), ("empty", 0, 9), ("unknown", 0, 9)]
    got = storage.history.read_many(ranges, 3)
    assert got["a"] == storage.history.read_page("a", 1, 5, 3)
    assert (got["a"].last_seq, len(got["a"].texts)) == (4, 3)
    assert got["b"] == storage.history.read_page("b", 0, 2, 3) and got["b"].last_seq == 2
    # A thread with no items in its range has an empty page or none.
    assert all(t not in got or not got[t].texts for t in ("empty", "unknown"))


def test_an_append_stores_its_trace_context_with_its_last_item(storage: Storage) -> None:
    history = storage.history
    history.create("t", created_us=CREATED_US, first=item(0))  # creates store no context
    history.append("t", [item(1), item(2)], trace=traceparent(1))  # seq 2..3
    history.append("t", [item(3)])  # untraced: nothing stored (seq 4)
    history.append("t", [item(4)], IdempotencyKey("k", "d"), trace=traceparent(4))  # seq 5
    assert history.append("t", [item(4)], IdempotencyKey("k", "d"),
                          trace=traceparent(9)) == Appended(5, written=False)  # stores nothing
    history.append("t", [item(5), item(6), item(7)], trace=traceparent(5))  # seq 6..8
    assert history.traces("t", 0, 8, 128) == StoredTraces((traceparent(1), traceparent(4),
                                                           traceparent(5)))
    # A context belongs to its append's last item: ranges of seqs select by it.
    assert history.traces("t", 0, 2, 128) == StoredTraces(())
    assert history.traces("t", 2, 3, 128) == StoredTraces((traceparent(1),))
    assert history.traces("t", 3, 7, 128) == StoredTraces((traceparent(4),))
    assert history.traces("t", 5, 8, 128) == StoredTraces((traceparent(5),))
    # Bounded in seq order, the rest counted.
    assert history.traces("t", 0, 8, 2) == StoredTraces((traceparent(1), traceparent(4)), dropped=1)
    assert history.traces("t", 0, 8, 1) == StoredTraces((traceparent(1),), dropped=2)
    # The items themselves read back as before.
    assert seqs(storage, "t") == list(range(1, 9))
    assert [r.text for r in history.read("t", 1, 3, 10)] == [item(1).text, item(2).text]


def test_no_thread_has_trace_contexts_once_gone(storage: Storage) -> None:
    assert storage.history.traces("nobody", 0, 10, 128) == StoredTraces(())
    for tid, tombstone in (("discarded", True), ("deleted", False)):
        storage.history.create(tid, created_us=CREATED_US, first=None)
        storage.history.append(tid, [item(1)], trace=traceparent(1))
        assert storage.history.traces(tid, 0, 1, 128) == StoredTraces((traceparent(1),))
        storage.remove_thread(tid, tombstone=tombstone)
        assert storage.history.traces(tid, 0, 1, 128) == StoredTraces(())
    # A new thread under a deleted id has only its own.
    storage.history.create("deleted", created_us=CREATED_US, first=None)
    storage.history.append("deleted", [item(1)])
    assert storage.history.traces("deleted", 0, 1, 128) == StoredTraces(())


def test_position_never_goes_down(storage: Storage) -> None:
    marks = [storage.history.position()]
    storage.history.create("t", created_us=CREATED_US, first=item(1))
    marks.append(storage.history.position())
    storage.history.append("t", [item(2), item(3)])
    marks.append(storage.history.position())
    assert all(isinstance(m, int) and m >= 0 for m in marks)
    assert marks == sorted(marks)


def test_rejected_writes_raise_store_closed_and_write_nothing(storage: Storage) -> None:
    storage.history.create("t", created_us=CREATED_US, first=item(1))
    storage.reject_writes()
    for call in (lambda: storage.history.create("new", created_us=CREATED_US, first=None),
                 lambda: storage.history.append("t", [item(2)])):
        with pytest.raises(StoreClosed):
            call()
    assert storage.history.heads() == {"t": 1}
    assert storage.history.head("t") == 1  # reads go on


# -- MetadataIndex -----------------------------------------------------------------------------

def test_commit_writes_each_row_with_its_projected_seq(storage: Storage) -> None:
    a, b = row("a", 3, title="A", token_usage={"total": 5}), row("b", 1, state='{"b": true}')
    result = commit(storage, a, b)
    assert result == CommitResult(CommitOutcome.COMMITTED)
    assert storage.index.read("a") == a.meta and storage.index.read("b") == b.meta
    assert storage.index.checkpoint("a") == Checkpoint(3, a.fold_state, None)
    assert storage.index.checkpoint("b") == Checkpoint(1, '{"b": true}', None)
    newer = row("a", 4, title="A2")
    commit(storage, newer)
    assert storage.index.read("a") == newer.meta
    assert storage.index.checkpoint("a").projected_seq == 4


def test_checkpoints_are_the_rows_checkpoints_of_the_live_thread(storage: Storage) -> None:
    thread(storage, "a", 3)
    thread(storage, "norow", 1)
    commit(storage, row("a", 3, state='{"a": 3}'))
    got = storage.index.checkpoints(["a", "norow", "unknown"])
    assert set(got) == {"a"}
    assert (got["a"].projected_seq, got["a"].fold_state) == (3, '{"a": 3}')
    # Where the backend gives the row's incarnation, it is the live thread's.
    assert got["a"].incarnation in (None, storage.history.incarnation("a"))


def test_a_stored_row_never_moves_back(storage: Storage) -> None:
    commit(storage, row("a", 5, title="five"))
    result = commit(storage, row("a", 3, title="three"))  # a slower process's older fold
    assert result == CommitResult(CommitOutcome.COMMITTED)
    assert storage.index.checkpoint("a").projected_seq == 5
    assert storage.index.read("a") == row("a", 5, title="five").meta


def test_incarnation_tells_a_recreated_id_from_its_predecessor(storage: Storage) -> None:
    storage.history.create("t", created_us=CREATED_US, first=item(1))
    first = storage.history.incarnation("t")
    assert storage.history.incarnation("t") == first
    storage.remove_thread("t", tombstone=False)
    with pytest.raises(ThreadNotFound):
        storage.history.incarnation("t")
    storage.history.create("t", created_us=CREATED_US, first=item(1))
    assert storage.history.incarnation("t") != first
    storage.history.create("d", created_us=CREATED_US, first=None)
    storage.remove_thread("d", tombstone=True)
    with pytest.raises(ThreadDiscarded):
        storage.history.incarnation("d")


def test_a_row_of_a_removed_or_recreated_thread_is_gone_not_written(storage: Storage) -> None:
    commit(storage, row("old", 1, title="before"), row("kept", 1))
    stale = replace(row("old", 2, title="stale"), incarnation=storage.history.incarnation("old"))
    storage.remove_thread("old", tombstone=False)
    storage.history.create("old", created_us=CREATED_US, first=item(1))  # the id, taken again
    result = commit(storage, stale, row("kept", 2))
    assert (result.outcome, result.gone) == (CommitOutcome.COMMITTED, frozenset({"old"}))
    assert storage.index.read("old") is None  # the new thread has no row yet: nothing stale
    assert storage.index.checkpoint("kept").projected_seq == 2
    storage.remove_thread("kept", tombstone=True)
    late = replace(row("kept", 3), incarnation=UNKNOWN_INCARNATION + 1)
    assert storage.index.commit([late], position=0, may_write=lambda t: True,
                                deadline=None).gone == frozenset({"kept"})
    assert storage.index.read("kept") is None


def test_stale_names_threads_behind_for_longer_than_asked(storage: Storage) -> None:
    commit(storage, row("caught-up", 1))
    storage.history.create("behind", created_us=time.time_ns() // 1000, first=None)  # now
    storage.history.append("behind", [item(1), item(2)])
    assert storage.stale(3600.0) == []  # behind only for a moment
    time.sleep(0.01)  # time must pass for "older than" to hold
    assert [(lag.thread_id, lag.head) for lag in storage.stale(0.001)] == [("behind", 2)]
    assert [lag.thread_id for lag in storage.stale(0.0)] == ["behind"]


def test_rows_read_back_share_nothing_with_their_writer_or_each_other(storage: Storage) -> None:
    written = row("a", 1, token_usage={"total": 5, "details": {"cached": 1}})
    commit(storage, written)
    assert written.meta.token_usage is not None
    written.meta.token_usage["details"]["cached"] = -1
    first = storage.index.read("a")
    assert first is not None and first.token_usage == {"total": 5, "details": {"cached": 1}}
    first.token_usage["total"] = -1  # type: ignore[index]
    listed = storage.index.list(ListQuery(limit=10, include_empty=True)).threads
    assert [m.token_usage for m in listed] == [{"total": 5, "details": {"cached": 1}}]


def test_a_thread_without_a_row_is_at_zero(storage: Storage) -> None:
    storage.history.create("t", created_us=CREATED_US, first=item(1))
    assert storage.index.read("t") is None
    assert storage.index.checkpoint("t") == Checkpoint(0, None, None)
    assert storage.index.checkpoint("never-created") == Checkpoint(0, None, None)


def test_a_row_may_write_refuses_is_skipped_alone(storage: Storage) -> None:
    asked: list[str] = []

    def may_write(thread_id: str) -> bool:
        asked.append(thread_id)
        return thread_id != "removing"

    result = commit(storage, row("kept", 1), row("removing", 1), may_write=may_write)
    assert (result.outcome, result.refused, dict(result.errors)) == (
        CommitOutcome.COMMITTED, frozenset({"removing"}), {})
    assert sorted(asked) == ["kept", "removing"]
    assert storage.index.read("removing") is None
    assert storage.index.checkpoint("removing") == Checkpoint(0, None, None)
    assert storage.index.read("kept") is not None


def test_a_row_the_index_cannot_store_fails_alone(storage: Storage) -> None:
    result = commit(storage, row("good", 1, title="fine"), row("bad", 1, title="lone \ud800"))
    assert result.outcome is CommitOutcome.COMMITTED and set(result.errors) == {"bad"}
    assert storage.index.read("bad") is None and storage.index.read("good") is not None


def test_a_large_group_commit_writes_every_row_and_a_bad_one_fails_alone(storage: Storage) -> None:
    # More rows than SQLite writes in one statement, and a row behind the stored one
    # (which stays): each row is as if committed alone.
    commit(storage, row("ahead", 5, title="kept text"))
    rows = [row(f"t{i:02}", 1, minutes=i, title=f"title {i:02}", preview=f"preview {i:02}")
            for i in range(75)]
    result = commit(storage, *rows, row("ahead", 3, title="older text"))
    assert (result.outcome, dict(result.errors)) == (CommitOutcome.COMMITTED, {})
    listed = storage.index.list(ListQuery(limit=100, include_empty=True)).threads
    assert sorted((m.thread_id, m.title, m.preview) for m in listed) == [
        ("ahead", "kept text", None), *((f"t{i:02}", f"title {i:02}", f"preview {i:02}") for i in range(75))]
    found = storage.index.list(ListQuery(limit=100, include_empty=True, words=("preview", "64")))
    assert [m.thread_id for m in found.threads] == ["t64"]
    assert storage.index.list(ListQuery(limit=10, include_empty=True, words=("older",))).threads == []
    # A bad row among many: the others are written all the same.
    rows = [row(f"t{i:02}", 2, minutes=i, title=f"again {i:02}") for i in range(75)]
    rows[40] = row("bad", 1, title="lone \ud800")
    result = commit(storage, *rows)
    assert result.outcome is CommitOutcome.COMMITTED and set(result.errors) == {"bad"}
    assert storage.index.read("bad") is None
    again = storage.index.list(ListQuery(limit=100, include_empty=True, words=("again",))).threads
    assert {m.title for m in again} == {f"again {i:02}" for i in range(75) if i != 40}

def test_after_fence_nothing_is_written(storage: Storage) -> None:
    commit(storage, row("a", 1))
    thread(storage, "c", 1)
    assert storage.index.fence(HANG) is True
    assert commit(storage, row("a", 2), row("b", 1)).outcome is CommitOutcome.FENCED
    storage.index.record_failures([Failure("c", 1, "too late")])
    assert storage.index.checkpoint("a").projected_seq == 1
    assert storage.index.read("b") is None
    assert storage.index.checkpoint("c") == Checkpoint(0, None, None)
    with pytest.raises(StoreClosed, match="'a'"):
        storage.remove_thread("a", tombstone=True)
    assert storage.index.read("a") is not None and seqs(storage, "a") == [1, 2]  # nothing removed


@pytest.fixture
def held_write_lock(storage: Storage) -> Iterator[threading.Event]:
    """Another thread holds the index's write lock until the event is set."""
    lock = getattr(storage.index, "write_lock", None)
    if lock is None:
        pytest.skip("this backend's index exposes no write lock to hold")
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            taken.set()
            assert release.wait(HANG)

    holder, out = in_thread(hold)
    assert taken.wait(HANG)
    yield release
    release.set()
    holder.join(HANG)
    assert "error" not in out, out


def test_commit_past_its_deadline_is_busy_and_writes_nothing(storage: Storage,
                                                             held_write_lock: threading.Event) -> None:
    for wait in (0.05, 0.0, -1.0):
        started = time.monotonic()
        result = commit(storage, row("a", 1), deadline=started + wait)
        assert result == CommitResult(CommitOutcome.BUSY)
        assert time.monotonic() - started < max(wait, 0) + MARGIN
    held_write_lock.set()
    assert storage.index.checkpoint("a") == Checkpoint(0, None, None)
    assert commit(storage, row("a", 1), deadline=time.monotonic() + HANG).outcome is CommitOutcome.COMMITTED


def test_fence_waits_for_the_writer_within_its_timeout_and_fences_all_the_same(
        storage: Storage, held_write_lock: threading.Event) -> None:
    started = time.monotonic()
    assert storage.index.fence(0.05) is False
    assert time.monotonic() - started < 0.05 + MARGIN
    held_write_lock.set()
    assert commit(storage, row("a", 1)).outcome is CommitOutcome.FENCED
    assert storage.index.read("a") is None


def test_a_recorded_failure_shows_until_a_commit_covers_it(storage: Storage) -> None:
    thread(storage, "t", 3)
    storage.index.record_failures([Failure("t", 3, "RuntimeError: boom")])
    assert storage.index.checkpoint("t") == Checkpoint(0, None, "RuntimeError: boom")
    commit(storage, row("t", 2))  # an older generation's success does not clear it
    assert storage.index.checkpoint("t") == Checkpoint(2, '{"s": 1}', "RuntimeError: boom")
    commit(storage, row("t", 3))
    assert storage.index.checkpoint("t") == Checkpoint(3, '{"s": 1}', None)


def test_a_failure_a_row_already_covers_is_not_recorded(storage: Storage) -> None:
    commit(storage, row("t", 5))
    thread(storage, "other", 1)
    storage.index.record_failures([Failure("t", 4, "older"), Failure("t", 5, "same generation"),
                                   Failure("other", 1, "recorded")])
    assert storage.index.checkpoint("t").last_error is None
    assert storage.index.checkpoint("other").last_error == "recorded"
    storage.index.record_failures([Failure("t", 6, "newer")])
    assert storage.index.checkpoint("t").last_error == "newer"


# -- MetadataIndex.list ----------------------------------------------------------------------------

@pytest.fixture
def listed(storage: Storage) -> Storage:
    """Rows to list: recency (minutes) tells the order, newest first."""
    commit(storage,
           row("pigs", 1, minutes=9, title="Three little pigs", preview="Three little pigs", cwd="/farm"),
           row("wolf", 1, minutes=8, title="The big bad wolf", preview="huff and puff", cwd="/farm"),
           row("cjk", 1, minutes=7, first_user_message="修复不稳定的测试", preview="修复不稳定的测试"),
           row("named", 1, minutes=6, name="Deploy Runbook", preview="something else", cwd="/ops"),
           row("empty", 1, minutes=5, title=None, preview=None, cwd="/farm"),
           row("old", 1, minutes=4, title="archived pigs", preview="archived pigs",
               archived_at=BASE, cwd="/farm"))
    return storage


def listed_ids(storage: Storage, **query: object) -> list[str]:
    page = storage.index.list(ListQuery(limit=100, **query))  # type: ignore[arg-type]
    assert page.next_cursor is None
    return [m.thread_id for m in page.threads]


def test_list_filters_archived_empty_and_cwd(listed: Storage) -> None:
    assert listed_ids(listed) == ["pigs", "wolf", "cjk", "named"]
    assert listed_ids(listed, include_empty=True) == ["pigs", "wolf", "cjk", "named", "empty"]
    assert listed_ids(listed, archived=True) == ["old"]
    assert listed_ids(listed, cwd="/farm") == ["pigs", "wolf"]
    assert listed_ids(listed, cwd="/farm", include_empty=True) == ["pigs", "wolf", "empty"]
    assert listed_ids(listed, cwd="/fa") == []  # the cwd exactly, not a prefix
    assert [m.title for m in listed.index.list(ListQuery(limit=1)).threads] == ["Three little pigs"]


@pytest.mark.parametrize(("words", "expected"), [
    (("thr",), ["pigs"]),  # a prefix, not a whole word
    (("THREE",), ["pigs"]),
    (("ttle",), ["pigs"]),  # inside a word
    (("three", "pigs"), ["pigs"]),  # ANDed
    (("three", "wolf"), []),
    (("pigs",), ["pigs"]),  # the archived one only with archived=True
    (("huff", "wolf"), ["wolf"]),  # the words may match different fields
    (("测试",), ["cjk"]),  # two characters inside a longer CJK run
    (("不稳定",), ["cjk"]),
    (("runbook",), ["named"]), (("ru",), ["named"]),  # the user-set name
    (("ig",), ["pigs", "wolf"]), (("IG",), ["pigs", "wolf"]),  # short words too, any (ASCII) case
    (("absent",), []),
])
def test_list_search_words_are_case_insensitive_substrings_anded(
        listed: Storage, words: tuple[str, ...], expected: list[str]) -> None:
    assert listed_ids(listed, words=words) == expected


def test_list_search_reaches_archived_and_empty_threads_only_when_asked(listed: Storage) -> None:
    assert listed_ids(listed, words=("pigs",), archived=True) == ["old"]
    assert listed_ids(listed, words=("wolf",), include_empty=True) == ["wolf"]


@pytest.mark.parametrize("query", [ListQuery(limit=2), ListQuery(limit=1, include_empty=True),
                                   ListQuery(limit=1, cwd="/farm"), ListQuery(limit=1, words=("e",))])
def test_list_pages_by_keyset_with_the_cursor(listed: Storage, query: ListQuery) -> None:
    whole = listed_ids(listed, archived=query.archived, include_empty=query.include_empty,
                       words=query.words, cwd=query.cwd)
    assert len(whole) > query.limit  # more than one page
    pages: list[list[str]] = []
    while True:
        page = listed.index.list(query)
        pages.append([m.thread_id for m in page.threads])
        assert len(page.threads) <= query.limit
        if page.next_cursor is None:
            break
        query = replace(query, after=decode_cursor(page.next_cursor, query.filters()))
    assert [t for p in pages for t in p] == whole
    assert all(pages)  # no empty page, not even the last one


def test_list_keyset_breaks_recency_ties_by_thread_id(storage: Storage) -> None:
    commit(storage, *(row(f"t{n}", 1, preview="p") for n in range(5)))  # one recency for all
    query, seen = ListQuery(limit=2), []
    while True:
        page = storage.index.list(query)
        seen += [m.thread_id for m in page.threads]
        if page.next_cursor is None:
            break
        query = replace(query, after=decode_cursor(page.next_cursor, query.filters()))
    assert seen == ["t4", "t3", "t2", "t1", "t0"]


def test_a_cursor_is_bound_to_its_query(listed: Storage) -> None:
    cursor = listed.index.list(ListQuery(limit=1)).next_cursor
    assert cursor is not None
    assert decode_cursor(cursor, ListQuery(limit=5).filters()) == (
        us_from_utc(BASE + timedelta(minutes=9)), "pigs")
    with pytest.raises(InvalidArgument, match="next_cursor"):
        decode_cursor(cursor, ListQuery(limit=1, archived=True).filters())


# -- Storage -------------------------------------------------------------------------------------

def test_a_fresh_storage(storage: Storage, backend: Backend) -> None:
    assert storage.capabilities == backend.capabilities
    assert isinstance(storage.capabilities, Capabilities)
    assert storage.read_only is False
    assert storage.path == backend.path
    assert isinstance(storage.description, str) and storage.description
    assert storage.lagging() == []
    assert storage.history.heads() == {}
    assert isinstance(storage.housekeeping_due_at(), float)
    storage.housekeep()  # never raises


def test_report_counts_live_threads_those_behind_and_failures_without_writing(storage: Storage) -> None:
    history = storage.history
    history.create("done", created_us=CREATED_US, first=item(1))
    commit(storage, row("done", 1))
    a_created = time.time_ns() // 1000
    history.create("a-old", created_us=a_created, first=item(1))  # behind since its creation
    history.create("b-new", created_us=a_created + 1, first=None)
    history.append("b-new", [item(1), item(2), item(3)])
    commit(storage, row("b-new", 1))
    history.create("empty", created_us=CREATED_US, first=None)  # nothing to project
    history.create("gone", created_us=CREATED_US, first=item(1))
    storage.remove_thread("gone", tombstone=True)
    storage.index.record_failures([Failure("b-new", 3, "boom b"), Failure("a-old", 1, "boom a")])
    heads, checkpoints = history.heads(), {t: storage.index.checkpoint(t) for t in history.heads()}

    report = storage.report(10)
    assert report.threads == 4  # live ones: the discarded thread is not counted
    assert (report.threads_behind, report.items_behind) == (2, 1 + 2)
    assert report.behind == [BehindThread("a-old", 1, 0), BehindThread("b-new", 3, 1)]  # longest first
    assert report.oldest_behind_since is not None
    assert report.failed == [FailedThread("a-old", "boom a"), FailedThread("b-new", "boom b")]
    assert report.schema_version and all(isinstance(v, int) for v in report.schema_version.values())
    limited = storage.report(1)
    assert (limited.threads_behind, limited.behind, limited.failed) == (
        2, [BehindThread("a-old", 1, 0)], [FailedThread("a-old", "boom a")])
    # Reporting wrote nothing.
    assert history.heads() == heads
    assert {t: storage.index.checkpoint(t) for t in heads} == checkpoints

    commit(storage, row("a-old", 1), row("b-new", 3))
    caught_up = storage.report(10)
    assert (caught_up.threads_behind, caught_up.items_behind, caught_up.behind) == (0, 0, [])
    assert caught_up.oldest_behind_since is None and caught_up.failed == []


def test_remove_thread_takes_the_row_the_failure_and_the_history(storage: Storage) -> None:
    for thread_id in ("discarded", "deleted", "kept"):
        storage.history.create(thread_id, created_us=CREATED_US, first=item(1))
        commit(storage, row(thread_id, 1, preview=thread_id))
        storage.index.record_failures([Failure(thread_id, 2, "failed")])
    storage.remove_thread("discarded", tombstone=True)
    storage.remove_thread("deleted", tombstone=False)
    for thread_id, error in (("discarded", ThreadDiscarded), ("deleted", ThreadNotFound)):
        assert storage.index.read(thread_id) is None
        assert storage.index.checkpoint(thread_id) == Checkpoint(0, None, None)
        gone(storage, thread_id, error)
    assert listed_ids(storage) == ["kept"]
    assert storage.index.checkpoint("kept") == Checkpoint(1, '{"s": 1}', "failed")
    assert storage.history.heads() == {"kept": 1}


def test_reopened_storage_lags_by_the_threads_behind(backend: Backend, storage: Storage) -> None:
    storage.history.create("no-row", created_us=CREATED_US, first=item(1))
    storage.history.create("caught-up", created_us=CREATED_US, first=item(1))
    storage.history.create("behind", created_us=CREATED_US, first=item(1))
    storage.history.append("behind", [item(2)])
    commit(storage, row("caught-up", 1), row("behind", 1))
    storage.close()
    backend.requires("reopen")
    reopened = backend.open_storage()
    lagging = sorted(reopened.lagging(), key=lambda lag: lag.thread_id)
    assert lagging == [Lag("behind", 2, 1), Lag("no-row", 1, None)]
    assert [lag.refold for lag in lagging] == [False, True]
    assert reopened.index.read("caught-up") == row("caught-up", 1).meta
    assert reopened.history.heads() == {"no-row": 1, "caught-up": 1, "behind": 2}


def test_backup_copies_into_a_new_directory_where_the_backend_can(storage: Storage, backend: Backend,
                                                                  tmp_path: Path) -> None:
    storage.history.create("t", created_us=CREATED_US, first=item(1))
    commit(storage, row("t", 1, preview="copied"))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(InvalidArgument):
        storage.backup(taken)  # not a new directory, or no backup at all
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]
    copy = tmp_path / "copy"
    if not backend.capabilities.backup:
        with pytest.raises(InvalidArgument):
            storage.backup(copy)
        assert not copy.exists()
        return
    storage.backup(copy)
    copied = backend.open_storage(copy)
    assert copied.history.heads() == {"t": 1}
    assert copied.index.read("t") == row("t", 1, preview="copied").meta


def test_abandon_lets_another_opener_in(storage: Storage, backend: Backend) -> None:
    storage.history.create("t", created_us=CREATED_US, first=item(1))
    storage.abandon()
    backend.requires("reopen")
    other = backend.open_storage()  # the lock is released: no StoreLocked
    assert other.history.heads() == {"t": 1}
