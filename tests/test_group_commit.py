"""Group commit of appends on SQLite (issue 15 point 3): concurrent appenders of a process
share one transaction and one fsync, and no append returns before its own items are
durable.

A group is formed deterministically: the test holds the writers' file lock
(``history.lock``) from another open file description, as another process would; the
appending threads then wait for it (the leader in ``flock``, the followers queued), and
releasing it lets the leader commit them all at once. Faults are real SQLite failures
raised inside the store's own connection (the one place these tests reach inside): a
deferred foreign key that fails the COMMIT, and a trigger that aborts one statement.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable

import pytest
from conftest import in_thread, plain, wait_for

from thread_store import (InvalidArgument, OutcomeUnknown, StorageError, StoreClosed, ThreadDiscarded,
                          ThreadNotFound, ThreadStore)
from thread_store.backends.sqlite import _filelock
from thread_store.backends.sqlite._group import GroupCommit
from thread_store.backends.sqlite.history import History
from thread_store.model import EncodedItem

WRITERS = 8


def _history(store: ThreadStore) -> History:
    history = store._storage.history  # type: ignore[attr-defined]
    assert isinstance(history, History)
    return history


def _grouped(store: ThreadStore, calls: list[Callable[[], object]]) -> list[dict[str, object]]:
    """Run ``calls`` in threads so that they commit as one group; their outcomes, in order."""
    history = _history(store)
    with _filelock.hold(store_dir(store) / "history.lock"):
        started = [in_thread(call) for call in calls]
        # One leader waits in flock, the others queue behind it.
        wait_for(lambda: history._group.queued() == len(calls) - 1, "the followers to queue")
    for thread, _ in started:
        thread.join(timeout=30.0)
        assert not thread.is_alive(), "an append of the group never returned"
    return [out for _, out in started]


def store_dir(store: ThreadStore) -> Path:
    path = store._storage.path  # type: ignore[attr-defined]
    assert isinstance(path, Path)
    return path


def _stored(store: ThreadStore, thread_id: str) -> list[dict[str, Any]]:
    """The thread's items as a separate connection reads them from ``history.db``."""
    conn = sqlite3.connect(f"file:{store_dir(store) / 'history.db'}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT item FROM items WHERE thread_id = ? ORDER BY seq",
                            (thread_id,)).fetchall()
    finally:
        conn.close()
    return [json.loads(text) for (text,) in rows]


def _on_writer(history: History, *statements: str) -> None:
    """Run statements on the history's writer connection, between its writes."""
    with history.lock:
        for statement in statements:
            history._conn.execute(statement)


def _fail_commits(history: History) -> None:
    """Every later transaction that inserts an item fails at COMMIT: the trigger leaves a
    deferred foreign key unresolved, which SQLite checks only when the transaction commits."""
    _on_writer(history, "PRAGMA foreign_keys = ON",
               "CREATE TEMP TABLE fence (id INTEGER PRIMARY KEY)",
               "CREATE TEMP TABLE dangling (ref INTEGER REFERENCES fence (id) "
               "DEFERRABLE INITIALLY DEFERRED)",
               "CREATE TEMP TRIGGER fail_commit AFTER INSERT ON main.items "
               "BEGIN INSERT INTO dangling VALUES (1); END")


def test_concurrent_appends_share_one_commit(store_path: Path) -> None:
    """Eight appends that queue while the writer lock is held commit in one transaction."""
    with ThreadStore.open(store_path, durability="full") as store:
        tids = [store.create_thread() for _ in range(WRITERS)]
        history = _history(store)
        before = history.append_commits
        outs = _grouped(store, [lambda t=t: store.append(t, [plain(1)]) for t in tids])
        assert [out.get("result") for out in outs] == [1] * WRITERS
        assert history.append_commits - before == 1
        assert all(_stored(store, t) == [plain(1)] for t in tids)


def test_failed_group_commit_fails_every_append_of_the_group(store_path: Path) -> None:
    """The leader's COMMIT fails: every follower gets the error, none reports success,
    nothing of the group is stored, and later appends continue from the old heads."""
    with ThreadStore.open(store_path, durability="full") as store:
        tids = [store.create_thread() for _ in range(WRITERS)]
        for t in tids:
            store.append(t, [plain(0)])
        history = _history(store)
        _fail_commits(history)
        followed = history._group.followed
        outs = _grouped(store, [lambda t=t: store.append(t, [plain(1), plain(2)] if t == tids[0]
                                                           else [plain(1)]) for t in tids])
        assert history._group.followed - followed == WRITERS - 1  # one group
        assert not [out for out in outs if "result" in out], "an append of a failed group succeeded"
        for out in outs:
            error = out["error"]
            assert isinstance(error, StorageError), error
            assert "nothing of this call was written" in str(error)
            assert isinstance(error.__cause__, sqlite3.IntegrityError)
        with pytest.raises(StorageError):  # alone, in autocommit, it fails the same way
            store.append(tids[1], [plain(1)])
        assert all(_stored(store, t) == [plain(0)] for t in tids)
        _on_writer(history, "DROP TRIGGER temp.fail_commit")
        assert [store.append(t, [plain(3)]) for t in tids] == [2] * WRITERS
        store.flush_all(timeout=30.0)
        assert all(store.read_thread(t).item_count == 2 for t in tids)


