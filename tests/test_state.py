"""The projector's per-thread state: retry policy and the per-thread item buffer."""

from __future__ import annotations

import random

import pytest

from thread_store.storage import StoredRow
from thread_store import InvalidArgument, RetryPolicy
from thread_store._state import BUFFER_BYTES, BUFFER_ITEMS, ThreadState


@pytest.mark.parametrize("kwargs", [{"attempts": 0}, {"attempts": 1.5}, {"attempts": True},
                                    {"base_delay": -0.1}, {"max_delay": float("nan")},
                                    {"max_delay": float("inf")}])
def test_retry_policy_rejects_bad_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument, match="RetryPolicy"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_backoff_grows_is_capped_and_jittered() -> None:
    policy = RetryPolicy(attempts=8, base_delay=0.1, max_delay=0.5)
    rng = random.Random(7)
    delays = [policy.delay(n, rng) for n in range(1, 8)]
    for n, delay in enumerate(delays, 1):
        nominal = min(0.5, 0.1 * 2 ** (n - 1))
        assert nominal / 2 <= delay <= nominal


def _item(seq: int, size: int = 10) -> StoredRow:
    return StoredRow(seq, seq, "x" * size, "response_item")


def test_buffer_holds_unprojected_items_until_a_cap_then_gives_up() -> None:
    st = ThreadState("t", head=0, projected=0)
    st.buffer_items([_item(n) for n in range(1, BUFFER_ITEMS + 1)])
    assert st.buffer is not None and len(st.buffer) == BUFFER_ITEMS
    st.buffer_items([_item(BUFFER_ITEMS + 1)])
    assert st.buffer is None  # past the cap: the projector reads history instead
    st.head = st.projected = BUFFER_ITEMS + 1
    st.projected_to(st.head, {"item_count": st.head})
    assert st.buffer == []  # caught up: buffering starts again


def test_buffer_byte_cap_and_projection_trims_covered_items() -> None:
    st = ThreadState("t", head=0, projected=0)
    st.buffer_items([_item(1), _item(2), _item(3)])
    st.head = 3
    st.projected_to(2, None)
    assert st.buffer == [_item(3)] and st.projected == 2
    st.buffer_items([_item(4, BUFFER_BYTES)])
    assert st.buffer is None
