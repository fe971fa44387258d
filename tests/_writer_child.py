"""A writer process for the several-writers tests (DESIGN §1.11, §6), and its parent's handle.

Run as a script (``python _writer_child.py``), this module is a child process that reads one
JSON command a line on its stdin and answers each with exactly one JSON line on its stdout,
flushed at once, in order. A reply is ``{"ok": true, "result": ...}``, or ``{"ok": false,
"error": "<exception class name>", "message": "..."}`` when the call raised. The commands
(``op`` and its arguments):

- ``open path [options] [fail_threads] [block_threads signal_dir] [other_rules]
  [otlp_endpoint service]``: open the store for writing; ``options`` are keyword options
  of ``ThreadStore.open`` (JSON values: ``coalesce_delay``, ``catch_up_after``, ...).
  ``otlp_endpoint``: trace the store with an SDK provider exporting OTLP/HTTP there, as
  ``service`` (its ``service.name``). ``fail_threads``: a ``projection_hook``
  that raises ``RuntimeError`` (a permanent failure) for those thread ids. ``block_threads``:
  a hook that, for those ids, creates the file ``signal_dir/<thread_id>.entered`` and then
  blocks until ``signal_dir/<thread_id>.release`` exists (the test's gate on an attempt in
  flight). ``other_rules``: fold rules with another ``rules_id``. Result: the child's pid.
- ``create [thread_id] [metadata]`` -> the thread id.
- ``append thread_id items [idempotency_key]`` -> the generation.
- ``append_and_flush thread_id items [timeout]`` -> the metadata.
- ``burst child threads count seed [flush_every]``: ``count`` appends of one Codex-shaped
  item each (``_child._items``), to threads picked at random; each item's
  ``payload.token`` is ``"<child>/<n>"``, ``n`` counting the appends; every
  ``flush_every``-th is an ``append_and_flush``. Result: ``[[thread_id, generation,
  n, flushed], ...]``, one entry per acknowledged append, in order; for an
  ``append_and_flush`` (``flushed``) the generation is the ``projected_seq`` it returned,
  which covers the append and maybe later ones of other processes.
- ``flush thread_id [generation] [timeout]`` -> the metadata; ``flush_all [timeout]``.
- ``read_thread thread_id`` -> the metadata; ``read_history thread_id`` -> ``[[seq, item],
  ...]``; ``status thread_id`` -> the ``ThreadStatus`` fields.
- ``pause`` / ``resume``: ``pause_projection`` / ``resume_projection``.
- ``export_spans``: export every span ended so far (before a SIGKILL loses them).
- ``discard thread_id [timeout]``; ``delete thread_id``.
- ``close [timeout]``: close the store (the process stays, for more commands).
- ``rebuild_index path [options]``: ``ThreadStore.rebuild_index`` (needs no open store
  here; ``options`` name the store, e.g. a PostgreSQL ``schema``) -> count.
- ``exit``: close the store if it is open, answer, and end the process.

Metadata travels as ``ThreadMetadata.to_json()``. Imported, the module gives the parent
:class:`WriterChild` (spawn, call, kill, close) and :class:`ChildError`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable

from _child import _items
from opentelemetry.sdk.trace import TracerProvider

from thread_store import CodexRules, ThreadStore
from thread_store.otel_setup import build_tracer_provider

#: Seconds a reply may take before the parent calls the child hung: generous, it only
#: catches hangs (a slow machine must never fail a test here).
REPLY_TIMEOUT = 120.0


# -- the parent's side -----------------------------------------------------------------------


class ChildError(Exception):
    """A command raised in the child; ``kind`` is the exception's class name."""

    def __init__(self, op: str, kind: str, message: str) -> None:
        super().__init__(f"{op} raised {kind} in the child: {message}")
        self.op = op
        self.kind = kind
        self.message = message


