"""DESIGN §1.3 and §1.11: the store, not a process, holds where a projection stands.

``status()`` reads ``head_seq``, ``projected_seq`` and ``last_error`` from the store, so
another process (here: a read-only store, and the same store reopened) sees them; the
fold rules' identifier is stored and other rules are refused at open.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Backend, user_msg, wait_for
from thread_store import CodexRules, InvalidArgument, ProjectionFailed, ThreadStore


class _OtherRules(CodexRules):
    rules_id = "tests.other-rules/1"


class _Unnamed(CodexRules):
    """Rules without an identifier of their own: their class names them."""

    rules_id = None  # type: ignore[assignment]


def _fail(thread_id: str, generation: int) -> None:
    raise RuntimeError(f"no projection for {thread_id} at {generation}")


def test_last_error_is_recorded_in_the_store_until_a_success_clears_it(backend: Backend) -> None:
    backend.requires("read_only")
    with backend.open_store(projection_hook=_fail) as store:
        tid = store.create_thread()
        with pytest.raises(ProjectionFailed):
            store.append_and_flush(tid, [user_msg("hello")], timeout=30)
        with backend.open_store(read_only=True) as reader:  # another reader sees it
            seen = reader.status(tid)
        assert seen.pending and seen.head_seq == 1 and seen.projected_seq == 0
        assert seen.last_error is not None and "RuntimeError: no projection" in seen.last_error
        assert seen.attempts == 0 and seen.waiters == 0  # counters of the reader's own process
    entered, release = threading.Event(), threading.Event()

    def hold(thread_id: str, generation: int) -> None:
        entered.set()
        release.wait(30)

    backend.requires("reopen")
    with backend.open_store(projection_hook=hold) as store:
        wait_for(entered.is_set, "the catch-up's attempt")  # held: nothing succeeded yet
        before = store.status(tid)
        assert before.last_error is not None and "no projection" in before.last_error
        release.set()
        assert store.flush(tid, timeout=30).projected_seq == 1
        after = store.status(tid)
        assert (after.last_error, after.pending, after.projected_seq) == (None, False, 1)
    with backend.open_store(read_only=True) as reader:
        assert reader.status(tid).last_error is None


def test_an_older_failure_never_overwrites_a_newer_success(backend: Backend) -> None:
    calls = []

    def fail_first(thread_id: str, generation: int) -> None:
        # The new thread's empty row (generation 0) may be projected first, by the worker.
        if generation > 0:
            calls.append(generation)
            if len(calls) == 1:
                raise RuntimeError("the first attempt that folds an item fails")

    with backend.open_store(projection_hook=fail_first) as store:
        tid = store.create_thread()
        with pytest.raises(ProjectionFailed):
            store.append_and_flush(tid, [user_msg("one")], timeout=30)
        assert store.append_and_flush(tid, [user_msg("two")], timeout=30).projected_seq == 2
        assert store.status(tid).last_error is None


def test_status_reads_the_stored_projection(backend: Backend) -> None:
    with backend.open_store() as store:
        tid = store.create_thread()
        store.append_and_flush(tid, [user_msg("a")], timeout=30)
        store.pause_projection()
        store.append(tid, [user_msg("b")])
        status = store.status(tid)
        assert (status.head_seq, status.projected_seq, status.pending) == (2, 1, True)
        store.resume_projection()
        store.flush(tid, timeout=30)
        status = store.status(tid)
        assert (status.head_seq, status.projected_seq, status.pending) == (2, 2, False)


def test_other_fold_rules_are_refused_until_the_index_is_rebuilt_with_them(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with ThreadStore.open(path) as store:
        tid = store.create_thread()
        store.append_and_flush(tid, [user_msg("hello")], timeout=30)
    with pytest.raises(InvalidArgument, match="thread_store.codex/1.*tests.other-rules/1"):
        ThreadStore.open(path, rules=_OtherRules())
    with pytest.raises(InvalidArgument, match="rebuild_index"):
        ThreadStore.open(path, rules=_Unnamed())
    with ThreadStore.open(path, read_only=True, rules=_OtherRules()) as reader:  # it never folds
        assert reader.read_thread(tid).title == "hello"
    assert ThreadStore.rebuild_index(path, rules=_OtherRules()) == 1
    with ThreadStore.open(path, rules=_OtherRules()) as store:
        assert store.read_thread(tid).title == "hello"
    with pytest.raises(InvalidArgument, match="tests.other-rules/1"):
        ThreadStore.open(path)


@pytest.mark.parametrize("bad", ["", 3, b"codex"])
def test_a_malformed_rules_id_is_refused(tmp_path: Path, bad: object) -> None:
    class Bad(CodexRules):
        rules_id = bad  # type: ignore[assignment]

    with pytest.raises(InvalidArgument, match="rules_id"):
        ThreadStore.open(tmp_path / "s", rules=Bad())
    assert not (tmp_path / "s").exists()


def test_report_reads_threads_behind_and_failures_from_the_store(backend: Backend) -> None:
    with backend.open_store(projection_hook=_fail_for("broken")) as store:
        store.create_thread("broken")
        with pytest.raises(ProjectionFailed):
            store.append_and_flush("broken", [user_msg("x")], timeout=30)
        store.append_and_flush(store.create_thread("done"), [user_msg("y")], timeout=30)
        store.pause_projection()
        store.create_thread("later")
        store.append("later", [user_msg("a"), user_msg("b")])
        store.discard(store.create_thread("gone"))
        report = store.report()
        assert report.threads == 3  # the discarded one is not counted
        assert (report.threads_behind, report.items_behind) == (2, 1 + 2)
        assert [(b.thread_id, b.head_seq, b.projected_seq) for b in report.behind] == [
            ("broken", 1, 0), ("later", 2, 0)]  # longest behind first
        assert report.oldest_behind_since is not None
        assert [(f.thread_id, f.last_error) for f in report.failed] == [
            ("broken", "RuntimeError: no projection for broken at 1")]
        assert len(store.report(limit=1).behind) == 1
        assert store.status("later").pending  # reporting caught nothing up
        store.resume_projection()
        store.flush("later", timeout=30)
        assert [b.thread_id for b in store.report().behind] == ["broken"]
        with pytest.raises(InvalidArgument):
            store.report(limit=0)


def _fail_for(victim: str) -> Callable[[str, int], None]:
    def hook(thread_id: str, generation: int) -> None:
        if thread_id == victim:
            _fail(thread_id, generation)
    return hook
