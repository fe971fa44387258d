"""Subprocess children of the reliability tests, and the invariants the parents check.

Run as a script, this module is a child process (``python _child.py MODE ARGS...``) that
reports on its stdout, one line per event, flushed at once:

- ``crash PATH SEED DURABILITY [several]``: appends to many threads until it is killed,
  printing ``A <thread_id> <generation> <token>...`` only after ``append`` returned (with
  ``several``, ``F`` for an ``append_and_flush``: the ``projected_seq`` it returned may
  cover other writers' appends; see :class:`Ack`);
- ``hold-index-lock PATH``: holds ``BEGIN EXCLUSIVE`` on the store's index.db until a line
  (or EOF) arrives on its stdin, then prints ``released T`` with the monotonic time T taken
  just before its COMMIT;
- ``writer PATH``: keeps the store open for writing until its stdin closes.

Imported, it gives the parent tests their shared checks: the fold of a thread's history,
convergence of the whole store, SQLite integrity, and that no projector thread survives.
"""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thread_store import CodexRules, ThreadMetadata, ThreadStore, ThreadStoreError
from thread_store.derive import fold
from thread_store.model import us_from_utc
from thread_store.storage import ListQuery

HISTORY = "history.db"
INDEX = "index.db"
PROJECTOR_THREAD = "thread_store-projector"
READY = "ready"


# -- invariants (used by the parent tests) ---------------------------------------------------


