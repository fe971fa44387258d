"""Property tests of DESIGN §1.10: metadata is always the fold of the history.

Part one checks the pure fold: resuming from a JSON-serialized state at any split point
equals one fold, and the times move forward where the design promises it. Part two drives
a real store on every backend (the real projector thread) with a hypothesis state machine:
appends, barriers, discards, deletes, restarts (where the backend can reopen), paused
projection and injected projection faults, checking after every step that each thread's
row equals the fold of its stored history up to the row's ``projected_seq``.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

import pytest
from conftest import Backend
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from thread_store import (
    CodexRules,
    FlushTimeout,
    ProjectionFailed,
    RetryPolicy,
    StoreClosed,
    ThreadDiscarded,
    ThreadExists,
    ThreadMetadata,
    ThreadNotFound,
    ThreadStore,
    TransientProjectionError,
)
from thread_store.derive import ARCHIVE_EDIT, METADATA_EDIT, State, fold
from thread_store.model import parse_timestamp, us_from_utc, utc

RULES = CodexRules()
Item = dict[str, Any]
Pair = tuple[int, Mapping[str, Any]]  # (ts_us, item), as the fold takes them

# -- item strategies ------------------------------------------------------------------------

TIMES = st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1),
                     timezones=st.just(timezone.utc))
TEXTS = st.sampled_from(["", "   ", "Fix the flaky test", "  trim me \n", "日本語"]) | st.text(max_size=6)
MAYBE_TEXT = st.none() | TEXTS


def _event(kind: str, **payload: Any) -> Item:
    return {"type": "event_msg", "payload": {"type": kind, **payload}}


_USAGE = st.fixed_dictionaries({"input_tokens": st.integers(0, 10**6),
                                "total_tokens": st.integers(0, 10**6)})
_BODIES: st.SearchStrategy[Item] = st.one_of(
    st.builds(lambda text, images: _event("user_message", message=text, images=images),
              MAYBE_TEXT, st.sampled_from([None, [], ["data:image/png;base64,AAAA"]])),
    st.builds(lambda usage: _event("token_count", info=None if usage is None else {
        "total_token_usage": usage, "last_token_usage": usage}), st.none() | _USAGE),
    st.builds(lambda objective: _event("thread_goal_updated", goal={"objective": objective}), MAYBE_TEXT),
    st.sampled_from(["task_started", "turn_started"]).map(_event),
    st.builds(lambda when, cwd, provider, branch: {"type": "session_meta", "payload": {
        "timestamp": None if when is None else when.isoformat(), "cwd": cwd,
        "model_provider": provider, "git": {"branch": branch}}},
        st.none() | TIMES, MAYBE_TEXT, MAYBE_TEXT, MAYBE_TEXT),
    st.builds(lambda model, cwd, effort: {"type": "turn_context", "payload": {
        "model": model, "cwd": cwd, **({} if effort == "absent" else {"effort": effort})}},
        MAYBE_TEXT, MAYBE_TEXT, st.sampled_from(["absent", None, "low", "high"])),
    st.just({"type": "response_item", "payload": {"type": "message", "role": "assistant"}}),
    st.builds(lambda name: {"type": METADATA_EDIT, "payload": {"name": name}}, MAYBE_TEXT),
    st.builds(lambda archived: {"type": ARCHIVE_EDIT, "payload": {"archived": archived}}, st.booleans()),
)


@st.composite
def codex_items(draw: st.DrawFn) -> Item:
    """A Codex-like item, with its own RFC 3339 timestamp about two times in three."""
    item = draw(_BODIES)
    when = draw(st.none() | TIMES | TIMES)
    return item if when is None else {**item, "timestamp": when.isoformat()}


@st.composite
def timed_items(draw: st.DrawFn) -> Pair:
    """``(ts_us, item)`` as the store stores it: the item's own time, else an append time."""
    item = draw(codex_items())
    own = parse_timestamp(item.get("timestamp"))
    return (own if own is not None else us_from_utc(draw(TIMES))), item


def _fold_from(created_us: int, pairs: list[Pair], state: State | None = None) -> State:
    return fold(RULES, RULES.initial("t", created_us) if state is None else state, pairs)


# -- part one: the pure fold ----------------------------------------------------------------

