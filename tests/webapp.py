"""A small web app on one embedded store, served by several worker processes (issue 13).

It is the recipe of the README section "Web servers with several workers", run for real
by ``tests/test_webserver.py`` under ``gunicorn -w 4`` (WSGI: :func:`application`) and
``uvicorn --workers 4`` (ASGI: :func:`asgi`):

- **One store per worker, opened in the worker**: under WSGI, which has no start-up hook,
  a :class:`ThreadStore` on the worker's first request (:class:`PerProcessStore`); under
  ASGI, an :class:`AsyncThreadStore` at the worker's lifespan startup. Both faces make
  the same calls (:func:`_route`). Nothing is opened at import, so the master never holds a store
  whatever the server does before it forks (``gunicorn --preload`` imports the app in the
  master; a store opened there would be disowned in every worker, whose calls raise
  ``StoreClosed``), and the same code serves servers that fork (gunicorn) and servers that
  spawn (``uvicorn --workers``).
- **Closed when the worker exits**: by gunicorn's ``worker_exit`` hook (which this module
  defines, so ``gunicorn -c python:webapp`` picks it up) or the ASGI lifespan shutdown.
  ``close`` drains the projection work the worker accepted, so nothing it acknowledged is
  left behind in the index.

Configuration comes from the environment: ``WEBAPP_STORE`` (the store directory) and
``WEBAPP_OPTIONS`` (a JSON object of ``ThreadStore.open`` options for each worker's store,
the test's knobs; none by default). Each worker writes ``webapp: opened <pid>`` and
``webapp: closed <pid>`` on its stderr, so the test can tell that every store it opened
was closed before the worker ended.

Endpoints (JSON in and out; every reply carries the serving worker's ``pid``):

- ``GET /health``: ``{"pid"}``, without touching the store;
- ``POST /threads``: create a thread -> ``{"thread_id"}``;
- ``POST /threads/<id>/append`` ``{"items": [...]}`` -> ``{"generation"}``;
- ``POST /threads/<id>/append_and_flush`` ``{"items": [...]}`` -> ``{"metadata"}``;
- ``POST /threads/<id>/flush`` -> ``{"metadata"}``;
- ``GET /threads/<id>`` -> ``{"metadata"}``; ``GET /threads/<id>/history`` -> ``{"items":
  [[seq, item], ...]}``;
- ``GET /threads?limit=N&include_empty=1`` -> ``{"threads": [metadata, ...]}``.

A ``ThreadStoreError`` becomes ``{"error": <class name>, "message": ...}`` with a 4xx or 5xx
status.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from thread_store import (AsyncThreadStore, FlushTimeout, InvalidArgument, InvalidItem, ThreadDiscarded,
                          ThreadNotFound, ThreadStore, ThreadStoreError)

#: Seconds a barrier of a request may wait: far below gunicorn's 30 s worker timeout.
BARRIER_TIMEOUT = 20.0

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
_STATUS = {ThreadNotFound: "404 Not Found", ThreadDiscarded: "410 Gone", InvalidItem: "400 Bad Request",
           InvalidArgument: "400 Bad Request", FlushTimeout: "504 Gateway Timeout"}


class PerProcessStore:
    """One :class:`ThreadStore` per process, opened by the first call in that process.

    A store inherited over ``fork`` belongs to the parent (the library disowns it in the
    child), so the holder compares the process id and opens a store of the worker's own.
    """

    def __init__(self, opener: Callable[[], ThreadStore]) -> None:
        self._opener = opener
        self._lock = threading.Lock()  # threaded workers: one open per process
        self._store: ThreadStore | None = None
        self._pid = 0

    def get(self) -> ThreadStore:
        """This process's store, opened now if this is the process's first call."""
        with self._lock:
            if self._store is None or self._pid != os.getpid():
                self._store, self._pid = self._opener(), os.getpid()
                _event("opened")
            return self._store

    def close(self) -> None:
        """Close this process's store, if it opened one (drains the work it accepted)."""
        with self._lock:
            if self._store is not None and self._pid == os.getpid():
                self._store.close()
                self._store = None
                _event("closed")


def _event(what: str) -> None:
    sys.stderr.write(f"webapp: {what} {os.getpid()}\n")
    sys.stderr.flush()


def _options() -> dict[str, Any]:
    return dict(json.loads(os.environ.get("WEBAPP_OPTIONS", "{}")))


def _open() -> ThreadStore:
    return ThreadStore.open(os.environ["WEBAPP_STORE"], **_options())


#: The WSGI face's store (gunicorn): one per worker, opened by its first request.
STORE = PerProcessStore(_open)
#: The ASGI face's store (uvicorn spawns its workers: the lifespan opens one in each).
ASYNC_STORE: AsyncThreadStore | None = None


def worker_exit(server: object, worker: object) -> None:
    """gunicorn's hook, run in the worker as it ends (``gunicorn -c python:webapp``)."""
    STORE.close()


@dataclass(frozen=True)
class Call:
    """One request as a store call: the method of ``ThreadStore`` (and of
    ``AsyncThreadStore``, which has the same names) and how its result becomes the reply."""

    method: str | None  # None: answered without the store (``/health``)
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    reply: Callable[[Any], dict[str, Any]]


