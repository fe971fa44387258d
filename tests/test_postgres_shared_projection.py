"""Projections shared by several stores on one PostgreSQL schema (issue 12 point 6): a
store resumes from another's row instead of folding again what it folded, and an attempt
whose target another store's row already covers writes nothing.

Two stores in one process stand for two processes: they share nothing but the server
(each its own pool, projector and fold cache).
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import pytest
from conftest import new_schema, user_msg

from thread_store import ThreadStore
from thread_store.derive import CodexRules, State

HANG = 30.0


class _Counting(CodexRules):
    """The Codex rules (same ``rules_id``), counting the items they fold (a projection
    folds stored text through ``apply_stored``, which never calls ``apply``)."""

    def __init__(self) -> None:
        super().__init__()
        self.folded = 0

    def apply(self, state: dict[str, Any], item: Mapping[str, Any], ts_us: int) -> dict[str, Any]:
        self.folded += 1
        return super().apply(state, item, ts_us)

    def apply_stored(self, state: State, texts: Sequence[str], ts_us: Sequence[int]) -> State:
        self.folded += len(texts)
        return super().apply_stored(state, texts, ts_us)


@pytest.fixture
def pair(pg_url: str) -> Iterator[tuple[ThreadStore, ThreadStore, _Counting]]:
    """Stores A (counting its folds) and B on one new schema; no catch-up scan meanwhile."""
    schema, rules = new_schema(), _Counting()
    with ThreadStore.open(pg_url, schema=schema, rules=rules, catch_up_after=3600.0) as a, \
            ThreadStore.open(pg_url, schema=schema, catch_up_after=3600.0) as b:
        yield a, b, rules


def test_a_store_resumes_from_another_stores_further_row(
        pair: tuple[ThreadStore, ThreadStore, _Counting]) -> None:
    a, b, rules = pair
    tid = a.create_thread()
    a.append_and_flush(tid, [user_msg("a's first")], timeout=HANG)  # A caches its fold at 1
    for n in range(5):
        b.append(tid, [user_msg(f"b's {n}")])
    b.flush(tid, timeout=HANG)  # B's row is at 6
    before = rules.folded
    meta = a.append_and_flush(tid, [user_msg("a's second")], timeout=HANG)
    assert rules.folded - before == 1  # item 7 only, not 2..7 again
    assert (meta.item_count, meta.projected_seq) == (7, 7)
    assert b.read_thread(tid).title == a.read_thread(tid).title == "a's first"


def test_an_attempt_another_stores_row_covers_writes_nothing(
        pair: tuple[ThreadStore, ThreadStore, _Counting]) -> None:
    a, b, rules = pair
    tid = a.create_thread()
    a.append_and_flush(tid, [user_msg("one")], timeout=HANG)
    b.append(tid, [user_msg("two")])  # A's buffer no longer joins its cached fold
    a.pause_projection()
    generation = a.append(tid, [user_msg("three")])
    b.flush(tid, timeout=HANG)  # B projects up to the head, A's append included
    written, folded = a.stats().rows_written, rules.folded
    a.resume_projection()
    meta = a.flush(tid, generation=generation, timeout=HANG)
    assert (a.stats().rows_written, rules.folded) == (written, folded)
    assert (meta.item_count, meta.projected_seq) == (3, 3)
    # A's next append resumes from the stored row.
    assert a.append_and_flush(tid, [user_msg("four")], timeout=HANG).item_count == 4
    assert rules.folded - folded == 1


def test_a_row_of_a_thread_created_again_is_neither_covering_nor_resumed(
        pair: tuple[ThreadStore, ThreadStore, _Counting]) -> None:
    a, b, _ = pair
    tid = a.create_thread()
    a.append_and_flush(tid, [user_msg("old one")], timeout=HANG)
    b.delete_thread(tid)
    b.create_thread(tid)
    for n in range(3):
        b.append(tid, [user_msg(f"new {n}")])
    b.flush(tid, timeout=HANG)
    meta = a.append_and_flush(tid, [user_msg("new 3")], timeout=HANG)
    assert (meta.item_count, meta.title) == (4, "new 0")
