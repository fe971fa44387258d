"""Metadata derivation: a pure fold ``(state, item) -> state`` over a thread's history.

No I/O lives here. The state is a plain JSON-ready dict so the index can persist it and
resume the fold where it stopped; :class:`CodexRules` is the default, Codex-compatible
rule set of DESIGN §2. An application plugs in its own rules by implementing
:class:`ProjectionRules`.
"""

from __future__ import annotations

from copy import deepcopy
from collections.abc import Mapping
from typing import Any, Callable, Protocol

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


def _event_msg(state: State, payload: Mapping[str, Any], ts_us: int) -> None:
    kind = payload.get("type")
    if kind == "user_message":
        _user_message(state, payload)
    elif kind == "token_count":
        info = payload.get("info")
        if isinstance(info, _MAPPING) and isinstance(info.get("total_token_usage"), _MAPPING):
            state["token_usage"] = dict(info["total_token_usage"])
    elif kind == "thread_goal_updated":
        goal = payload.get("goal")
        objective = _text(goal.get("objective")) if isinstance(goal, _MAPPING) else None
        if objective is not None and state.get("preview") is None:
            state["preview"] = objective
    elif kind in ("turn_started", "task_started"):
        turn = state.get("turn_us")
        state["turn_us"] = ts_us if turn is None else max(turn, ts_us)


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
        new = dict(state)
        new["item_count"] = state.get("item_count", 0) + 1
        updated = state.get("updated_us")
        new["updated_us"] = ts_us if updated is None else max(updated, ts_us)
        kind = item.get("type")
        handler = _HANDLERS.get(kind) if isinstance(kind, str) else None
        payload = item.get("payload")
        if handler is not None and isinstance(payload, _MAPPING):
            handler(new, payload, ts_us)
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
