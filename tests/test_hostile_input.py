"""Hostile input (DESIGN §5): every public call answers with success or a typed error.

Hypothesis throws arbitrary JSON, strings, ids, cursors, sizes and timeouts at every call.
Besides the outcome being typed, a rejected call writes nothing, and a sentinel thread
nobody touches keeps its history and metadata, and can still be appended to and flushed.
All of that holds on every backend. Thread ids never become paths or SQL, and the SQLite
store's files are private to their owner.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _child import assert_converged, assert_no_projector_thread, assert_store_integrity
from conftest import Backend, plain, user_msg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thread_store import (
    FlushTimeout,
    InvalidArgument,
    InvalidItem,
    ProjectionFailed,
    ThreadNotFound,
    ThreadStore,
    ThreadStoreError,
)

SENTINEL = "sentinel"
NASTY_TEXT = [
    "", " ", "'; DROP TABLE items; --", "\" OR 1=1 --", "x\x00y", "\x00", "\ud800",
    "a\udfffb", "\U0001f600", "NULL", "%s%n", "../../etc/passwd", "a" * 10_000,
    "title:* OR preview:*", "\"unbalanced", "NEAR(a b)", "*", "-", "^x",
]
NASTY_TIMESTAMPS = [
    "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "2024-02-30T00:00:00Z",
    "2024-01-01T00:00:00Z", "2024-01-01", "not a time", "", 0, None, 1e300,
]
HUGE_INTS = [2**63, -(2**63) - 1, 10**100, 10**4000]  # hypothesis cannot repr 10**5000


def _cursor(obj: Any) -> str:
    """Forge a cursor the way the index encodes one (hostile parts are made JSON anyway)."""
    text = json.dumps(obj, skipkeys=True, default=repr)
    return base64.urlsafe_b64encode(text.encode("utf-8", "surrogatepass")).decode().rstrip("=")


NASTY_CURSORS = [
    _cursor([1, False, False, None, 10**30, "x"]), _cursor([1, False, False, None, 5, "\ud800"]),
    _cursor([1, False, False, None, 5, "x\x00"]), _cursor([1, False, False, None, -(2**70), "x"]),
    _cursor([1, False, False, None, 1.5, "x"]), _cursor({"a": 1}), _cursor(7), _cursor([]),
    base64.urlsafe_b64encode(b"[" * 3000).decode(), "!!!", "", "=" * 10, "a" * 5000,
]

# -- strategies --------------------------------------------------------------------------------


def mostly(valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Valid three times in four: a call checks its arguments in turn, so a hostile value
    only reaches the deeper layers when the arguments checked before it were fine."""
    return st.sampled_from([True, True, True, False]).flatmap(lambda ok: valid if ok else hostile)


# Plain st.text() almost never yields a lone surrogate or NUL; mix those in on purpose.
texts = st.one_of(st.text(st.one_of(st.characters(), st.sampled_from("\ud800\udfff\x00'\";-*")),
                          max_size=40),
                  st.sampled_from(NASTY_TEXT))
keys = st.one_of(texts, st.integers(), st.none(), st.booleans(), st.floats(),
                 st.tuples(st.integers()))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from(HUGE_INTS),
                    st.floats(), texts)
json_values = st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                     st.dictionaries(keys, inner, max_size=4)),
    max_leaves=12)
fields = mostly(texts, json_values)
timestamps = mostly(st.sampled_from(["2024-01-01T00:00:00Z", "2025-06-30T23:59:59.999+02:00"]),
                    st.one_of(st.sampled_from(NASTY_TIMESTAMPS), fields))


