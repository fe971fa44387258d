"""The attempt runner's fold: items read back from history are parsed only when a rule
reads their type, and the fold is the same as parsing every one."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from thread_store import ThreadStore, _attempt
from thread_store._attempt import item_type


@pytest.mark.parametrize(("text", "kind"), [
    ('{"type":"response_item","payload":{"type":"message"}}', "response_item"),
    ('{"payload":{"type":"x"},"type":"response_item"}', None),  # type not first: parse
    ('{"type":"a\\"b","payload":{}}', None),  # an escape in the type: parse
    ('{"type":"unterminated', None),
    ('{"type": "spaced"}', None),  # not as json.dumps(separators=...) writes it
])
def test_item_type_reads_a_leading_type_or_gives_up(text: str, kind: str | None) -> None:
    assert item_type(text) == kind
    if kind is not None:
        assert json.loads(text)["type"] == kind


def test_a_fold_from_history_parses_only_the_items_rules_read(
        store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    response = {"type": "response_item", "payload": {"type": "message", "text": "x" * 100}}
    late_type = {"payload": {"type": "reasoning"}, "type": "response_item"}
    first = {"type": "event_msg", "payload": {"type": "user_message", "message": "fix the test"}}
    with ThreadStore.open(store_path) as store:
        store.pause_projection()
        tid = store.create_thread()
        store.append(tid, [first] + [response] * 20 + [late_type])
        store.close(timeout=0)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{store_path / 'index.db'}{suffix}").unlink(missing_ok=True)
    parsed: list[str] = []

    def loads(text: str) -> object:
        parsed.append(text)
        return json.loads(text)

    monkeypatch.setattr(_attempt, "json", SimpleNamespace(loads=loads, dumps=json.dumps))
    with ThreadStore.open(store_path) as store:
        meta = store.flush(tid, timeout=30.0)
    assert meta.item_count == 22 and meta.title == "fix the test"
    # The user message and the item whose type is not first, never the 20 response items.
    assert sum(1 for text in parsed if '"response_item"' in text) == 1
