"""Metadata derivation: a pure fold ``(state, item) -> state`` over a thread's history.

No I/O lives here. The state is a plain JSON-ready dict so the index can persist it and
resume the fold where it stopped; :class:`CodexRules` is the default, Codex-compatible
rule set of DESIGN §2. An application plugs in its own rules by implementing
:class:`ProjectionRules`.
"""

from __future__ import annotations

import heapq
import json
import re
from copy import deepcopy
from collections.abc import Iterable, Mapping, Sequence
from itertools import compress
from operator import not_
from typing import Any, Callable, Protocol

from ._sniff import NAME, PAYLOAD_TYPE_AT, TYPE_AT
from .errors import InvalidArgument
from .model import TEXT_FIELDS, ThreadMetadata, parse_timestamp, utc, utc_from_us

#: What the rules accept as a JSON object: ``dict`` first, which parsed items are, so the
#: check rarely reaches the ABC (``typing.Mapping``'s check was 6 % of a catch-up).
_MAPPING = (dict, Mapping)

State = dict[str, Any]

#: Item types thread_store itself appends for explicit edits.
METADATA_EDIT = "thread_store.metadata"
ARCHIVE_EDIT = "thread_store.archive"
IMAGE_PLACEHOLDER = "[Image]"
#: ``update_metadata(name=NOT_GIVEN)``: no field given (``name=None`` clears the name).
NOT_GIVEN: Any = object()


def metadata_edit_item(name: Any) -> dict[str, Any]:
    """The history item ``update_metadata(name=...)`` appends, validated.

    :raises InvalidArgument: no field given, or ``name`` is neither a string nor ``None``.
    """
    if name is NOT_GIVEN:
        raise InvalidArgument("update_metadata needs at least one field, e.g. name='Fix CI'")
    if name is not None and not isinstance(name, str):
        raise InvalidArgument(f"name must be a string or None, not {type(name).__name__}")
    return {"type": METADATA_EDIT, "payload": {"name": name}}


def archive_edit_item(archived: bool) -> dict[str, Any]:
    """The history item ``archive_thread`` / ``unarchive_thread`` append."""
    return {"type": ARCHIVE_EDIT, "payload": {"archived": archived}}


class ProjectionRules(Protocol):
    """The pluggable projection: an initial state, a fold step, and the row it yields.

    Rules may also define ``item_types``: a frozenset of the item types ``apply`` reads
    beyond ``type`` and the timestamp. Items of other types then reach ``apply`` as just
    ``{"type": ...}``, which spares the projector parsing them.

    Rules may also define ``apply_stored(state, texts, ts_us) -> State``: fold stored
    items, given as their JSON texts and their timestamps, into a new state, without
    changing ``state``. It must return what ``apply`` folded over each parsed item in
    order returns, and is free to parse only what it reads. The projector then calls it
    instead of ``apply`` (and ``item_types``), once per page of history.

    Rules may define ``rules_id``: a string naming the rules and their version. A store
    records it and refuses other rules at open (DESIGN §1.11), since its rows are the
    fold of these rules; change it when the fold changes. Without it the rules' class
    (module and name) is the identifier (see :func:`rules_id`)."""

    def initial(self, thread_id: str, created_us: int) -> State:
        """Return the state of a thread with no items, created at ``created_us``."""
        ...

    def apply(self, state: State, item: Mapping[str, Any], ts_us: int) -> State:
        """Return a new state: ``state`` after ``item`` stored at ``ts_us``. Must be pure."""
        ...

    def metadata(self, thread_id: str, state: State, projected_seq: int) -> ThreadMetadata:
        """Return the metadata row that ``state`` stands for."""
        ...


def _storable(text: str) -> str:
    """``text`` with lone surrogates (valid in JSON, not in UTF-8) replaced by ``?``.

    Otherwise SQLite could never store the row, and the thread would never project.
    """
    return text if text.isascii() else text.encode("utf-8", "replace").decode("utf-8")


def _text(value: Any) -> str | None:
    """A non-blank string, trimmed, else ``None``."""
    if isinstance(value, str):
        text: str = value.strip()
        if text:
            return _storable(text)
    return None


def _session_meta(state: State, payload: Mapping[str, Any], ts_us: int) -> None:
    created = parse_timestamp(payload.get("timestamp"))
    if created is not None:
        state["created_us"] = created
    for key in ("cwd", "model_provider", "cli_version", "source"):
        value = _text(payload.get(key))
        if value is not None:
            state[key] = value
    git = payload.get("git")
    if isinstance(git, _MAPPING):
        for source_key, key in (
            ("commit_hash", "git_sha"),
            ("branch", "git_branch"),
            ("repository_url", "git_origin_url"),
        ):
            value = _text(git.get(source_key))
            if value is not None:
                state[key] = value


def _turn_context(state: State, payload: Mapping[str, Any], ts_us: int) -> None:
    model = _text(payload.get("model"))
    if model is not None:
        state["model"] = model
    if "effort" in payload:
        effort = payload["effort"]
        state["reasoning_effort"] = _storable(effort) if isinstance(effort, str) and effort else None
    cwd = _text(payload.get("cwd"))
    if cwd is not None and state.get("cwd") is None:
        state["cwd"] = cwd


