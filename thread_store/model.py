"""Pure data: metadata rows, stored items, pages, status, policies and counters, plus input validation."""

from __future__ import annotations

import json
import math
import random
import re
from copy import deepcopy
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any, Mapping

from .errors import InvalidArgument, InvalidItem

THREAD_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
DEFAULT_MAX_ITEM_BYTES = 8 * 1024 * 1024
#: The string fields of ThreadMetadata, in order: the fold fills them, the index stores them.
TEXT_FIELDS = ("name", "title", "preview", "first_user_message", "model_provider", "model",
               "reasoning_effort", "cwd", "cli_version", "source", "git_sha", "git_branch",
               "git_origin_url")
MAX_TIMEOUT_S = 1e9


@dataclass(frozen=True, slots=True)
class ThreadMetadata:
    """A thread's projected metadata: the fold of its history up to ``projected_seq``.

    Datetimes are timezone-aware UTC. ``token_usage`` is the ``total_token_usage`` dict of
    the latest ``token_count`` event, or ``None``.
    """

    thread_id: str
    name: str | None = None
    title: str | None = None
    preview: str | None = None
    first_user_message: str | None = None
    model_provider: str | None = None
    model: str | None = None
    reasoning_effort: str | None = None
    cwd: str | None = None
    cli_version: str | None = None
    source: str | None = None
    git_sha: str | None = None
    git_branch: str | None = None
    git_origin_url: str | None = None
    token_usage: dict[str, Any] | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    recency_at: datetime | None = None
    archived_at: datetime | None = None
    item_count: int = 0
    projected_seq: int = 0

    def to_json(self) -> dict[str, Any]:
        """Return the fields as a JSON-ready dict (datetimes as ISO 8601 strings)."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            out[name] = value.isoformat() if isinstance(value, datetime) else deepcopy(value)
        return out


def caller_copy(meta: ThreadMetadata) -> ThreadMetadata:
    """``meta`` with containers of its own: one row can be handed to many callers (every
    waiter an attempt serves) and is built from cached fold state; each may mutate it."""
    return meta if meta.token_usage is None else replace(meta, token_usage=deepcopy(meta.token_usage))


@dataclass(frozen=True, slots=True)
class StoredItem:
    """One history entry: its per-thread ``seq``, its timestamp and the item itself."""

    seq: int
    ts: datetime
    item: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Page:
    """One page of ``list_threads``; pass ``next_cursor`` back to get the next one."""

    threads: list[ThreadMetadata]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class ThreadStatus:
    """Where a thread's projection stands.

    ``pending`` is true while ``projected_seq < head_seq``. ``attempts`` counts the
    attempts of the current retry budget; ``last_error`` is the error of the last failed
    attempt until an attempt succeeds.
    """

    head_seq: int
    projected_seq: int
    pending: bool
    attempts: int
    last_error: str | None
    waiters: int


@dataclass(frozen=True, slots=True)
class EncodedItem:
    """An item validated and serialized for the history log."""

    text: str
    ts_us: int
    kind: str  # the item's ``type``, so the fold can skip parsing items no rule reads


def utc(value: int) -> datetime:
    """Turn integer microseconds since the epoch into an aware UTC datetime."""
    return _EPOCH + timedelta(microseconds=value)


def utc_from_us(value: int | None) -> datetime | None:
    """Like :func:`utc`, passing ``None`` through."""
    return None if value is None else utc(value)


def us_from_utc(value: datetime) -> int:
    """Turn a datetime (naive means UTC) into integer microseconds since the epoch."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MIN_US = us_from_utc(datetime.min.replace(tzinfo=timezone.utc))
_MAX_US = us_from_utc(datetime.max.replace(tzinfo=timezone.utc))


def parse_timestamp(value: Any) -> int | None:
    """Parse an RFC 3339 timestamp into microseconds; ``None`` when it is not one."""
    if not isinstance(value, str) or not 10 <= len(value) <= 64:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    value_us = us_from_utc(parsed)
    # An offset can push the UTC time past year 1 or 9999, which could not be read back.
    return value_us if _MIN_US <= value_us <= _MAX_US else None


def check_thread_id(thread_id: object) -> str:
    """Return ``thread_id`` if it is a valid id, else raise :class:`InvalidArgument`."""
    if isinstance(thread_id, str) and THREAD_ID_PATTERN.fullmatch(thread_id):
        return thread_id
    raise InvalidArgument(
        f"invalid thread id {thread_id!r}: use 1 to 128 characters from [A-Za-z0-9._:-]"
    )


