"""derive.py: one test per metadata rule of DESIGN §2, through :class:`CodexRules`."""

from __future__ import annotations

import copy
import json
import random
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any, Mapping

import pytest

from thread_store import CodexRules, ThreadMetadata
from thread_store import workload as wl
from thread_store.derive import ARCHIVE_EDIT, IMAGE_PLACEHOLDER, METADATA_EDIT, State, fold
from thread_store.model import parse_timestamp, us_from_utc

RULES = CodexRules()
T0 = datetime(2024, 3, 1, 12, 0, tzinfo=timezone.utc)
#: Time of the "append" for items without their own timestamp, like the store's clock.
APPENDED_AT = T0 + timedelta(days=1)
Item = dict[str, Any]


def at(seconds: float) -> datetime:
    """``T0`` shifted by ``seconds`` (whole milliseconds survive the workload's format)."""
    return T0 + timedelta(seconds=seconds)


def stamp(item: Mapping[str, Any]) -> int:
    """The timestamp the store would give ``item``: its own, else the append time."""
    own = parse_timestamp(item.get("timestamp"))
    return own if own is not None else us_from_utc(APPENDED_AT)


def fold_items(items: list[Item], state: State | None = None) -> State:
    """Fold ``items`` as the store would, from ``state`` or a thread created at ``T0``."""
    start = RULES.initial("t", us_from_utc(T0)) if state is None else state
    return fold(RULES, start, [(stamp(item), item) for item in items])


def meta(*items: Item) -> ThreadMetadata:
    """The metadata row of a thread created at ``T0`` holding ``items``."""
    return RULES.metadata("t", fold_items(list(items)), len(items))


def event(kind: str, when: datetime | None = None, **payload: Any) -> Item:
    """An ``event_msg`` of ``kind`` with optional timestamp."""
    item: Item = {"type": "event_msg", "payload": {"type": kind, **payload}}
    if when is not None:
        item["timestamp"] = when.isoformat()
    return item


def session(when: datetime | None = None, **payload: Any) -> Item:
    """A ``session_meta`` with exactly ``payload`` (plus ``timestamp`` when given)."""
    body = dict(payload) if when is None else {"timestamp": when.isoformat(), **payload}
    return {"type": "session_meta", "payload": body}


def context(**payload: Any) -> Item:
    """A ``turn_context`` with exactly ``payload``."""
    return {"type": "turn_context", "payload": payload}


def goal(objective: Any) -> Item:
    """An ``event_msg`` / ``thread_goal_updated``."""
    return event("thread_goal_updated", goal={"objective": objective, "status": "active"})


# -- the empty thread ---------------------------------------------------------------------

def test_a_thread_without_items_has_only_its_creation_time() -> None:
    empty = meta()
    assert empty == ThreadMetadata(thread_id="t", created_at=T0, updated_at=T0, recency_at=T0,
                                   item_count=0, projected_seq=0)


# -- session_meta -------------------------------------------------------------------------

def test_session_meta_sets_created_at_session_fields_and_git() -> None:
    row = meta(wl.session_meta("t", at(-3600)))
    assert row.created_at == at(-3600)
    assert (row.cwd, row.model_provider, row.cli_version, row.source) == (
        "/work/repo", "openai", "0.46.0", "cli")
    assert (row.git_sha, row.git_branch, row.git_origin_url) == (
        "3f2c1e9a7b", "main", "git@github.com:example/repo.git")


def test_session_meta_without_timestamp_keeps_the_creation_time() -> None:
    assert meta(session(cwd="/repo")).created_at == T0


def test_session_meta_empty_values_do_not_overwrite() -> None:
    blank = session(cwd="", model_provider="   ", cli_version=None, source="",
                    git={"commit_hash": "", "branch": "  ", "repository_url": None})
    full, after = meta(wl.session_meta("t", at(-60))), meta(wl.session_meta("t", at(-60)), blank)
    for field in ("cwd", "model_provider", "cli_version", "source", "git_sha", "git_branch",
                  "git_origin_url", "created_at"):
        assert getattr(after, field) == getattr(full, field), field


def test_a_later_session_meta_with_values_overwrites() -> None:
    row = meta(wl.session_meta("t", at(-60)), session(at(-30), cwd="/other", git={"branch": "dev"}))
    assert (row.cwd, row.git_branch, row.git_sha, row.created_at) == (
        "/other", "dev", "3f2c1e9a7b", at(-30))