def _user_message(state: State, payload: Mapping[str, Any]) -> None:
    text = _text(payload.get("message"))
    has_images = any(
        isinstance(payload.get(key), list) and payload.get(key) for key in ("images", "local_images")
    )
    if text is not None and state.get("title") is None:
        state["title"] = text
    if (text is not None or has_images) and state.get("first_user_message") is None:
        shown = text if text is not None else IMAGE_PLACEHOLDER
        state["first_user_message"] = shown
        if state.get("preview") is None:
            state["preview"] = shown


def _token_usage(payload: Mapping[str, Any]) -> dict[str, Any] | None:
    """A ``token_count`` payload's total usage; ``None`` when it has none (``info: null``)."""
    info = payload.get("info")
    if isinstance(info, _MAPPING) and isinstance(info.get("total_token_usage"), _MAPPING):
        return dict(info["total_token_usage"])
    return None


def _turn_started(state: State, ts_us: int) -> None:
    turn = state.get("turn_us")
    state["turn_us"] = ts_us if turn is None else max(turn, ts_us)


#: ``event_msg`` types that advance ``recency_at`` (older files: ``task_started``).
_TURN_STARTS = ("turn_started", "task_started")  # a tuple: a payload type may be unhashable
#: ``event_msg`` types whose payload a rule reads in order, and the fields they only
#: fill when empty: once those are set, such an event changes nothing.
_FILLS = {"user_message": ("title", "first_user_message", "preview"),
          "thread_goal_updated": ("preview",)}
#: The ``event_msg`` types a rule reads in order (token counts: the latest wins).
_IN_ORDER = (*_TURN_STARTS, *_FILLS)


def _event_msg(state: State, payload: Mapping[str, Any], ts_us: int) -> None:
    kind = payload.get("type")
    if kind == "user_message":
        _user_message(state, payload)
    elif kind == "token_count":
        usage = _token_usage(payload)
        if usage is not None:
            state["token_usage"] = usage
    elif kind == "thread_goal_updated":
        goal = payload.get("goal")
        objective = _text(goal.get("objective")) if isinstance(goal, _MAPPING) else None
        if objective is not None and state.get("preview") is None:
            state["preview"] = objective
    elif kind in _TURN_STARTS:
        _turn_started(state, ts_us)


def _metadata_edit(state: State, payload: Mapping[str, Any], ts_us: int) -> None:
    if "name" in payload:
        name = payload["name"]
        state["name"] = (_storable(name.strip()) or None) if isinstance(name, str) else None


def _archive_edit(state: State, payload: Mapping[str, Any], ts_us: int) -> None:
    state["archived_us"] = ts_us if payload.get("archived") is True else None


_HANDLERS: dict[str, Callable[[State, Mapping[str, Any], int], None]] = {
    "session_meta": _session_meta,
    "turn_context": _turn_context,
    "event_msg": _event_msg,
    METADATA_EDIT: _metadata_edit,
    ARCHIVE_EDIT: _archive_edit,
}


def _alternatives(names: Iterable[str]) -> str:
    return "|".join(re.escape(name) for name in sorted(names))


_EVENT_AT = TYPE_AT + "event_msg" + PAYLOAD_TYPE_AT
#: The payload type of an ``event_msg`` laid out as :mod:`thread_store._sniff` says.
_EVENT = re.compile(_EVENT_AT + "(" + NAME + ")").match
#: A token count laid out so; :meth:`CodexRules.apply_stored` looks for the latest.
_TOKEN_COUNT = re.compile(_EVENT_AT + 'token_count"').match
#: An item whose start (laid out so) says the rules need not look at it in order: a
#: type without a handler, or an ``event_msg`` that is not a type read in order. No match:
#: a rule may read it, or the layout is another, and the fold looks closer.
_PASSED_OVER = re.compile(
    TYPE_AT + "(?:event_msg" + PAYLOAD_TYPE_AT + "(?!(?:" + _alternatives(_IN_ORDER) + ')")' + NAME
    + "|(?!(?:" + _alternatives(_HANDLERS) + ')")' + NAME + ")").match


def _counted(state: State, items: int, latest_us: int) -> State:
    """A copy of ``state`` after ``items`` more items, the latest stamped ``latest_us``."""
    new = dict(state)
    new["item_count"] = state.get("item_count", 0) + items
    updated = state.get("updated_us")
    new["updated_us"] = latest_us if updated is None else max(updated, latest_us)
    return new


def _apply_parsed(state: State, item: Mapping[str, Any], ts_us: int,
                  tokens: dict[int, Mapping[str, Any]], index: int) -> None:
    """:meth:`CodexRules.apply`'s handler step on ``state`` itself (item already counted);
    a token count's payload goes to ``tokens`` at ``index`` instead (the latest wins)."""
    kind = item.get("type")
    handler = _HANDLERS.get(kind) if isinstance(kind, str) else None
    payload = item.get("payload")
    if handler is None or not isinstance(payload, _MAPPING):
        return
    if handler is _event_msg and payload.get("type") == "token_count":
        tokens[index] = payload
    else:
        handler(state, payload, ts_us)


