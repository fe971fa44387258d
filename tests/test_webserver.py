"""Issue 13, point 5: a real web server with several worker processes on one embedded store.

``gunicorn -w 4`` (with and without ``--preload``) and ``uvicorn --workers 4`` serve
``tests/webapp.py`` (the README recipe: a store per worker, opened in the worker, closed
as the worker ends) on a local port the kernel picks. Client threads drive it with
concurrent appends and barriers, which land on several workers. The workers' coalescing
delay and ``catch_up_after`` are longer than the test, so the metadata moves only through
barriers (``append_and_flush``, ``flush``: a worker doing, or taking over, the others'
work) and ``close``. Then the test checks what the workers served against the store's
files, stops the server with SIGTERM, and checks that every worker closed its store and
left no projection work behind.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from _child import Ack, _items, assert_acknowledged, assert_converged, assert_store_integrity, folded, live_threads
from conftest import wait_for

from thread_store import ThreadStore

TESTS = Path(__file__).parent
WORKERS = 4
CLIENTS = 8
THREADS = 6
REQUESTS = 30  # per client
#: Seconds for a request, the server's start and its stop: these only catch hangs.
HANG = 60.0


_GUNICORN = ["gunicorn", "-w", str(WORKERS), "-b", "127.0.0.1:0", "-c", "python:webapp",
             "--graceful-timeout", str(int(HANG)), "webapp:application"]
_GUNICORN_LISTENING = r"Listening at: http://127\.0\.0\.1:(\d+)"
#: How to start each server (the module that runs it, then its arguments) with
#: ``WORKERS`` workers on a port of the kernel's choosing, and the line it logs with that
#: port once it listens. ``--preload`` imports the app in the master before it forks: the
#: recipe opens nothing there.
SERVERS = {
    "gunicorn": (_GUNICORN, _GUNICORN_LISTENING),
    "gunicorn-preload": ([*_GUNICORN, "--preload"], _GUNICORN_LISTENING),
    "uvicorn": (["uvicorn", "--workers", str(WORKERS), "--host", "127.0.0.1", "--port", "0",
                 "--lifespan", "on", "--timeout-graceful-shutdown", str(int(HANG)), "webapp:asgi"],
                r"Uvicorn running on http://127\.0\.0\.1:(\d+)"),
}


class Server:
    """A web server process (and its workers, in a session of their own) serving ``webapp``."""

    def __init__(self, kind: str, store: Path, log: Path) -> None:
        args, self._listening = SERVERS[kind]
        pytest.importorskip(args[0], reason=f"{args[0]} comes with the dev extra")
        env = {**os.environ,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
               # Only barriers and close project: no coalescing window or catch-up ends.
               "WEBAPP_STORE": str(store),
               "WEBAPP_OPTIONS": json.dumps({"coalesce_delay": 600, "catch_up_after": 600}),
               # A store left for the interpreter's exit hook warns: make that visible.
               "PYTHONWARNINGS": "always::ResourceWarning"}
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", *args], env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.port = 0

    def output(self) -> str:
        """What gunicorn and its workers logged so far."""
        return self.log.read_text()

    def start(self) -> None:
        """Wait until the server listens and a worker answers."""
        def listening() -> bool:
            assert self.proc.poll() is None, f"the server exited:\n{self.output()}"
            found = re.search(self._listening, self.output())
            self.port = int(found.group(1)) if found else 0
            return bool(found)
        wait_for(listening, "the server to listen", timeout=HANG)
        wait_for(self._healthy, "a worker to answer", timeout=HANG)

    def _healthy(self) -> bool:
        try:
            self.call("GET", "/health")
        except ConnectionRefusedError:  # bound, but no worker listens yet (uvicorn)
            return False
        return True

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One request on a connection of its own; the JSON reply (fails unless 200)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=HANG)
        try:
            payload = None if body is None else json.dumps(body)
            conn.request(method, path, body=payload, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            reply = json.loads(response.read())
        finally:
            conn.close()
        assert response.status == 200, (method, path, response.status, reply)
        return reply

    def stop(self) -> int:
        """SIGTERM the server (a graceful stop of every worker); its exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(HANG)

    def kill(self) -> None:
        """Make sure the server and its workers are gone (after a failed test)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the workers too
            self.proc.wait(HANG)


@pytest.fixture(params=list(SERVERS))
def server(request: pytest.FixtureRequest, tmp_path: Path, store_path: Path) -> Iterator[Server]:
    """Each server with four workers on the test's store, listening; killed if still up."""
    running = Server(request.param, store_path, tmp_path / "server.log")
    try:
        running.start()
        yield running
    finally:
        running.kill()


