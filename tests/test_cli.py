"""The thread-store command: real subprocesses for the main paths, CliRunner for the rest."""

from __future__ import annotations

import dataclasses
import json
import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import plain, user_msg
from otlp_receiver import OTLPReceiver

from thread_store import ProjectionFailed, ThreadMetadata, ThreadStore
from thread_store.cli import cli
from thread_store.backends.sqlite._history_schema import SCHEMA_VERSION as HISTORY_VERSION
from thread_store.backends.sqlite._index_schema import SCHEMA_VERSION as INDEX_VERSION

FIXTURES = Path(__file__).parent / "fixtures" / "codex"
FIELDS = [f.name for f in dataclasses.fields(ThreadMetadata)]
CONSOLE_SCRIPT = Path(sys.executable).with_name("thread-store")
HANG = 30.0  # generous timeout that only catches hangs


def run(*args: str, script: bool = False, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a real subprocess: the console script, or ``python -m thread_store.cli``."""
    command = [str(CONSOLE_SCRIPT)] if script else [sys.executable, "-m", "thread_store.cli"]
    return subprocess.run([*command, *args], check=False, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    """Run the CLI in-process, on a wide terminal unless ``env`` sets ``COLUMNS``."""
    return CliRunner(env={"COLUMNS": "200", **(env or {})}).invoke(cli, list(args), catch_exceptions=False)


def assert_one_line_error(stderr: str, *words: str) -> None:
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr
    for word in words:
        assert word in stderr


@pytest.fixture
def filled(store_path: Path) -> dict[str, str]:
    """A closed store with three listed threads, one archived and one without a preview."""
    with ThreadStore.open(store_path) as s:
        ids = {}
        for name, text in (("flaky", "Fix the flaky test"), ("docs", "Update the docs"),
                           ("old", "Old work")):
            ids[name] = s.create_thread(metadata={"cwd": "/repo"})
            s.append_and_flush(ids[name], [user_msg(text), plain()])
        s.archive_thread(ids["old"])
        ids["empty"] = s.create_thread()
        s.append_and_flush(ids["empty"], [plain()])
    return ids


def test_console_script_demo_then_list_show_status(store_path: Path) -> None:
    demo = run("--store", str(store_path), "demo", "--threads", "4", "--seed", "7", script=True)
    assert demo.returncode == 0, demo.stderr
    assert "demo: 4 threads" in demo.stdout and "p50 append" in demo.stdout
    again = run("--store", str(store_path), "demo", "--threads", "3", script=True)
    assert again.returncode == 0, again.stderr

    listed = run("--store", str(store_path), "list", "--json")
    assert listed.returncode == 0, listed.stderr
    threads = json.loads(listed.stdout)
    assert len(threads) == 7  # the second run made fresh threads
    assert all(list(t) == FIELDS for t in threads)
    recency = [t["recency_at"] for t in threads]
    assert recency == sorted(recency, reverse=True)

    first = threads[0]
    shown = run("--store", str(store_path), "show", first["thread_id"], "--items", "3", "--json")
    assert shown.returncode == 0, shown.stderr
    body = json.loads(shown.stdout)
    assert body["thread"] == first
    assert [i["seq"] for i in body["items"]] == [first["item_count"] - 2, first["item_count"] - 1,
                                                 first["item_count"]]

    report = run("--store", str(store_path), "status", "--json")
    assert report.returncode == 0, report.stderr
    status = json.loads(report.stdout)
    assert status["threads"] == 7
    assert (status["behind"], status["failed"], status["threads_behind"]) == ([], [], 0)


def test_import_codex_and_reindex_in_a_subprocess(store_path: Path) -> None:
    imported = run("--store", str(store_path), "import-codex", str(FIXTURES))
    assert imported.returncode == 0, imported.stderr
    assert "2 threads created" in imported.stdout and "23 items appended" in imported.stdout
    skipped = [line for line in imported.stderr.splitlines() if line.startswith("skipped ")]
    assert [line.split(":")[1] for line in skipped] == ["8", "12"]
    before = run("--store", str(store_path), "list", "--json").stdout

    reindexed = run("--store", str(store_path), "reindex")
    assert reindexed.returncode == 0, reindexed.stderr
    assert "reindexed 2 threads" in reindexed.stdout
    assert run("--store", str(store_path), "list", "--json").stdout == before

    again = run("--store", str(store_path), "import-codex", str(FIXTURES), "--json")
    assert json.loads(again.stdout)["items_appended"] == 0


@pytest.mark.parametrize("args, words", [
    (["show", "no such id!"], ["invalid thread id"]),
    (["show", "0194a1b2-0000-7000-8000-000000000000"], ["does not exist"]),
    (["list", "--cursor", "bogus"], ["invalid cursor"]),
    (["list", "--limit", "0"], ["--limit"]),
])
def test_errors_are_one_line_without_traceback(filled: dict[str, str], store_path: Path,
                                               args: list[str], words: list[str]) -> None:
    result = run("--store", str(store_path), *args)
    assert result.returncode != 0
    assert result.stdout == ""
    assert_one_line_error(result.stderr, *words)


def test_store_path_that_is_a_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "a-file"
    path.write_text("not a store")
    result = run("list", env={"THREAD_STORE": str(path)}, script=True)
    assert result.returncode == 1
    assert_one_line_error(result.stderr, str(path), "not a directory")


def test_demo_exports_traces_over_otlp_and_to_a_file(tmp_path: Path) -> None:
    trace_file = tmp_path / "traces.jsonl"
    with OTLPReceiver() as receiver:
        result = run("--store", str(tmp_path / "s"), "demo", "--threads", "2", "--seed", "1",
                     "--otlp-endpoint", receiver.endpoint, "--trace-file", str(trace_file))
        assert result.returncode == 0, result.stderr
        names = {span.name for span in receiver.wait_for(lambda spans: bool(spans), timeout=10)}
    assert {"thread_store.append", "thread_store.project"} <= names
    lines = [json.loads(line) for line in trace_file.read_text().splitlines()]
    assert lines and all("resourceSpans" in line for line in lines)


# -- CliRunner --------------------------------------------------------------------------


def test_every_help_ends_with_an_example() -> None:
    for name in [None, *cli.commands]:
        result = invoke(*([name] if name else []), "--help")
        assert result.exit_code == 0, name
        lines = [line.strip() for line in result.stdout.rstrip().splitlines()]
        assert "Example:" in lines, name
        examples = lines[len(lines) - lines[::-1].index("Example:"):]
        assert examples and all(line.startswith("thread-store ") for line in examples), (name, examples)


def test_store_path_from_the_environment_and_the_default(filled: dict[str, str], store_path: Path,
                                                         tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    result = invoke("list", env={"THREAD_STORE": str(store_path)})
    assert result.exit_code == 0
    assert "Fix the flaky test" in result.stdout and "Old work" not in result.stdout
    monkeypatch.chdir(tmp_path)
    demo = CliRunner(env={"THREAD_STORE": None}).invoke(cli, ["demo", "--threads", "2"],
                                                        catch_exceptions=False)
    assert demo.exit_code == 0
    with ThreadStore.open(tmp_path / "thread-store-data", read_only=True) as store:
        assert len(store.list_threads().threads) == 2


def test_list_filters_and_paging(filled: dict[str, str], store_path: Path) -> None:
    store = ["--store", str(store_path)]
    archived = json.loads(invoke(*store, "list", "--archived", "--json").stdout)
    assert [t["thread_id"] for t in archived] == [filled["old"]]
    found = json.loads(invoke(*store, "list", "--search", "flaky", "--json").stdout)
    assert [t["thread_id"] for t in found] == [filled["flaky"]]
    everything = json.loads(invoke(*store, "list", "--include-empty", "--json").stdout)
    assert filled["empty"] in {t["thread_id"] for t in everything}

    first = invoke(*store, "list", "--limit", "1")
    assert first.stdout.splitlines()[0].split() == ["ID", "TITLE", "MODEL", "ITEMS", "RECENCY", "(UTC)"]
    cursor = first.stderr.split("--cursor ")[1].split()[0]
    second = invoke(*store, "list", "--limit", "1", "--cursor", cursor)
    ids = [line.split()[0] for line in (first.stdout + second.stdout).splitlines()
           if not line.startswith("ID")]
    assert sorted(ids) == sorted([filled["flaky"], filled["docs"]])
    assert second.stderr == ""  # the last page has no cursor hint


def test_show_table(filled: dict[str, str], store_path: Path) -> None:
    result = invoke("--store", str(store_path), "show", filled["flaky"], "--items", "1")
    assert result.exit_code == 0
    assert "Fix the flaky test" in result.stdout and "last 1 item:" in result.stdout
    assert result.stdout.rstrip().splitlines()[-1].split()[0] == "3"  # session_meta, message, plain


def test_status_names_threads_left_behind(filled: dict[str, str], store_path: Path) -> None:
    with ThreadStore.open(store_path) as s:
        s.pause_projection()
        for name in ("flaky", "docs"):
            s.append(filled[name], [plain(), plain()])
        s.close(timeout=0)  # leave them behind, as a crash would
    result = invoke("--store", str(store_path), "status", "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    # Read-only: it caught nothing up, so both are behind by exactly their two items.
    assert report["threads"] == 4  # "empty" counts, though unlisted; archived ones too
    assert (report["threads_behind"], report["items_behind"]) == (2, 4)
    assert sorted((b["thread_id"], b["head_seq"] - b["projected_seq"]) for b in report["behind"]) == \
        sorted((filled[name], 2) for name in ("flaky", "docs"))
    assert report["oldest_behind_since"] is not None and report["failed"] == []
    assert report["schema_version"] == {"history": HISTORY_VERSION, "index": INDEX_VERSION}
    text = invoke("--store", str(store_path), "status")
    assert "2 threads, 4 items" in text.stdout and filled["flaky"] in text.stdout


def test_status_reads_a_store_an_agent_has_open_and_changes_nothing(store_path: Path) -> None:
    def fail(thread_id: str, generation: int) -> None:
        if thread_id == "broken":
            raise RuntimeError("the disk is haunted")

    with ThreadStore.open(store_path, projection_hook=fail) as agent:
        agent.create_thread("broken")
        with pytest.raises(ProjectionFailed):
            agent.append_and_flush("broken", [user_msg("boo")], timeout=HANG)
        agent.pause_projection()
        for n in range(3):
            agent.create_thread(f"t{n}")
            agent.append("t0", [plain(n)])
        result = invoke("--store", str(store_path), "status", "--json", "--limit", "1")
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["failed"] == [{"thread_id": "broken", "last_error": "RuntimeError: the disk is haunted"}]
        assert [b["thread_id"] for b in report["behind"]] in (["broken"], ["t0"])  # limited to 1
        assert report["threads_behind"] == 2 and report["items_behind"] == 1 + 3
        assert agent.status("t0").pending  # the report caught nothing up
def test_import_codex_reports_and_exit_codes(store_path: Path) -> None:
    store = ["--store", str(store_path)]
    first = invoke(*store, "import-codex", str(FIXTURES), "--json")
    assert first.exit_code == 0
    report = json.loads(first.stdout)
    assert (report["threads_created"], report["items_appended"]) == (2, 23)
    assert [s["line"] for s in report["skipped"]] == [8, 12]
    with ThreadStore.open(store_path) as s:
        s.update_metadata("0194a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", name="renamed")
    second = invoke(*store, "import-codex", str(FIXTURES))
    assert second.exit_code == 0
    assert "0 items appended" in second.stdout and "2 unchanged" in second.stdout


def test_import_codex_defaults_to_codex_home_and_skips_unchanged_files(store_path: Path, tmp_path: Path) -> None:
    codex_home = tmp_path / "codex-home"
    shutil.copytree(FIXTURES, codex_home / "sessions")
    env = {"CODEX_HOME": str(codex_home)}
    first = invoke("--store", str(store_path), "import-codex", "--json", env=env)
    assert first.exit_code == 0, first.stderr
    assert json.loads(first.stdout)["threads_created"] == 2
    assert (store_path / "codex-import.json").is_file()
    second = invoke("--store", str(store_path), "import-codex", env=env)
    assert second.exit_code == 0, second.stderr
    assert "2 files (2 unchanged, skipped)" in second.stdout and "2 unchanged" in second.stdout
    missing = invoke("--store", str(store_path), "import-codex", env={"CODEX_HOME": str(tmp_path / "none")})
    assert missing.exit_code == 2
    assert_one_line_error(missing.stderr, "DIRECTORY")


def test_import_codex_replace_reimports_a_truncated_rollout(store_path: Path, tmp_path: Path) -> None:
    sessions = Path(shutil.copytree(FIXTURES, tmp_path / "sessions"))
    store = ["--store", str(store_path)]
    assert invoke(*store, "import-codex", str(sessions)).exit_code == 0
    rollout = next(sessions.rglob("rollout-*0194a1b2*.jsonl"))
    rollout.write_text("".join(rollout.read_text().splitlines(keepends=True)[:3]))
    kept = invoke(*store, "import-codex", str(sessions))
    assert kept.exit_code == 1 and "--replace" in kept.stderr
    replaced = invoke(*store, "import-codex", str(sessions), "--replace")
    assert replaced.exit_code == 0, replaced.stderr
    assert "1 replaced" in replaced.stdout
    with ThreadStore.open(store_path, read_only=True) as s:
        assert s.read_thread("0194a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b").item_count == 3


def test_import_codex_conflict_exits_1(store_path: Path, tmp_path: Path) -> None:
    with ThreadStore.open(store_path) as s:
        s.create_thread("0194a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b")
        s.append("0194a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", [user_msg("unrelated")])
    result = invoke("--store", str(store_path), "import-codex", str(FIXTURES))
    assert result.exit_code == 1
    assert "not imported:" in result.stderr and "1 thread created" in result.stdout


def test_runner_errors_are_one_line(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    for args, code in ((["--store", missing, "status"], 1), (["--store", missing, "reindex"], 1),
                       (["--store", missing, "list"], 1), (["frobnicate"], 2),
                       (["import-codex", missing], 2)):
        result = invoke(*args)
        assert result.exit_code == code, (args, result.stderr)
        assert_one_line_error(result.stderr)
    assert not Path(missing).exists()  # no command created a store by accident


def test_the_library_never_loads_the_cli() -> None:
    # (click itself is always importable: sqlite-utils depends on it.)
    code = ("import sys, thread_store, thread_store.aio, thread_store.codex, thread_store.demo; "
            "sys.exit('thread_store.cli' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=60).returncode == 0


def test_bench_passes_arguments_through() -> None:
    result = invoke("bench", "--", "--help")
    assert result.exit_code == 0
    assert "python -m benchmarks" in result.stdout


def test_rename_archive_unarchive_change_what_list_shows(store_path: Path, filled: dict[str, str]) -> None:
    store, flaky = ["--store", str(store_path)], filled["flaky"]
    renamed = invoke(*store, "rename", flaky, "Deflake CI")
    assert renamed.exit_code == 0, renamed.stderr
    assert "Deflake CI" in invoke(*store, "list").stdout
    assert invoke(*store, "archive", flaky).exit_code == 0
    assert flaky not in invoke(*store, "list").stdout
    archived = json.loads(invoke(*store, "list", "--archived", "--json").stdout)
    assert [(t["thread_id"], t["name"]) for t in archived if t["thread_id"] == flaky] == [(flaky, "Deflake CI")]
    assert invoke(*store, "unarchive", flaky).exit_code == 0
    assert flaky in invoke(*store, "list").stdout
    assert invoke(*store, "rename", flaky, "").exit_code == 0  # '' clears the name
    with ThreadStore.open(store_path, read_only=True) as s:
        assert s.read_thread(flaky).name is None and s.read_thread(flaky).archived_at is None


def test_management_commands_never_create_a_store(tmp_path: Path) -> None:
    missing = tmp_path / "typo"
    for command in (["rename", "x", "y"], ["archive", "x"], ["unarchive", "x"], ["delete", "x", "--yes"],
                    ["export", "x"]):
        result = invoke("--store", str(missing), *command)
        assert result.exit_code == 1, (command, result.stdout)
        assert_one_line_error(result.stderr)
    assert not missing.exists()


def test_delete_off_a_terminal_needs_yes(store_path: Path, filled: dict[str, str]) -> None:
    store, docs = ["--store", str(store_path)], filled["docs"]
    refused = invoke(*store, "delete", docs)  # CliRunner's stdin is not a terminal
    assert refused.exit_code == 2
    assert_one_line_error(refused.stderr, "--yes")
    assert docs in invoke(*store, "list").stdout
    assert invoke(*store, "delete", docs, "--yes").exit_code == 0
    gone = invoke(*store, "show", docs)
    assert gone.exit_code == 1
    assert_one_line_error(gone.stderr, docs)


@pytest.mark.parametrize("answer, deleted", [("n", False), ("y", True)])
def test_delete_on_a_terminal_asks_first(store_path: Path, filled: dict[str, str], answer: str,
                                         deleted: bool) -> None:
    docs = filled["docs"]
    leader, follower = pty.openpty()
    try:
        child = subprocess.Popen([sys.executable, "-m", "thread_store.cli", "--store", str(store_path),
                                  "delete", docs], stdin=follower, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        os.write(leader, f"{answer}\n".encode())
        out, err = child.communicate(timeout=120)
    finally:
        os.close(leader)
        os.close(follower)
    assert f"Delete thread {docs} (Update the docs, 3 items) for good?" in err
    assert child.returncode == (0 if deleted else 1), err
    with ThreadStore.open(store_path, read_only=True) as s:
        listed = {m.thread_id for m in s.list_threads().threads}
    assert (docs not in listed) == deleted


def test_export_prints_the_items_as_appended_and_imports_back(store_path: Path, tmp_path: Path) -> None:
    items = [{"type": "session_meta", "payload": {"cwd": "/repo", "note": "é ☃"}},
             user_msg("Fix the flaky test"), plain(1), {"type": "event_msg", "payload": {"x": 1.5, "y": None}}]
    with ThreadStore.open(store_path) as s:
        tid = s.create_thread()
        s.append(tid, items)
    exported = invoke("--store", str(store_path), "export", tid)
    assert exported.exit_code == 0, exported.stderr
    lines = exported.stdout.splitlines()
    assert lines == [json.dumps(i, separators=(",", ":")) for i in items]
    assert [json.loads(line) for line in lines] == items

    rollouts = tmp_path / "sessions"
    rollouts.mkdir()
    (rollouts / f"rollout-2026-01-01T00-00-00-{tid}.jsonl").write_text(exported.stdout)
    copy = tmp_path / "copy"
    assert invoke("--store", str(copy), "import-codex", str(rollouts)).exit_code == 0
    with ThreadStore.open(copy, read_only=True) as s:
        assert [stored.item for stored in s.read_history(tid)] == items


def _many_threads(store_path: Path, ids: list[str]) -> None:
    with ThreadStore.open(store_path) as s:
        for tid in ids:
            s.create_thread(tid)
            s.append_and_flush(tid, [user_msg("A title that is too long to fit beside a full thread id"),
                                     {"type": "turn_context", "payload": {"model": "gpt-5-codex"}},
                                     {"type": "event_msg", "payload": {"type": "token_count", "info": {
                                         "total_token_usage": {f"kind_{n}_tokens": n for n in range(9)}}}}])


def test_list_and_show_fit_an_80_column_terminal(store_path: Path) -> None:
    ids = ["0194a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", "0194a1b2-ffff-7e5f-8a9b-0c1d2e3f4a5b",
           "7f3e9a10-0000-4000-8000-000000000000"]
    _many_threads(store_path, ids)
    narrow = invoke("--store", str(store_path), "list", env={"COLUMNS": "80"})
    assert narrow.exit_code == 0, narrow.stderr
    lines = narrow.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, narrow.stdout
    assert "…" in narrow.stdout  # the title was clipped, with an ellipsis
    shown = {line.split()[0] for line in lines[1:]}
    assert shown == {"0194a1b2-c", "0194a1b2-f", "7f3e9a10"}  # short and still unique
    wide = invoke("--store", str(store_path), "list", env={"COLUMNS": "200"})
    assert {line.split()[0] for line in wide.stdout.splitlines()[1:]} == set(ids)
    assert "…" not in wide.stdout
    detail = invoke("--store", str(store_path), "show", "7f3e", env={"COLUMNS": "80"})
    assert detail.exit_code == 0, detail.stderr
    assert max(len(line) for line in detail.stdout.splitlines()) <= 80, detail.stdout


def test_commands_take_a_unique_id_prefix_and_list_candidates_otherwise(store_path: Path) -> None:
    ids = ["0194a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", "0194a1b2-ffff-7e5f-8a9b-0c1d2e3f4a5b",
           "0194a1b2"]
    _many_threads(store_path, ids)
    store = ["--store", str(store_path)]
    assert invoke(*store, "rename", "0194a1b2-c", "by prefix").exit_code == 0
    with ThreadStore.open(store_path, read_only=True) as s:
        assert s.read_thread(ids[0]).name == "by prefix"
    exported = invoke(*store, "export", "0194a1b2-f")
    assert exported.exit_code == 0 and len(exported.stdout.splitlines()) == 3
    exact = invoke(*store, "show", "0194a1b2", "--json")  # an exact id wins over the prefix
    assert json.loads(exact.stdout)["thread"]["thread_id"] == "0194a1b2"
    ambiguous = invoke(*store, "archive", "0194a1b2-")
    assert ambiguous.exit_code == 2
    assert_one_line_error(ambiguous.stderr, ids[0], ids[1], "more of the id")
    unknown = invoke(*store, "show", "ffff")
    assert unknown.exit_code == 1
    assert_one_line_error(unknown.stderr, "ffff")


def test_long_commands_show_progress(store_path: Path) -> None:
    demo = invoke("--store", str(store_path), "demo", "--threads", "100", "--seed", "1")
    assert demo.exit_code == 0, demo.stderr
    assert demo.stderr.startswith("sessions")  # click's bar, on stderr (a label off a terminal)
    small = invoke("--store", str(store_path), "demo", "--threads", "3")
    assert small.stderr == ""  # a short run prints no bar
    reindexed = invoke("--store", str(store_path), "reindex")
    assert reindexed.exit_code == 0 and reindexed.stderr.startswith("re-projecting")


def test_list_filters_by_cwd(store_path: Path, filled: dict[str, str]) -> None:
    store = ["--store", str(store_path)]
    listed = json.loads(invoke(*store, "list", "--cwd", "/repo", "--json").stdout)
    assert sorted(t["thread_id"] for t in listed) == sorted([filled["flaky"], filled["docs"]])
    assert json.loads(invoke(*store, "list", "--cwd", "/elsewhere", "--json").stdout) == []
    found = json.loads(invoke(*store, "list", "--search", "flak", "--json").stdout)
    assert [t["thread_id"] for t in found] == [filled["flaky"]]
