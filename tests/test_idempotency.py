"""DESIGN §3: ``idempotency_key`` on ``append`` and ``append_and_flush``, on every backend.

Same key and items: nothing is written and the first generation comes back; same key,
other items: ``InvalidArgument`` and nothing written; an empty append records nothing;
keys are scoped to their thread and live as long as it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from conftest import Backend, plain, user_msg
from thread_store import InvalidArgument, ThreadStore


def _items(store: ThreadStore, tid: str) -> list[dict[str, Any]]:
    return [stored.item for stored in store.read_history(tid)]


def test_a_repeated_append_writes_nothing_and_returns_the_first_generation(store: ThreadStore) -> None:
    tid = store.create_thread()
    first = store.append(tid, [plain(1), plain(2)], idempotency_key="turn-1")
    store.append(tid, [plain(3)])
    again = store.append(tid, [plain(1), plain(2)], idempotency_key="turn-1")
    assert first == again == 2
    assert _items(store, tid) == [plain(1), plain(2), plain(3)]
    # Its barrier targets the first generation (2): the worker may or may not have
    # projected the later item by then.
    meta = store.append_and_flush(tid, [plain(1), plain(2)], idempotency_key="turn-1", timeout=30)
    assert meta.projected_seq >= 2 and meta.item_count == meta.projected_seq
    assert store.flush(tid, timeout=30).item_count == 3


def test_the_same_key_with_other_items_is_refused_and_writes_nothing(store: ThreadStore) -> None:
    tid = store.create_thread()
    store.append(tid, [plain(1)], idempotency_key="k")
    with pytest.raises(InvalidArgument, match="other items"):
        store.append(tid, [plain(2)], idempotency_key="k")
    with pytest.raises(InvalidArgument, match="other items"):
        store.append_and_flush(tid, [plain(1), plain(1)], idempotency_key="k", timeout=30)
    assert _items(store, tid) == [plain(1)]
    assert store.flush(tid, timeout=30).item_count == 1


def test_keys_are_scoped_to_their_thread_and_an_empty_append_records_nothing(store: ThreadStore) -> None:
    one, two = store.create_thread(), store.create_thread()
    assert store.append(one, [], idempotency_key="k") == 0
    assert store.append(one, [plain(1)], idempotency_key="k") == 1  # the empty one recorded nothing
    assert store.append(two, [plain(9)], idempotency_key="k") == 1  # another thread, another key
    assert _items(store, one) == [plain(1)] and _items(store, two) == [plain(9)]


def test_a_deleted_thread_takes_its_keys_with_it(store: ThreadStore) -> None:
    tid = store.create_thread("reused")
    store.append(tid, [plain(1)], idempotency_key="k")
    store.delete_thread(tid)
    store.create_thread("reused")
    assert store.append("reused", [plain(2)], idempotency_key="k") == 1
    assert _items(store, "reused") == [plain(2)]


@pytest.mark.parametrize("key", ["", "x" * 129, "a\x00b", "\ud800", 7, b"k"])
def test_malformed_keys_are_refused_before_anything_is_written(store: ThreadStore, key: Any) -> None:
    tid = store.create_thread()
    with pytest.raises(InvalidArgument, match="idempotency_key"):
        store.append(tid, [plain(1)], idempotency_key=key)
    assert _items(store, tid) == []


def test_a_key_outlives_a_reopen(backend: Backend) -> None:
    backend.requires("reopen")
    with backend.open_store() as store:
        tid = store.create_thread()
        assert store.append(tid, [user_msg("hi")], idempotency_key="once") == 1
    with backend.open_store() as store:
        assert store.append(tid, [user_msg("hi")], idempotency_key="once") == 1
        assert len(store.read_history(tid)) == 1


def test_the_async_face_takes_keys_too(backend: Backend) -> None:
    async def run() -> tuple[int, int, int]:
        async with backend.open_async() as store:
            tid = await store.create_thread()
            first = await store.append(tid, [plain(1)], idempotency_key="k")
            meta = await store.append_and_flush(tid, [plain(1)], idempotency_key="k", timeout=30)
            return first, meta.item_count, len(await store.read_history(tid))

    assert asyncio.run(run()) == (1, 1, 1)