@settings(max_examples=200)
@given(st.lists(timed_items(), max_size=30), TIMES)
def test_resuming_from_json_state_at_any_split_equals_one_fold(
        pairs: list[Pair], created: datetime) -> None:
    created_us = us_from_utc(created)
    whole = _fold_from(created_us, pairs)
    expected = RULES.metadata("t", whole, len(pairs))
    for split in range(len(pairs) + 1):
        stored = json.loads(json.dumps(_fold_from(created_us, pairs[:split])))
        resumed = _fold_from(created_us, pairs[split:], stored)
        assert RULES.metadata("t", resumed, len(pairs)) == expected, split
        assert json.loads(json.dumps(resumed)) == json.loads(json.dumps(whole)), split


#: Items the fold must pass over, or parse to see through: events no rule reads, payloads
#: that are no object, a token count whose type is not its payload's first key.
_ODD: st.SearchStrategy[Item] = st.one_of(
    st.builds(lambda kind: _event(kind, message="x"), st.sampled_from(["agent_message", "token_count_"])),
    st.builds(lambda payload: {"type": "event_msg", "payload": payload},
              st.sampled_from([None, [], "token_count", {"info": None, "type": "token_count"}])),
    st.builds(lambda usage: {"type": "event_msg", "payload": {
        "info": {"total_token_usage": usage}, "type": "token_count"}}, _USAGE),
)
STORED = timed_items() | st.tuples(st.integers(0, 2**53), _ODD)
#: How stored items may be laid out: as the store writes them (its own ``timestamp`` last
#: here), Codex's way (``timestamp`` first), and layouts the fold must parse to read.
LAYOUTS = st.sampled_from([
    lambda item: json.dumps(item, separators=(",", ":")),
    lambda item: json.dumps({"timestamp": item.get("timestamp", "2026-01-01T00:00:00Z"), **item},
                            separators=(",", ":")),
    json.dumps,  # spaces after separators
    lambda item: json.dumps(dict(reversed(list(item.items()))), separators=(",", ":")),
])


@settings(max_examples=300)
@given(st.lists(st.tuples(STORED, LAYOUTS), max_size=30), TIMES, st.data())
def test_the_page_fold_of_stored_text_equals_the_fold_of_parsed_items(
        stored: list[tuple[Pair, Callable[[Item], str]]], created: datetime, data: st.DataObject) -> None:
    # CodexRules.apply_stored parses only what can change the state; the state it returns
    # must be the one apply gives over every parsed item, however the pages are cut.
    pairs = [pair for pair, _ in stored]
    texts = [layout(dict(item)) for (_, item), layout in stored]
    created_us = us_from_utc(created)
    expected = json.loads(json.dumps(_fold_from(created_us, pairs)))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(pairs)), max_size=4)))
    state = RULES.initial("t", created_us)
    for start, end in zip([0, *cuts], [*cuts, len(pairs)]):
        given, before = state, json.dumps(state)
        state = RULES.apply_stored(given, texts[start:end], [ts for ts, _ in pairs[start:end]])
        assert json.dumps(given) == before  # the state it was given is left as it was
    assert json.loads(json.dumps(state)) == expected


@settings(max_examples=200)
@given(st.lists(timed_items(), min_size=1, max_size=30), TIMES)
def test_times_move_forward_where_the_design_promises(
        pairs: list[Pair], created: datetime) -> None:
    # DESIGN §2: updated_at is the latest item timestamp and recency_at the latest turn
    # start, else created_at; created_at is a floor for both, so an item stamped before it
    # lowers neither. Only a session_meta item that sets created_at may move them back.
    state = RULES.initial("t", us_from_utc(created))
    previous: ThreadMetadata | None = None
    turns: list[int] = []
    for count, (ts_us, item) in enumerate(pairs, 1):
        state = RULES.apply(state, item, ts_us)
        row = RULES.metadata("t", state, count)
        assert row.created_at is not None and row.updated_at is not None
        assert row.recency_at is not None
        assert row.item_count == count
        assert row.updated_at == max(utc(max(ts for ts, _ in pairs[:count])), row.created_at)
        if item["type"] == "event_msg" and item["payload"]["type"] in ("task_started", "turn_started"):
            turns.append(ts_us)
        assert row.recency_at == (max(utc(max(turns)), row.created_at) if turns else row.created_at)
        if previous is not None and row.created_at == previous.created_at:
            assert row.updated_at >= previous.updated_at  # type: ignore[operator]
            assert row.recency_at >= previous.recency_at  # type: ignore[operator]
        previous = row


# -- part two: a real store under a state machine -------------------------------------------