def _item(kind: str, **payload: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Items the default rules read, with hostile values in the fields they read."""
    return st.fixed_dictionaries(
        {"type": st.just(kind), "payload": st.fixed_dictionaries({}, optional=payload)},
        optional={"timestamp": timestamps})


def _event(kind: str, **payload: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return _item("event_msg", type=st.just(kind), **payload)


SESSION_FIELDS = {
    "cwd": fields, "model_provider": fields, "cli_version": fields, "source": fields,
    "timestamp": timestamps,
    "git": mostly(st.fixed_dictionaries({}, optional={"commit_hash": fields, "branch": fields,
                                                     "repository_url": fields}), json_values),
}
items = mostly(
    st.one_of(
        _event("user_message", message=fields, images=json_values, local_images=json_values),
        _event("token_count", info=mostly(st.fixed_dictionaries({"total_token_usage": json_values}),
                                          json_values)),
        _event("thread_goal_updated", goal=mostly(st.fixed_dictionaries({"objective": fields}),
                                                  json_values)),
        _event("turn_started"), _event("task_started"),
        _item("session_meta", **SESSION_FIELDS),
        _item("turn_context", model=fields, effort=fields, cwd=fields),
        _item("thread_store.metadata", name=fields),
        _item("thread_store.archive", archived=json_values)),
    st.one_of(st.fixed_dictionaries({"type": fields},
                                    optional={"payload": json_values, "timestamp": fields}),
              json_values))
item_lists = mostly(st.lists(items, max_size=4),
                    st.one_of(json_values, st.binary(max_size=8), st.just(user_msg("not a list"))))
hostile_ids = st.one_of(st.from_regex(r"[A-Za-z0-9._:-]{1,128}", fullmatch=True), texts,
                        st.integers(), st.none(), st.binary(max_size=8),
                        st.sampled_from(["..", ".", "../x", "a/b", "/", "a" * 129, "a b", "x'--"]))
timeouts = mostly(st.one_of(st.none(), st.floats(min_value=0, max_value=0.05)),
                  st.one_of(st.floats(), st.sampled_from([float("inf"), 1e300, -1, 2**80]),
                            st.integers(), st.booleans(), texts))
hostile_counts = st.one_of(st.integers(), st.sampled_from([0, -1, 1, 2**62, 2**63, 10**30]),
                           st.floats(), st.none(), st.booleans(), texts)
limits = mostly(st.integers(1, 50), hostile_counts)
seqs = mostly(st.integers(0, 8), hostile_counts)
flags = mostly(st.booleans(), json_values)
searches = mostly(st.one_of(st.none(), st.text(max_size=10)), st.one_of(texts, json_values))
cursors = st.one_of(st.none(), texts, st.sampled_from(NASTY_CURSORS), st.integers(),
                    st.binary(max_size=8))
# What a forged cursor for the drawn query may carry as its position.
forged_positions = st.tuples(
    st.one_of(st.integers(), st.sampled_from([*HUGE_INTS, -(2**63) - 1, 2**63 - 1]), st.floats(), texts),
    mostly(texts, json_values))


class _Fuzz:
    """One store, a sentinel nobody may touch, and a pool of threads the calls work on.

    Each example starts on fresh threads, so a replay while shrinking sees the same state.
    """

    def __init__(self, store: ThreadStore) -> None:
        self.store = store
        self.pool: list[str] = []
        self.cursors: list[str] = []

    def begin(self) -> None:
        """Start an example: new pool threads, no cursors."""
        self.pool = [self.store.create_thread() for _ in range(3)]
        self.cursors = []

    def call(self, data: st.DataObject) -> None:
        """Make one random public call; check that its outcome is allowed."""
        # No draw depends on the store's state, so Hypothesis can replay and shrink; the
        # pool and cursor lists only decide which existing value a drawn index picks.
        from_pool, n, hostile = data.draw(st.tuples(mostly(st.just(True), st.just(False)),
                                                    st.integers(0, 63), hostile_ids), label="thread_id")
        while len(self.pool) < 3:  # deletes drain the pool; keep live threads to work on
            self.pool.append(self.store.create_thread())
        tid = self.pool[n % len(self.pool)] if from_pool else hostile
        if tid == SENTINEL:
            tid = "not-the-sentinel"
        name, call, adds = self.pick(data, tid)
        head = self.head(tid)
        existed = self.exists(tid)
        try:
            result = call()
        except FlushTimeout:
            outcome = "barrier"  # the items are durable; only the wait was short
        except ProjectionFailed as exc:
            # No hook and no fault here: whatever append accepted must project (§5).
            raise AssertionError(f"{name}: accepted input broke the projection") from exc
        except ThreadStoreError:
            outcome = "rejected"
        else:
            outcome = "ok"
            if name == "create_thread" and isinstance(result, str):
                self.pool.append(result)
            if name == "list_threads" and result.next_cursor is not None:
                self.cursors.append(result.next_cursor)
        # No other exception may escape: pytest reports it with the drawn arguments.
        if name == "create_thread" and outcome == "rejected":
            assert self.exists(tid) == existed, f"a rejected create_thread({tid!r}) wrote"
        if head is not None and adds is not None:
            expected = head if outcome == "rejected" else head + adds
            after = self.head(tid)
            assert after in (expected, None), f"{name}: head {head} -> {after}, {outcome}"

    def head(self, tid: object) -> int | None:
        """The thread's history head, or ``None`` when it is not a live pool thread."""
        if tid not in self.pool:
            return None
        try:
            return len(self.store.read_history(tid, limit=100_000))  # type: ignore[arg-type]
        except ThreadStoreError:
            return None

    def exists(self, tid: object) -> bool:
        """Whether the id names a thread in the history (live or discarded)."""
        try:
            self.store.status(tid)  # type: ignore[arg-type]
        except (ThreadNotFound, InvalidArgument):
            return False
        except ThreadStoreError:
            return True  # discarded: its tombstone exists
        return True

    def pick(self, data: st.DataObject, tid: Any) -> tuple[str, Callable[[], Any], int | None]:
        """Draw one call: its name, a thunk, and how many items it appends if it succeeds."""
        store = self.store
        name = data.draw(st.sampled_from(_CALLS), label="call")
        if name in ("append", "append_and_flush"):
            batch = data.draw(item_lists, label="items")
            adds = len(batch) if isinstance(batch, list) else None
            if name == "append":
                return name, lambda: store.append(tid, batch), adds
            timeout = data.draw(timeouts, label="timeout")
            return name, lambda: store.append_and_flush(tid, batch, timeout=timeout), adds
        if name == "create_thread":
            metadata = data.draw(st.one_of(st.none(), json_values,
                                           st.fixed_dictionaries({}, optional=SESSION_FIELDS)),
                                 label="metadata")
            return name, lambda: store.create_thread(tid, metadata=metadata), None
        if name == "list_threads":
            args = {"limit": data.draw(limits), "archived": data.draw(flags),
                    "search": data.draw(searches), "include_empty": data.draw(flags)}
            how, n, cursor, (recency, last) = data.draw(st.tuples(
                st.sampled_from(["none", "drawn", "reused", "forged", "forged"]), st.integers(0, 63),
                cursors,
                forged_positions), label="cursor")
            if how == "none":
                cursor = None
            elif how == "reused" and self.cursors:
                cursor = self.cursors[n % len(self.cursors)]
            elif how == "forged":  # well-formed for this very query, so it reaches the SQL
                search = (args["search"].strip() or None) if isinstance(args["search"], str) else None
                cursor = _cursor([1, args["archived"], args["include_empty"], search, recency, last])
            args["cursor"] = cursor
            return name, lambda: store.list_threads(**args), None
        if name == "read_history":
            after, limit = data.draw(seqs, label="after_seq"), data.draw(limits, label="limit")
            return name, lambda: store.read_history(tid, after_seq=after, limit=limit), None
        if name == "update_metadata":
            value = data.draw(st.one_of(texts, json_values), label="name")
            timeout = data.draw(timeouts, label="timeout")
            return name, lambda: store.update_metadata(tid, name=value, timeout=timeout), 1
        timeout = data.draw(timeouts, label="timeout")
        if name == "flush":
            generation = data.draw(st.one_of(st.none(), seqs), label="generation")
            return name, lambda: store.flush(tid, generation=generation, timeout=timeout), 0
        if name == "flush_all":
            return name, lambda: store.flush_all(timeout=timeout), 0
        if name in ("archive_thread", "unarchive_thread"):
            return name, lambda: getattr(store, name)(tid, timeout=timeout), 1
        if name in ("delete_thread", "discard"):
            if tid in self.pool:
                self.pool.remove(tid)
            return name, lambda: (store.delete_thread(tid, timeout=timeout) if name == "delete_thread"
                                  else store.discard(tid, timeout=timeout)), None
        return name, lambda: getattr(store, name)(tid), 0  # read_thread, status


# Appends and listings take the most varied input, so they come up three times as often.
_CALLS = ["append", "append_and_flush", "list_threads"] * 3 + [
    "create_thread", "flush", "flush_all", "read_thread", "read_history", "update_metadata",
    "archive_thread", "unarchive_thread", "delete_thread", "discard", "status"]


def _sentinel(store: ThreadStore) -> tuple[Any, ...]:
    """What the fuzzing must not change: the sentinel's history and metadata."""
    return (store.read_history(SENTINEL), store.read_thread(SENTINEL),
            store.status(SENTINEL).head_seq)


def _fuzz_every_public_call(backend: Backend, examples: int) -> None:
    with backend.open_store() as store:
        store.create_thread(SENTINEL, metadata={"cwd": "/sentinel"})
        store.append_and_flush(SENTINEL, [user_msg("guard me"), plain()], timeout=10.0)
        before = _sentinel(store)
        fuzz = _Fuzz(store)

        @settings(max_examples=examples, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(st.data())
        def run(data: st.DataObject) -> None:
            fuzz.begin()
            for _ in range(data.draw(st.integers(1, 8), label="calls")):
                fuzz.call(data)

        run()
        assert _sentinel(store) == before
        assert store.append_and_flush(SENTINEL, [plain()], timeout=10.0).item_count == 4
        assert_converged(store)
    if backend.capabilities.files:
        assert_store_integrity(store.path)  # type: ignore[arg-type]
    assert_no_projector_thread()


def test_fuzz_every_public_call(backend: Backend) -> None:
    _fuzz_every_public_call(backend, 400)


@pytest.mark.slow
def test_fuzz_every_public_call_long(backend: Backend) -> None:
    _fuzz_every_public_call(backend, 5000)


@given(timeout=timeouts)
# Each example opens a store of its own (backend.new_place()): the fixture keeps no state
# between examples.
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
def test_fuzz_close_timeout(backend: Backend, timeout: Any) -> None:
    store = backend.new_place().open()
    try:
        store.append(store.create_thread(), [plain()])
        try:
            store.close(timeout=timeout)
        except InvalidArgument:
            pass  # a malformed timeout is refused; the store is still open
    finally:
        store.close()
    # A drawn deadline near 0 returns while the fenced worker may finish its batch.
    assert_no_projector_thread(grace=30.0)


# -- explicit hostile values ------------------------------------------------------------------


def _nested(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {}
    root = {"type": "response_item", "payload": node}
    for _ in range(depth):
        node["n"] = {}
        node = node["n"]
    return root


TEN_MB = 10 * 1024 * 1024
REJECTED = {
    "10 MB item": {"type": "response_item", "payload": {"blob": "x" * TEN_MB}},
    "100k levels": _nested(100_000),
    "nan": {"type": "response_item", "payload": {"v": float("nan")}},
    "infinity": {"type": "response_item", "payload": {"v": float("inf")}},
    "tuple key": {"type": "response_item", "payload": {(1, 2): "v"}},
    "int beyond str conversion": {"type": "response_item", "payload": {"v": 10**5000}},
    "set value": {"type": "response_item", "payload": {"v": {1, 2}}},
    "no type": {"payload": {}},
    "type not str": {"type": 7},
    "bad timestamp": {"type": "x", "timestamp": "yesterday"},
    "timestamp past year 9999 in UTC": {"type": "x", "timestamp": "9999-12-31T23:59:59-14:00"},
}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_rejected_item_writes_nothing(store: ThreadStore, case: str) -> None:
    tid = store.create_thread()
    store.append(tid, [plain(1)])
    for batch in ([REJECTED[case]], [plain(2), REJECTED[case], plain(3)]):
        with pytest.raises(InvalidItem):
            store.append(tid, batch)
        with pytest.raises(InvalidItem):
            store.append_and_flush(tid, batch, timeout=5.0)
    assert [s.item for s in store.read_history(tid)] == [plain(1)]
    assert store.flush(tid, timeout=10.0).item_count == 1


ACCEPTED = {
    "sql in text": user_msg("'; DROP TABLE items; --"),
    "nul bytes": user_msg("a\x00b\x00"),
    "lone surrogates": user_msg("lone \ud800 and \udfff"),
    "lone surrogate as name": {"type": "thread_store.metadata", "payload": {"name": "n\udc80"}},
    "lone surrogate as cwd": {"type": "session_meta", "payload": {"cwd": "/\ud800"}},
    "lone surrogate as effort": {"type": "turn_context", "payload": {"effort": "\ud800"}},
    "huge ints": {"type": "event_msg", "payload": {"type": "token_count", "info": {
        "total_token_usage": {"total_tokens": 10**100, "neg": -(2**70)}}}},
    "int keys": {"type": "response_item", "payload": {1: "one", None: "none", 2.5: "x"}},
    "deep but fine": _nested(200),
    "emoji": user_msg("\U0001f600 ok"),
}


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_odd_but_valid_items_are_stored_and_projected(store: ThreadStore, case: str) -> None:
    """Valid JSON is kept as JSON keeps it, and its thread still projects and lists."""
    item = ACCEPTED[case]
    tid = store.create_thread()
    meta = store.append_and_flush(tid, [item], timeout=10.0)
    assert meta.item_count == 1
    assert store.read_history(tid)[0].item == json.loads(json.dumps(item))
    store.list_threads(include_empty=True, search="lone")
    assert assert_converged(store) == 1


def test_ten_megabyte_item_with_raised_limit(backend: Backend) -> None:
    big = {"type": "response_item", "payload": {"blob": "y" * TEN_MB}}
    with backend.open_store(max_item_bytes=16 * 1024 * 1024) as store:
        tid = store.create_thread()
        assert store.append_and_flush(tid, [big, user_msg("after")], timeout=30.0).item_count == 2
        assert store.read_history(tid, limit=1)[0].item == big
        assert_converged(store)


@pytest.mark.parametrize("search", NASTY_TEXT)
def test_nasty_search_is_typed(store: ThreadStore, search: str) -> None:
    store.append_and_flush(store.create_thread(), [user_msg("needle")], timeout=10.0)
    try:
        page = store.list_threads(search=search)
    except InvalidArgument:
        return
    assert all(isinstance(m.thread_id, str) for m in page.threads)


@pytest.mark.parametrize("cursor", NASTY_CURSORS)
def test_nasty_cursor_is_invalid_cursor(store: ThreadStore, cursor: str) -> None:
    with pytest.raises(InvalidArgument):
        store.list_threads(cursor=cursor)


# -- ids and files (SQLite's own) -------------------------------------------------------------

STORE_FILES = {"history.db", "history.db-wal", "history.db-shm", "index.db", "index.db-wal",
               "index.db-shm", "store.lock", "history.lock", "index.lock"}
BAD_IDS = ["../x", "a/b", "/etc/passwd", "'; DROP TABLE items; --", "x' OR '1'='1", "a b",
           "", "a" * 129, "x\x00", "é", "id;rm -rf ~", "\ud800", "tab\t"]
HARMLESS_IDS = ["..", ".", "...", "--", "x--", "1:2", "a.b-c_d", "_", ":memory:", "a" * 128]


def test_ids_never_become_paths_or_sql(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with ThreadStore.open(path) as store:
        for bad in BAD_IDS:
            for call in (store.create_thread, store.read_thread, store.delete_thread, store.status):
                with pytest.raises(InvalidArgument):
                    call(bad)
            with pytest.raises(InvalidArgument):
                store.append(bad, [plain()])
        for ok in HARMLESS_IDS:
            store.create_thread(ok)
            assert store.append_and_flush(ok, [user_msg(f"id {ok}")], timeout=10.0).thread_id == ok
        listed = {m.thread_id for m in store.list_threads(limit=100).threads}
        assert listed == set(HARMLESS_IDS)
        store.delete_thread("..")
        with pytest.raises(ThreadNotFound):
            store.read_thread("..")
        assert_converged(store)
        assert set(os.listdir(path)) <= STORE_FILES
        assert os.listdir(tmp_path) == ["store"]
    assert_store_integrity(path)


def test_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = tmp_path / "store"
        with ThreadStore.open(path) as store:
            store.append_and_flush(store.create_thread(), [user_msg("hi")], timeout=10.0)
            store.list_threads()  # readers open too
            modes = {name: stat.S_IMODE(os.stat(path / name).st_mode) for name in os.listdir(path)}
            assert set(modes) == STORE_FILES
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
            assert modes == dict.fromkeys(STORE_FILES, 0o600)
    finally:
        os.umask(old)
