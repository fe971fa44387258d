"""Import Codex rollout files (``~/.codex/sessions/YYYY/MM/DD/rollout-*.jsonl``) into a store.

Each rollout file is one session. Its thread id is the ``id`` of its first
``session_meta`` line, else the UUID at the end of the file name
(``rollout-2025-01-05T12-00-00-<uuid>.jsonl``). Every line that is a JSON object with a
``type`` (and that the store accepts: a valid ``timestamp``, not too large) becomes one
history item, in file order; the metadata then follows from the usual fold (DESIGN §2).
Other lines are reported as ``file:line: reason`` and skipped, and the rest is imported.
Several files with one id (a resumed session) form one thread, in path order, which is
chronological for Codex's date-named directories and files.

**Idempotency is by content.** The importer compares the thread's history with the
file's valid lines, item by item, and appends only the lines past the end of that
common prefix. So:

- importing again appends nothing, and a file that grew appends only its new lines;
- a malformed line anywhere is skipped the same way every time, so it never shifts the
  comparison; a torn last line (a file still being written) is skipped now and imported
  once it is complete;
- an import that stopped halfway (crash, Ctrl-C) resumes where its last durable batch
  ended, because batches are appended in file order;
- items thread_store appends itself (renames, archive: types ``thread_store.*``) are
  ignored in the comparison, and rollout lines may not use those types;
- a thread whose history is not a prefix of its files (the id is taken by something
  else, or the file was rewritten) is reported and left alone, never appended to.

The price is reading each imported thread's history once per import, which costs about
as much as reading the file itself. A counter (items imported so far) would be cheaper
but breaks as soon as the thread gets an item that is not from the file.

**Unchanged files are skipped.** Given a ``seen`` record (``thread-store import-codex``
keeps one beside the store), a thread whose files all have the size and modification
time they had when it was last imported in full is not compared again: only a cheap
check that the thread still exists. Only what changed is verified.

**A rewritten file** (edited, so the thread's history is no longer a prefix of it, or
truncated, so the history holds more than it) is reported and left alone;
``replace=True`` deletes such a thread and imports it again from its files.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._options import check_path
from .errors import InvalidArgument, InvalidItem, ThreadDiscarded, ThreadNotFound, ThreadStoreError
from .model import DEFAULT_MAX_ITEM_BYTES, encode_item
from .store import ThreadStore

#: Items per ``append`` call.
BATCH = 500
_RESERVED_PREFIX = "thread_store."
_UUID_IN_NAME = re.compile(
    r"([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})\.jsonl$")
_END = object()


@dataclass(frozen=True, slots=True)
class SkippedLine:
    """A rollout line that was not imported, and why."""

    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass(slots=True)
class ImportReport:
    """What :func:`import_codex` did.

    ``errors`` names the files or threads that were not imported at all (no id, a
    conflicting history, a discarded id); ``skipped`` the single lines left out.
    """

    files: int = 0
    files_unchanged: int = 0
    threads_created: int = 0
    threads_updated: int = 0
    threads_unchanged: int = 0
    threads_replaced: int = 0
    items_appended: int = 0
    skipped: list[SkippedLine] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Return the report as a JSON-ready dict."""
        return {"files": self.files, "files_unchanged": self.files_unchanged,
                "threads_created": self.threads_created,
                "threads_updated": self.threads_updated,
                "threads_unchanged": self.threads_unchanged,
                "threads_replaced": self.threads_replaced,
                "items_appended": self.items_appended,
                "skipped": [{"path": s.path, "line": s.line, "reason": s.reason} for s in self.skipped],
                "errors": list(self.errors)}