THREAD_IDS = ("t0", "t1", "t2", "t3")
BARRIER_S = 30.0  # generous: a barrier that takes this long is a hang, not slowness
FAST_RETRY = RetryPolicy(attempts=5, base_delay=0.001, max_delay=0.01)
# 0 s: an attempt still in flight (a slow fault) is not awaited but fenced.
REMOVE_TIMEOUTS = st.sampled_from([0.0, BARRIER_S])


class Faults:
    """Projection faults armed per thread; its ``hook`` runs on the projector's threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: dict[str, tuple[str, int]] = {}
        #: Transient faults raised in a row per thread: one attempt's retry budget spans
        #: them, also across two arms of the same thread.
        self._streak: dict[str, int] = {}
        #: Threads whose projection an injected permanent fault ever failed.
        self.failed: set[str] = set()

    def arm(self, thread_id: str, kind: str, count: int) -> None:
        """Make the next ``count`` attempts on ``thread_id`` slow, or raise a ``kind`` error."""
        with self._lock:
            self._armed[thread_id] = (kind, count)

    def clear(self) -> None:
        """Disarm every fault."""
        with self._lock:
            self._armed.clear()

    def hook(self, thread_id: str, generation: int) -> None:
        """The ``projection_hook``: raise the armed fault, if any."""
        with self._lock:
            kind, left = self._armed.get(thread_id, ("", 0))
            if kind == "transient" and self._streak.get(thread_id, 0) >= FAST_RETRY.attempts - 1:
                # One more would exhaust the budget and fail the thread, which the model
                # only expects of a permanent fault; this attempt passes, the next one resumes.
                left = 0
            if not left:
                self._streak.pop(thread_id, None)
                return
            self._armed[thread_id] = (kind, left - 1)
            self._streak[thread_id] = self._streak.get(thread_id, 0) + 1 if kind == "transient" else 0
            if kind == "permanent":
                self.failed.add(thread_id)
        if kind != "transient":
            # Holds the attempt in flight, so appends, barriers, discards and closes race
            # with it (and, for a permanent fault, with its failure).
            time.sleep(0.005)
        if kind == "slow":
            return
        if kind == "transient":
            raise TransientProjectionError(f"injected transient fault at generation {generation}")
        raise RuntimeError(f"injected permanent fault at generation {generation}")


class StoreMachine(RuleBasedStateMachine):
    """Drives a real store and keeps a model: each live thread's expected history.

    Each example opens a new store on ``backend``; it restarts the store only where the
    backend can reopen one.
    """

    def __init__(self, backend: Backend) -> None:
        super().__init__()
        self.place = backend.new_place()
        self.can_reopen = backend.capabilities.reopen
        self.faults = Faults()
        self.store = self._open()
        self.history: dict[str, list[Item]] = {}
        # The fold starts from the thread's creation time, which only the store knows: we
        # read it back right after create_thread, when the only possible item is a
        # session_meta without a timestamp, so any row then still carries it unchanged.
        self.created_us: dict[str, int] = {}
        self.discarded: set[str] = set()
        self.projected: dict[str, int] = {}
        self.paused = False

    def _open(self) -> ThreadStore:
        return self.place.open(projection_hook=self.faults.hook,
                                coalesce_delay=0.001, retry=FAST_RETRY)

    # -- model helpers --------------------------------------------------------------------

    def _gone_error(self, thread_id: str) -> type[Exception]:
        """The error any call on a thread that is not live must raise."""
        return ThreadDiscarded if thread_id in self.discarded else ThreadNotFound

    def _expected(self, thread_id: str, upto: int) -> ThreadMetadata:
        """The fold of the thread's stored history up to ``upto``."""
        stored = self.store.read_history(thread_id, limit=100_000)[:upto]
        pairs: list[Pair] = [(us_from_utc(s.ts), s.item) for s in stored]
        state = fold(RULES, RULES.initial(thread_id, self.created_us[thread_id]), pairs)
        return RULES.metadata(thread_id, state, upto)

    def _check_row(self, thread_id: str, row: ThreadMetadata) -> None:
        assert row.projected_seq <= len(self.history[thread_id])
        assert row == self._expected(thread_id, row.projected_seq)
        assert row.projected_seq >= self.projected.get(thread_id, 0), "projection went backwards"
        self.projected[thread_id] = row.projected_seq

    def _barrier(self, thread_id: str, target: int, call: Callable[[], ThreadMetadata]) -> None:
        """Run a barrier: success covers ``target``; ProjectionFailed needs an injected fault."""
        try:
            row = call()
        except ProjectionFailed as exc:
            assert thread_id in self.faults.failed, f"failed with no permanent fault injected: {exc}"
            assert isinstance(exc.__cause__, RuntimeError)
            return
        assert row.projected_seq >= target
        self._check_row(thread_id, row)

    def _append_then_barrier(self, thread_id: str, items: list[Item],
                             call: Callable[[], ThreadMetadata]) -> None:
        if thread_id not in self.history:
            with pytest.raises(self._gone_error(thread_id)):
                call()
            return
        target = len(self.history[thread_id]) + len(items)
        self.history[thread_id].extend(items)  # durable before the barrier's outcome
        self._barrier(thread_id, target, call)

    # -- rules ----------------------------------------------------------------------------

    @initialize()
    def create_two(self) -> None:
        for thread_id in THREAD_IDS[:2]:
            self.create(thread_id, None)

    @rule(thread_id=st.sampled_from(THREAD_IDS),
          metadata=st.none() | st.just({}) | st.fixed_dictionaries({"cwd": TEXTS, "source": TEXTS}))
    def create(self, thread_id: str, metadata: dict[str, Any] | None) -> None:
        if thread_id in self.history or thread_id in self.discarded:
            expected = ThreadExists if thread_id in self.history else ThreadDiscarded
            with pytest.raises(expected):
                self.store.create_thread(thread_id, metadata=metadata)
            return
        assert self.store.create_thread(thread_id, metadata=metadata) == thread_id
        self.history[thread_id] = [{"type": "session_meta", "payload": metadata}] if metadata else []
        created = self.store.read_thread(thread_id).created_at
        assert created is not None
        self.created_us[thread_id] = us_from_utc(created)
        self.projected[thread_id] = 0

    @rule(thread_id=st.sampled_from(THREAD_IDS), items=st.lists(codex_items(), max_size=5))
    def append(self, thread_id: str, items: list[Item]) -> None:
        if thread_id not in self.history:
            with pytest.raises(self._gone_error(thread_id)):
                self.store.append(thread_id, items)
            return
        self.history[thread_id].extend(items)
        assert self.store.append(thread_id, items) == len(self.history[thread_id])

    @precondition(lambda self: not self.paused)
    @rule(thread_id=st.sampled_from(THREAD_IDS), items=st.lists(codex_items(), max_size=4))
    def append_and_flush(self, thread_id: str, items: list[Item]) -> None:
        self._append_then_barrier(thread_id, items, lambda: self.store.append_and_flush(
            thread_id, items, timeout=BARRIER_S))

    @precondition(lambda self: not self.paused)
    @rule(thread_id=st.sampled_from(THREAD_IDS), name=MAYBE_TEXT)
    def rename(self, thread_id: str, name: str | None) -> None:
        item = {"type": METADATA_EDIT, "payload": {"name": name}}
        self._append_then_barrier(thread_id, [item], lambda: self.store.update_metadata(
            thread_id, name=name, timeout=BARRIER_S))

    @precondition(lambda self: not self.paused)
    @rule(thread_id=st.sampled_from(THREAD_IDS), archived=st.booleans())
    def archive(self, thread_id: str, archived: bool) -> None:
        item = {"type": ARCHIVE_EDIT, "payload": {"archived": archived}}
        call = self.store.archive_thread if archived else self.store.unarchive_thread
        self._append_then_barrier(thread_id, [item], lambda: call(thread_id, timeout=BARRIER_S))

    @precondition(lambda self: not self.paused)
    @rule(thread_id=st.sampled_from(THREAD_IDS))
    def flush(self, thread_id: str) -> None:
        self._append_then_barrier(thread_id, [], lambda: self.store.flush(thread_id, timeout=BARRIER_S))

    @precondition(lambda self: not self.paused)
    @rule()
    def flush_all(self) -> None:
        try:
            self.store.flush_all(timeout=BARRIER_S)
        except ProjectionFailed as exc:
            assert set(exc.thread_ids) <= self.faults.failed, exc
            return
        for thread_id, items in self.history.items():
            self.projected[thread_id] = len(items)  # checked by the next invariant

    @precondition(lambda self: self.paused and bool(self.history))
    @rule(data=st.data())
    def flush_while_paused_times_out(self, data: st.DataObject) -> None:
        thread_id = data.draw(st.sampled_from(sorted(self.history)))
        head = len(self.history[thread_id])
        try:
            row = self.store.flush(thread_id, timeout=0.01)
        except FlushTimeout as exc:
            # An attempt already running at pause time may finish (even between the
            # timeout and the error reading the projected generation); else nothing moves.
            assert (exc.thread_id, exc.target) == (thread_id, head) and exc.projected <= head
            assert self.store.status(thread_id).waiters == 0, "a timed-out waiter leaked"
            return
        except ProjectionFailed:
            assert thread_id in self.faults.failed
            return
        assert row.projected_seq == head
        self._check_row(thread_id, row)

    @rule(thread_id=st.sampled_from(THREAD_IDS), discard=st.booleans(), timeout=REMOVE_TIMEOUTS)
    def remove(self, thread_id: str, discard: bool, timeout: float) -> None:
        call = self.store.discard if discard else self.store.delete_thread
        if thread_id not in self.history:
            with pytest.raises(self._gone_error(thread_id)):
                call(thread_id, timeout=timeout)
            return
        call(thread_id, timeout=timeout)
        del self.history[thread_id]
        if discard:
            self.discarded.add(thread_id)  # tombstoned; a deleted id may be created again

    @precondition(lambda self: self.can_reopen)
    @rule(timeout=st.sampled_from([0.0, 10.0]))
    def reopen(self, timeout: float) -> None:
        # close(0) leaves pending work (and maybe a slow attempt, fenced) to the next open.
        self.store.close(timeout=timeout)
        with pytest.raises(StoreClosed):
            self.store.append(THREAD_IDS[0], [{"type": "x"}])
        self.store = self._open()
        self.paused = False

    @rule()
    def pause(self) -> None:
        self.store.pause_projection()
        self.paused = True

    @rule()
    def resume(self) -> None:
        self.store.resume_projection()
        self.paused = False

    @precondition(lambda self: bool(self.history))
    @rule(data=st.data(), kind=st.sampled_from(["slow", "transient", "permanent"]), count=st.integers(1, 3))
    def inject_fault(self, data: st.DataObject, kind: str, count: int) -> None:
        # Live threads only, so that faults do fire. Transient faults stay below the retry
        # budget (5 attempts), so they must never surface.
        self.faults.arm(data.draw(st.sampled_from(sorted(self.history))), kind, count)

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def rows_are_folds_of_the_stored_history(self) -> None:
        for thread_id, items in self.history.items():
            stored = self.store.read_history(thread_id, limit=100_000)
            assert [s.seq for s in stored] == list(range(1, len(items) + 1))
            assert [s.item for s in stored] == items
            self._check_row(thread_id, self.store.read_thread(thread_id))
        for thread_id in set(THREAD_IDS) - set(self.history):
            with pytest.raises(self._gone_error(thread_id)):
                self.store.read_thread(thread_id)

    def teardown(self) -> None:
        try:
            self._final_checks()
        finally:
            self.store.close(timeout=10.0)

    def _final_checks(self) -> None:
        self.store.resume_projection()
        self.faults.clear()
        try:
            self.store.flush_all(timeout=BARRIER_S)
        except ProjectionFailed as exc:
            # An attempt whose hook fired just before clear() may still be failing; a
            # fresh flush_all starts new attempts, which now have no fault to hit.
            assert set(exc.thread_ids) <= self.faults.failed, exc
            self.store.flush_all(timeout=BARRIER_S)
        for thread_id, items in self.history.items():
            status = self.store.status(thread_id)
            assert status.projected_seq == status.head_seq == len(items), status
            assert not status.pending and status.waiters == 0, status
            row = self.store.read_thread(thread_id)
            assert row == self._expected(thread_id, len(items))
        listed = {m.thread_id: m for archived in (False, True) for m in self.store.list_threads(
            limit=len(THREAD_IDS) + 1, archived=archived, include_empty=True).threads}
        # Every live thread is listed with include_empty, also one without items.
        assert listed == {t: self.store.read_thread(t) for t in self.history}


MACHINE_SETTINGS = settings(max_examples=40, stateful_step_count=30, deadline=None,
                            suppress_health_check=[HealthCheck.too_slow])


def test_store_machine(backend: Backend) -> None:
    run_state_machine_as_test(lambda: StoreMachine(backend), settings=MACHINE_SETTINGS)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # about 3 minutes per backend on a loaded 2-core machine
def test_store_machine_long_run(backend: Backend) -> None:
    run_state_machine_as_test(lambda: StoreMachine(backend), settings=settings(
        MACHINE_SETTINGS, max_examples=300, stateful_step_count=80))
