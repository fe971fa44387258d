"""DESIGN §1.11 and §6: several processes open one embedded store for writing.

Every test runs real writer processes (``_writer_child.py``, one JSON command a line on
stdin, one JSON reply a line on stdout) beside stores of this process, on one store
directory, through the public API only. The test and its children hand off through those
replies, files a projection hook creates, and ``wait_for`` with generous timeouts; no test
sleeps to synchronise, and no timeout here measures speed: each only catches a hang.

Where the test process's store must not do the work on its own, it is opened with a
``catch_up_after`` no test lives to see (:data:`NEVER`): a barrier that returns then proves
the barrier did (or took over) the work. A store that must catch up opens *before* the work
it catches up is appended, so the catch-up at ``open`` cannot be what finds it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

import pytest
from _child import Ack, assert_acknowledged, assert_converged
from _writer_child import ChildError, WriterChild
from conftest import Backend, Spawn, in_thread, plain, user_msg, wait_for

from thread_store import InvalidArgument, ThreadDiscarded, ThreadMetadata, ThreadStore

#: A ``catch_up_after`` that never comes within a test: only barriers do this store's work.
NEVER = 600.0
#: A ``catch_up_after`` short enough to wait for.
SOON = 0.5
#: Timeouts of barriers and waits: they only catch hangs, never measure speed.
HANG = 30.0

def _status(store: ThreadStore, thread_id: str) -> tuple[int, int, bool]:
    status = store.status(thread_id)
    return status.head_seq, status.projected_seq, status.pending


def _child_status(child: WriterChild, thread_id: str) -> tuple[int, int, bool]:
    status = child.call("status", thread_id=thread_id)
    return status["head_seq"], status["projected_seq"], status["pending"]


def _names_pid(message: str, pid: int) -> bool:
    return re.search(rf"\b{pid}\b", message) is not None


# -- concurrent appends: gap-free generations, acknowledged items in place, the fold -----------


def _concurrent_appends(store: ThreadStore, spawn: Spawn, *, children: int, count: int,
                        threads: int, kill: int | None = None) -> None:
    """``children`` processes append ``count`` items each to the same ``threads`` threads at
    once (every tenth an ``append_and_flush``, so projections race too); child ``kill`` (if
    any) is SIGKILLed midway. Then every thread's seqs are 1..N, every acknowledged
    generation holds its child's item, and after ``flush_all`` the rows are the fold."""
    tids = [store.create_thread(f"shared-{t}") for t in range(threads)]
    writers = [spawn() for _ in range(children)]
    for c, writer in enumerate(writers):
        writer.send("burst", child=f"c{c}", threads=tids, count=count, seed=c, flush_every=10)
    if kill is not None:
        wait_for(lambda: sum(store.status(t).head_seq for t in tids) >= count, "the burst under way",
                 timeout=HANG)
        writers[kill].kill()
    acked = {f"c{c}": writer.reply() for c, writer in enumerate(writers) if c != kill}

    for child, acks in acked.items():
        assert [n for _, _, n, _ in acks] == list(range(count)), child
    # (the killed child's items are whatever it committed, each once)
    assert_acknowledged(store, tids, [Ack(tid, generation, (f"{child}/{n}",), flushed)
                                      for child, acks in acked.items()
                                      for tid, generation, n, flushed in acks],
                        complete=kill is None)

    assert assert_converged(store, timeout=HANG) == threads
    for c, writer in enumerate(writers):  # status is the store's, the same from every process
        if c != kill:
            for tid in tids:
                head = len(store.read_history(tid, limit=100_000))
                assert _child_status(writer, tid) == (head, head, False), (c, tid)
            writer.exit()


def test_concurrent_appends_from_several_processes_keep_every_thread_whole(
        shared_backend: Backend, spawn: Spawn) -> None:
    _concurrent_appends(shared_backend.open_store(), spawn, children=3, count=200, threads=5)


@pytest.mark.slow
def test_concurrent_appends_from_several_processes_keep_every_thread_whole_long(
        shared_backend: Backend, spawn: Spawn) -> None:
    _concurrent_appends(shared_backend.open_store(), spawn, children=4, count=2000, threads=8)


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(5))
def test_concurrent_appends_with_a_writer_killed_midway_long(
        shared_backend: Backend, spawn: Spawn, round_: int) -> None:
    _concurrent_appends(shared_backend.open_store(), spawn, children=3, count=1000, threads=5,
                        kill=round_ % 3)


