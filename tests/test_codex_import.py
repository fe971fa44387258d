"""Importing Codex rollout files: metadata per DESIGN §2, idempotent re-import, bad lines."""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import user_msg

from thread_store import InvalidArgument, ThreadStore
from thread_store.codex import import_codex

FIXTURES = Path(__file__).parent / "fixtures" / "codex"
A = "0194a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"  # has a session_meta id and two bad lines
B = "0194b7c8-d9e0-7f1a-9b2c-3d4e5f6a7b8c"  # its session_meta has no id
FILE_A = f"2025/01/05/rollout-2025-01-05T12-00-00-{A}.jsonl"
FILE_B = f"2025/01/06/rollout-2025-01-06T09-30-00-{B}.jsonl"


@pytest.fixture
def sessions(tmp_path: Path) -> Path:
    """A writable copy of the fixture sessions directory."""
    return Path(shutil.copytree(FIXTURES, tmp_path / "sessions"))


def valid_lines(path: Path) -> list[dict[str, object]]:
    """The lines of a fixture file that are items (JSON objects with a type)."""
    out = []
    for raw in path.read_text().splitlines():
        try:
            item = json.loads(raw)
        except ValueError:
            continue
        if isinstance(item, dict) and "type" in item:
            out.append(item)
    return out


def history(store: ThreadStore, thread_id: str) -> list[dict[str, object]]:
    return [s.item for s in store.read_history(thread_id, limit=10_000)]


def append_lines(path: Path, *lines: str, newline: bool = True) -> None:
    with path.open("a") as f:
        f.write("\n".join(lines) + ("\n" if newline else ""))


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_metadata_follows_the_derivation_rules(store: ThreadStore, sessions: Path) -> None:
    report = import_codex(store, sessions)
    assert (report.files, report.threads_created, report.items_appended) == (2, 2, 17 + 6)
    assert report.errors == []
    a = store.read_thread(A)
    assert a.title == a.preview == a.first_user_message == "Fix the flaky test in tests/test_sync.py"
    assert (a.model, a.reasoning_effort, a.model_provider) == ("gpt-5-codex", "high", "openai")
    assert (a.cwd, a.cli_version, a.source) == ("/home/dev/project", "0.46.0", "cli")
    assert (a.git_sha, a.git_branch, a.git_origin_url) == (
        "3f2c1e9a7b5d", "fix-flaky", "git@github.com:example/project.git")
    assert a.token_usage is not None and a.token_usage["total_tokens"] == 23000  # null info keeps it
    assert a.created_at == at("2025-01-05T12:00:00")
    assert a.recency_at == at("2025-01-05T12:05:00.010")
    assert a.updated_at == at("2025-01-05T12:05:32")
    assert (a.item_count, a.projected_seq) == (17, 17)
    assert history(store, A) == valid_lines(sessions / FILE_A)
    listed = [t.thread_id for t in store.list_threads().threads]
    assert listed == [B, A]  # newest recency first


def test_thread_id_comes_from_the_file_name_without_a_session_meta_id(
        store: ThreadStore, sessions: Path) -> None:
    import_codex(store, sessions)
    b = store.read_thread(B)
    assert (b.title, b.model, b.reasoning_effort, b.source) == (
        "Summarise the meeting notes", "o4-mini", None, "vscode")
    assert b.created_at == at("2025-01-06T09:30:00")
    assert b.token_usage is not None and b.token_usage["total_tokens"] == 900


def test_malformed_lines_are_reported_with_file_and_line_and_skipped(
        store: ThreadStore, sessions: Path) -> None:
    report = import_codex(store, sessions)
    path = str(sessions / FILE_A)
    assert [(s.path, s.line) for s in report.skipped] == [(path, 8), (path, 12)]
    assert str(report.skipped[0]).startswith(f"{path}:8: invalid JSON")
    assert "type" in report.skipped[1].reason
    assert report.to_json()["skipped"][1] == {"path": path, "line": 12,
                                              "reason": report.skipped[1].reason}


def test_reimport_adds_nothing(store: ThreadStore, sessions: Path) -> None:
    import_codex(store, sessions)
    before = {t: history(store, t) for t in (A, B)}
    again = import_codex(store, sessions)
    assert (again.items_appended, again.threads_created, again.threads_updated,
            again.threads_unchanged) == (0, 0, 0, 2)
    assert len(again.skipped) == 2  # still reported: they are still in the file
    assert {t: history(store, t) for t in (A, B)} == before


def test_grown_file_appends_only_its_new_lines(store: ThreadStore, sessions: Path) -> None:
    path = sessions / FILE_A
    import_codex(store, sessions)
    new_turn = [
        {"timestamp": "2025-01-05T12:10:00.000Z", "type": "event_msg",
         "payload": {"type": "user_message", "message": "Run the whole suite", "kind": "plain"}},
        {"timestamp": "2025-01-05T12:10:00.010Z", "type": "event_msg",
         "payload": {"type": "task_started", "model_context_window": 272000}},
    ]
    torn = json.dumps({"timestamp": "2025-01-05T12:10:05.000Z", "type": "response_item",
                       "payload": {"type": "message", "role": "assistant", "content": []}})
    append_lines(path, "not json either", *map(json.dumps, new_turn), torn[:40], newline=False)
    grown = import_codex(store, sessions)
    assert (grown.items_appended, grown.threads_updated, grown.threads_unchanged) == (2, 1, 1)
    assert [s.line for s in grown.skipped] == [8, 12, 20, 23]
    assert "still being written" in grown.skipped[-1].reason
    assert store.read_thread(A).recency_at == at("2025-01-05T12:10:00.010")

    append_lines(path, torn[40:])  # the writer finishes its line
    done = import_codex(store, sessions)
    assert done.items_appended == 1
    assert history(store, A) == valid_lines(path)
    assert store.read_thread(A).item_count == 17 + 3