def _client(server: Server, client: int, thread_ids: list[str], barriers: bool) -> tuple[list[Ack], set[int]]:
    """``REQUESTS`` appends of one item each to random threads (with ``barriers``, every
    fifth an ``append_and_flush``); the acks, and the pids of the workers that served them.
    Each item's token is ``c<client>/<n>``."""
    rng = random.Random(client)
    acks, pids = [], set()
    for n in range(REQUESTS):
        thread_id = rng.choice(thread_ids)
        items = _items(rng, iter([f"c{client}/{n}"]), 1)
        flushed = barriers and n % 5 == 4
        reply = server.call("POST", f"/threads/{thread_id}/{'append_and_flush' if flushed else 'append'}",
                            {"items": items})
        generation = reply["metadata"]["projected_seq"] if flushed else reply["generation"]
        acks.append(Ack(thread_id, generation, (items[0]["payload"]["token"],), flushed))
        pids.add(reply["pid"])
    return acks, pids


def _served(server: Server, thread_ids: list[str], clients: range, *,
            barriers: bool = True) -> tuple[list[Ack], set[int]]:
    """The appends of these clients (numbers), at once from a thread each."""
    with ThreadPoolExecutor(len(clients)) as pool:
        done = list(pool.map(lambda c: _client(server, c, thread_ids, barriers), clients))
    return [a for acks, _ in done for a in acks], {pid for _, pids in done for pid in pids}


def test_web_server_workers_share_one_store(server: Server, store_path: Path) -> None:
    created = [server.call("POST", "/threads") for _ in range(THREADS)]
    tids = [c["thread_id"] for c in created]
    acks, pids = _served(server, tids, range(CLIENTS))
    assert len(pids) > 1, "one worker served every concurrent request"

    with ThreadStore.open(store_path, read_only=True) as reader:
        assert assert_acknowledged(reader, tids, acks, complete=True) == CLIENTS * REQUESTS
        heads = {tid: reader.status(tid).head_seq for tid in tids}
        created_us = live_threads(store_path)
        # A flush in any worker covers every worker's appends: each row is the fold.
        with ThreadPoolExecutor(CLIENTS) as pool:
            flushed = dict(zip(tids, pool.map(lambda t: server.call("POST", f"/threads/{t}/flush"), tids)))
        for tid in tids:
            expected = folded(reader, tid, created_us[tid]).to_json()
            assert flushed[tid]["metadata"] == expected, tid
            assert expected["item_count"] == expected["projected_seq"] == heads[tid], tid
            assert server.call("GET", f"/threads/{tid}")["metadata"] == expected, tid
        listed = server.call("GET", f"/threads?limit={THREADS + 10}&include_empty=1")["threads"]
        assert {m["thread_id"]: m["item_count"] for m in listed} == heads

        # Appends no barrier covers: each worker's close must project what it accepted.
        late, late_pids = _served(server, tids, range(CLIENTS, 2 * CLIENTS), barriers=False)
        assert reader.report().threads_behind > 0, "the late appends were projected already"
        assert server.stop() == 0, server.output()

        opened = set(map(int, re.findall(r"webapp: opened (\d+)", server.output())))
        closed = set(map(int, re.findall(r"webapp: closed (\d+)", server.output())))
        assert pids | late_pids <= opened == closed, server.output()
        assert "still open at exit" not in server.output(), server.output()
        assert "Traceback" not in server.output(), server.output()
        report = reader.report()
        assert (report.threads_behind, report.items_behind, report.failed) == (0, 0, []), report
        assert_acknowledged(reader, tids, acks + late, complete=True)
    assert_store_integrity(store_path)
    with ThreadStore.open(store_path) as store:
        assert assert_converged(store) == THREADS