# -- barriers across processes -----------------------------------------------------------------


def test_flush_waits_for_appends_of_another_process(shared_backend: Backend, spawn: Spawn) -> None:
    """§1.11: a generation is a position in the store; B's flush covers A's appends, and the
    default target is the head in the store at call time (B has no state for the thread)."""
    b = shared_backend.open_store(catch_up_after=NEVER)
    a = spawn()
    a.call("pause")  # so B must do or take over the work
    tid = a.call("create", metadata={"cwd": "/from/a"})
    generation = a.call("append", thread_id=tid, items=[user_msg("asked in A"), plain()])
    assert generation == 3
    meta = b.flush(tid, timeout=HANG)
    assert (meta.projected_seq, meta.title, meta.cwd, meta.item_count) == (3, "asked in A", "/from/a", 3)
    assert b.read_thread(tid) == meta
    assert _child_status(a, tid) == (3, 3, False)  # A sees the store's state, paused or not
    a.exit()


def test_flush_wakes_when_the_projection_of_another_process_commits(
        shared_backend: Backend, spawn: Spawn, tmp_path: Path) -> None:
    """A waiter in B is served by A's attempt in flight (or takes the work over): it returns
    once a projection covering its target commits, whichever process ran it."""
    b = shared_backend.open_store(catch_up_after=NEVER)
    a = spawn(block_threads=["gated"], signal_dir=str(tmp_path))
    a.call("create", thread_id="gated")
    generation = a.call("append", thread_id="gated", items=[user_msg("projected in A")])
    wait_for((tmp_path / "gated.entered").exists, "A's attempt in flight", timeout=HANG)
    waiter, out = in_thread(lambda: b.flush("gated", timeout=HANG))
    wait_for(lambda: b.status("gated").waiters == 1 or not waiter.is_alive(), "B's waiter",
             timeout=HANG)
    (tmp_path / "gated.release").touch()
    waiter.join(HANG + 10)
    assert not waiter.is_alive(), "B's flush outlived its timeout"
    assert "error" not in out, out
    meta = out["result"]
    assert isinstance(meta, ThreadMetadata)
    assert (meta.projected_seq, meta.title) == (generation, "projected in A")
    assert _child_status(a, "gated") == (1, 1, False)
    a.exit()


def test_a_barrier_never_waits_on_a_dead_process(shared_backend: Backend, spawn: Spawn) -> None:
    """A appended with its projection paused and died: B's barrier does the work itself."""
    b = shared_backend.open_store(catch_up_after=NEVER)
    a = spawn()
    a.call("pause")
    tid = a.call("create")
    generation = a.call("append", thread_id=tid, items=[user_msg("left by A"), plain()])
    a.kill()
    meta = b.flush(tid, timeout=HANG)
    assert (meta.projected_seq, meta.title, meta.item_count) == (generation, "left by A", 2)
    assert _status(b, tid) == (2, 2, False)


def test_a_process_killed_mid_projection_blocks_no_one(shared_backend: Backend, spawn: Spawn,
                                                       tmp_path: Path) -> None:
    """§6: a process that dies inside a projection attempt (its hook holds it there) leaves
    nothing that blocks the others: B's barrier and B's discard go ahead at once."""
    b = shared_backend.open_store(catch_up_after=NEVER)
    a = spawn(block_threads=["stuck", "gone"], signal_dir=str(tmp_path))
    for tid in ("stuck", "gone"):
        a.call("create", thread_id=tid)
        assert a.call("append", thread_id=tid, items=[user_msg(f"{tid} in A")]) == 1
    wait_for(lambda: any(tmp_path.glob("*.entered")), "A's attempt in flight", timeout=HANG)
    a.kill()
    b.discard("gone", timeout=HANG)  # no DiscardTimeout: a dead process's attempt is over
    meta = b.flush("stuck", timeout=HANG)
    assert (meta.projected_seq, meta.title) == (1, "stuck in A")
    other = b.create_thread()
    assert b.append_and_flush(other, [user_msg("life goes on")], timeout=HANG).title == "life goes on"
    with pytest.raises(ThreadDiscarded):
        b.read_thread("gone")
    assert assert_converged(b, timeout=HANG) == 2


