"""One batch of projection attempts: hook, fold, and one fenced index transaction.

This is the projector's only I/O. It runs with no projector lock held, in the worker or
in a barrier's calling thread.

An error from user code (the hook, the rules) fails its own attempt only. The one
exception: in a barrier's calling thread (``in_caller``), a ``BaseException`` that is
not an ``Exception`` (``KeyboardInterrupt``, ``SystemExit``) propagates, so Ctrl-C is
never swallowed; the projector then hands the attempts back (see ``Projector._run``).
"""

from __future__ import annotations

import json
import time
from typing import Callable

from ._pending import Claim, Result
from .derive import ProjectionRules
from .errors import (StoreClosed, ThreadDiscarded, ThreadNotFound, TransientProjectionError,
                     TransientStorageError)
from .backends.sqlite.history import History
from .backends.sqlite.index import Index, RowWrite

ProjectionHook = Callable[[str, int], None]


def is_transient(exc: BaseException) -> bool:
    """Errors worth a retry with backoff: the storage boundary and hooks say so by type."""
    return isinstance(exc, (TransientProjectionError, TransientStorageError))


def _failure(exc: BaseException) -> Result:
    return Result("retry" if is_transient(exc) else "failed", error=exc)


class AttemptRunner:
    """Runs attempts against one store's history and index."""

    def __init__(self, history: History, index: Index, rules: ProjectionRules,
                 hook: ProjectionHook | None, on_commit: Callable[[], None]) -> None:
        self._history = history
        self._index = index
        self._rules = rules
        self._hook = hook
        self.has_hook = hook is not None
        self._on_commit = on_commit
        types: frozenset[str] | None = getattr(rules, "item_types", None)
        self._reads: Callable[[str], bool] = (lambda _kind: True) if types is None else types.__contains__

    def run(self, claims: list[Claim], deadline: float | None = None, *,
            in_caller: bool = False) -> dict[int, Result]:
        """Prepare every claim, then commit the good rows together; results by ``id(claim)``.

        :param deadline: a barrier running its own attempt gives the work back
            (``yielded``) rather than wait past it for the index write lock.
        :param in_caller: runs in a barrier's calling thread: let interrupts through.
        """
        results: dict[int, Result] = {}
        rows: list[tuple[Claim, RowWrite, Result]] = []
        # Taken before the fold: every item it folds was committed, so is at or below it.
        history_mark = self._history.last_rowid
        for c in claims:
            result, row = self._prepare(c, in_caller)
            if row is None:
                results[id(c)] = result
            else:
                rows.append((c, row, result))
        if rows:
            self._commit(rows, results, deadline, history_mark)
        return results

    def _prepare(self, c: Claim, in_caller: bool) -> tuple[Result, RowWrite | None]:
        """Run the hook and the fold for one claim."""
        thread_id = c.state.thread_id
        if self._hook is not None:
            try:
                self._hook(thread_id, c.target)
            except BaseException as exc:  # noqa: BLE001 - any hook error fails this attempt only
                if in_caller and not isinstance(exc, Exception):
                    raise
                return _failure(exc), None
        try:
            base, state = self._start_state(c)
            seq = base
            if c.items is not None and base == c.base:
                for seq, ts_us, text, kind in c.items:
                    # Items of a type no rule reads need no parsing: most are response items.
                    item = json.loads(text) if self._reads(kind) else {"type": kind}
                    state = self._rules.apply(state, item, ts_us)
            else:
                for page in self._history.iter_range(thread_id, base, c.target):
                    for seq, ts_us, text in page:
                        state = self._rules.apply(state, json.loads(text), ts_us)
            if seq != c.target:
                return Result("gone", error=ThreadDiscarded(f"thread {thread_id!r} is gone")), None
            meta = self._rules.metadata(thread_id, state, c.target)
            state_json = json.dumps(state)
            return (Result("ok", meta=meta, fold_state=state, state_bytes=len(state_json)),
                    RowWrite(meta, state_json))
        except (ThreadDiscarded, ThreadNotFound) as exc:  # removed while this attempt ran
            return Result("gone", error=exc), None
        except BaseException as exc:  # noqa: BLE001 - the worker records, never dies
            if in_caller and not isinstance(exc, Exception):
                raise
            return _failure(exc), None

    def _start_state(self, c: Claim) -> tuple[int, dict[str, object]]:
        """The fold state to resume from, and its seq: cached, stored, or initial."""
        thread_id = c.state.thread_id
        if not c.refold:
            if c.fold_state is not None:
                return c.base, c.fold_state
            base, state_json = self._index.load_state(thread_id)
            if state_json is not None and base <= c.target:
                return base, json.loads(state_json)
        # No row yet, or the row is ahead of history (power loss): fold from the start.
        return 0, self._rules.initial(thread_id, self._history.created_us(thread_id))

    def _commit(self, rows: list[tuple[Claim, RowWrite, Result]],
                results: dict[int, Result], deadline: float | None, history_mark: int) -> None:
        """Write the rows in one transaction, fenced by close and by discard/delete."""
        lock = self._index.write_lock
        # A group commit can hold the lock for long; a barrier with a deadline must not
        # wait for it past the deadline, so it hands its attempt to the worker instead.
        wait = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        acquired = False
        try:  # an interrupt (Ctrl-C in a caller) anywhere after the acquire releases the lock
            acquired = lock.acquire(timeout=wait)
            if not acquired:
                for c, _, _ in rows:
                    results[id(c)] = Result("yielded")
                return
            if self._index.fenced:
                for c, _, _ in rows:
                    results[id(c)] = Result("closed")
                return
            live = []
            for entry in rows:
                # Checked under the write lock, which a removal takes to delete the row:
                # no attempt can write a row back once the removal began.
                if not entry[0].state.live:
                    results[id(entry[0])] = Result("fenced")
                else:
                    live.append(entry)
            if not live:
                return
            try:
                errors = self._index.write_rows([row for _, row, _ in live], history_mark)
            except StoreClosed:
                for c, _, _ in live:
                    results[id(c)] = Result("closed")
                return
            except Exception as exc:  # noqa: BLE001
                for c, _, _ in live:
                    results[id(c)] = _failure(exc)
                return
        finally:
            if acquired:
                lock.release()
        self._on_commit()
        for c, _, prepared in live:
            error = errors.get(c.state.thread_id)
            results[id(c)] = Result("failed", error=error) if error else prepared
