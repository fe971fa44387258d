"""The recovery scan at open: which threads' projections are behind their history.

History marks a thread behind in the append's own transaction and acknowledgements clear
the mark once the index holds that head, so open reads only the marked threads; every
thread is compared only when one file lost a tail the other kept.
"""

from __future__ import annotations

import logging

from .history import History
from .index import Index
from ...storage import Lag

log = logging.getLogger("thread_store")


def recover(history: History, index: Index) -> list[Lag]:
    """Find threads whose projection is behind (or, after power loss, ahead of) history.

    History marks a thread behind in the append's own transaction, and acknowledgements
    clear the mark once the index committed the thread's row, so open() reads only the
    marked threads: O(threads behind), after a clean close or a crash alike.
    Acknowledgements are written lazily (about once per second, and at close), so a
    crash leaves the threads of the last commits marked although their rows are written:
    they are checked here, found caught up, and acknowledged.

    Every thread is compared once, the findings are marked in history and the files
    agree again, only when one file lost a tail the other kept (power loss with
    ``durability="normal"``, a restored backup), or for a new index:

    - the index lost commits that history acknowledged: its epoch (a count of its
      transactions) is below the one history recorded with its last acknowledgement;
    - history lost items that the index folded: its highest items rowid is below the
      index's ``history_mark`` (what history's highest rowid was before each fold).
      Rowids only grow (a removal keeps the highest one, see
      ``History._keep_high_water``), so removing the newest thread is no false alarm.
    """
    # Other writers may commit between any two reads here, and they only raise each of
    # these values: so of each pair the one they raise first is read first (the index
    # commits before history acknowledges it; a fold reads history's rowid before the
    # index records it). Only a lost tail then leaves the later read below the earlier.
    acknowledged = history.index_epoch()
    mark = index.history_mark()
    if (index.fresh or acknowledged is None or index.epoch() < acknowledged
            or history.high_water() < mark):
        return _compare_all(history, index)
    behind: list[Lag] = []
    caught_up = []
    for marked in history.behind_threads():
        checkpoint = index.checkpoint(marked.thread_id)
        projected = None if checkpoint.fold_state is None else checkpoint.projected_seq
        head = marked.head
        if projected is not None and projected > head:
            # Ahead of history (a lost tail), or another writer appended and projected
            # since the head was read: only a head read after the row tells them apart.
            now = history.live_head(marked.thread_id)
            if now is None:
                continue  # removed meanwhile, with its row
            head = now
        lag = Lag(marked.thread_id, head, projected)
        if lag.projected == lag.head:
            caught_up.append((lag.thread_id, lag.head))  # its acknowledgement was not written yet
        else:
            behind.append(lag)
    history.acknowledge(caught_up, None)  # the worker writes it with the others
    _delete_rows_ahead(index, behind)
    return behind


def _delete_rows_ahead(index: Index, behind: list[Lag]) -> None:
    """Rows ahead of their history (a power loss took items they folded) go, so the
    re-fold can write them: a stored row never moves back otherwise."""
    ahead = sorted(lag.thread_id for lag in behind if lag.refold and lag.projected is not None)
    if ahead:
        with index.exclusive():
            index.delete_rows(ahead)


def _compare_all(history: History, index: Index) -> list[Lag]:
    """Compare every thread's row with its history, once (see :func:`recover`).

    Crash-safe in this order: the findings are marked in history before the index's mark
    and history's epoch say that the files agree again.
    """
    if not index.fresh:
        log.warning("thread_store: the index and the history disagree (a power loss or a "
                    "restored file); comparing every thread")
    elif history.index_epoch() is not None:
        log.warning("thread_store: rebuilding the index from history")
    high_water = history.high_water()
    projected_by_id = index.projected_seqs()
    behind = [lag for thread_id, head in history.heads().items()
              if (lag := Lag(thread_id, head, projected_by_id.pop(thread_id, None))).projected != head]
    history.mark_behind(sorted(lag.thread_id for lag in behind))
    with index.exclusive():
        # Rows of threads whose history is gone (removed mid-crash, or lost with a tail).
        index.delete_rows(sorted(projected_by_id))
        index.reset_history_mark(high_water)
    _delete_rows_ahead(index, behind)
    history.mark_behind([], epoch=index.epoch())
    return behind
