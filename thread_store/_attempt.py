"""One batch of projection attempts: spans, hook, fold, and one fenced index transaction.

This is the projector's only I/O. It runs with no projector lock held, in the worker or
in a barrier's calling thread, and hands every claim back to the projector to settle.

An error from user code (the hook, the rules) fails its own attempt only. The one
exception: in a barrier's calling thread (``in_caller``), a ``BaseException`` that is
not an ``Exception`` (``KeyboardInterrupt``, ``SystemExit``) propagates, so Ctrl-C is
never swallowed; the attempts are then handed back (see :meth:`AttemptRunner.run`).
"""

from __future__ import annotations

import json
import logging
from functools import partial
from typing import Callable, Iterator, Mapping, NamedTuple, Protocol, Sequence, TypeVar

from ._outcomes import AttemptOutcome, Result
from ._sniff import item_type
from ._state import Claim
from .derive import ProjectionRules, State
from .errors import (ThreadDiscarded, ThreadNotFound, ThreadStoreError, TransientProjectionError,
                     TransientStorageError, describe)
from .storage import Checkpoint, CommitOutcome, HistoryLog, MetadataIndex, RowWrite, StoredPage, StoredRow
from .tracing import MAX_LINKS, Links, Projection, Telemetry, merge_links

ProjectionHook = Callable[[str, int], None]
_T = TypeVar("_T")
#: Items per history read of a fold: memory stays bounded (items are at most
#: ``max_item_bytes`` each, most far smaller) and a read's round trip is amortized.
PAGE_ITEMS = 1000
#: Takes the claims out of flight with their results (by ``id(claim)``) and returns each
#: retry's backoff (by ``id(claim)``); the projector takes its lock for it.
Settle = Callable[[list[Claim], dict[int, Result]], dict[int, float | None]]

log = logging.getLogger("thread_store.projector")  # the projector's messages, as before


def is_transient(exc: BaseException) -> bool:
    """Errors worth a retry with backoff: the storage boundary and hooks say so by type."""
    return isinstance(exc, (TransientProjectionError, TransientStorageError))


def _failure(exc: BaseException) -> Result:
    return Result(AttemptOutcome.RETRY if is_transient(exc) else AttemptOutcome.FAILED, error=exc)


def _cached_incarnation(c: Claim) -> int | None:
    """The incarnation of the claim's cached fold state, if it resumes one."""
    return c.incarnation if c.fold_state is not None and not c.refold else None


class StepAside(Protocol):
    """The worker's wait for this process's appends between units of its work
    (:meth:`~thread_store._priority.AppendPriority.step_aside`)."""

    def __call__(self, background: bool = False) -> None: ...


class _Start(NamedTuple):
    """Where one claim's fold starts: the thread's incarnation, the fold state at ``base``,
    and the items after it when they are buffered (``None``: read from history, the first
    page in the batch's read)."""

    incarnation: int
    base: int
    state: dict[str, object]
    rows: list[StoredRow] | None


def _reads_stored(c: Claim) -> bool:
    """Whether the claim looks at the thread's stored row: it resumes no cached fold
    with buffered items (it knows no fold here, or other processes appended since)."""
    return not c.refold and (c.fold_state is None or c.items is None)


def history_pages(history: HistoryLog, thread_id: str, after_seq: int, upto_seq: int,
                  page: int = PAGE_ITEMS) -> Iterator[StoredPage]:
    """Yield the items ``after_seq < seq <= upto_seq`` in pages, to keep memory bounded."""
    while after_seq < upto_seq:
        rows = history.read_page(thread_id, after_seq, upto_seq, page)
        if not rows.texts:
            return
        yield rows
        after_seq = rows.last_seq