def import_codex(store: ThreadStore, directory: str | os.PathLike[str],
                 progress: Callable[[int, int], None] | None = None, *,
                 seen: MutableMapping[str, dict[str, Any]] | None = None,
                 replace: bool = False) -> ImportReport:
    """Import every ``rollout-*.jsonl`` under ``directory`` (recursively) into ``store``.

    Safe to run again on the same directory: see the module docstring.

    :param progress: called as ``progress(threads_done, threads_total)`` after each thread.
    :param seen: the files imported in full so far, ``{path: {"size", "mtime_ns",
        "thread_id"}}``; read to skip unchanged files and updated in place. Keep it
        between runs (JSON-ready) to make a re-import cheap.
    :param replace: delete and re-import a thread whose files no longer start with its
        history (a rollout that was edited or truncated).
    :returns: counts, skipped lines (``file:line: reason``) and per-thread errors.
    :raises InvalidArgument: ``directory`` is not a directory.

    >>> with ThreadStore.open("data/threads") as store:  # doctest: +SKIP
    ...     report = import_codex(store, Path.home() / ".codex" / "sessions")
    """
    root = check_path(directory)
    if not root.is_dir():
        raise InvalidArgument(f"{root} is not a directory; pass a Codex sessions directory "
                              "such as ~/.codex/sessions")
    seen = {} if seen is None else seen
    report = ImportReport()
    groups: dict[str, list[_File]] = {}
    for path in sorted(root.rglob("rollout-*.jsonl")):
        if not path.is_file():
            continue
        report.files += 1
        file = _File.stat(path, seen.get(str(path)))
        if file.thread_id is None:
            report.errors.append(f"{path}: no session_meta id and no UUID in the file name; "
                                 "file not imported")
        else:
            groups.setdefault(file.thread_id, []).append(file)
    for done, (thread_id, files) in enumerate(groups.items(), 1):
        if all(f.unchanged for f in files) and _still_there(store, thread_id):
            report.files_unchanged += len(files)
            report.threads_unchanged += 1
        else:
            try:
                if _import_thread(store, thread_id, [f.path for f in files], report, replace):
                    seen.update((str(f.path), f.record()) for f in files)
            except (InvalidArgument, ThreadDiscarded) as exc:
                report.errors.append(f"{files[0].path}: thread {thread_id!r} not imported: {exc}")
        if progress is not None:
            progress(done, len(groups))
    return report


@dataclass(frozen=True, slots=True)
class _File:
    """A rollout file as found now, and whether it is as it was when last imported."""

    path: Path
    size: int
    mtime_ns: int
    thread_id: str | None
    unchanged: bool

    @classmethod
    def stat(cls, path: Path, last: Mapping[str, Any] | None) -> _File:
        # Taken before the file is read: a file growing meanwhile is verified next time.
        info = path.stat()
        unchanged = (last is not None and last.get("size") == info.st_size
                     and last.get("mtime_ns") == info.st_mtime_ns and isinstance(last.get("thread_id"), str))
        thread_id = last["thread_id"] if unchanged and last is not None else _thread_id(path)
        return cls(path, info.st_size, info.st_mtime_ns, thread_id, unchanged)

    def record(self) -> dict[str, Any]:
        """What ``seen`` keeps of this file."""
        return {"size": self.size, "mtime_ns": self.mtime_ns, "thread_id": self.thread_id}


def _still_there(store: ThreadStore, thread_id: str) -> bool:
    """Whether the thread exists (a deleted thread is imported again); one cheap read."""
    try:
        store.status(thread_id)
    except (ThreadNotFound, ThreadDiscarded):
        return False
    return True


def _import_thread(store: ThreadStore, thread_id: str, paths: list[Path],
                   report: ImportReport, replace: bool) -> bool:
    """Import one thread's files; returns whether it now holds every importable line."""
    skipped = len(report.skipped)
    conflict, appended, existed = _append_new_lines(store, thread_id, paths, report)
    if conflict is not None and replace:
        store.delete_thread(thread_id)
        first_pass = set(report.skipped[skipped:])
        again = ImportReport()
        conflict, appended, _ = _append_new_lines(store, thread_id, paths, again)
        report.skipped.extend(s for s in again.skipped if s not in first_pass)
        report.threads_replaced += 1
        report.items_appended += appended
        return conflict is None
    if conflict is not None:
        report.errors.append(conflict)
        return False
    report.items_appended += appended
    if appended and existed:
        report.threads_updated += 1
    elif appended:
        report.threads_created += 1
    elif existed:
        report.threads_unchanged += 1
    return True


