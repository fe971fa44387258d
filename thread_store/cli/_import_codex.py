"""The ``import-codex`` command, and the record beside the store that lets a re-import skip
unchanged files (the store itself keeps no application bookkeeping)."""

from __future__ import annotations

import json
import os
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click

from thread_store import ThreadStore
from thread_store.codex import import_codex

from ._output import echo_json, example, plural, progress

#: What ``import-codex`` has imported in full, in the store directory.
_IMPORT_RECORD = "codex-import.json"


@click.command("import-codex", epilog=example("thread-store import-codex",
                                              "thread-store import-codex ~/old-laptop/.codex/sessions --replace"))
@click.argument("directory", required=False,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--replace", is_flag=True,
              help="Delete and re-import threads whose rollout was edited or truncated.")
@click.option("--json", "as_json", is_flag=True, help="Print the import report as JSON.")
@click.pass_obj
def import_codex_command(store_path: Path, directory: Path | None, replace: bool, as_json: bool) -> None:
    """Import Codex rollout files (rollout-*.jsonl, recursively); safe to run again.

    DIRECTORY defaults to $CODEX_HOME/sessions, else ~/.codex/sessions. Re-importing
    appends only lines that are new since the last import, and skips files whose size
    and modification time are as they were (the record is STORE/codex-import.json).
    Lines that are not JSON objects with a "type" are reported as FILE:LINE and
    skipped. Exits 1 when a whole thread could not be imported.
    """
    directory = directory or _codex_sessions()
    record = store_path / _IMPORT_RECORD
    with ThreadStore.open(store_path) as store, ExitStack() as bars:
        seen = _read_json_object(record)
        try:
            report = import_codex(store, directory, progress=progress(bars, "importing"), seen=seen,
                                  replace=replace)
        finally:
            _write_json_atomically(record, seen)
    if as_json:
        echo_json(report.to_json())
    else:
        for line in report.skipped:
            click.echo(f"skipped {line}", err=True)
        for problem in report.errors:
            click.echo(f"not imported: {problem}", err=True)
        replaced = f", {report.threads_replaced} replaced" if report.threads_replaced else ""
        click.echo(f"{plural(report.files, 'file')} ({report.files_unchanged} unchanged, skipped): "
                   f"{plural(report.threads_created, 'thread')} created, {report.threads_updated} "
                   f"updated, {report.threads_unchanged} unchanged{replaced}; "
                   f"{plural(report.items_appended, 'item')} appended, "
                   f"{plural(len(report.skipped), 'line')} skipped")
    if report.errors:
        sys.exit(1)


def _codex_sessions() -> Path:
    """Codex's sessions directory: ``$CODEX_HOME/sessions``, else ``~/.codex/sessions``."""
    home = os.environ.get("CODEX_HOME")
    sessions = (Path(home) if home else Path.home() / ".codex") / "sessions"
    if not sessions.is_dir():
        raise click.UsageError(f"no Codex sessions directory at {sessions}; pass DIRECTORY")
    return sessions


def _read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object kept in a file; empty when the file is missing or unreadable."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a lost record only makes the next import verify every file
    return value if isinstance(value, dict) else {}


def _write_json_atomically(path: Path, value: Any) -> None:
    """Replace ``path`` with ``value`` as JSON, never leaving a half-written file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value), encoding="utf-8")
    os.replace(partial, path)