# -- turn_context -------------------------------------------------------------------------

def test_turn_context_sets_model_only_when_non_empty() -> None:
    assert meta(context(model="gpt-5")).model == "gpt-5"
    assert meta(context(model="gpt-5"), context(model=""), context(model=None)).model == "gpt-5"


def test_turn_context_effort_sets_and_null_effort_clears() -> None:
    assert meta(context(effort="high")).reasoning_effort == "high"
    assert meta(context(effort="high"), context(model="m")).reasoning_effort == "high"
    assert meta(context(effort="high"), context(effort=None)).reasoning_effort is None
    assert meta(wl.turn_context(at(0), effort=None)).reasoning_effort is None


def test_turn_context_sets_cwd_only_if_none_was_seen() -> None:
    assert meta(context(cwd="/a")).cwd == "/a"
    assert meta(context(cwd="/a"), context(cwd="/b")).cwd == "/a"
    assert meta(context(cwd=""), context(cwd="/b")).cwd == "/b"


def test_turn_context_never_overrides_the_session_meta_cwd() -> None:
    assert meta(session(cwd="/session"), context(cwd="/turn")).cwd == "/session"
    # session_meta is the authority: it wins even when it comes second.
    assert meta(context(cwd="/turn"), session(cwd="/session")).cwd == "/session"


# -- user_message -------------------------------------------------------------------------

def test_user_message_text_is_trimmed() -> None:
    row = meta(wl.user_message("  Fix the bug \n", at(1)))
    assert (row.title, row.first_user_message, row.preview) == ("Fix the bug",) * 3


@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_a_blank_user_message_counts_as_empty(text: str) -> None:
    row = meta(wl.user_message(text, at(1)))
    assert (row.title, row.first_user_message, row.preview) == (None, None, None)
    assert meta(wl.user_message(text, at(1)), wl.user_message("real", at(2))).title == "real"


def test_the_first_non_empty_message_sets_title_and_first_message_once() -> None:
    row = meta(wl.user_message("first", at(1)), wl.user_message("second", at(2)))
    assert (row.title, row.first_user_message, row.preview) == ("first", "first", "first")


@pytest.mark.parametrize("key", ["images", "local_images"])
def test_an_image_only_message_shows_a_placeholder_and_no_title(key: str) -> None:
    image = event("user_message", at(1), message="  ", **{key: ["data:image/png;base64,AAAA"]})
    row = meta(image)
    assert (row.title, row.first_user_message, row.preview) == (
        None, IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER)
    later = meta(image, wl.user_message("now with words", at(2)))
    assert (later.title, later.first_user_message, later.preview) == (
        "now with words", IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER)


def test_a_message_with_text_and_images_shows_its_text() -> None:
    row = meta(wl.user_message("look", at(1), images=["data:image/png;base64,AAAA"]))
    assert (row.title, row.first_user_message, row.preview) == ("look", "look", "look")


def test_an_empty_image_list_is_no_image() -> None:
    assert meta(event("user_message", at(1), message="", images=[])).preview is None


# -- goals --------------------------------------------------------------------------------

def test_a_goal_first_thread_takes_its_preview_from_the_objective() -> None:
    row = meta(goal("  Ship the release  "))
    assert (row.preview, row.title, row.first_user_message) == ("Ship the release", None, None)
    later = meta(goal("Ship the release"), wl.user_message("Start with the changelog", at(1)))
    assert (later.preview, later.title, later.first_user_message) == (
        "Ship the release", "Start with the changelog", "Start with the changelog")


def test_a_goal_after_a_message_keeps_the_preview() -> None:
    assert meta(wl.user_message("hello", at(1)), goal("Other")).preview == "hello"
    assert meta(goal("First"), goal("Second")).preview == "First"


def test_a_blank_goal_sets_no_preview() -> None:
    assert meta(goal("  ")).preview is None


# -- token_count --------------------------------------------------------------------------

def test_token_count_with_null_info_changes_nothing_but_counts() -> None:
    before = fold_items([wl.session_meta("t", at(-10)), wl.token_count(at(1), 500)])
    after = fold_items([wl.token_count(at(1), 900, info=False)], copy.deepcopy(before))
    assert RULES.metadata("t", after, 3) == replace(
        RULES.metadata("t", before, 3), item_count=3)
    assert meta(wl.token_count(at(1), 5, info=False)).token_usage is None


