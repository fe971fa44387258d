"""DESIGN §1.8 recovery: what open() checks after a clean close, a crash and power loss.

History marks a thread behind in the append's own transaction, and acknowledgements,
batched in memory and written about once per second, clear the marks; open() reads the
marks (O(threads behind)) unless the index's epoch or its history mark says one file lost
a tail, and then compares every thread once. Power loss is simulated by putting back an
earlier copy of one file while keeping the other, which is what a lost WAL tail leaves.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest
from _child import assert_converged, assert_store_integrity, folded, live_threads
from conftest import plain, user_msg

from thread_store import ProjectionFailed, ThreadStore
from thread_store.backends.sqlite import _acks
from thread_store.backends.sqlite import history as history_module
from thread_store.backends.sqlite import index as index_module

CHILD = Path(__file__).with_name("_recovery_child.py")
#: What open() logs when it compares every thread (O(all threads)).
FULL_COMPARE = "comparing every thread"


def _marked(store_path: Path) -> set[str]:
    """The threads history has marked behind (read beside an open store: WAL allows it)."""
    with closing(sqlite3.connect(f"file:{store_path / 'history.db'}?mode=ro", uri=True)) as conn:
        return {r[0] for r in conn.execute("SELECT thread_id FROM behind")}


def _epochs(store_path: Path) -> tuple[int, int]:
    """``(index epoch, epoch history last acknowledged)`` of a closed store."""
    with closing(sqlite3.connect(store_path / "index.db")) as index, \
            closing(sqlite3.connect(store_path / "history.db")) as history:
        (epoch,), = index.execute("SELECT value FROM index_meta WHERE key = 'epoch'")
        (acked,), = history.execute("SELECT value FROM store_meta WHERE key = 'index_epoch'")
    return int(epoch), int(acked)


def _set_projected(store_path: Path, thread_id: str, projected: int, title: str) -> None:
    """Tamper with a row behind the store's back: only a full comparison would notice."""
    with closing(sqlite3.connect(store_path / "index.db")) as conn, conn:
        conn.execute("UPDATE threads SET projected_seq = ?, title = ? WHERE thread_id = ?",
                     (projected, title, thread_id))


def _held_hook(release: threading.Event):  # type: ignore[no-untyped-def]
    """A projection_hook that holds open()'s catch-up until the test has looked."""
    return lambda thread_id, generation: release.wait(30)


@contextmanager
def _open_held(store_path: Path) -> Iterator[ThreadStore]:
    """Open with catch-up held, so ``stats().pending_threads`` is what open() scheduled."""
    release = threading.Event()
    try:
        with ThreadStore.open(store_path, projection_hook=_held_hook(release)) as store:
            try:
                yield store
            finally:
                release.set()
    finally:
        release.set()


def _populate(store_path: Path, threads: int) -> list[str]:
    with ThreadStore.open(store_path) as store:
        tids = [store.create_thread() for _ in range(threads)]
        for tid in tids:
            store.append(tid, [user_msg(f"title {tid}"), plain()])
        store.flush_all(timeout=30)
    return tids


def _copy(store_path: Path, name: str, dest: Path) -> None:
    """A copy of one closed database file (close checkpointed its WAL into it)."""
    dest.mkdir(exist_ok=True)
    assert not Path(f"{store_path / name}-wal").exists()
    shutil.copy2(store_path / name, dest / name)


def _restore(saved: Path, name: str, store_path: Path) -> None:
    """Put back an earlier state of one file, as a power loss that lost its tail leaves it."""
    for suffix in ("-wal", "-shm"):
        Path(f"{store_path / name}{suffix}").unlink(missing_ok=True)
    shutil.copy2(saved / name, store_path / name)


