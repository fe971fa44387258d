"""The barrier core's reads as coroutines (``_port_reads``): the sync face completes them
without an event loop, and a registration whose thread's state is forgotten while it
reads re-reads outside the projector's lock (it is not reentrant)."""

from __future__ import annotations

import asyncio
import threading

import pytest
from conftest import user_msg

from thread_store import ThreadStore
from thread_store._port_reads import PortReads, complete
from thread_store._schedule import IDLE_STATES

HANG = 30.0


async def _suspends() -> int:
    await asyncio.sleep(0)
    return 1


async def _returns() -> int:
    return 7


def test_complete_runs_a_coroutine_that_never_suspends() -> None:
    assert complete(_returns()) == 7


def test_complete_refuses_a_coroutine_that_suspends() -> None:
    with pytest.raises(RuntimeError, match="suspended"):
        complete(_suspends())


class EvictingReads(PortReads):
    """The sync ports, but reading the incarnation first makes the projector retire one
    more idle thread than it keeps, so it forgets the least recently idle one."""

    def __init__(self, store: ThreadStore) -> None:
        super().__init__(store._storage)
        self._store = store

    async def incarnation(self, thread_id: str) -> int:
        other = self._store.create_thread()
        self._store.append_and_flush(other, [user_msg("one more idle thread")], timeout=HANG)
        return await super().incarnation(thread_id)


def test_a_state_forgotten_during_the_registration_s_read_is_read_again() -> None:
    with ThreadStore.open(":memory:") as store:
        first = store.create_thread()
        store.append_and_flush(first, [user_msg("least recently idle")], timeout=HANG)
        for _ in range(IDLE_STATES - 1):
            tid = store.create_thread()
            store.append_and_flush(tid, [user_msg("idle")], timeout=HANG)
        projector = store._barriers.projector()
        result: dict[str, object] = {}

        def register() -> None:
            result["waiter"] = complete(projector.register(EvictingReads(store), first, 1))

        # A thread, so a deadlock fails the test instead of hanging it.
        worker = threading.Thread(target=register, daemon=True)
        worker.start()
        worker.join(HANG)
        assert not worker.is_alive(), "the registration deadlocked on the projector's lock"
        assert result == {"waiter": None}  # projected: the stored checkpoint says so
