"""Children of the recovery tests: each sets up a state, says ``ready`` and waits for SIGKILL.

- ``behind PATH THREADS BEHIND ACKS``: projects THREADS threads, then pauses projection and
  appends to the first BEHIND of them, so the kill leaves exactly those behind. With
  ACKS ``written`` the projected heads are acknowledged in history first (as the worker
  does about once per second); with ``unwritten`` none ever is (the kill comes before);
- ``discard PATH THREAD``: starts discarding the thread and is killed after the
  index row is gone but before the history is removed (the window of a crash mid-discard).
"""

from __future__ import annotations

import sys
import threading

from thread_store import ThreadStore
from thread_store.backends.sqlite import _acks
from thread_store.backends.sqlite.history import History


def _say(*words: object) -> None:
    sys.stdout.write(" ".join(map(str, words)) + "\n")
    sys.stdout.flush()


def _user_msg(text: str) -> dict[str, object]:
    return {"type": "event_msg", "payload": {"type": "user_message", "message": text}}


def behind(path: str, threads: int, behind: int, acks: str) -> None:
    if acks == "unwritten":
        _acks.INTERVAL_S = 3600.0  # the worker would write them after a second
    store = ThreadStore.open(path)
    tids = [store.create_thread() for _ in range(threads)]
    for tid in tids:
        store.append(tid, [_user_msg(f"title {tid}")])
    store.flush_all(timeout=60.0)
    if acks == "written":
        store._history.write_acknowledgements()
    store.pause_projection()
    for tid in tids[:behind]:
        store.append(tid, [_user_msg("after the pause")])
    _say("ready", *tids)
    threading.Event().wait()  # until SIGKILL


def discard(path: str, tid: str) -> None:
    store = ThreadStore.open(path)
    real_remove = History.remove

    def remove_then_die(self: History, thread_id: str, *, tombstone: bool) -> None:
        # The crash injection: the index row is gone, the history removal never runs.
        _say("ready", thread_id)
        threading.Event().wait()
        real_remove(self, thread_id, tombstone=tombstone)

    History.remove = remove_then_die  # type: ignore[method-assign]
    store.discard(tid)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "behind":
        behind(args[0], int(args[1]), int(args[2]), args[3])
    elif mode == "discard":
        discard(args[0], args[1])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