def _run_child(*args: str) -> tuple[subprocess.Popen[str], list[str]]:
    """Start a recovery child and return it with the words of its ``ready`` line."""
    proc = subprocess.Popen([sys.executable, str(CHILD), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # EOF (a dead child) ends it too: never a hang
    if not line.startswith("ready"):
        proc.kill()
        raise AssertionError(f"child failed: {line!r} {proc.communicate(timeout=60)[1]}")
    return proc, line.split()[1:]


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -9


# -- O(threads behind) -----------------------------------------------------------------------


def test_clean_reopen_schedules_only_the_threads_left_behind(store_path: Path) -> None:
    tids = _populate(store_path, 50)
    failing = set(tids[:3])

    def hook(thread_id: str, generation: int) -> None:
        if thread_id in failing:
            raise RuntimeError("this thread's projection fails for good")

    with ThreadStore.open(store_path, projection_hook=hook) as store:
        for tid in tids[:3]:
            store.append(tid, [plain(1)])
            with pytest.raises(ProjectionFailed):
                store.flush(tid, timeout=30)
    # A caught-up thread tampered with: a scan of every thread would re-project it.
    _set_projected(store_path, tids[10], 1, "tampered")
    release = threading.Event()
    with ThreadStore.open(store_path, projection_hook=_held_hook(release)) as store:
        assert store.stats().pending_threads == 3  # what open() scheduled: the marked ones
        assert {t for t in tids if store.status(t).pending} == set(tids[:3]) | {tids[10]}
        release.set()
        for tid in tids[:3]:
            assert store.flush(tid, timeout=30).projected_seq == 3
        assert store.stats().rows_written == 3
        assert store.read_thread(tids[10]).title == "tampered"


def test_reopen_after_sigkill_schedules_only_the_threads_behind(store_path: Path) -> None:
    proc, tids = _run_child("behind", str(store_path), "50", "4", "written")
    _kill(proc)
    _set_projected(store_path, tids[10], 0, "tampered")
    release = threading.Event()
    with ThreadStore.open(store_path, projection_hook=_held_hook(release)) as store:
        assert store.stats().pending_threads == 4
        release.set()
        for tid in tids[:4]:
            meta = store.flush(tid, timeout=30)
            assert (meta.projected_seq, meta.title) == (2, f"title {tid}")
        assert store.stats().rows_written == 4
        assert store.read_thread(tids[10]).title == "tampered"


def test_the_mark_survives_a_projection_of_an_older_head(store_path: Path) -> None:
    """The mark is cleared only while history holds nothing past the projected head."""
    (tid,) = _populate(store_path, 1)
    release = threading.Event()
    started = threading.Event()

    def hook(thread_id: str, generation: int) -> None:
        if generation == 3:
            started.set()
            release.wait(30)
        elif generation == 4:
            raise RuntimeError("generation 4 stays behind")

    with ThreadStore.open(store_path, projection_hook=hook, caller_runs=False) as store:
        store.append(tid, [plain(1)])
        assert started.wait(30)  # the projection of generation 3 is running
        store.append(tid, [plain(2)])  # generation 4 lands before that projection commits
        release.set()
        assert store.flush(tid, generation=3, timeout=30).projected_seq == 3
        with pytest.raises(ProjectionFailed):
            store.flush(tid, generation=4, timeout=30)
    with _open_held(store_path) as store:
        assert store.stats().pending_threads == 1
    with ThreadStore.open(store_path) as store:
        assert store.flush(tid, timeout=30).projected_seq == 4
        assert_converged(store)


# -- power loss: one file keeps a tail the other lost -----------------------------------------


def test_index_ahead_of_history_after_power_loss_is_refolded(store_path: Path, tmp_path: Path) -> None:
    kept, gone = _populate(store_path, 2)
    saved = tmp_path / "saved"
    _copy(store_path, "history.db", saved)
    with ThreadStore.open(store_path) as store:
        store.append_and_flush(kept, [user_msg("lost"), plain(2)], timeout=30)
        born_lost = store.create_thread(metadata={"cwd": "/lost"})
        store.append_and_flush(born_lost, [user_msg("lost thread")], timeout=30)
        store.discard(gone)
    _restore(saved, "history.db", store_path)  # the history lost its tail; the index did not
    with ThreadStore.open(store_path) as store:
        assert set(live_threads(store_path)) == {kept, gone}
        assert assert_converged(store) == 2  # no row of born_lost, no items that are gone
        meta = store.read_thread(kept)
        assert (meta.projected_seq, meta.item_count, meta.title) == (2, 2, f"title {kept}")
        assert store.read_thread(gone) == folded(store, gone, live_threads(store_path)[gone])
        assert {m.thread_id for m in store.list_threads(include_empty=True).threads} == {kept, gone}
    assert_store_integrity(store_path)
    # The disagreement was settled once: the next open trusts the marks again.
    _set_projected(store_path, kept, 1, "tampered")
    with _open_held(store_path) as store:
        assert store.stats().pending_threads == 0


def test_index_behind_history_after_power_loss_catches_up(store_path: Path, tmp_path: Path) -> None:
    tids = _populate(store_path, 3)
    saved = tmp_path / "saved"
    _copy(store_path, "index.db", saved)
    with ThreadStore.open(store_path) as store:
        for tid in tids:
            store.append_and_flush(tid, [plain(7)], timeout=30)
        new = store.create_thread()
        store.append_and_flush(new, [user_msg("new")], timeout=30)
    _restore(saved, "index.db", store_path)  # the index lost its tail; the history did not
    with ThreadStore.open(store_path) as store:
        assert assert_converged(store) == 4
        assert store.read_thread(new).title == "new"
    _set_projected(store_path, new, 0, "tampered")
    with _open_held(store_path) as store:  # the epochs agree again: marks are trusted
        assert store.stats().pending_threads == 0


@pytest.mark.parametrize("rebuild", ["reindex", "corrupt index"])
def test_open_after_an_index_rebuild_trusts_the_marks_again(store_path: Path, rebuild: str) -> None:
    tids = _populate(store_path, 5)
    with ThreadStore.open(store_path) as store:  # many index transactions before the rebuild
        for n in range(10):
            for tid in tids:
                store.append_and_flush(tid, [plain(n)], timeout=30)
    if rebuild == "reindex":
        assert ThreadStore.rebuild_index(store_path) == 5
    else:
        (store_path / "index.db").write_bytes(b"not a database" * 100)
        with ThreadStore.open(store_path) as store:
            assert assert_converged(store) == 5
    _set_projected(store_path, tids[0], 1, "tampered")
    with _open_held(store_path) as store:
        assert store.stats().pending_threads == 0


def test_history_from_schema_1_is_migrated_and_compared_once(store_path: Path) -> None:
    """A store written before the per-thread marks: open migrates it and compares it all."""
    tids = _populate(store_path, 3)
    with closing(sqlite3.connect(store_path / "history.db")) as conn, conn:
        # Take the file back to version 1: no marks, no trigger, the old session marker.
        conn.execute("DROP TRIGGER items_behind")
        conn.execute("DROP TABLE behind")
        conn.execute("DROP TABLE idempotency")
        conn.execute("DELETE FROM store_meta")
        conn.execute("""INSERT INTO store_meta VALUES ('session', '{"clean": true, "behind": []}')""")
        conn.execute("INSERT INTO items (thread_id, seq, ts_us, item) VALUES (?, 3, 1, ?)",
                     (tids[0], '{"type": "event_msg", "payload": {"type": "user_message", '
                      '"message": "appended by an old version, never projected"}}'))
        conn.execute("PRAGMA user_version = 1")
    assert history_module.SCHEMA_VERSION == 5 and index_module.SCHEMA_VERSION == 6
    with ThreadStore.open(store_path) as store:
        assert store.flush(tids[0], timeout=30).projected_seq == 3
        assert assert_converged(store) == 3
        store.append(tids[1], [plain(9)])  # the migrated trigger marks it
    with closing(sqlite3.connect(store_path / "history.db")) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == history_module.SCHEMA_VERSION
        assert conn.execute("SELECT count(*) FROM store_meta WHERE key = 'session'").fetchone()[0] == 0


# -- a crash in the middle of a discard --------------------------------------------------------


def test_sigkill_between_index_and_history_removal_leaves_the_thread_whole(
        store_path: Path) -> None:
    """DESIGN §1.7: a discard that did not return changed nothing; the thread is whole."""
    kept, victim = _populate(store_path, 2)
    proc, (said,) = _run_child("discard", str(store_path), victim)
    assert said == victim
    with closing(sqlite3.connect(f"file:{store_path / 'index.db'}?mode=ro", uri=True)) as conn:
        rows = {r[0] for r in conn.execute("SELECT thread_id FROM threads")}
    assert rows == {kept}  # the child died with the row gone and the history whole
    _kill(proc)
    with ThreadStore.open(store_path) as store:
        meta = store.flush(victim, timeout=30)
        assert (meta.projected_seq, meta.title) == (2, f"title {victim}")
        assert not store.status(victim).pending
        assert victim in {m.thread_id for m in store.list_threads().threads}
        assert assert_converged(store) == 2
        store.discard(victim)  # and the discard can be retried
    with ThreadStore.open(store_path) as store:
        assert assert_converged(store) == 1


# -- lazy acknowledgements: no history write on an index commit ---------------------------------


def test_barriers_and_group_commits_write_nothing_to_history_but_the_items(
        store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An index commit adds its heads to a batch in memory; only the worker writes it."""
    monkeypatch.setattr(_acks, "INTERVAL_S", 3600.0)  # no batch comes due in this test
    tids = _populate(store_path, 20)
    with ThreadStore.open(store_path) as store:
        for tid in tids:  # state loaded and heads cached: what follows is the steady state
            store.append_and_flush(tid, [plain(0)], timeout=30)
        statements: list[str] = []
        store._history._conn.set_trace_callback(statements.append)
        for n in range(5):
            store.append_and_flush(tids[0], [plain(n)], timeout=30)  # in the caller
        for tid in tids:
            store.append(tid, [plain(9)])
        store.flush_all(timeout=30)  # a group commit in the worker
        store._history._conn.set_trace_callback(None)
        assert store.stats().transactions >= 7
        writes = [s for s in statements if not s.startswith(("SELECT", "--"))]
        assert writes and all(s.startswith("INSERT INTO items") for s in writes), writes
        assert set(tids) <= _marked(store_path)  # nothing acknowledged yet
    assert not _marked(store_path)  # close wrote the batch


def test_the_worker_writes_acknowledgements_within_about_a_second(
        store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_acks, "INTERVAL_S", 0.05)
    (tid,) = _populate(store_path, 1)
    with ThreadStore.open(store_path) as store:
        store.append_and_flush(tid, [plain(1)], timeout=30)
        deadline = time.monotonic() + 30
        while _marked(store_path) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not _marked(store_path)


def test_a_full_batch_is_written_at_once_and_heads_past_it_stay_marked(
        store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_acks, "INTERVAL_S", 3600.0)
    monkeypatch.setattr(_acks, "LIMIT", 4)
    with ThreadStore.open(store_path) as store:
        tids = [store.create_thread() for _ in range(4)]
        for tid in tids:
            store.append_and_flush(tid, [user_msg("hi")], timeout=30)
        deadline = time.monotonic() + 30  # the fourth head filled it: the worker writes it
        while _marked(store_path) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not _marked(store_path)
        store.pause_projection()
        more = [store.create_thread() for _ in range(6)]
        for tid in more:
            store.append(tid, [user_msg("hi")])
        store.resume_projection()
        store.flush_all(timeout=30)  # a group commit of six: two heads left out, unless split
        left_out = store._history._acks.left_out
    assert len(_marked(store_path)) == left_out  # close wrote the ones it held
    with _open_held(store_path) as store:  # their rows are there: open finds nothing to do
        assert store.stats().pending_threads == 0


def test_a_late_acknowledgement_never_clears_a_mark_a_removal_needs(
        store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Removals forget the thread's head: written later, it would clear the mark of a
    discard in progress, or of a new thread that took a deleted thread's id."""
    monkeypatch.setattr(_acks, "INTERVAL_S", 3600.0)
    with ThreadStore.open(store_path) as store:
        reused, pending = store.create_thread("reused"), store.create_thread("pending")
        for tid in (reused, pending):
            store.append_and_flush(tid, [user_msg("one"), plain(2)], timeout=30)
        store.delete_thread(reused)
        store.pause_projection()
        store.create_thread(reused)
        store.append(reused, [plain(1)])  # seq 1, below the acknowledged head 2
        with store._index.write_lock:  # the first phase of a removal: the row goes
            store._index.delete_rows([pending])
        store._history.write_acknowledgements()
        assert _marked(store_path) == {reused, pending}
        store._history.remove(pending, tombstone=False)  # finish it by hand
        store.resume_projection()
        assert store.flush(reused, timeout=30).item_count == 1


def test_sigkill_before_any_acknowledgement_reopens_in_o_marked(
        store_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Commits whose acknowledgements were never written: open re-checks exactly the
    marked threads (no full comparison), projects the ones behind, and converges."""
    proc, tids = _run_child("behind", str(store_path), "50", "4", "unwritten")
    _kill(proc)
    assert _marked(store_path) == set(tids)  # every thread: no acknowledgement was written
    epoch, acked = _epochs(store_path)
    assert epoch > acked  # the index ran ahead of what history acknowledged: the normal case
    with caplog.at_level(logging.WARNING, logger="thread_store"):
        with _open_held(store_path) as store:
            assert store.stats().pending_threads == 4
        assert FULL_COMPARE not in caplog.text
    with ThreadStore.open(store_path) as store:
        assert assert_converged(store) == 50
        for tid in tids[:4]:
            assert store.read_thread(tid).projected_seq == 2
    assert not _marked(store_path)


def test_history_losing_a_tail_the_index_folded_is_found_by_the_history_mark(
        store_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The epochs cannot see it (the index is ahead of history's acknowledgements, as
    usual): the index's history mark, above history's highest rowid, does."""
    tids = _populate(store_path, 3)
    saved = tmp_path / "saved"
    _copy(store_path, "history.db", saved)
    with ThreadStore.open(store_path) as store:
        store.append_and_flush(tids[0], [user_msg("lost"), plain(2)], timeout=30)
    _restore(saved, "history.db", store_path)
    epoch, acked = _epochs(store_path)
    assert epoch > acked
    with caplog.at_level(logging.WARNING, logger="thread_store"):
        with _open_held(store_path) as store:
            assert store.stats().pending_threads == 1
        assert FULL_COMPARE in caplog.text
    with ThreadStore.open(store_path) as store:
        assert assert_converged(store) == 3
        meta = store.read_thread(tids[0])
        assert (meta.projected_seq, meta.title) == (2, f"title {tids[0]}")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="thread_store"), _open_held(store_path):
        assert FULL_COMPARE not in caplog.text  # settled once: mark and epoch agree again


def test_removing_the_newest_thread_is_no_false_alarm_and_rowids_stay_unique(
        store_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A removal keeps the highest rowid, so history's highest rowid never goes down:
    no full comparison after it, and items appended later still get rowids above every
    one the index's mark counted, so losing them is still found."""
    kept, newest, deleted = _populate(store_path, 3)
    with ThreadStore.open(store_path) as store:
        store.append_and_flush(deleted, [plain(3)], timeout=30)
        store.delete_thread(deleted)
        store.append_and_flush(newest, [plain(4)], timeout=30)
        store.discard(newest)  # now the thread with the highest rowid
    with caplog.at_level(logging.WARNING, logger="thread_store"), _open_held(store_path) as store:
        assert store.stats().pending_threads == 0
        assert FULL_COMPARE not in caplog.text
    saved = tmp_path / "saved"
    _copy(store_path, "history.db", saved)
    with ThreadStore.open(store_path) as store:
        store.append_and_flush(kept, [user_msg("lost")], timeout=30)
    _restore(saved, "history.db", store_path)
    with caplog.at_level(logging.WARNING, logger="thread_store"):
        with ThreadStore.open(store_path) as store:
            assert assert_converged(store) == 1
            assert store.read_thread(kept).projected_seq == 2
        assert FULL_COMPARE in caplog.text
    assert_store_integrity(store_path)


def test_index_losing_commits_that_history_acknowledged_is_found_by_the_epoch(
        store_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """An acknowledgement raised history's epoch past the epoch of the index's older copy:
    open compares every thread and catches up what the copy lacks."""
    monkeypatch.setattr(_acks, "INTERVAL_S", 0.05)
    tids = _populate(store_path, 3)
    saved = tmp_path / "saved"
    _copy(store_path, "index.db", saved)
    with ThreadStore.open(store_path) as store:
        store.append_and_flush(tids[1], [user_msg("kept by history")], timeout=30)
        deadline = time.monotonic() + 30
        while _marked(store_path) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not _marked(store_path)  # acknowledged by the worker, while open
    _restore(saved, "index.db", store_path)
    epoch, acked = _epochs(store_path)
    assert epoch < acked
    with caplog.at_level(logging.WARNING, logger="thread_store"):
        with ThreadStore.open(store_path) as store:
            assert assert_converged(store) == 3
            assert store.read_thread(tids[1]).projected_seq == 3
        assert FULL_COMPARE in caplog.text


def test_index_from_schema_2_is_migrated_and_trusts_the_marks(
        store_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A version 2 index (eagerly acknowledged, no history mark) opens without a full
    comparison, and its mark then follows history."""
    tids = _populate(store_path, 3)
    with closing(sqlite3.connect(store_path / "index.db")) as conn, conn:
        conn.execute("DELETE FROM index_meta WHERE key = 'history_mark'")
        conn.execute("PRAGMA user_version = 2")
    _set_projected(store_path, tids[0], 1, "tampered")
    with caplog.at_level(logging.WARNING, logger="thread_store"), _open_held(store_path) as store:
        assert store.stats().pending_threads == 0
        assert FULL_COMPARE not in caplog.text
    with ThreadStore.open(store_path) as store:
        store.append_and_flush(tids[1], [plain(3)], timeout=30)
    with closing(sqlite3.connect(store_path / "index.db")) as conn, \
            closing(sqlite3.connect(store_path / "history.db")) as history:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == index_module.SCHEMA_VERSION
        (mark,), = conn.execute("SELECT value FROM index_meta WHERE key = 'history_mark'")
        (top,), = history.execute("SELECT max(rowid) FROM items")
    assert mark == top


def test_a_reindex_that_was_asked_for_warns_about_nothing(store_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    with ThreadStore.open(store_path) as store:
        store.append_and_flush(store.create_thread(), [user_msg("kept")])
    with caplog.at_level(logging.WARNING, logger="thread_store"):
        assert ThreadStore.rebuild_index(store_path) == 1
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    # An index that vanished unasked is still reported.
    for suffix in ("", "-wal", "-shm"):
        Path(f"{store_path / 'index.db'}{suffix}").unlink(missing_ok=True)
    with caplog.at_level(logging.WARNING, logger="thread_store"):
        with ThreadStore.open(store_path) as store:
            store.flush_all(timeout=30)
            assert [m.title for m in store.list_threads().threads] == ["kept"]
    assert any("rebuilding the index" in r.getMessage() for r in caplog.records)


# -- open() beside other writers (issue 13) ----------------------------------------------------


@contextmanager
def _another_writer_commits_after(method: str, commit: Callable[[], None],
                                  monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run ``commit`` (a real append and projection by another store on the directory)
    right after this thread's first call of ``History.<method>``: the moment another
    process may commit at while open() scans, made certain instead of left to chance."""
    original = getattr(history_module.History, method)
    opener = threading.get_ident()
    pending = [commit]

    def then_another_writer(self: history_module.History, *args: object) -> object:
        result = original(self, *args)
        if pending and threading.get_ident() == opener:  # not other stores' workers
            pending.pop()()
        return result

    with monkeypatch.context() as patched:
        patched.setattr(history_module.History, method, then_another_writer)
        yield
    assert not pending, f"open() never called History.{method}"


def test_a_row_another_writer_projects_during_open_is_not_taken_for_one_ahead(
        store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by the several-writers crash torture: open() read a marked thread's head, then
    its row. Another writer appended and projected in between, so the row looked ahead of
    history, as after a power loss: open() deleted it and re-projected the older head, and
    the other writer's acknowledgement then cleared the mark. The thread stayed behind for
    good, with nothing left to find it."""
    (tid,) = _populate(store_path, 1)
    with ThreadStore.open(store_path) as paused, ThreadStore.open(store_path) as other:
        paused.pause_projection()
        assert paused.append(tid, [plain(3)]) == 3  # marked behind, its row at 2

        def append_and_project() -> None:
            assert other.append(tid, [plain(4)]) == 4
            assert other.flush(tid, timeout=30).projected_seq == 4

        with _another_writer_commits_after("behind_threads", append_and_project, monkeypatch):
            ThreadStore.open(store_path).close()  # drains what its scan found
    with ThreadStore.open(store_path) as store:
        assert assert_converged(store) == 1
        assert store.read_thread(tid).projected_seq == 4
    assert not _marked(store_path)


def test_another_writer_committing_during_open_is_no_false_alarm(
        store_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """DESIGN §1.8: opening costs O(threads behind) however many processes share the
    store. open() read history's highest rowid, then the index's history mark; another
    writer's projection in between raised the mark above that rowid, which looked like
    history losing a tail and made open() compare every thread."""
    (tid,) = _populate(store_path, 1)
    with ThreadStore.open(store_path) as other:

        def append_and_project() -> None:
            other.append_and_flush(tid, [plain(3)], timeout=30)

        with caplog.at_level(logging.WARNING, logger="thread_store"):
            with _another_writer_commits_after("high_water", append_and_project, monkeypatch):
                ThreadStore.open(store_path).close()
        assert FULL_COMPARE not in caplog.text
    with ThreadStore.open(store_path) as store:
        assert assert_converged(store) == 1
