"""The projector's per-thread state machine, without threads: retry policy, the item
buffer, and every phase transition of :class:`ThreadState` (DESIGN §1.4 barriers, §1.6
retries, §1.8 removal)."""

from __future__ import annotations

import random
import threading

import pytest
from opentelemetry.trace import SpanContext

from thread_store import InvalidArgument, ProjectionFailed, RetryPolicy, StoreClosed, ThreadDiscarded
from thread_store._outcomes import AttemptOutcome, Result, Settlement, Success, Waiter
from thread_store._phases import Phase, RemovalKind
from thread_store._state import BUFFER_BYTES, BUFFER_ITEMS, Claim, ThreadState
from thread_store.model import EncodedItem, ThreadMetadata
from thread_store.storage import StoredRow

POLICY = RetryPolicy(attempts=3, base_delay=0.1, max_delay=0.5)
NOW = 100.0


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


# -- phases -------------------------------------------------------------------------------


def _state(phase: Phase, *, head: int = 2, projected: int = 0) -> ThreadState:
    """A thread in ``phase``, reached through the transitions themselves."""
    st = ThreadState("t", head=head, projected=projected)
    st.pending_since = NOW - 1
    if phase in (Phase.DUE, Phase.BACKING_OFF):
        assert st.schedule(NOW + 1, backoff=phase is Phase.BACKING_OFF)
    elif phase is Phase.IN_FLIGHT:
        st.claim(expedited=False)
    elif phase is Phase.HELD:
        st.settle(st.claim(expedited=False), Result(AttemptOutcome.FAILED, error=ValueError("x")),
                  retry=POLICY, rng=random.Random(0), now=NOW)
    elif phase is Phase.REMOVING:
        st.begin_removal(RemovalKind.DISCARDED)
    elif phase is Phase.REMOVED:
        st.begin_removal(RemovalKind.DISCARDED)
        st.commit_removal()
    assert st.phase is phase
    return st


def _settle(st: ThreadState, claim: Claim, kind: AttemptOutcome, *,
            error: BaseException | None = None, retry: RetryPolicy = POLICY) -> Settlement:
    result = Result(kind, error=error, fold_state={"n": claim.target} if kind is AttemptOutcome.OK
                    else None)
    return st.settle(claim, result, retry=retry, rng=random.Random(0), now=NOW)


def test_schedule_keeps_the_earliest_due_time() -> None:
    st = _state(Phase.IDLE)
    assert st.schedule(NOW + 5)
    assert (st.phase, st.due_at) == (Phase.DUE, NOW + 5)
    assert not st.schedule(NOW + 9)  # never later than it already is
    assert st.schedule(NOW + 1)
    assert (st.phase, st.due_at) == (Phase.DUE, NOW + 1)


def test_a_backoff_is_cut_only_by_a_new_waiter() -> None:
    st = _state(Phase.IDLE)
    assert st.schedule(NOW + 5, backoff=True)
    assert st.phase is Phase.BACKING_OFF
    assert not st.schedule(NOW)  # an append keeps the backoff
    assert (st.phase, st.due_at) == (Phase.BACKING_OFF, NOW + 5)
    assert st.schedule(NOW, cut_backoff=True)
    assert (st.phase, st.due_at) == (Phase.DUE, NOW)


@pytest.mark.parametrize("phase", [Phase.IN_FLIGHT, Phase.REMOVING, Phase.REMOVED])
def test_schedule_is_a_no_op_while_running_or_removing(phase: Phase) -> None:
    st = _state(phase)
    assert not st.schedule(NOW, cut_backoff=True)
    assert st.phase is phase and st.due_at is None


def test_a_held_thread_must_be_unheld_before_it_is_scheduled() -> None:
    with pytest.raises(AssertionError):
        _state(Phase.HELD).schedule(NOW)


@pytest.mark.parametrize("phase", [Phase.IDLE, Phase.DUE, Phase.BACKING_OFF])
def test_claim_snapshots_the_work_and_takes_the_thread_in_flight(phase: Phase) -> None:
    st = _state(phase, head=3, projected=1)
    st.fold_state = {"n": 1}
    claim = st.claim(expedited=True)
    assert (st.phase, st.due_at, st.attempts, st.in_flight) == (Phase.IN_FLIGHT, None, 1, True)
    assert (claim.target, claim.base, claim.attempt, claim.expedited) == (3, 1, 1, True)
    assert claim.fold_state == {"n": 1} and claim.items is None  # nothing buffered: read history
    st.refold = True
    st.end_flight()
    assert st.claim(expedited=False).fold_state is None  # a refold starts from scratch


