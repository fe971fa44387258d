"""The attempt runner's fold of stored items: what rules never read is never parsed, the
result is the fold of every parsed item, and rules without the optional page fold
(``apply_stored``) or ``item_types`` see every item whole, as before."""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Mapping

import pytest

from thread_store import CodexRules, ProjectionFailed, ThreadMetadata, ThreadStore
from thread_store._attempt import PAGE_ITEMS
from thread_store.derive import State
from thread_store.model import utc
from thread_store.workload import response_item, token_count, user_message

START = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
AGENT_SAYS = {"timestamp": "2026-01-02T03:04:06.000Z", "type": "event_msg",
              "payload": {"type": "agent_message", "message": "done"}}


def _history(rng: random.Random) -> list[dict[str, Any]]:
    """Codex rollout lines (timestamp first): a message, then response items, an event no
    rule reads and token counts, the last of them with usage."""
    items = [user_message("Fix the flaky test", START)]
    for n in range(1, 13):
        at = START + timedelta(seconds=n)
        items.append(response_item(rng, at) if n % 3 else token_count(at, 1000 * n))
    return items + [AGENT_SAYS, token_count(START + timedelta(seconds=20), 99_000),
                    token_count(START + timedelta(seconds=21), 0, info=False)]


def _lose_index_and_break(store_path: Path, tid: str, broken: Any) -> list[int]:
    """Drop ``index.db`` and break, in ``history.db`` itself, the JSON text of every stored
    item ``broken(item)`` picks (its start stays, its end no parser takes); return their seqs."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{store_path / 'index.db'}{suffix}").unlink(missing_ok=True)
    conn = sqlite3.connect(store_path / "history.db")
    try:
        rows = conn.execute("SELECT seq, item FROM items WHERE thread_id = ?", (tid,)).fetchall()
        seqs = [seq for seq, text in rows if broken(json.loads(text))]
        with conn:
            conn.executemany("UPDATE items SET item = substr(item, 1, length(item) - 1) || ',,{' "
                             "WHERE thread_id = ? AND seq = ?", [(tid, seq) for seq in seqs])
    finally:
        conn.close()
    return seqs


def _stored(store_path: Path, rules: Any = None) -> tuple[str, list[dict[str, Any]]]:
    """A thread with :func:`_history` appended while projection is paused, then closed."""
    items = _history(random.Random(5))
    with ThreadStore.open(store_path, **({} if rules is None else {"rules": rules})) as store:
        store.pause_projection()
        tid = store.create_thread()
        store.append(tid, items)
        store.close(timeout=0)
    return tid, items


def _expected(items: list[dict[str, Any]]) -> State:
    rules = CodexRules()
    state = rules.initial("t", 0)
    for item in items:
        state = rules.apply(state, item, 0)
    return state


def _unread(item: Mapping[str, Any]) -> bool:
    return item["type"] == "response_item" or item["payload"].get("type") == "agent_message"


def test_items_no_rule_reads_fold_unparsed_even_when_their_text_is_broken(store_path: Path) -> None:
    tid, items = _stored(store_path)
    expected = _expected(items)
    broken = _lose_index_and_break(store_path, tid, _unread)
    assert len(broken) == 9  # eight response items and the agent's message
    with ThreadStore.open(store_path) as store:
        meta = store.flush(tid, timeout=30.0)
    assert meta.item_count == len(items) == 16 and meta.title == "Fix the flaky test"
    assert meta.token_usage == expected["token_usage"] and meta.token_usage["total_tokens"] == 99_000


def test_token_counts_a_later_one_overrides_are_not_parsed(store_path: Path) -> None:
    tid, items = _stored(store_path)
    # Every token count but the last two: the one with usage wins, the one after has none.
    counts = [i for i, item in enumerate(items) if item["payload"].get("type") == "token_count"]
    superseded = {json.dumps(items[i], separators=(",", ":")) for i in counts[:-2]}
    _lose_index_and_break(store_path, tid,
                          lambda item: json.dumps(item, separators=(",", ":")) in superseded)
    with ThreadStore.open(store_path) as store:
        meta = store.flush(tid, timeout=30.0)
    assert meta.token_usage is not None and meta.token_usage["total_tokens"] == 99_000


def test_a_broken_item_a_rule_reads_fails_the_projection(store_path: Path) -> None:
    # The converse, so the tests above are not vacuous: a broken user message is parsed.
    tid, _ = _stored(store_path)
    _lose_index_and_break(store_path, tid, lambda item: item["payload"].get("type") == "user_message")
    with ThreadStore.open(store_path) as store:
        with pytest.raises(ProjectionFailed):
            store.flush(tid, timeout=30.0)


class TypedRules:
    """Rules with ``item_types`` but no ``apply_stored``: items of other types reach
    ``apply`` as just their type, parsed or not."""

    item_types = frozenset({"event_msg"})
    rules_id = "test.typed/1"

    def __init__(self) -> None:
        self._codex = CodexRules()

    def initial(self, thread_id: str, created_us: int) -> State:
        return self._codex.initial(thread_id, created_us)

    def apply(self, state: State, item: Mapping[str, Any], ts_us: int) -> State:
        assert item["type"] == "event_msg" or item == {"type": item["type"]}
        return self._codex.apply(state, item, ts_us)

    def metadata(self, thread_id: str, state: State, projected_seq: int) -> ThreadMetadata:
        return self._codex.metadata(thread_id, state, projected_seq)


def test_item_types_spare_parsing_items_stamped_before_their_type(store_path: Path) -> None:
    tid, items = _stored(store_path, TypedRules())
    _lose_index_and_break(store_path, tid, lambda item: item["type"] == "response_item")
    with ThreadStore.open(store_path, rules=TypedRules()) as store:
        meta = store.flush(tid, timeout=30.0)
    assert meta.item_count == len(items) and meta.token_usage == _expected(items)["token_usage"]


class PlainRules:
    """User-written rules with only the three methods: they see every item whole."""

    rules_id = "test.plain/1"

    def initial(self, thread_id: str, created_us: int) -> State:
        return {"created_us": created_us, "digest": "", "seen": 0}

    def apply(self, state: State, item: Mapping[str, Any], ts_us: int) -> State:
        line = json.dumps([state["digest"], ts_us, item], sort_keys=True)
        return {**state, "digest": hashlib.sha256(line.encode()).hexdigest(), "seen": state["seen"] + 1}

    def metadata(self, thread_id: str, state: State, projected_seq: int) -> ThreadMetadata:
        created = utc(state["created_us"])
        return ThreadMetadata(thread_id=thread_id, name=state["digest"], item_count=state["seen"],
                              created_at=created, updated_at=created, recency_at=created,
                              projected_seq=projected_seq)


def _plain_fold(store_path: Path, tid: str) -> str:
    """The digest of every stored item, parsed, in order, at its stored time."""
    rules = PlainRules()
    conn = sqlite3.connect(store_path / "history.db")
    try:
        created = conn.execute("SELECT created_us FROM threads WHERE thread_id = ?", (tid,)).fetchone()[0]
        state = rules.initial(tid, created)
        for ts_us, text in conn.execute("SELECT ts_us, item FROM items WHERE thread_id = ? "
                                        "ORDER BY seq", (tid,)):
            state = rules.apply(state, json.loads(text), ts_us)
    finally:
        conn.close()
    return str(state["digest"])


def test_rules_without_the_optional_parts_see_every_item_whole(store_path: Path) -> None:
    items = _history(random.Random(7))
    with ThreadStore.open(store_path, rules=PlainRules()) as store:
        tid = store.create_thread()
        live = store.append_and_flush(tid, items[:3], timeout=30.0)  # from the buffer
        store.pause_projection()
        store.append(tid, items[3:])
        store.close(timeout=0)
    assert live.item_count == 3
    for suffix in ("", "-wal", "-shm"):
        Path(f"{store_path / 'index.db'}{suffix}").unlink(missing_ok=True)
    with ThreadStore.open(store_path, rules=PlainRules()) as store:
        meta = store.flush(tid, timeout=30.0)  # from history, after the index was lost
    assert meta.item_count == len(items) and meta.name == _plain_fold(store_path, tid)


def test_a_fold_reads_history_past_the_batchs_first_page(store_path: Path) -> None:
    # The batch reads the first PAGE_ITEMS items of each thread in one read; the rest
    # comes page by page. The only token count is the last item, in the third page.
    rng = random.Random(7)
    later = [response_item(rng, START + timedelta(seconds=n)) for n in range(1, 2 * PAGE_ITEMS + 200)]
    items = [user_message("Fix the flaky test", START), *later,
             token_count(START + timedelta(hours=1), 77_000)]
    with ThreadStore.open(store_path) as store:
        tid = store.create_thread()
        store.pause_projection()
        for start in range(0, len(items), 500):
            store.append(tid, items[start:start + 500])
        store.resume_projection()
        meta = store.flush(tid, timeout=30.0)
    assert meta.item_count == len(items) > 2 * PAGE_ITEMS
    assert meta.title == "Fix the flaky test" and meta.token_usage == _expected(items)["token_usage"]
    assert meta.token_usage is not None and meta.token_usage["total_tokens"] == 77_000