class AttemptRunner:
    """Runs attempts against one store's history and index."""

    def __init__(self, history: HistoryLog, index: MetadataIndex, rules: ProjectionRules,
                 hook: ProjectionHook | None, telemetry: Telemetry,
                 on_commit: Callable[[], None], step_aside: StepAside) -> None:
        self._history = history
        self._index = index
        self._rules = rules
        self._hook = hook
        self.has_hook = hook is not None
        self._telemetry = telemetry
        self._on_commit = on_commit
        self._step_aside = step_aside  # between folds in the worker: appends go first
        types: frozenset[str] | None = getattr(rules, "item_types", None)
        self._reads: Callable[[str], bool] = (lambda _kind: True) if types is None else types.__contains__
        # Rules that fold stored text themselves (ProjectionRules.apply_stored) parse
        # only what they read, into one state per page instead of one per item.
        self._apply_stored: Callable[[State, Sequence[str], Sequence[int]], State] | None = (
            getattr(rules, "apply_stored", None))

    def run(self, claims: list[Claim], settle: Settle, deadline: float | None = None, *,
            in_caller: bool = False) -> None:
        """Run one attempt per claim and commit the successful ones in one transaction;
        then every claim goes to ``settle`` with its result, whatever is raised where.

        In the worker any error fails only the batch's attempts. In a barrier's calling
        thread (``in_caller``), a ``BaseException`` that is not an ``Exception`` (Ctrl-C,
        SystemExit) gives the attempts back unrun (``yielded``) and propagates.

        :param deadline: a barrier running its own attempt gives the work back
            (``yielded``) rather than wait past it for the index write lock.
        """
        tel = self._telemetry
        spans: dict[int, Projection] = {}
        results: dict[int, Result] = {}
        try:
            if tel.tracing():
                for c in claims:
                    links = self._links(c)
                    spans[id(c)] = tel.start_projection(
                        c.state.thread_id, links.contexts, links.dropped, links.appends, c.base,
                        c.target, c.attempt, c.expedited, len(claims))
            results = self._attempt(claims, deadline, in_caller)
        except BaseException as exc:  # noqa: BLE001 - the worker records, never dies
            if in_caller and not isinstance(exc, Exception):
                raise  # the finally hands the attempts back ("yielded")
            log.error("thread_store: projection batch failed: %s", describe(exc))
            results = {id(c): results.get(id(c)) or Result(AttemptOutcome.FAILED, error=exc)
                       for c in claims}
        finally:
            results = {id(c): results.get(id(c)) or Result(AttemptOutcome.YIELDED) for c in claims}
            backoffs = settle(claims, results)
            # Spans end outside the projector lock: a coalesced projection marks up to
            # MAX_LINKS appends visible, one span each, and appends must not wait for that.
            for c in claims:
                span = spans.get(id(c))
                if span is not None:
                    result = results[id(c)]
                    try:
                        tel.end_projection(span, outcome=result.kind.value, error=result.error,
                                           backoff=backoffs.get(id(c)))
                    except Exception:  # noqa: BLE001 - telemetry must not stop the projector
                        log.exception("thread_store: ending a projection span failed")

    def _links(self, c: Claim) -> Links:
        """What the claim's projection span points at (tracing on only).

        Buffered items were all appended here, so the contexts captured here are all of
        them. Otherwise some may be other processes' appends: the contexts stored with the
        items not yet projected are read and merged in (DESIGN §1.11). A failed read
        costs the links only, never the projection.
        """
        local = Links(tuple(c.contexts), c.dropped, c.appends)
        if c.items is not None:
            return local
        thread_id = c.state.thread_id
        try:
            base = c.base
            if not c.refold and c.fold_state is None:
                # c.base may be a lower bound (a thread this process knew nothing of):
                # the store says where its projection stands.
                base = max(base, self._index.checkpoint(thread_id).projected_seq)
            stored = self._history.traces(thread_id, base, c.target, MAX_LINKS)
        except ThreadStoreError as exc:
            log.debug("thread_store: reading the trace contexts of %r failed: %s",
                      thread_id, describe(exc))
            return local
        return merge_links(c.contexts, c.dropped, c.appends, stored.traceparents, stored.dropped)

    def _attempt(self, claims: list[Claim], deadline: float | None,
                 in_caller: bool) -> dict[int, Result]:
        """Prepare every claim, then commit the good rows together; results by ``id(claim)``."""
        results: dict[int, Result] = {}
        # Taken before the fold: every item it folds was committed, so is at or below it.
        position = self._history.position()
        hooked = [c for c in claims if self._hook_ran(c, in_caller, results)]
        # A claim resuming its cached fold knows its incarnation, and the commit's guard
        # refuses its row if the thread was removed or created again meanwhile (``gone``:
        # the cached state is dropped and the next attempt reads the incarnation): no read.
        unknown = [c.state.thread_id for c in hooked if _cached_incarnation(c) is None]
        wanted = [c.state.thread_id for c in hooked if _reads_stored(c)]
        refolds = [c.state.thread_id for c in hooked if c.refold]
        try:
            # One read each for the batch (a round trip per thread was most of a PostgreSQL
            # projector's time), after the hooks and before the folds; the incarnations
            # first, so a stored row read after them is of the live thread or refused; the
            # creation times of the folds from the first item (a catch-up's) too.
            live = self._history.incarnations(unknown) if unknown else {}
            stored = self._index.checkpoints(wanted) if wanted else {}
            created = self._history.created_times(refolds) if refolds else {}
        except BaseException as exc:  # noqa: BLE001 - the worker records, never dies
            if in_caller and not isinstance(exc, Exception):
                raise
            results.update((id(c), _failure(exc)) for c in hooked)
            return results
        started: list[tuple[Claim, _Start]] = []
        for c in hooked:
            known = _cached_incarnation(c)
            begun = self._guarded(c, in_caller, partial(
                self._start, c, live.get(c.state.thread_id) if known is None else known,
                stored.get(c.state.thread_id) if _reads_stored(c) else None,
                created.get(c.state.thread_id)))
            if isinstance(begun, Result):
                results[id(c)] = begun
            else:
                started.append((c, begun))
        # The first page of every thread that folds from history, in one read for the
        # batch (a read per thread was the most of a PostgreSQL projector's round trips
        # once several processes append to the same threads); SQLite and memory read
        # each page as its fold looks it up.
        ranges = [(c.state.thread_id, s.base, c.target) for c, s in started if s.rows is None]
        try:
            pages = self._history.read_many(ranges, PAGE_ITEMS) if ranges else {}
        except BaseException as exc:  # noqa: BLE001 - the worker records, never dies
            if in_caller and not isinstance(exc, Exception):
                raise
            results.update((id(c), _failure(exc)) for c, s in started if s.rows is None)
            started, pages = [(c, s) for c, s in started if s.rows is not None], {}
        rows: list[tuple[Claim, RowWrite, Result]] = []
        for c, s in started:
            if not in_caller:
                self._step_aside(background=not c.appends and not c.expedited)
            done = self._guarded(c, in_caller, partial(self._finish, c, s, pages))
            if isinstance(done, Result):
                results[id(c)] = done
            else:
                rows.append((c, done[1], done[0]))
        if rows:
            if not in_caller:
                self._step_aside()
            self._commit(rows, results, deadline, position, in_caller)
        return results

    def _hook_ran(self, c: Claim, in_caller: bool, results: dict[int, Result]) -> bool:
        """Run the hook for one claim; ``False`` (its failure in ``results``) if it raised."""
        if self._hook is not None:
            try:
                self._hook(c.state.thread_id, c.target)
            except BaseException as exc:  # noqa: BLE001 - any hook error fails this attempt only
                if in_caller and not isinstance(exc, Exception):
                    raise
                results[id(c)] = _failure(exc)
                return False
        return True

    @staticmethod
    def _guarded(c: Claim, in_caller: bool, step: Callable[[], _T]) -> _T | Result:
        """Run one claim's step; its error becomes the attempt's result. A thread removed
        while the attempt ran is ``GONE``; Ctrl-C in a barrier's thread propagates."""
        try:
            return step()
        except (ThreadDiscarded, ThreadNotFound) as exc:  # removed while this attempt ran
            return Result(AttemptOutcome.GONE, error=exc)
        except BaseException as exc:  # noqa: BLE001 - the worker records, never dies
            if in_caller and not isinstance(exc, Exception):
                raise
            return _failure(exc)

    def _start(self, c: Claim, live: int | None, stored: Checkpoint | None,
               created_us: int | None) -> _Start | Result:
        """Where one claim's fold starts; ``live`` is the thread's incarnation read for the
        batch (``None``: not live then), ``stored`` its row's checkpoint and ``created_us``
        its creation time if the batch read them. The rows are the buffered items when
        they start there, else ``None`` (read from history). A stored row of the live
        thread that covers the target (another process projected it) ends the attempt:
        nothing to fold or write."""
        thread_id = c.state.thread_id
        # Read before the fold, so a commit of this fold is refused if the thread is
        # deleted and created again meanwhile; if that happened already (in another
        # process), what this one cached is another thread's: start over. A thread
        # not live in the batch's read is read again, to raise why.
        incarnation = live if live is not None else self._history.incarnation(thread_id)
        if c.incarnation is not None and incarnation != c.incarnation:
            return Result(AttemptOutcome.REBORN, head=self._history.head(thread_id))
        ahead = stored if stored is not None and stored.incarnation == incarnation else None
        if ahead is not None and ahead.projected_seq >= c.target:
            return Result(AttemptOutcome.OK, incarnation=incarnation, covered=True)
        base, state = self._start_state(c, stored, ahead, created_us)
        buffered = c.items if c.items is not None and base == c.base else None
        return _Start(incarnation, base, state, buffered)

    def _finish(self, c: Claim, s: _Start,
                pages: Mapping[str, StoredPage]) -> tuple[Result, RowWrite] | Result:
        """Fold one claim's items (the buffered ones, or history's: its first page in the
        batch's read, ``pages``, then the rest in pages if that did not reach the target)
        and build its row."""
        thread_id = c.state.thread_id
        state, seq = s.state, s.base
        first = pages.get(thread_id)
        if s.rows is not None:
            if s.rows:
                state = self._fold(state, [r.text for r in s.rows], [r.ts_us for r in s.rows],
                                   [r.kind for r in s.rows])
                seq = s.rows[-1].seq
        elif first is not None and first.texts:
            state, seq = self._fold(state, first.texts, first.ts_us), first.last_seq
            if len(first.texts) == PAGE_ITEMS:
                for page in history_pages(self._history, thread_id, seq, c.target):
                    state, seq = self._fold(state, page.texts, page.ts_us), page.last_seq
        if seq != c.target:
            return Result(AttemptOutcome.GONE, error=ThreadDiscarded(f"thread {thread_id!r} is gone"))
        meta = self._rules.metadata(thread_id, state, c.target)
        state_json = json.dumps(state)
        return (Result(AttemptOutcome.OK, meta=meta, fold_state=state, state_bytes=len(state_json),
                       incarnation=s.incarnation),
                RowWrite(meta, state_json, s.incarnation))

    def _fold(self, state: State, texts: Sequence[str], ts_us: Sequence[int],
              kinds: Sequence[str | None] | None = None) -> State:
        """``state`` after the stored items (``kinds``: their types, where known), by the
        rules' own fold of stored text if they have one."""
        if self._apply_stored is not None:
            return self._apply_stored(state, texts, ts_us)
        apply, item = self._rules.apply, self._item
        for i, text in enumerate(texts):
            state = apply(state, item(text, kinds[i] if kinds is not None else None), ts_us[i])
        return state

    def _item(self, text: str, kind: str | None) -> dict[str, object]:
        """The item to fold: parsed only if a rule reads its type. Most items are
        response items no rule reads, and parsing them was most of a catch-up's time."""
        if kind is None:
            kind = item_type(text)
        if kind is None or self._reads(kind):
            item: dict[str, object] = json.loads(text)
            return item
        return {"type": kind}

    def _start_state(self, c: Claim, stored: Checkpoint | None, ahead: Checkpoint | None,
                     created_us: int | None) -> tuple[int, dict[str, object]]:
        """The fold state to resume from, and its seq: cached, stored, or initial (at
        ``created_us``, read here if the batch did not). A row of the live thread
        (``ahead``, below the target) further than the cached fold saves folding again
        what other processes' projections folded."""
        thread_id = c.state.thread_id
        if not c.refold:
            if ahead is not None and ahead.fold_state is not None and (
                    c.fold_state is None or ahead.projected_seq > c.base):
                return ahead.projected_seq, json.loads(ahead.fold_state)
            if c.fold_state is not None:
                return c.base, c.fold_state
            # The batch read the thread's row (``_reads_stored``); ``None``: it has none.
            if stored is not None and stored.fold_state is not None and stored.projected_seq <= c.target:
                return stored.projected_seq, json.loads(stored.fold_state)
        # No row yet, or the row is ahead of history (power loss): fold from the start.
        if created_us is None:
            created_us = self._history.created_us(thread_id)
        return 0, self._rules.initial(thread_id, created_us)

    def _commit(self, rows: list[tuple[Claim, RowWrite, Result]],
                results: dict[int, Result], deadline: float | None, position: int,
                in_caller: bool) -> None:
        """Write the rows in one transaction, fenced by close and by discard/delete; the
        worker steps aside for appends between rows."""
        live = {c.state.thread_id: c for c, _, _ in rows}
        try:
            # Asked under the index's write lock, which a removal holds to delete the row.
            done = self._index.commit([row for _, row, _ in rows], position=position,
                                      may_write=lambda thread_id: live[thread_id].state.live,
                                      deadline=deadline,
                                      between_rows=None if in_caller else self._step_aside)
        except Exception as exc:  # noqa: BLE001 - translated by the backend; fails this batch
            for c, _, _ in rows:
                results[id(c)] = _failure(exc)
            return
        if done.outcome is not CommitOutcome.COMMITTED:
            # BUSY: a barrier out of time hands its attempt to the worker; FENCED: closed.
            kind = (AttemptOutcome.YIELDED if done.outcome is CommitOutcome.BUSY
                    else AttemptOutcome.CLOSED)
            for c, _, _ in rows:
                results[id(c)] = Result(kind)
            return
        if len(done.refused) + len(done.gone) < len(rows):
            self._on_commit()
        for c, _, prepared in rows:
            thread_id = c.state.thread_id
            error = done.errors.get(thread_id)
            if thread_id in done.refused:
                results[id(c)] = Result(AttemptOutcome.FENCED)
            elif thread_id in done.gone:
                # Removed, or created again, since the fold began: the next attempt finds
                # out which from history (a removal fails its waiters; a new thread folds anew).
                results[id(c)] = Result(AttemptOutcome.YIELDED)
            else:
                results[id(c)] = Result(AttemptOutcome.FAILED, error=error) if error else prepared