@pytest.mark.parametrize("phase", [Phase.IN_FLIGHT, Phase.HELD, Phase.REMOVING, Phase.REMOVED])
def test_claim_only_from_an_idle_or_scheduled_thread(phase: Phase) -> None:
    with pytest.raises(AssertionError):
        _state(phase).claim(expedited=False)


@pytest.mark.parametrize(
    ("kind", "attempts", "appended", "phase", "attempts_after", "backoff", "failed"), [
        (AttemptOutcome.OK, 1, False, Phase.IDLE, 0, False, False),
        (AttemptOutcome.RETRY, 1, False, Phase.IDLE, 1, True, False),
        (AttemptOutcome.RETRY, 3, False, Phase.HELD, 3, False, True),  # budget spent
        (AttemptOutcome.FAILED, 1, False, Phase.HELD, 1, False, True),
        (AttemptOutcome.FAILED, 1, True, Phase.IDLE, 0, False, True),  # new work: fresh budget
        (AttemptOutcome.FENCED, 1, False, Phase.IDLE, 0, False, False),  # never ran: no budget
        (AttemptOutcome.YIELDED, 2, False, Phase.IDLE, 1, False, False),
        (AttemptOutcome.CLOSED, 1, False, Phase.IDLE, 1, False, False),
        (AttemptOutcome.GONE, 1, False, Phase.REMOVED, 1, False, False),
    ])
def test_settle_moves_the_thread_on_by_what_the_attempt_came_to(
        kind: AttemptOutcome, attempts: int, appended: bool, phase: Phase, attempts_after: int,
        backoff: bool, failed: bool) -> None:
    st = _state(Phase.IDLE)
    st.attempts = attempts - 1
    claim = st.claim(expedited=False)
    if appended:
        st.head += 1
    settled = _settle(st, claim, kind, error=ValueError("boom"))
    assert (st.phase, st.attempts) == (phase, attempts_after)
    assert (settled.backoff is not None, settled.failure is not None) == (backoff, failed)
    assert (st.failure_epoch == 1) == failed
    if backoff or failed:
        assert st.last_error == "ValueError: boom"
    if failed:
        assert settled.failure is not None and settled.failure.generation == claim.target
    if kind is AttemptOutcome.OK:
        assert (st.projected, st.fold_state, st.pending_since) == (2, {"n": 2}, None)
        assert settled.lag == 1.0
    else:
        assert st.projected == 0 and st.fold_state is None
    if kind is AttemptOutcome.GONE:
        assert st.removal is RemovalKind.DELETED


def test_unhold_gives_a_held_thread_a_fresh_budget_and_is_a_no_op_otherwise() -> None:
    st = _state(Phase.HELD)
    assert st.attempts == 1
    st.unhold()
    assert (st.phase, st.attempts) == (Phase.IDLE, 0)
    busy = _state(Phase.IN_FLIGHT)
    busy.unhold()
    assert (busy.phase, busy.attempts) == (Phase.IN_FLIGHT, 1)


def test_an_append_buffers_counts_keeps_contexts_and_unholds() -> None:
    st = _state(Phase.HELD, head=0)
    st.pending_since, st.buffer = None, []
    item = EncodedItem('{"type": "x"}', 7, "x")
    st.record_append(0, 1, [item], None, now=NOW, max_links=1)
    assert (st.phase, st.head, st.appends, st.attempts) == (Phase.IDLE, 1, 1, 0)
    assert st.buffer == [StoredRow(1, 7, item.text, "x")] and st.pending_since == NOW
    context = SpanContext(trace_id=1, span_id=1, is_remote=False)
    for head in (2, 3):
        st.record_append(head - 1, head, [item], context, now=NOW + 1, max_links=1)
    assert (st.contexts, st.dropped, st.pending_since) == ([(2, context)], 1, NOW)
    st.record_append(5, 6, [item], None, now=NOW, max_links=1)  # another append came first
    assert st.buffer is None and st.head == 6


# -- removal ------------------------------------------------------------------------------


@pytest.mark.parametrize(("phase", "back"), [
    (Phase.IDLE, Phase.IDLE), (Phase.DUE, Phase.IDLE), (Phase.BACKING_OFF, Phase.IDLE),
    (Phase.HELD, Phase.HELD), (Phase.IN_FLIGHT, Phase.IN_FLIGHT)])
