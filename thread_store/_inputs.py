"""Validation of the arguments of ``ThreadStore``'s calls: items, keys and listing queries.

``ThreadStore.open``'s target and options are checked in :mod:`thread_store._options`;
the checks of single values (ids, timeouts, counts, one item) are in
:mod:`thread_store.model`. Everything here raises :class:`InvalidArgument` (or
:class:`InvalidItem`) before the store is touched.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Mapping, Sequence

from .errors import InvalidArgument
from .model import EncodedItem, check_count, encode_item
from .storage import IdempotencyKey, ListQuery, decode_cursor


def now_us() -> int:
    """The wall-clock time in microseconds: an item's default timestamp, a thread's creation."""
    return time.time_ns() // 1000


def encode_items(items: Sequence[Mapping[str, Any]], max_item_bytes: int) -> list[EncodedItem]:
    """Validate an append's items and serialize them.

    :raises InvalidArgument: ``items`` is not a list (or sequence) of items.
    :raises InvalidItem: an item is malformed or over ``max_item_bytes``.
    """
    # A list is the common case; the ABC checks cost about a microsecond each.
    if type(items) is not list and (isinstance(items, (str, bytes, Mapping))
                                    or not isinstance(items, Sequence)):
        raise InvalidArgument("items must be a list of item dicts, e.g. [{'type': 'event_msg', ...}]")
    now = now_us()
    return [encode_item(item, now, max_item_bytes) for item in items]


def session_meta_item(metadata: Mapping[str, Any] | None, max_item_bytes: int) -> EncodedItem | None:
    """``create_thread``'s ``metadata`` as the thread's first item; ``None`` (or empty): none."""
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise InvalidArgument(f"metadata must be a dict, not {type(metadata).__name__}")
    if not metadata:
        return None
    return encode_items([{"type": "session_meta", "payload": dict(metadata)}], max_item_bytes)[0]


def check_idempotency_key(key: object, items: list[EncodedItem]) -> IdempotencyKey:
    """Validate a key and pair it with the digest of the items it guards."""
    if (not isinstance(key, str) or not 1 <= len(key) <= 128 or "\x00" in key
            or not encodable(key)):
        raise InvalidArgument(f"idempotency_key must be a string of 1 to 128 characters without "
                              f"NUL characters or lone surrogates, or None; not {key!r:.80}")
    digest = hashlib.sha256()
    for item in items:
        digest.update(item.text.encode())
        digest.update(b"\x00")
    return IdempotencyKey(key, digest.hexdigest())


def list_query(limit: int, *, archived: bool, search: str | None, include_empty: bool,
               cwd: str | None) -> ListQuery:
    """Validate ``list_threads``' filters; the cursor is decoded by :func:`from_cursor`."""
    check_count(limit, name="limit", minimum=1, maximum=1000)
    for flag, name in ((archived, "archived"), (include_empty, "include_empty")):
        if not isinstance(flag, bool):
            raise InvalidArgument(f"{name} must be True or False, not {flag!r}")
    if search is not None and (not isinstance(search, str) or len(search) > 1000
                               or "\x00" in search or not encodable(search)):
        raise InvalidArgument("search must be a string of at most 1000 characters, without "
                              "NUL characters or lone surrogates, or None")
    if cwd is not None and (not isinstance(cwd, str) or len(cwd) > 4096 or "\x00" in cwd
                            or not encodable(cwd)):
        raise InvalidArgument("cwd must be a directory path string (at most 4096 characters, "
                              "no NUL characters or lone surrogates) or None")
    return ListQuery(limit=limit, archived=archived, include_empty=include_empty,
                     words=tuple(search.split()) if search else (), cwd=cwd)


def from_cursor(query: ListQuery, cursor: str | None) -> ListQuery:
    """``query`` continued after ``cursor`` (a ``next_cursor`` of the same query), if any.

    :raises InvalidCursor: the cursor is not from this query.
    """
    if cursor is None:
        return query
    return ListQuery(limit=query.limit, archived=query.archived,
                     include_empty=query.include_empty, words=query.words, cwd=query.cwd,
                     after=decode_cursor(cursor, query.filters()))


def encodable(text: str) -> bool:
    """False for strings storage cannot take (lone surrogates do not encode to UTF-8)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