def test_store_edits_do_not_break_idempotency(store: ThreadStore, sessions: Path) -> None:
    import_codex(store, sessions)
    store.update_metadata(A, name="Flaky test")
    store.archive_thread(A)
    append_lines(sessions / FILE_A, json.dumps(
        {"timestamp": "2025-01-05T12:20:00.000Z", "type": "event_msg",
         "payload": {"type": "agent_message", "message": "done"}}))
    report = import_codex(store, sessions)
    assert report.items_appended == 1
    meta = store.read_thread(A)
    assert (meta.name, meta.item_count) == ("Flaky test", 17 + 2 + 1)
    assert meta.archived_at is not None
    assert import_codex(store, sessions).items_appended == 0


def test_conflicting_history_is_reported_and_left_alone(store: ThreadStore, sessions: Path) -> None:
    store.create_thread(A)
    store.append(A, [user_msg("something else entirely")])
    report = import_codex(store, sessions)
    assert report.items_appended == 6  # only B
    assert len(report.errors) == 1 and A in report.errors[0] and "prefix" in report.errors[0]
    assert len(history(store, A)) == 1


def test_unchanged_files_are_skipped_by_size_and_mtime(store: ThreadStore, sessions: Path) -> None:
    seen: dict[str, dict[str, object]] = {}
    first = import_codex(store, sessions, seen=seen)
    assert (first.threads_created, first.files_unchanged) == (2, 0)
    assert set(seen) == {str(sessions / FILE_A), str(sessions / FILE_B)}
    before = {t: history(store, t) for t in (A, B)}

    # Same size and mtime, other content: not read at all, so not even the conflict shows.
    path = sessions / FILE_B
    stat = path.stat()
    text = path.read_text()
    path.write_text(text.replace('"cwd"', '"CWD"', 1))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    again = import_codex(store, sessions, seen=seen)
    assert (again.files_unchanged, again.threads_unchanged, again.items_appended) == (2, 2, 0)
    assert again.errors == [] and again.skipped == []  # no file was parsed
    assert {t: history(store, t) for t in (A, B)} == before

    # A new modification time: that file, and only its thread, is verified again.
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    verified = import_codex(store, sessions, seen=seen)
    assert verified.files_unchanged == 1
    assert len(verified.errors) == 1 and B in verified.errors[0] and "--replace" in verified.errors[0]


def test_a_deleted_thread_with_unchanged_files_is_imported_again(store: ThreadStore, sessions: Path) -> None:
    seen: dict[str, dict[str, object]] = {}
    import_codex(store, sessions, seen=seen)
    store.delete_thread(A)
    again = import_codex(store, sessions, seen=seen)
    assert (again.threads_created, again.threads_unchanged, again.files_unchanged) == (1, 1, 1)
    assert history(store, A) == valid_lines(sessions / FILE_A)


def test_replace_reimports_an_edited_rollout(store: ThreadStore, sessions: Path) -> None:
    import_codex(store, sessions)
    path = sessions / FILE_A
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:5]))  # truncated: the store's history runs past it
    kept = import_codex(store, sessions)
    assert len(kept.errors) == 1 and A in kept.errors[0] and "replace" in kept.errors[0]
    assert len(history(store, A)) == 17
    store.update_metadata(A, name="kept?")
    replaced = import_codex(store, sessions, replace=True)
    assert (replaced.threads_replaced, replaced.errors) == (1, [])
    assert history(store, A) == valid_lines(path)
    assert store.read_thread(A).name is None  # a replaced thread starts over from its files
    assert [s.line for s in replaced.skipped] == [s.line for s in kept.skipped]


def test_a_resumed_session_in_two_files_is_one_thread(store: ThreadStore, tmp_path: Path) -> None:
    root = tmp_path / "sessions"
    day1, day2 = root / "2025" / "01" / "05", root / "2025" / "01" / "07"
    day2.mkdir(parents=True)
    shutil.copytree(FIXTURES / "2025" / "01" / "05", day1)
    resumed = day2 / f"rollout-2025-01-07T08-00-00-{A}.jsonl"
    append_lines(resumed, json.dumps(
        {"timestamp": "2025-01-07T08:00:00.000Z", "type": "event_msg",
         "payload": {"type": "user_message", "message": "Back again", "kind": "plain"}}))
    report = import_codex(store, root)
    assert (report.files, report.threads_created, report.items_appended) == (2, 1, 18)
    assert history(store, A)[-1]["payload"] == {"type": "user_message", "message": "Back again",
                                                "kind": "plain"}
    assert import_codex(store, root).items_appended == 0


def test_unusable_inputs(store: ThreadStore, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        import_codex(store, tmp_path / "missing")
    (tmp_path / "rollout-no-id.jsonl").write_text(
        json.dumps({"type": "session_meta", "payload": {"cwd": "/x"}}) + "\n")
    progress: list[tuple[int, int]] = []
    report = import_codex(store, tmp_path, progress=lambda done, total: progress.append((done, total)))
    assert report.files == 1 and report.items_appended == 0
    assert "rollout-no-id.jsonl" in report.errors[0]
    assert progress == []
    import_codex(store, FIXTURES, progress=lambda done, total: progress.append((done, total)))
    assert progress == [(1, 2), (2, 2)]


@pytest.mark.parametrize("directory", [None, 5, b"/tmp", "", "a\x00b"], ids=repr)
def test_malformed_directory_raises_invalid_argument(store: ThreadStore, directory: object) -> None:
    with pytest.raises(InvalidArgument):
        import_codex(store, directory)  # type: ignore[arg-type]