class WriterChild:
    """A child process running this module, driven one command at a time."""

    def __init__(self) -> None:
        self._stderr: IO[str] = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                                     bufsize=1)
        self._replies: queue.Queue[str | None] = queue.Queue()
        self._sent: list[str] = []
        self._reader = threading.Thread(target=self._read, name="writer-child-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._replies.put(line)
        self._replies.put(None)  # EOF: the child is gone

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.proc.pid

    def send(self, op: str, **args: Any) -> None:
        """Send one command without waiting for its reply (collect it with :meth:`reply`)."""
        assert self.proc.stdin is not None
        self._sent.append(op)
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()

    def reply(self, timeout: float = REPLY_TIMEOUT) -> Any:
        """The result of the oldest command not yet answered; raise :class:`ChildError` if
        it raised, ``AssertionError`` (with the child's stderr) if the child hung or died."""
        op = self._sent.pop(0)
        try:
            line = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"child {self.pid} did not answer {op!r} within {timeout:g}s; "
                                 f"stderr:\n{self.stderr()}") from None
        if line is None:
            raise AssertionError(f"child {self.pid} died before answering {op!r} "
                                 f"(exit {self.proc.wait()}); stderr:\n{self.stderr()}")
        answer = json.loads(line)
        if not answer["ok"]:
            raise ChildError(op, answer["error"], answer["message"])
        return answer["result"]

    def call(self, op: str, timeout: float = REPLY_TIMEOUT, **args: Any) -> Any:
        """Send one command and return its result (see :meth:`reply`)."""
        self.send(op, **args)
        return self.reply(timeout)

    def error(self, op: str, **args: Any) -> ChildError:
        """Send a command that must raise; return the error (fail if it succeeded)."""
        try:
            result = self.call(op, **args)
        except ChildError as exc:
            return exc
        raise AssertionError(f"{op} {args} succeeded in the child with {result!r}; it must raise")

    def kill(self) -> None:
        """SIGKILL the child and reap it."""
        self.proc.kill()
        assert self.proc.wait(REPLY_TIMEOUT) == -9, self.stderr()

    def exit(self) -> None:
        """Ask the child to close its store and end; wait for it."""
        self.call("exit")
        assert self.proc.wait(REPLY_TIMEOUT) == 0, self.stderr()

    def stderr(self) -> str:
        """What the child wrote on its stderr so far."""
        self._stderr.seek(0)
        return self._stderr.read()

    def close(self) -> None:
        """Make sure the child is gone and every pipe and file of it is closed."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(REPLY_TIMEOUT)
        self._reader.join(REPLY_TIMEOUT)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        self._stderr.close()


# -- the child's side ------------------------------------------------------------------------


class OtherRules(CodexRules):
    """The default fold under another identifier: a store must refuse it (DESIGN §1.11)."""

    rules_id = "tests.other-rules/1"


def _hook(fail: set[str], block: set[str], signal_dir: Path | None) -> Callable[[str, int], None]:
    def hook(thread_id: str, generation: int) -> None:
        if thread_id in fail:
            raise RuntimeError(f"projection_hook refuses {thread_id} at generation {generation}")
        if thread_id in block:
            assert signal_dir is not None
            (signal_dir / f"{thread_id}.entered").touch()
            release = signal_dir / f"{thread_id}.release"
            while not release.exists():  # the test's gate; the library never polls
                time.sleep(0.01)
    return hook


class Session:
    """The child's state: at most one open store."""

    def __init__(self) -> None:
        self.store: ThreadStore | None = None
        self.tracer_provider: TracerProvider | None = None

    def open(self, path: str, options: dict[str, Any] | None = None,
             fail_threads: list[str] | None = None, block_threads: list[str] | None = None,
             signal_dir: str | None = None, other_rules: bool = False,
             otlp_endpoint: str | None = None, service: str = "writer-child") -> int:
        assert self.store is None, "one store per child"
        extra: dict[str, Any] = dict(options or {})
        if otlp_endpoint is not None:
            self.tracer_provider = build_tracer_provider(service, otlp_endpoint=otlp_endpoint)
            extra["tracer_provider"] = self.tracer_provider
        if fail_threads or block_threads:
            extra["projection_hook"] = _hook(set(fail_threads or ()), set(block_threads or ()),
                                             None if signal_dir is None else Path(signal_dir))
        if other_rules:
            extra["rules"] = OtherRules()
        self.store = ThreadStore.open(path, **extra)
        return os.getpid()

    def opened(self) -> ThreadStore:
        assert self.store is not None, "send 'open' first"
        return self.store

    def burst(self, child: str, threads: list[str], count: int, seed: int,
              flush_every: int = 0) -> list[list[Any]]:
        store = self.opened()
        rng = random.Random(seed)
        acks: list[list[Any]] = []
        for n in range(count):
            thread_id = rng.choice(threads)
            item = _items(rng, iter([f"{child}/{n}"]), 1)[0]
            if flush_every and n % flush_every == flush_every - 1:
                # The metadata covers this append, and maybe later ones of other processes.
                covered = store.append_and_flush(thread_id, [item], timeout=60.0).projected_seq
                acks.append([thread_id, covered, n, True])
            else:
                acks.append([thread_id, store.append(thread_id, [item]), n, False])
        return acks

    def close(self, timeout: float | None = 10.0) -> None:
        if self.store is not None:
            self.store.close(timeout)
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
            self.tracer_provider = None

    def run(self, op: str, args: dict[str, Any]) -> Any:
        """Carry out one command; its result must be JSON-ready."""
        if op == "open":
            return self.open(**args)
        if op == "burst":
            return self.burst(**args)
        if op in ("close", "exit"):
            return self.close(**args)
        if op == "rebuild_index":
            return ThreadStore.rebuild_index(args["path"], **args.get("options", {}))
        store = self.opened()
        if op == "create":
            return store.create_thread(args.get("thread_id"), metadata=args.get("metadata"))
        if op == "append":
            return store.append(args["thread_id"], args["items"],
                                idempotency_key=args.get("idempotency_key"))
        if op == "append_and_flush":
            return store.append_and_flush(args["thread_id"], args["items"],
                                          args.get("timeout")).to_json()
        if op == "flush":
            return store.flush(args["thread_id"], generation=args.get("generation"),
                               timeout=args.get("timeout")).to_json()
        if op == "flush_all":
            return store.flush_all(args.get("timeout"))
        if op == "read_thread":
            return store.read_thread(args["thread_id"]).to_json()
        if op == "read_history":
            return [[s.seq, s.item] for s in store.read_history(args["thread_id"], limit=100_000)]
        if op == "status":
            return dataclasses.asdict(store.status(args["thread_id"]))
        if op == "pause":
            return store.pause_projection()
        if op == "resume":
            return store.resume_projection()
        if op == "export_spans":
            assert self.tracer_provider is not None, "open with otlp_endpoint first"
            return self.tracer_provider.force_flush()
        if op == "discard":
            return store.discard(args["thread_id"], args.get("timeout"))
        if op == "delete":
            return store.delete_thread(args["thread_id"])
        raise ValueError(f"unknown command {op!r}")


def main() -> None:
    session = Session()
    for line in sys.stdin:
        command = json.loads(line)
        op = command.pop("op")
        try:
            answer: dict[str, Any] = {"ok": True, "result": session.run(op, command)}
        except Exception as exc:  # noqa: BLE001 - every error goes back to the parent
            answer = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
        if op == "exit":
            return
    session.close()  # stdin closed: the parent is done with us


if __name__ == "__main__":
    main()