def check_timeout(timeout: object, *, name: str = "timeout") -> float | None:
    """Return a timeout in seconds (``None`` = no limit) or raise :class:`InvalidArgument`."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise InvalidArgument(f"{name} must be a number of seconds or None, not {timeout!r}")
    if (isinstance(timeout, float) and math.isnan(timeout)) or timeout < 0:
        raise InvalidArgument(f"{name} must be >= 0 seconds, not {timeout!r}")
    # Longer waits overflow threading's TIMEOUT_MAX (OverflowError); ~31 years is no limit.
    return float(min(timeout, MAX_TIMEOUT_S))


def check_count(value: object, *, name: str, minimum: int, maximum: int) -> int:
    """Return an int within bounds or raise :class:`InvalidArgument`."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise InvalidArgument(f"{name} must be an integer from {minimum} to {maximum}, not {value!r}")
    return value


def encode_item(item: object, now_us: int, max_bytes: int) -> EncodedItem:
    """Validate one item and serialize it; raise :class:`InvalidItem` when it is bad.

    ASCII-escaped JSON keeps lone surrogates and NUL bytes round-trippable in SQLite.
    """
    if type(item) is not dict and not isinstance(item, Mapping):  # dict first: ABC checks are slow
        raise InvalidItem(f"an item must be a JSON object (dict), not {type(item).__name__}")
    kind = item.get("type")
    if not isinstance(kind, str) or not kind:
        raise InvalidItem("an item needs a non-empty string 'type', e.g. {'type': 'event_msg', ...}")
    ts_us = now_us
    if "timestamp" in item:
        parsed = parse_timestamp(item["timestamp"])
        if parsed is None:
            raise InvalidItem(
                f"item 'timestamp' must be an RFC 3339 string, not {item['timestamp']!r}"
            )
        ts_us = parsed
    try:
        text = json.dumps(item, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidItem(f"item of type {kind!r} is not JSON-serializable: {exc}") from exc
    if len(text) > max_bytes:
        raise InvalidItem(
            f"item of type {kind!r} is {len(text)} bytes as JSON, over max_item_bytes={max_bytes}; "
            "store large blobs elsewhere and append a reference"
        )
    return EncodedItem(text, ts_us, kind)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Capped exponential backoff with jitter; ``attempts`` is the budget per failure run."""

    attempts: int = 8
    base_delay: float = 0.05
    max_delay: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 1:
            raise InvalidArgument(f"RetryPolicy.attempts must be an integer >= 1, not {self.attempts!r}")
        for name in ("base_delay", "max_delay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise InvalidArgument(f"RetryPolicy.{name} must be a finite number of seconds >= 0, "
                                      f"not {value!r}")

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Backoff before retry number ``attempt`` (1-based), jittered into [50%, 100%]."""
        backoff: float = min(self.max_delay, self.base_delay * 2.0 ** (attempt - 1))
        return backoff * rng.uniform(0.5, 1.0)


@dataclass(frozen=True, slots=True)
class BehindThread:
    """A thread whose projection is behind its history, in a :class:`StoreReport`."""

    thread_id: str
    head_seq: int
    projected_seq: int


@dataclass(frozen=True, slots=True)
class FailedThread:
    """A thread whose last projection failed for good, in a :class:`StoreReport`."""

    thread_id: str
    last_error: str


@dataclass(frozen=True, slots=True)
class StoreReport:
    """The store's projection health, read from the store (no process's counters).

    ``threads`` counts live threads (archived included, discarded ones not);
    ``items_behind`` sums head minus projected over the threads behind; ``behind`` lists
    the longest-behind first and ``failed`` the threads with a recorded failure, each at
    most the report's limit.
    """

    schema_version: dict[str, int]
    threads: int
    threads_behind: int
    items_behind: int
    oldest_behind_since: datetime | None
    behind: list[BehindThread]
    failed: list[FailedThread]

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON-ready dict (the time as ISO 8601)."""
        since = self.oldest_behind_since
        return {"schema_version": dict(self.schema_version), "threads": self.threads,
                "threads_behind": self.threads_behind, "items_behind": self.items_behind,
                "oldest_behind_since": None if since is None else since.isoformat(),
                "behind": [asdict(b) for b in self.behind],
                "failed": [asdict(f) for f in self.failed]}


@dataclass(frozen=True, slots=True)
class ProjectorStats:
    """Counters since open: group commits, rows, attempts, retries, failures, backlog."""

    transactions: int
    rows_written: int
    attempts: int
    retries: int
    failures: int
    pending_threads: int
    waiters: int