def test_work_of_a_killed_process_is_caught_up_without_a_barrier(shared_backend: Backend,
                                                                  spawn: Spawn) -> None:
    """§1.11: live processes catch up a dead one's work within ``catch_up_after``, with no
    restart and no barrier (B never flushes here)."""
    b = shared_backend.open_store(catch_up_after=SOON)  # open before A appends
    a = spawn()
    a.call("pause")
    tid = a.call("create")
    generation = a.call("append", thread_id=tid, items=[user_msg("orphaned"), plain()])
    a.kill()
    wait_for(lambda: b.status(tid).projected_seq == generation, "B's catch-up", timeout=HANG)
    assert _status(b, tid) == (2, 2, False)
    assert b.read_thread(tid).title == "orphaned"


def test_a_paused_process_work_is_taken_over_by_barriers_and_caught_up_by_others(
        shared_backend: Backend, spawn: Spawn) -> None:
    """§1.11: ``pause_projection`` holds only its own process. Other processes' barriers
    take its work over at once (``flush`` and ``flush_all`` in B, whose catch-up never
    comes), and their catch-up reaches it after ``catch_up_after`` (C, with no barrier)."""
    b = shared_backend.open_store(catch_up_after=NEVER)
    a = spawn()
    a.call("pause")
    x, y, z = (a.call("create", thread_id=t) for t in ("x", "y", "z"))
    assert a.call("append", thread_id=x, items=[user_msg("x by A")]) == 1
    assert a.call("append", thread_id=y, items=[user_msg("y by A"), plain()]) == 2
    assert b.flush(x, timeout=HANG).title == "x by A"
    b.flush_all(timeout=HANG)  # takes y over too: a thread this process never touched
    assert _status(b, y) == (2, 2, False)
    assert b.read_thread(y).title == "y by A"

    c = spawn(options={"catch_up_after": SOON})  # after the barriers, before A appends z
    assert a.call("append", thread_id=z, items=[user_msg("z by A")]) == 1
    wait_for(lambda: _child_status(c, z) == (1, 1, False), "C's catch-up", timeout=HANG)
    assert b.read_thread(z).title == "z by A"
    assert _child_status(a, z) == (1, 1, False)  # still paused, and sees it done
    a.exit()
    c.exit()


# -- removal across processes ------------------------------------------------------------------


def test_discard_in_one_process_is_final_in_another(shared_backend: Backend, spawn: Spawn) -> None:
    """§1.7, §1.11: after A discards, B's calls raise ThreadDiscarded, and B's own pending
    work for the thread never writes it back."""
    b = shared_backend.open_store()
    tid = b.create_thread()
    b.append_and_flush(tid, [user_msg("ephemeral")], timeout=HANG)
    b.pause_projection()
    assert b.append(tid, [plain()]) == 2  # work B holds for the thread, not yet projected
    a = spawn()
    a.call("discard", thread_id=tid, timeout=HANG)
    b.resume_projection()  # its stale work may run now: it must find the tombstone
    calls: dict[str, Callable[[], object]] = {
        "append": lambda: b.append(tid, [plain()]),
        "append_and_flush": lambda: b.append_and_flush(tid, [plain()], timeout=HANG),
        "read_thread": lambda: b.read_thread(tid),
        "read_history": lambda: b.read_history(tid),
        "flush": lambda: b.flush(tid, timeout=HANG),
        "status": lambda: b.status(tid),
        "create_thread": lambda: b.create_thread(tid),
    }
    returned = []
    for name, call in calls.items():
        try:
            call()
            returned.append(name)
        except ThreadDiscarded:
            pass
    assert not returned, f"on a thread discarded in another process, {returned} did not raise"
    b.flush_all(timeout=HANG)
    assert tid not in {m.thread_id for m in b.list_threads(include_empty=True).threads}
    with pytest.raises(ThreadDiscarded):
        b.read_thread(tid)
    fresh = spawn()  # a process that never knew the thread finds the tombstone too
    assert fresh.error("read_thread", thread_id=tid).kind == "ThreadDiscarded"
    assert fresh.error("append", thread_id=tid, items=[plain()]).kind == "ThreadDiscarded"
    a.exit()
    fresh.exit()