def test_token_count_takes_the_latest_total_usage() -> None:
    first, second = wl.token_count(at(1), 5000), wl.token_count(at(2), 1200)
    usage = meta(first, second).token_usage
    assert usage == second["payload"]["info"]["total_token_usage"]
    assert usage is not None and usage["total_tokens"] == 1200


# -- times --------------------------------------------------------------------------------

def test_recency_is_created_at_until_a_turn_starts() -> None:
    row = meta(wl.user_message("hi", at(30)))
    assert row.recency_at == T0
    assert meta(wl.session_meta("t", at(-60))).recency_at == at(-60)


@pytest.mark.parametrize("kind", ["task_started", "turn_started"])
def test_a_turn_start_advances_recency(kind: str) -> None:
    assert meta(event(kind, at(40))).recency_at == at(40)
    assert meta(event("task_started", at(10)), event(kind, at(40))).recency_at == at(40)


def test_updated_at_is_the_latest_item_timestamp() -> None:
    row = meta(wl.user_message("a", at(5)), wl.token_count(at(9), 10))
    assert row.updated_at == at(9)
    assert meta({"type": "response_item", "payload": {}}).updated_at == APPENDED_AT


def test_times_never_move_backwards() -> None:
    row = meta(event("turn_started", at(50)), event("turn_started", at(20)),
               wl.token_count(at(10), 5))
    assert (row.updated_at, row.recency_at) == (at(50), at(50))


def test_an_item_stamped_before_creation_lowers_neither_updated_nor_recency() -> None:
    # DESIGN §2: created_at is a floor for updated_at and recency_at.
    row = meta(event("turn_started", at(-600)), wl.user_message("old", at(-300)))
    assert (row.created_at, row.updated_at, row.recency_at) == (T0, T0, T0)
    state = fold_items([wl.user_message("new", at(60))])
    before = RULES.metadata("t", state, 1)
    after = RULES.metadata("t", fold_items([event("turn_started", at(-900))], state), 2)
    assert (after.updated_at, after.recency_at) == (before.updated_at, before.recency_at)


def test_a_session_meta_moving_created_at_later_raises_the_floor() -> None:
    moved = {**session(at(100)), "timestamp": at(1).isoformat()}
    row = meta(wl.user_message("early", at(5)), moved)
    assert (row.created_at, row.updated_at, row.recency_at) == (at(100), at(100), at(100))


# -- counts and explicit edits ------------------------------------------------------------

def test_item_count_counts_every_item() -> None:
    items = list(wl.conversation("t", random.Random(7), turns=2, start=T0))
    assert meta(*items).item_count == len(items)


def test_metadata_edits_set_and_clear_the_name_and_count() -> None:
    named = meta(wl.user_message("hi", at(1)), {"type": METADATA_EDIT, "payload": {"name": " Fix CI "}})
    assert (named.name, named.title, named.item_count) == ("Fix CI", "hi", 2)
    cleared = meta({"type": METADATA_EDIT, "payload": {"name": "x"}},
                   {"type": METADATA_EDIT, "payload": {"name": None}})
    assert (cleared.name, cleared.item_count) == (None, 2)


def test_archive_edits_set_and_clear_archived_at_and_count() -> None:
    archive = {"type": ARCHIVE_EDIT, "payload": {"archived": True}}
    assert meta(archive).archived_at == APPENDED_AT
    stamped = dict(archive, timestamp=at(7).isoformat())
    assert meta(stamped).archived_at == at(7)
    back = meta(archive, {"type": ARCHIVE_EDIT, "payload": {"archived": False}})
    assert (back.archived_at, back.item_count) == (None, 2)


# -- determinism and resumption -----------------------------------------------------------

def _session_items() -> list[Item]:
    rng = random.Random(42)
    items = [goal("Cut a release")]
    items += wl.conversation("t", rng, turns=4, start=T0)
    items += [{"type": METADATA_EDIT, "payload": {"name": "Release"}},
              wl.token_count(at(1), 3, info=False), {"type": ARCHIVE_EDIT, "payload": {"archived": True}}]
    return items


def test_refolding_a_history_gives_the_same_row() -> None:
    items = _session_items()
    assert meta(*items) == meta(*copy.deepcopy(items))
    assert meta(*items).to_json() == meta(*items).to_json()