def _route(method: str, parts: list[str], query: dict[str, list[str]], body: dict[str, Any]) -> Call:
    """The store call of one request, whichever face (sync or async) will make it."""
    if parts == ["health"]:
        return Call(None, (), {}, lambda _: {})
    if parts == ["threads"] and method == "POST":
        return Call("create_thread", (), {}, lambda tid: {"thread_id": tid})
    if parts == ["threads"] and method == "GET":
        return Call("list_threads", (), {"limit": int(query.get("limit", ["50"])[0]),
                                         "include_empty": query.get("include_empty") == ["1"]},
                    lambda page: {"threads": [m.to_json() for m in page.threads]})
    if len(parts) == 2 and parts[0] == "threads" and method == "GET":
        return Call("read_thread", (parts[1],), {}, lambda meta: {"metadata": meta.to_json()})
    if len(parts) != 3 or parts[0] != "threads":
        raise LookupError("/".join(parts))
    thread_id, action = parts[1], (method, parts[2])
    metadata: Callable[[Any], dict[str, Any]] = lambda meta: {"metadata": meta.to_json()}  # noqa: E731
    if action == ("GET", "history"):
        return Call("read_history", (thread_id,), {"limit": 100_000},
                    lambda rows: {"items": [[r.seq, r.item] for r in rows]})
    if action == ("POST", "append"):
        return Call("append", (thread_id, body.get("items")), {}, lambda gen: {"generation": gen})
    if action == ("POST", "append_and_flush"):
        return Call("append_and_flush", (thread_id, body.get("items")), {"timeout": BARRIER_TIMEOUT},
                    metadata)
    if action == ("POST", "flush"):
        return Call("flush", (thread_id,), {"timeout": BARRIER_TIMEOUT}, metadata)
    raise LookupError("/".join(parts))


def _parsed(method: str, path: str, query: str, raw: bytes) -> Call:
    return _route(method, [p for p in path.split("/") if p], parse_qs(query), json.loads(raw) if raw else {})


def _reply(method: str, path: str, *, error: BaseException | None = None,
           reply: dict[str, Any] | None = None) -> tuple[str, bytes]:
    """The status and JSON body of a request's reply (or of its error)."""
    status = "200 OK"
    if isinstance(error, ThreadStoreError):
        status = _STATUS.get(type(error), "500 Internal Server Error")
        reply = {"error": type(error).__name__, "message": str(error)}
    elif isinstance(error, LookupError):
        status, reply = "404 Not Found", {"error": "NoSuchEndpoint", "message": f"{method} {path}"}
    return status, json.dumps({**(reply or {}), "pid": os.getpid()}).encode()


def _respond(method: str, path: str, query: str, raw: bytes) -> tuple[str, bytes]:
    """One WSGI request on this worker's (sync) store: the status and the JSON body."""
    try:
        call = _parsed(method, path, query, raw)
        result = None if call.method is None else getattr(STORE.get(), call.method)(*call.args, **call.kwargs)
    except (ThreadStoreError, LookupError) as exc:
        return _reply(method, path, error=exc)
    return _reply(method, path, reply=call.reply(result))


async def _respond_async(store: AsyncThreadStore, method: str, path: str, query: str,
                         raw: bytes) -> tuple[str, bytes]:
    """One ASGI request on this worker's ``AsyncThreadStore``: the status and the JSON body."""
    try:
        call = _parsed(method, path, query, raw)
        result = None if call.method is None else await getattr(store, call.method)(*call.args, **call.kwargs)
    except (ThreadStoreError, LookupError) as exc:
        return _reply(method, path, error=exc)
    return _reply(method, path, reply=call.reply(result))


def application(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """The WSGI entry point: ``gunicorn -w 4 -c python:webapp webapp:application``."""
    length = int(environ.get("CONTENT_LENGTH") or 0)
    status, payload = _respond(environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""),
                               environ.get("QUERY_STRING", ""), environ["wsgi.input"].read(length))
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))])
    return [payload]


async def asgi(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """The ASGI entry point: ``uvicorn --workers 4 webapp:asgi``. Its lifespan opens the
    worker's :class:`AsyncThreadStore` at startup and closes it at shutdown; a barrier
    awaits its outcome without blocking the event loop."""
    global ASYNC_STORE
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                ASYNC_STORE = await AsyncThreadStore.open(os.environ["WEBAPP_STORE"], **_options())
                _event("opened")
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if ASYNC_STORE is not None:
                    await ASYNC_STORE.close()
                    ASYNC_STORE = None
                    _event("closed")
                await send({"type": "lifespan.shutdown.complete"})
                return
    raw = b""
    while True:
        message = await receive()
        raw += message.get("body", b"")
        if not message.get("more_body"):
            break
    assert ASYNC_STORE is not None, "the lifespan startup opens the store before any request"
    status, payload = await _respond_async(ASYNC_STORE, scope["method"], scope["path"],
                                           scope["query_string"].decode(), raw)
    await send({"type": "http.response.start", "status": int(status.split()[0]),
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": payload})