def _query(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Read a store file directly: these tests check storage internals on purpose."""
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute(sql, params).fetchall()


def live_threads(store_path: Path) -> dict[str, int]:
    """``{thread_id: created_us}`` of every live (not discarded) thread, from the history."""
    return dict(_query(store_path / HISTORY,  # type: ignore[arg-type]
                       "SELECT thread_id, created_us FROM threads WHERE discarded_us IS NULL"))


def folded(store: ThreadStore, thread_id: str, created_us: int) -> ThreadMetadata:
    """The metadata DESIGN §1.10 promises: the default rules folded over the whole history."""
    rules = CodexRules()
    state = rules.initial(thread_id, created_us)
    head = 0
    while page := store.read_history(thread_id, after_seq=head, limit=1000):
        state = fold(rules, state, [(us_from_utc(s.ts), s.item) for s in page])
        head = page[-1].seq
    return rules.metadata(thread_id, state, head)


def assert_converged(store: ThreadStore, timeout: float = 30.0) -> int:
    """After ``flush_all``, every live thread's metadata is the fold of its history.

    Also: ``projected_seq == head`` with nothing pending, and the index holds no row of a
    thread that is not live. Returns how many live threads were checked.
    """
    store.flush_all(timeout=timeout)
    threads, rows = _live_threads_and_rows(store)
    for thread_id, created_us in threads.items():
        expected = folded(store, thread_id, created_us)
        got, want = store.read_thread(thread_id).to_json(), expected.to_json()
        assert got == want, (thread_id, {k: (got[k], want[k]) for k in want if got[k] != want[k]})
        status = store.status(thread_id)
        assert (status.head_seq, status.projected_seq, status.pending) == (
            expected.projected_seq, expected.projected_seq, False), (thread_id, status)
    assert rows <= set(threads), f"index rows of dead threads: {sorted(rows - set(threads))}"
    return len(threads)


def _live_threads_and_rows(store: ThreadStore) -> tuple[dict[str, int], set[str]]:
    """``{thread_id: created_us}`` of the live threads, and the ids of the index's rows:
    read from the files where the store has them, else asked of the storage ports."""
    if store.path is not None:
        rows = {r[0] for r in _query(store.path / INDEX, "SELECT thread_id FROM threads")}
        return live_threads(store.path), rows
    storage = store._storage
    threads = {t: storage.history.created_us(t) for t in storage.history.heads()}
    listed = [storage.index.list(ListQuery(limit=len(threads) + 1000, archived=archived,
                                           include_empty=True)) for archived in (False, True)]
    assert all(page.next_cursor is None for page in listed), "1000 rows more than live threads"
    return threads, {m.thread_id for page in listed for m in page.threads}


@dataclass(frozen=True)
class Ack:
    """An append a writer reported only after it returned: the tokens of its items in
    order (each ``"<writer>/<n>"``, ``n`` counting that writer's items), and the generation
    it returned. For an ``append_and_flush`` (``flushed``) that is the ``projected_seq`` it
    returned, which covers the append and maybe later appends of other processes."""

    thread_id: str
    generation: int
    tokens: tuple[str, ...]
    flushed: bool = False


def parse_acks(lines: list[str]) -> list[Ack]:
    """The ``A`` (append) and ``F`` (append_and_flush) lines of a ``crash`` child."""
    acks = []
    for line in lines:
        word, *rest = line.split()
        if word in ("A", "F"):
            acks.append(Ack(rest[0], int(rest[1]), tuple(rest[2:]), flushed=word == "F"))
    return acks


def assert_acknowledged(store: ThreadStore, thread_ids: Iterable[str], acks: Iterable[Ack], *,
                        complete: bool = False) -> int:
    """Every acknowledged append is stored once at its generation (DESIGN §1.1, §1.3, §1.11).

    Each thread's seqs are 1..N with no gap or duplicate; no item is stored twice; one
    writer's items in a thread are in its order; each ack's items sit together in its
    thread, ending at its generation (at or below it for an ``append_and_flush``). With
    ``complete``, every stored item was acknowledged. Returns how many items were checked.
    """
    where: dict[str, tuple[str, int]] = {}
    for thread_id in thread_ids:
        history = store.read_history(thread_id, limit=100_000)
        assert [s.seq for s in history] == list(range(1, len(history) + 1)), f"{thread_id}: gaps or duplicates"
        order: dict[str, list[int]] = {}
        for s in history:
            token = s.item.get("payload", {}).get("token")
            if token is None:
                continue
            assert token not in where, f"{token} written twice: {where[token]}, ({thread_id}, {s.seq})"
            where[token] = (thread_id, s.seq)
            writer, n = token.rsplit("/", 1)
            order.setdefault(writer, []).append(int(n))
        for writer, ns in order.items():
            assert ns == sorted(ns), f"{thread_id}: the appends of {writer} are out of order"
    checked = set()
    for ack in acks:
        assert all(token in where for token in ack.tokens), f"acknowledged but not stored: {ack}"
        places = [where[token] for token in ack.tokens]
        seqs = [seq for _, seq in places]
        assert {tid for tid, _ in places} == {ack.thread_id}, (ack, places)
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"not stored together: {ack}"
        assert seqs[-1] <= ack.generation if ack.flushed else seqs[-1] == ack.generation, (ack, seqs)
        checked.update(ack.tokens)
    if complete:
        assert set(where) == checked, f"items nobody acknowledged were written: {sorted(set(where) - checked)[:5]}"
    return len(checked)


def integrity(db: Path) -> str:
    """``PRAGMA integrity_check`` of one database file (``"ok"`` when sound)."""
    return "; ".join(str(r[0]) for r in _query(db, "PRAGMA integrity_check"))


def assert_store_integrity(store_path: Path) -> None:
    """Both database files of a store pass ``PRAGMA integrity_check``."""
    for name in (HISTORY, INDEX):
        assert integrity(store_path / name) == "ok", name


def assert_no_projector_thread(grace: float = 0.0) -> None:
    """No projector worker is left running (call after every store is closed).

    ``grace``: seconds a worker may still take to exit. Give it after a close whose
    deadline may pass (``close(timeout=0)``, or a short one on a busy machine): such a close
    returns with its worker fenced but finishing its batch, and the worker must then exit
    on its own. After a close that drained within its deadline, no grace is needed.
    """
    deadline = time.monotonic() + grace
    for t in threading.enumerate():
        if t.name == PROJECTOR_THREAD:
            t.join(max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in threading.enumerate() if t.name == PROJECTOR_THREAD]
    assert not alive, f"projector threads still alive after close: {alive}"


# -- spawning children (used by the parent tests) --------------------------------------------


class Child:
    """A child process of this module whose stdout lines are collected by a reader thread."""

    def __init__(self, mode: str, *args: object) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, mode, *map(str, args)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        self.lines: list[str] = []
        self._seen = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="child-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._seen:
                self.lines.append(line)
                self._seen.notify_all()
        with self._seen:
            self.lines.append("")  # EOF marker: the child is gone
            self._seen.notify_all()

    def wait_for(self, word: str, timeout: float = 60.0) -> str:
        """Wait for a line starting with ``word``; fail with the child's stderr if it died."""
        deadline = time.monotonic() + timeout
        with self._seen:
            while True:
                for line in self.lines:
                    if line.startswith(word):
                        return line.strip()
                if "" in self.lines or time.monotonic() > deadline:
                    break
                self._seen.wait(max(0.0, deadline - time.monotonic()))
        raise AssertionError(f"child never said {word!r}; stderr:\n{self.stderr()}")

    def tell(self, line: str) -> None:
        """Send the child one line on its stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def kill(self) -> list[str]:
        """SIGKILL the child; return every complete line it printed."""
        self.proc.kill()
        return self.finish()

    def finish(self, timeout: float = 60.0) -> list[str]:
        """Close stdin, reap the child, and return its complete stdout lines."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass  # the child is already gone
        self.proc.wait(timeout)
        self._reader.join(timeout)
        return [line for line in self.lines if line.endswith("\n")]

    def stderr(self) -> str:
        """The child's stderr (reaps it first)."""
        assert self.proc.stderr is not None
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        return self.proc.stderr.read()

    def close(self) -> None:
        """Make sure the child is gone and its pipes are closed."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        self._reader.join(5.0)


# -- the children ----------------------------------------------------------------------------


def _say(*words: object) -> None:
    sys.stdout.write(" ".join(map(str, words)) + "\n")
    sys.stdout.flush()


def _items(rng: random.Random, tokens: Iterator[str], count: int) -> list[dict[str, Any]]:
    """Codex-shaped items, each carrying a unique token so the parent can find it."""
    out: list[dict[str, Any]] = []
    for _ in range(count):
        token = next(tokens)
        kind = rng.randrange(6)
        if kind == 0:
            payload: dict[str, Any] = {"type": "user_message", "message": f"ask {token}"}
            item: dict[str, Any] = {"type": "event_msg", "payload": payload}
        elif kind == 1:
            item = {"type": "event_msg", "payload": {"type": "task_started"},
                    "timestamp": f"2025-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}T10:00:00Z"}
        elif kind == 2:
            usage = {"total_tokens": rng.randrange(10**6)}
            item = {"type": "event_msg",
                    "payload": {"type": "token_count", "info": {"total_token_usage": usage}}}
        elif kind == 3:
            item = {"type": "turn_context", "payload": {"model": rng.choice(["a", "b"]),
                                                        "effort": rng.choice([None, "low"])}}
        elif kind == 4:
            item = {"type": "session_meta", "payload": {"cwd": f"/repo/{token}"}}
        else:
            item = {"type": "response_item", "payload": {"text": "x" * rng.randrange(2000)}}
        item.setdefault("payload", {})["token"] = token
        out.append(item)
    return out


def crash_child(path: str, seed: int, durability: str, several: bool = False) -> None:
    """Append forever with random barriers and projection pauses; acknowledge each append.

    ``several``: one of several writers killed at random (issue 13). It catches up others'
    work after half a second, and half of them project through a hook that sleeps up to
    2 ms, so kills often land in the middle of an attempt. Barriers get longer timeouts:
    on a loaded machine they only catch hangs, and a raise ends the child (its parent
    notices that it died).
    """
    rng = random.Random(seed)
    tokens = (f"{seed}/{n}" for n in range(1 << 62))
    options: dict[str, Any] = {"coalesce_delay": rng.choice([0.0, 0.001, 0.005, 0.02])}
    timeout = 10.0
    if several:
        timeout = 60.0
        options["catch_up_after"] = 0.5
        if rng.random() < 0.5:
            options["projection_hook"] = lambda thread_id, generation: time.sleep(random.uniform(0, 0.002))
    with ThreadStore.open(path, durability=durability, **options) as store:
        threads = list(live_threads(Path(path)))
        _say(READY)
        paused = False
        while True:
            op = rng.random()
            if op < 0.08 or not threads:
                threads.append(store.create_thread())
            elif op < 0.13:
                (store.resume_projection if paused else store.pause_projection)()
                paused = not paused
            elif op < 0.18 and not paused:  # a barrier would only wait out the pause
                store.flush(rng.choice(threads), timeout=timeout)
            else:
                thread_id = rng.choice(threads)
                items = _items(rng, tokens, rng.randint(1, 4))
                if op < 0.3 and not paused:
                    generation = store.append_and_flush(thread_id, items, timeout=timeout).projected_seq
                    # Alone in the store, what it covers is exactly its own append.
                    word = "F" if several else "A"
                else:
                    generation, word = store.append(thread_id, items), "A"
                _say(word, thread_id, generation, *(i["payload"]["token"] for i in items))


def hold_index_lock(path: str) -> None:
    """Hold the index database's write lock, as another process might, until told to let go.

    The parent decides when: a fixed hold time would race the parent's checks on a busy
    machine. The release time is read before COMMIT, so nothing can finish before it.
    """
    with closing(sqlite3.connect(Path(path) / INDEX, isolation_level=None)) as conn:
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("BEGIN EXCLUSIVE")
        _say("locked", time.monotonic())
        sys.stdin.readline()
        released = time.monotonic()
        conn.execute("COMMIT")
        _say("released", released)


def writer(path: str) -> None:
    """Hold the store open for writing until the parent closes our stdin."""
    try:
        with ThreadStore.open(path) as store:
            thread_id = store.create_thread()
            store.append_and_flush(thread_id, [{"type": "event_msg", "payload": {
                "type": "user_message", "message": "from the writer"}}], timeout=30.0)
            _say(READY, os.getpid(), thread_id)
            sys.stdin.read()
    except ThreadStoreError as exc:
        _say("error", type(exc).__name__, exc)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "crash":
        crash_child(args[0], int(args[1]), args[2], several=args[3:] == ["several"])
    elif mode == "hold-index-lock":
        hold_index_lock(args[0])
    elif mode == "writer":
        writer(args[0])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