def test_an_aborted_removal_puts_the_thread_back(phase: Phase, back: Phase) -> None:
    st = _state(phase)
    st.begin_removal(RemovalKind.DELETED)
    assert (st.phase, st.live, st.due_at) == (Phase.REMOVING, False, None)
    assert st.in_flight is (phase is Phase.IN_FLIGHT)
    st.abort_removal(row_deleted=False)
    assert (st.phase, st.removal) == (back, None)


@pytest.mark.parametrize("phase", [Phase.IDLE, Phase.HELD, Phase.IN_FLIGHT])
def test_an_abort_after_the_row_was_deleted_refolds_and_unholds(phase: Phase) -> None:
    st = _state(phase, head=2, projected=2)
    st.begin_removal(RemovalKind.DELETED)
    st.abort_removal(row_deleted=True)
    assert st.phase is (Phase.IN_FLIGHT if phase is Phase.IN_FLIGHT else Phase.IDLE)
    assert (st.refold, st.projected, st.buffer, st.attempts) == (True, 0, None, 0)


@pytest.mark.parametrize(("appended", "back"), [(False, Phase.HELD), (True, Phase.IDLE)])
def test_an_attempt_settling_mid_removal_decides_where_an_abort_returns(
        appended: bool, back: Phase) -> None:
    st = _state(Phase.IDLE)
    claim = st.claim(expedited=False)
    st.begin_removal(RemovalKind.DISCARDED)
    assert st.in_flight  # the removal waits for it, then fences it
    _settle(st, claim, AttemptOutcome.FAILED, error=ValueError("x"))
    assert (st.phase, st.in_flight) == (Phase.REMOVING, False)
    if appended:
        st.unhold()  # an append mid-removal: the failure no longer holds it
    st.abort_removal(row_deleted=False)
    assert st.phase is back


def test_an_attempt_outliving_a_committed_removal_leaves_it_removed() -> None:
    st = _state(Phase.IDLE)
    claim = st.claim(expedited=False)
    st.begin_removal(RemovalKind.DELETED)
    st.commit_removal()
    _settle(st, claim, AttemptOutcome.FENCED)
    assert st.phase is Phase.REMOVED and not st.in_flight


@pytest.mark.parametrize("kind", list(RemovalKind))
def test_a_committed_removal_answers_every_call_with_thread_discarded(kind: RemovalKind) -> None:
    st = _state(Phase.IDLE)
    st.begin_removal(kind)
    assert f"being {kind.value}" in str(st.gone_error())
    st.commit_removal()
    assert st.removed and f"was {kind.value}." in str(st.gone_error())
    with pytest.raises(AssertionError):
        st.begin_removal(kind)  # one removal at a time, and none after it is done


# -- waiters ------------------------------------------------------------------------------


def _waiter(target: int, epoch: int = 0) -> Waiter:
    return Waiter("t", target, epoch, None, threading.Condition())


def test_outcome_for_answers_a_waiter_only_when_it_can() -> None:
    st = _state(Phase.IDLE, head=3, projected=2)
    meta = ThreadMetadata(thread_id="t", projected_seq=2)
    reached = st.outcome_for(_waiter(2), meta)
    assert isinstance(reached, Success) and reached.meta is meta
    stale = st.outcome_for(_waiter(1), ThreadMetadata(thread_id="t", projected_seq=0))
    assert isinstance(stale, Success) and stale.meta is None  # the caller reads the row
    assert st.outcome_for(_waiter(3), meta) is None
    assert isinstance(st.outcome_for(_waiter(3), meta, final=True), StoreClosed)
    st.refold = True
    assert st.outcome_for(_waiter(2), meta) is None  # the row may be gone: wait for a refold


def test_outcome_for_fails_only_waiters_registered_before_the_failure() -> None:
    st = _state(Phase.IDLE, head=2)
    before = _waiter(2, epoch=st.failure_epoch)
    _settle(st, st.claim(expedited=False), AttemptOutcome.FAILED, error=ValueError("x"))
    failed = st.outcome_for(before, None)
    assert isinstance(failed, ProjectionFailed) and isinstance(failed.__cause__, ValueError)
    assert st.outcome_for(_waiter(2, epoch=st.failure_epoch), None) is None  # a retry's waiter
    st.begin_removal(RemovalKind.DELETED)
    st.commit_removal()
    assert isinstance(st.outcome_for(before, None), ThreadDiscarded)


def test_only_a_caught_up_idle_thread_is_forgettable() -> None:
    st = _state(Phase.IDLE, head=1, projected=1)
    assert st.forgettable
    st.schedule(NOW)
    assert not st.forgettable
    assert not _state(Phase.HELD, head=1, projected=1).forgettable