def test_an_append_that_fails_in_a_group_fails_alone(store_path: Path) -> None:
    """Bad input, an idempotency conflict, a discarded thread or a failed statement fail
    only their own append, which writes nothing; the rest of the group commits."""
    with ThreadStore.open(store_path) as store:
        one, two, three, four, gone = (store.create_thread() for _ in range(5))
        store.append(two, [plain(0)], idempotency_key="used")
        store.discard(gone)
        history = _history(store)
        _on_writer(history, "CREATE TEMP TRIGGER abort_poison BEFORE INSERT ON main.items "
                            "WHEN new.item LIKE '%poison%' BEGIN SELECT RAISE(ABORT, 'poisoned'); END")
        poison = {"type": "response_item", "payload": {"type": "message", "text": "poison"}}
        calls: dict[str, Callable[[], object]] = {
            "single": lambda: store.append(one, [plain(1)]),
            "several": lambda: store.append(one, [plain(2), plain(3)]),
            "unknown": lambda: store.append("no-such-thread", [plain(1)]),
            "discarded": lambda: store.append(gone, [plain(1)]),
            "conflict": lambda: store.append(two, [plain(9)], idempotency_key="used"),
            "poisoned": lambda: store.append(two, [plain(5), poison]),
            "after poison": lambda: store.append(two, [plain(6)]),
            "keyed": lambda: store.append(three, [plain(7)], idempotency_key="k"),
            "keyed again": lambda: store.append(three, [plain(7)], idempotency_key="k"),
            "poisoned alone": lambda: store.append(four, [poison]),
            "beside it": lambda: store.append(four, [plain(8)]),
        }
        outs = dict(zip(calls, _grouped(store, list(calls.values()))))
        assert isinstance(outs["unknown"]["error"], ThreadNotFound)
        assert isinstance(outs["discarded"]["error"], ThreadDiscarded)
        assert isinstance(outs["conflict"]["error"], InvalidArgument)
        assert isinstance(outs["poisoned"]["error"], StorageError)
        assert "poisoned" in str(outs["poisoned"]["error"])
        assert isinstance(outs["poisoned alone"]["error"], StorageError)
        assert outs["beside it"]["result"] == 1 and _stored(store, four) == [plain(8)]
        # The same thread twice in one group: consecutive seqs, in the group's order.
        single, several = outs["single"]["result"], outs["several"]["result"]
        assert (single, several) in ((1, 3), (3, 2))
        assert _stored(store, one) == ([plain(1), plain(2), plain(3)] if single == 1
                                       else [plain(2), plain(3), plain(1)])
        # Nothing of the poisoned append (not even its first item), the next one stored.
        assert _stored(store, two) == [plain(0), plain(6)]
        assert outs["after poison"]["result"] == 2
        # A key repeated within one group is written once; both get its generation.
        assert outs["keyed"]["result"] == outs["keyed again"]["result"] == 1
        assert _stored(store, three) == [plain(7)]
        store.flush_all(timeout=30.0)
        assert [store.read_thread(t).item_count for t in (one, two, three, four)] == [3, 2, 1, 1]


def test_traced_appends_keep_their_trace_context_in_a_group(store_path: Path) -> None:
    """Each append of a group stores its own traceparent with its last item, traced and
    untraced appends mixed (the port, below the store's tracing)."""
    with ThreadStore.open(store_path) as store:
        tids = [store.create_thread() for _ in range(4)]
        history = _history(store)
        item = EncodedItem(text=json.dumps(plain(1)), ts_us=1, kind="response_item")
        parent = [f"00-{n:032x}-{n:016x}-01" for n in range(1, 5)]
        plan = [(tids[0], 1, parent[0]), (tids[1], 1, None), (tids[2], 2, parent[2]),
                (tids[3], 1, parent[3]), (tids[0], 1, None), (tids[0], 1, parent[1])]
        outs = _grouped(store, [lambda t=t, n=n, p=p: history.append(t, [item] * n, None, p)
                                for t, n, p in plan])
        assert all("result" in out for out in outs), outs
        # The three appends to the first thread commit in the order they queued.
        assert [sorted(history.traces(t, 0, 10, 10).traceparents) for t in tids] == [
            [parent[0], parent[1]], [], [parent[2]], [parent[3]]]