def _latest_usage(texts: Sequence[str], parsed: dict[int, Mapping[str, Any]]) -> dict[str, Any] | None:
    """The usage of the last token count in ``texts`` that has one: those laid out as
    :data:`_TOKEN_COUNT` says are found in C from the end, the others were ``parsed``."""
    laid_out = compress(range(len(texts) - 1, -1, -1), map(_TOKEN_COUNT, reversed(texts)))
    latest_first = heapq.merge(laid_out, sorted(parsed, reverse=True), reverse=True) if parsed else laid_out
    for i in latest_first:
        usage = _token_usage(parsed[i] if i in parsed else json.loads(texts[i])["payload"])
        if usage is not None:
            return usage
    return None


class CodexRules:
    """The default rules of DESIGN §2, compatible with Codex rollout items.

    ``updated_at`` is the latest item timestamp and ``recency_at`` the latest turn start,
    each floored at ``created_at``: an item stamped before the thread's creation lowers
    neither. Both only take the maximum of what they saw, so the only thing that can move
    them backwards is a ``session_meta`` item that sets ``created_at`` (an imported
    session's real start).
    """

    item_types: frozenset[str] | None = frozenset(_HANDLERS)
    rules_id = "thread_store.codex/1"

    def initial(self, thread_id: str, created_us: int) -> State:
        """Return the empty state of a thread created at ``created_us``."""
        return {"created_us": created_us, "item_count": 0}

    def apply(self, state: State, item: Mapping[str, Any], ts_us: int) -> State:
        """Fold one item into a copy of ``state``."""
        new = _counted(state, 1, ts_us)
        kind = item.get("type")
        handler = _HANDLERS.get(kind) if isinstance(kind, str) else None
        payload = item.get("payload")
        if handler is not None and isinstance(payload, _MAPPING):
            handler(new, payload, ts_us)
        return new

    def apply_stored(self, state: State, texts: Sequence[str], ts_us: Sequence[int]) -> State:
        """Fold stored items (JSON texts, their timestamps) into one copy of ``state``.

        Equal to :meth:`apply` over each parsed item in order, but it parses only what
        can change the state. Types are read off the text (:mod:`thread_store._sniff`):
        items no rule reads in order are passed over in C (:data:`_PASSED_OVER`), turn
        starts need no parse, messages that only fill fields already set are not parsed,
        and of the token counts (the latest wins) only the last ones are, back to the
        first with usage.
        """
        if not texts:
            return dict(state)
        new = _counted(state, len(texts), max(ts_us))
        tokens: dict[int, Mapping[str, Any]] = {}  # payloads of token counts found parsing
        for i in compress(range(len(texts)), map(not_, map(_PASSED_OVER, texts))):
            text = texts[i]
            event = _EVENT(text)
            kind = event[1][:-1] if event else None
            if kind in _TURN_STARTS:
                _turn_started(new, ts_us[i])
            elif (kind is None or (fills := _FILLS.get(kind)) is None
                  or any(new.get(key) is None for key in fills)):
                _apply_parsed(new, json.loads(text), ts_us[i], tokens, i)
        usage = _latest_usage(texts, tokens)
        if usage is not None:
            new["token_usage"] = usage
        return new

    def metadata(self, thread_id: str, state: State, projected_seq: int) -> ThreadMetadata:
        """Build the public metadata row from ``state``."""
        created = state["created_us"]
        # created_at is a floor, applied here rather than in apply(): a session_meta item
        # may still move created_at, and the floor must follow it.
        turn = _floored(state.get("turn_us"), created)
        updated = _floored(state.get("updated_us"), created)
        usage = state.get("token_usage")
        return ThreadMetadata(
            thread_id=thread_id,
            **{key: state.get(key) for key in TEXT_FIELDS},
            # A deep copy: the row must share no container with the cached fold state, or a
            # caller mutating meta.token_usage would change every later projection.
            token_usage=deepcopy(usage) if usage is not None else None,
            created_at=utc(created),
            updated_at=utc(updated),
            recency_at=utc(turn),
            archived_at=utc_from_us(state.get("archived_us")),
            item_count=state.get("item_count", 0),
            projected_seq=projected_seq,
        )


def _floored(value_us: int | None, floor_us: int) -> int:
    return floor_us if value_us is None else max(value_us, floor_us)


def fold(rules: ProjectionRules, state: State, items: list[tuple[int, Mapping[str, Any]]]) -> State:
    """Fold ``(ts_us, item)`` pairs into ``state`` in order."""
    for ts_us, item in items:
        state = rules.apply(state, item, ts_us)
    return state


def rules_id(rules: ProjectionRules) -> str:
    """The identifier a store records for ``rules`` (see :class:`ProjectionRules`)."""
    declared = getattr(rules, "rules_id", None)
    if isinstance(declared, str) and declared:
        return declared
    return f"{type(rules).__module__}.{type(rules).__qualname__}"