@pytest.mark.parametrize("split", [0, 1, 5, 20, -1])
def test_folding_in_two_halves_through_json_equals_one_fold(split: int) -> None:
    items = _session_items()
    split %= len(items) + 1
    halfway = json.loads(json.dumps(fold_items(items[:split])))
    resumed = fold_items(items[split:], halfway)
    assert RULES.metadata("t", resumed, len(items)) == meta(*items)


def test_apply_does_not_mutate_its_inputs() -> None:
    items = _session_items()
    state = fold_items(items[:10])
    frozen_state, frozen_items = copy.deepcopy(state), copy.deepcopy(items)
    fold_items(items[10:], state)
    assert state == frozen_state and items == frozen_items


def test_metadata_token_usage_nested_dicts_are_a_copy_of_the_state() -> None:
    usage = {"total_tokens": 7, "details": {"cached": {"input": 3}}}
    state = fold_items([event("token_count", info={"total_token_usage": usage})])
    row = RULES.metadata("t", state, 1)
    assert row.token_usage is not None
    row.token_usage["details"]["cached"]["input"] = -1
    row.token_usage["details"]["extra"] = 1
    assert RULES.metadata("t", state, 1).token_usage == usage
    resumed = RULES.metadata("t", fold_items([wl.user_message("x", at(2))], state), 2)
    assert resumed.token_usage == usage


def test_metadata_token_usage_is_a_copy_of_the_state() -> None:
    state = fold_items([wl.token_count(at(1), 100)])
    row = RULES.metadata("t", state, 1)
    assert row.token_usage is not None
    row.token_usage["total_tokens"] = -1
    assert RULES.metadata("t", state, 1).token_usage["total_tokens"] == 100  # type: ignore[index]


# -- garbage ------------------------------------------------------------------------------

GARBAGE: list[Item] = [
    {"type": "event_msg"}, {"type": "event_msg", "payload": None}, {"type": "session_meta", "payload": "x"},
    {"type": "turn_context", "payload": [1, 2]}, {"type": "no_such_type", "payload": {"message": "hi"}},
    {"type": 5, "payload": {}}, {"type": None}, {"type": "event_msg", "payload": {"type": ["user_message"]}},
    event("user_message", message=5, images="not a list"), event("user_message", message=["x"]),
    event("token_count", info="x"), event("token_count", info={"total_token_usage": [1, 2]}),
    event("token_count", info={"last_token_usage": {"total_tokens": 1}}),
    event("thread_goal_updated", goal="x"), event("thread_goal_updated", goal={"objective": 3}),
    event("thread_goal_updated"), event(None), event("user_message"),  # type: ignore[arg-type]
    session(timestamp=5, cwd=7, source=[], git="x"), session(timestamp="not a time", git={"branch": 3}),
    session(timestamp="0001-01-01T00:00:00+14:00"), context(model=["m"], cwd={}),
    {"type": METADATA_EDIT, "payload": {"nam": "x"}}, {"type": METADATA_EDIT, "payload": "x"},
    {"type": ARCHIVE_EDIT, "payload": []},
]


def test_garbage_items_never_raise_and_change_only_counts_and_times() -> None:
    base = _session_items()
    before = RULES.metadata("t", fold_items(base), 0)
    after = RULES.metadata("t", fold_items(base + GARBAGE), 0)
    assert after == replace(before, item_count=len(base) + len(GARBAGE),
                                      updated_at=max(before.updated_at, APPENDED_AT))  # type: ignore[type-var]


@pytest.mark.parametrize("item", GARBAGE, ids=range(len(GARBAGE)))
def test_a_garbage_item_alone_leaves_an_empty_row(item: Item) -> None:
    assert meta(item) == replace(meta(), item_count=1, projected_seq=1, updated_at=APPENDED_AT)


@pytest.mark.parametrize("items", [GARBAGE, _session_items() + GARBAGE + _session_items()],
                         ids=["garbage", "sessions around garbage"])
def test_the_page_fold_of_stored_text_takes_garbage_as_apply_does(items: list[Item]) -> None:
    texts = [json.dumps(item, separators=(",", ":")) for item in items]
    start = RULES.initial("t", us_from_utc(T0))
    folded = RULES.apply_stored(start, texts, [stamp(item) for item in items])
    assert folded == fold_items(items)