def test_an_uncontended_append_commits_on_its_callers_thread(store_path: Path) -> None:
    """No hand-off on the hot path: each INSERT runs on the thread that appends."""
    with ThreadStore.open(store_path) as store:
        tid = store.create_thread()
        history = _history(store)
        inserted_by: list[int] = []
        with history.lock:
            history._conn.create_function("note_thread", 0,
                                          lambda: inserted_by.append(threading.get_ident()))
        _on_writer(history, "CREATE TEMP TRIGGER note AFTER INSERT ON main.items "
                            "BEGIN SELECT note_thread(); END")
        callers = []
        for n in range(5):
            thread, out = in_thread(lambda n=n: store.append(tid, [plain(n)]))
            thread.join(timeout=30.0)
            assert out["result"] == n + 1
            callers.append(thread.ident)
        assert inserted_by == callers
        assert history._group.followed == 0


def test_reads_of_the_head_and_position_do_not_wait_for_a_commit(store_path: Path) -> None:
    """While a commit holds the history lock (here: waiting for the writers' file lock),
    ``head``, ``status``, the position and the incarnations still answer."""
    with ThreadStore.open(store_path) as store:
        tid = store.create_thread()
        store.append_and_flush(tid, [plain(1)], timeout=30.0)
        history = _history(store)
        with _filelock.hold(store_dir(store) / "history.lock"):
            appending, out = in_thread(lambda: store.append(tid, [plain(2)]))
            wait_for(lambda: history.lock.locked(), "the append to hold the history lock")
            reads, got = in_thread(lambda: (history.head(tid), history.position(),
                                            history.incarnations([tid]), store.status(tid).head_seq))
            reads.join(timeout=10.0)
            assert not reads.is_alive(), "a read waited for the commit"
            head, position, incarnations, status_head = got["result"]  # type: ignore[misc]
            assert (head, status_head) == (1, 1) and position >= 1 and tid in incarnations
        appending.join(timeout=30.0)
        assert out["result"] == 2 and history.head(tid) == 2


def test_closing_beside_group_commits(store_path: Path) -> None:
    """Appenders racing ``close``: every append that returned is stored at its generation,
    and every one that did not raised ``StoreClosed``."""
    store = ThreadStore.open(store_path, durability="full")
    tids = [store.create_thread() for _ in range(WRITERS)]
    acked: dict[str, list[int]] = {t: [] for t in tids}
    errors: list[BaseException] = []
    history = _history(store)

    def writer(thread_id: str) -> None:
        n = 0
        while True:
            try:
                acked[thread_id].append(store.append(thread_id, [plain(n)]))
            except BaseException as exc:  # noqa: BLE001 - collected for the assertions
                errors.append(exc)
                return
            n += 1

    threads = [threading.Thread(target=writer, args=(t,)) for t in tids]
    for thread in threads:
        thread.start()
    wait_for(lambda: history._group.followed > 50, "appends to commit in groups")
    store.close(timeout=10.0)
    for thread in threads:
        thread.join(timeout=30.0)
    assert len(errors) == WRITERS and all(isinstance(e, StoreClosed) for e in errors), errors
    with ThreadStore.open(store_path) as reopened:
        for t in tids:
            assert acked[t] == list(range(1, len(acked[t]) + 1))
            assert [i.item for i in reopened.read_history(t)] == [plain(n) for n in range(len(acked[t]))]


def test_a_broken_leader_leaves_no_follower_waiting() -> None:
    """A leader whose commit raises: its followers get ``OutcomeUnknown`` (the commit
    may have reached the disk), and the lead passes on, so later requests still commit."""
    release = threading.Event()

    def commit(own: int, group: GroupCommit[int, int]) -> int:
        if own == 0:
            release.wait(30.0)
            group.take()
            raise RuntimeError("the disk went away")
        for pending in group.take():
            pending.resolve(pending.request)
        return own

    group: GroupCommit[int, int] = GroupCommit(commit)
    leader = in_thread(lambda: group.submit(0))
    wait_for(lambda: group._leading, "the leader")
    followers = [in_thread(lambda n=n: group.submit(n)) for n in (1, 2, 3)]
    wait_for(lambda: group.queued() == 3, "the followers to queue")
    release.set()
    for thread, _ in [leader, *followers]:
        thread.join(timeout=30.0)
    assert isinstance(leader[1]["error"], RuntimeError)
    for _, out in followers:
        assert isinstance(out["error"], OutcomeUnknown)
        assert isinstance(out["error"].__cause__, RuntimeError)
    assert group.submit(7) == 7 and not group._leading