def test_delete_and_recreate_in_one_process_beats_stale_state_in_another(
        shared_backend: Backend, spawn: Spawn) -> None:
    """§1.11: none can write a projection over a newer one. B projected the old thread
    and holds work for it; A deletes the id and creates it anew; B's stale state never
    writes old metadata into the new thread, and B's appends continue the new one."""
    b = shared_backend.open_store()
    tid = "reused-id"
    b.create_thread(tid)
    assert b.append(tid, [user_msg("old"), plain(1), plain(2)]) == 3
    assert b.flush(tid, timeout=HANG).title == "old"
    b.pause_projection()
    assert b.append(tid, [plain(3)]) == 4  # stale work B holds for the old thread
    a = spawn()
    a.call("delete", thread_id=tid)
    assert a.call("create", thread_id=tid) == tid
    assert a.call("append", thread_id=tid, items=[user_msg("new")]) == 1
    b.resume_projection()
    meta = b.flush(tid, timeout=HANG)
    assert (meta.title, meta.projected_seq, meta.item_count) == ("new", 1, 1)
    assert b.read_thread(tid) == meta
    assert b.append(tid, [plain(4)]) == 2
    meta = b.flush(tid, timeout=HANG)
    assert (meta.title, meta.projected_seq, meta.item_count) == ("new", 2, 2)
    assert [s.item for s in b.read_history(tid)] == [user_msg("new"), plain(4)]
    assert a.call("read_thread", thread_id=tid)["title"] == "new"
    assert assert_converged(b, timeout=HANG) == 1
    a.exit()


# -- idempotency, status, rules ----------------------------------------------------------------


def test_idempotency_key_holds_across_processes(shared_backend: Backend, spawn: Spawn) -> None:
    """§3: a key is the thread's, whichever process appended first; racing the same keyed
    append from two processes writes it once and gives both the same generation."""
    b = shared_backend.open_store()
    tid = b.create_thread()
    a = spawn()
    items = [user_msg("once"), plain(1)]
    assert a.call("append", thread_id=tid, items=items, idempotency_key="K") == 2
    assert b.append(tid, items, idempotency_key="K") == 2
    with pytest.raises(InvalidArgument):
        b.append(tid, [plain(2)], idempotency_key="K")
    assert b.append(tid, [plain(3)], idempotency_key="L") == 3
    assert a.call("append", thread_id=tid, items=[plain(3)], idempotency_key="L") == 3
    assert a.error("append", thread_id=tid, items=[plain(4)], idempotency_key="L").kind == "InvalidArgument"
    expected = [*items, plain(3)]

    c = spawn()
    for n in range(10):
        raced = [plain(100 + n), plain(200 + n)]
        for writer in (a, c):
            writer.send("append", thread_id=tid, items=raced, idempotency_key=f"race-{n}")
        generations = {a.reply(), c.reply()}
        expected += raced
        assert generations == {len(expected)}, n
    assert [s.item for s in b.read_history(tid)] == expected
    assert b.append(tid, [plain(109), plain(209)], idempotency_key="race-9") == len(expected)
    assert b.flush(tid, timeout=HANG).item_count == len(expected)
    a.exit()
    c.exit()


def test_status_is_the_stores_from_every_process(shared_backend: Backend, spawn: Spawn) -> None:
    """§1.11: an attempt that failed for good in A (A's hook refuses the thread) shows as
    ``last_error`` in B; B's successful flush (B has no hook) clears it for A too."""
    b = shared_backend.open_store()
    tid = b.create_thread()
    b.pause_projection()  # so only A attempts the thread, until B flushes
    a = spawn(fail_threads=[tid])
    assert a.call("append", thread_id=tid, items=[user_msg("refused in A")]) == 1
    assert a.error("flush", thread_id=tid, timeout=HANG).kind == "ProjectionFailed"
    in_a = a.call("status", thread_id=tid)
    assert "refuses" in (in_a["last_error"] or ""), in_a
    in_b = b.status(tid)
    assert (in_b.head_seq, in_b.projected_seq, in_b.pending) == (1, 0, True)
    assert "refuses" in (in_b.last_error or ""), in_b
    b.resume_projection()
    assert b.flush(tid, timeout=HANG).title == "refused in A"
    in_a = a.call("status", thread_id=tid)
    assert (in_a["head_seq"], in_a["projected_seq"], in_a["pending"], in_a["last_error"]) == (
        1, 1, False, None)
    assert b.status(tid).last_error is None
    a.exit()