def _append_new_lines(store: ThreadStore, thread_id: str, paths: list[Path],
                      report: ImportReport) -> tuple[str | None, int, bool]:
    """Append the lines of ``paths`` past the thread's common prefix with them.

    :returns: ``(conflict, appended, existed)``: why nothing was imported (the history
        is not a prefix of the files) or ``None``, how many items were appended, and
        whether the thread existed before.
    """
    try:
        history: Iterator[dict[str, Any]] | None = _own_items(store, thread_id)
        existed = True
    except ThreadNotFound:
        history, existed = None, False
    exists = existed
    pending: list[dict[str, Any]] = []
    appended = 0
    for path, number, item in _valid_items(paths, report):
        if history is not None:
            stored = next(history, _END)
            if stored is _END:
                history = None  # past the common prefix: everything from here is new
            elif stored == item:
                continue
            else:  # nothing was appended yet: appends start only past the common prefix
                return (f"{path}:{number}: thread {thread_id!r} in the store differs from this "
                        "line: its history is not a prefix of the rollout (was the file edited "
                        "or truncated?), so nothing was imported for it. Import with "
                        "replace=True (thread-store import-codex --replace) to delete the "
                        "thread and import it again from its files"), 0, existed
        pending.append(item)
        if len(pending) >= BATCH:
            exists = _append(store, thread_id, pending, exists)
            appended += len(pending)
            pending = []
    if history is not None and next(history, _END) is not _END:
        return (f"{paths[-1]}: thread {thread_id!r} in the store holds more items than its rollout "
                "(was the file truncated, or a file of the session removed?), so nothing was "
                "imported for it. Import with replace=True (thread-store import-codex --replace) "
                "to delete the thread and import it again from its files"), 0, existed
    if pending:
        exists = _append(store, thread_id, pending, exists)
        appended += len(pending)
    if appended:
        store.flush(thread_id)
    return None, appended, existed


def _append(store: ThreadStore, thread_id: str, items: list[dict[str, Any]], exists: bool) -> bool:
    if not exists:
        store.create_thread(thread_id)
    try:
        store.append(thread_id, items)
    except InvalidItem as exc:  # e.g. a store opened with a smaller max_item_bytes
        raise InvalidArgument(f"the store rejected an item: {exc}") from exc
    return True


def _own_items(store: ThreadStore, thread_id: str) -> Iterator[dict[str, Any]]:
    """The thread's history minus thread_store's own edits; raises at once if unknown."""
    first = store.read_history(thread_id, limit=BATCH)

    def pages() -> Iterator[dict[str, Any]]:
        page = first
        while page:
            for stored in page:
                if not str(stored.item.get("type", "")).startswith(_RESERVED_PREFIX):
                    yield stored.item
            page = store.read_history(thread_id, after_seq=page[-1].seq, limit=BATCH)

    return pages()


def _valid_items(paths: list[Path], report: ImportReport) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    """Yield ``(path, line number, item)`` of every importable line; record the others."""
    for path in paths:
        with path.open("rb") as lines:
            for number, raw in enumerate(lines, 1):
                item, reason = _parse(raw)
                if item is not None:
                    yield path, number, item
                elif reason:
                    report.skipped.append(SkippedLine(str(path), number, reason))


def _parse(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    """Return ``(item, "")``, or ``(None, reason)``; a blank line has no reason."""
    torn = "" if raw.endswith(b"\n") else " (last line without a newline: still being written?)"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not valid UTF-8" + torn
    text = text.strip()
    if not text:
        return None, ""
    try:
        item = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return None, f"invalid JSON: {exc}{torn}"
    if not isinstance(item, dict):
        return None, f"a line must be a JSON object, not {type(item).__name__}"
    kind = item.get("type")
    if isinstance(kind, str) and kind.startswith(_RESERVED_PREFIX):
        return None, f"item type {kind!r} is reserved for thread_store's own edits"
    try:
        encode_item(item, 0, DEFAULT_MAX_ITEM_BYTES)
    except ThreadStoreError as exc:
        return None, str(exc)
    return item, ""


def _thread_id(path: Path) -> str | None:
    """The ``id`` of the first ``session_meta`` line, else the UUID in the file name."""
    with path.open("rb") as lines:
        for raw in lines:
            item, _ = _parse(raw)
            if item is not None and item["type"] == "session_meta":
                payload = item.get("payload")
                found = payload.get("id") if isinstance(payload, dict) else None
                if isinstance(found, str) and found:
                    return found
                break
    match = _UUID_IN_NAME.search(path.name)
    return match.group(1) if match else None
