"""Soak: eight threads hammer one store with every kind of call (DESIGN §1.4, §1.7, §1.10),
on every backend.

No deadlock (faulthandler dumps every stack if the run stalls), no untyped error, metadata
that never moves backwards, and at the end every live thread is projected to its head and
equals the fold of its history.
"""

from __future__ import annotations

import faulthandler
import random
import sys
import threading
import time
from collections import Counter

import pytest
from _child import assert_converged, assert_no_projector_thread, assert_store_integrity
from conftest import Backend, plain, user_msg

from thread_store import FlushTimeout, ThreadDiscarded, ThreadMetadata, ThreadNotFound, ThreadStore

WORKERS = 8
# Another worker may delete or discard the thread a call is about: these are the answers.
RACES = (ThreadNotFound, ThreadDiscarded)
#: Each of these must have run at least once, however slow the machine: workers go on
#: past the deadline until they have.
REQUIRED = ("append", "list", "read", "delete")


class _Soak:
    """Shared state of one soak run: the live thread ids and what each call returned."""

    def __init__(self, store: ThreadStore, seconds: float) -> None:
        self.store = store
        self.deadline = time.monotonic() + seconds
        self.lock = threading.Lock()
        self.threads = [store.create_thread() for _ in range(16)]
        self.counts: Counter[str] = Counter()
        self.failures: list[str] = []

    def pick(self, rng: random.Random) -> str:
        with self.lock:
            return rng.choice(self.threads)

    def forget(self, thread_id: str) -> bool:
        """Take a thread out of the pool; never the last one, so some survive to be checked."""
        with self.lock:
            if thread_id in self.threads and len(self.threads) > 1:
                self.threads.remove(thread_id)
                return True
            return False

    def worker(self, seed: int) -> None:
        rng = random.Random(seed)
        seen: dict[str, ThreadMetadata] = {}
        while time.monotonic() < self.deadline or not self.covered():
            op = rng.choice(["append"] * 6 + ["append_and_flush"] * 3 + ["list"] * 3
                            + ["read"] * 3 + ["archive", "create", "delete"])
            tid = self.pick(rng)
            try:
                meta = self.run(op, tid, rng)
            except RACES:
                meta = None
            except FlushTimeout as exc:  # a 30 s barrier timing out means a stall
                self.failures.append(f"{op}({tid}) stalled at generation {exc.target} (projected "
                                     f"{exc.projected}): {self.describe(tid)}")
                meta = None
            except Exception as exc:  # noqa: BLE001 - recorded; the test fails on it
                self.failures.append(f"{op}({tid}): {exc!r}")
                meta = None
            self.counts[op] += 1
            if meta is not None:
                self.check_monotonic(seen, meta)

    def run(self, op: str, tid: str, rng: random.Random) -> ThreadMetadata | None:
        store = self.store
        if op == "append":
            store.append(tid, [plain(rng.randrange(100)) for _ in range(rng.randint(1, 3))])
        elif op == "append_and_flush":
            item = rng.choice([user_msg(f"soak {rng.randrange(1000)}"), plain(),
                               {"type": "event_msg", "payload": {"type": "turn_started"}}])
            return store.append_and_flush(tid, [item], timeout=30.0)
        elif op == "list":
            query = {"archived": rng.random() < 0.2, "search": rng.choice([None, "soak"])}
            page = store.list_threads(limit=5, **query)
            if page.next_cursor is not None:
                store.list_threads(limit=5, cursor=page.next_cursor, **query)
        elif op == "read":
            store.read_history(tid, after_seq=rng.randrange(5), limit=50)
            return store.read_thread(tid)
        elif op == "archive":
            if rng.random() < 0.5:
                return store.archive_thread(tid, timeout=30.0)
            return store.unarchive_thread(tid, timeout=30.0)
        elif op == "create":
            with self.lock:
                self.threads.append(store.create_thread())
        elif op == "delete":
            if not self.forget(tid):
                return None
            if rng.random() < 0.8:
                store.delete_thread(tid, timeout=30.0)
            else:
                store.discard(tid, timeout=30.0)
        return None

    def covered(self) -> bool:
        """Whether every required kind of call has run."""
        return all(self.counts[op] > 0 for op in REQUIRED)

    def describe(self, thread_id: str) -> str:
        """The thread's status and projector counters, to diagnose a stall."""
        try:
            return f"{self.store.status(thread_id)}; {self.store.stats()}"
        except Exception as exc:  # noqa: BLE001 - diagnostics only
            return repr(exc)

    def check_monotonic(self, seen: dict[str, ThreadMetadata], meta: ThreadMetadata) -> None:
        """What one caller observes of a thread never moves backwards (§1.10)."""
        before = seen.get(meta.thread_id)
        seen[meta.thread_id] = meta
        if before is None:
            return
        for field in ("projected_seq", "item_count", "recency_at", "updated_at"):
            if getattr(meta, field) < getattr(before, field):
                self.failures.append(f"{meta.thread_id}.{field} moved backwards: "
                                     f"{getattr(before, field)} -> {getattr(meta, field)}")


def _soak(backend: Backend, seconds: float) -> None:
    faulthandler.dump_traceback_later(seconds + 60.0, exit=False, file=sys.stderr)
    try:
        with backend.open_store() as store:
            try:
                _run_and_check(store, seconds)
            except BaseException:
                faulthandler.dump_traceback(file=sys.stderr)  # where is everyone stuck?
                raise
    finally:
        faulthandler.cancel_dump_traceback_later()
    if backend.capabilities.files:
        assert_store_integrity(store.path)  # type: ignore[arg-type]
    assert_no_projector_thread()


def _run_and_check(store: ThreadStore, seconds: float) -> None:
    soak = _Soak(store, seconds)
    workers = [threading.Thread(target=soak.worker, args=(n,), name=f"soak-{n}")
               for n in range(WORKERS)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(seconds + 60.0)
    stuck = [w.name for w in workers if w.is_alive()]
    assert not stuck, f"deadlock: {stuck} still running (stacks dumped to stderr)"
    assert not soak.failures, soak.failures[:20]
    assert soak.covered(), soak.counts
    print(f"\nsoak: {sum(soak.counts.values())} calls in {seconds:g}s: {dict(soak.counts)}")
    assert assert_converged(store) > 0


def test_soak_short(backend: Backend) -> None:
    _soak(backend, 5.0)


@pytest.mark.slow
def test_soak_long(backend: Backend) -> None:
    _soak(backend, 60.0)