def test_other_fold_rules_are_refused_beside_a_writer(shared_backend: Backend, spawn: Spawn) -> None:
    """§1.11: the fold rules belong to the store, also while another process writes."""
    b = shared_backend.open_store()
    b.append_and_flush(b.create_thread(), [user_msg("folded by the default rules")], timeout=HANG)
    a = spawn(open=False)
    place = shared_backend.place
    refused = a.error("open", path=str(place.target), options=dict(place.options), other_rules=True)
    assert refused.kind == "InvalidArgument", refused
    a.call("open", path=str(place.target), options=dict(place.options))  # its own rules open
    a.exit()


# -- shutdown ----------------------------------------------------------------------------------


def test_close_drains_its_own_work_and_leaves_the_rest(shared_backend: Backend, spawn: Spawn) -> None:
    """§1.8: ``close`` drains what its process accepted (A's coalescing delay would hold it
    for a minute) and leaves other processes' work behind, for them."""
    b = shared_backend.open_store()
    a = spawn(options={"coalesce_delay": 60.0, "catch_up_after": NEVER})
    b.pause_projection()  # so B projects nothing, A's or its own
    left = b.create_thread()
    assert b.append(left, [user_msg("B's, left behind")]) == 1  # after A opened: not A's to find
    mine = a.call("create")
    assert a.call("append", thread_id=mine, items=[user_msg("A's own")]) == 1
    a.call("close", timeout=10.0)
    a.exit()
    assert _status(b, mine) == (1, 1, False)
    assert b.read_thread(mine).title == "A's own"
    assert _status(b, left) == (1, 0, True)
    b.resume_projection()
    assert b.flush(left, timeout=HANG).title == "B's, left behind"


# -- what still needs the store to itself ------------------------------------------------------


def test_rebuild_index_needs_the_store_to_itself(shared_backend: Backend, spawn: Spawn) -> None:
    """§7: with writers open, a rebuild raises StoreLocked naming them, and changes nothing;
    read-only stores may stay open, and follow the rebuilt index."""
    shared_backend.requires("exclusive_rebuild")
    place = shared_backend.place
    where = {"path": str(place.target), "options": dict(place.options)}
    b = shared_backend.open_store()
    tid = b.create_thread()
    b.append_and_flush(tid, [user_msg("kept")], timeout=HANG)
    c = spawn()  # a second writer
    a = spawn(open=False)
    refused = a.error("rebuild_index", **where)
    assert refused.kind == "StoreLocked", refused
    assert _names_pid(refused.message, os.getpid()) and _names_pid(refused.message, c.pid), refused
    assert b.append_and_flush(tid, [plain()], timeout=HANG).title == "kept"
    assert c.call("read_thread", thread_id=tid)["item_count"] == 2

    c.exit()
    refused = a.error("rebuild_index", **where)  # B alone still holds it
    assert refused.kind == "StoreLocked" and _names_pid(refused.message, os.getpid()), refused
    b.close()
    with place.open(read_only=True) as reader:
        assert a.call("rebuild_index", **where) == 1
        meta = reader.read_thread(tid)
        assert (meta.title, meta.item_count, meta.projected_seq) == ("kept", 2, 2)
    a.exit()


def test_two_stores_in_one_process_both_write(shared_backend: Backend) -> None:
    """§6: a second store on the same directory in the same process is one more writer."""
    first = shared_backend.open_store()
    second = shared_backend.open_store()
    tid = first.create_thread()
    assert first.append(tid, [user_msg("from the first")]) == 1
    assert second.append(tid, [plain(1)]) == 2
    meta = second.flush(tid, timeout=HANG)
    assert (meta.title, meta.projected_seq) == ("from the first", 2)
    assert first.append(tid, [plain(2)]) == 3
    assert first.flush(tid, timeout=HANG).item_count == 3
    other = second.create_thread()
    assert first.append_and_flush(other, [user_msg("from the first, too")], timeout=HANG).item_count == 1
    assert _status(first, tid) == _status(second, tid) == (3, 3, False)
    assert assert_converged(first, timeout=HANG) == 2
    second.close()
    assert first.append_and_flush(tid, [plain(3)], timeout=HANG).projected_seq == 4


def test_child_errors_are_reported_typed(spawn: Spawn, tmp_path: Path) -> None:
    """The harness itself: a command that raises comes back as its class name."""
    child = spawn(open=False)
    with pytest.raises(ChildError) as raised:
        child.call("read_thread", thread_id="x")
    assert raised.value.kind == "AssertionError"  # no store open yet
    child.call("open", path=str(tmp_path / "own"))
    assert child.error("read_thread", thread_id="nope").kind == "ThreadNotFound"
    child.exit()
