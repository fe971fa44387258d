"""model.py: id and timeout validation, item encoding, time conversions, metadata JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from thread_store import InvalidArgument, InvalidItem, ThreadMetadata
from thread_store.model import (
    MAX_TIMEOUT_S,
    check_thread_id,
    check_timeout,
    encode_item,
    parse_timestamp,
    us_from_utc,
    utc,
    utc_from_us,
)

NOW_US = 1_700_000_000_000_000
BIG = 1 << 20


# -- thread ids -----------------------------------------------------------------------------

@pytest.mark.parametrize("thread_id", [
    "a", "A-z_0.9:x", "x" * 128, "019a2b3c-4d5e-6f70-8192-a3b4c5d6e7f8",
    # '.' is an allowed character, so '..' is a valid id: ids are never used as paths.
    "..", ".",
])
def test_check_thread_id_accepts_valid_ids(thread_id: str) -> None:
    assert check_thread_id(thread_id) == thread_id


@pytest.mark.parametrize("thread_id", [
    "", "x" * 129, "a/b", "../etc", "a b", "a\n", "\na", "é", "a*", None, 7, b"abc", ["a"],
])
def test_check_thread_id_rejects_invalid_ids(thread_id: object) -> None:
    with pytest.raises(InvalidArgument, match="1 to 128 characters"):
        check_thread_id(thread_id)


# -- timeouts -------------------------------------------------------------------------------

@pytest.mark.parametrize(("given_", "expected"), [(None, None), (0, 0.0), (2, 2.0), (0.25, 0.25)])
def test_check_timeout_accepts_none_and_non_negative_numbers(given_: object,
                                                             expected: float | None) -> None:
    result = check_timeout(given_)
    assert result == expected
    assert result is None or type(result) is float


@pytest.mark.parametrize("timeout", [-1, -0.001, math.nan, True, False, "1", [1], -math.inf])
def test_check_timeout_rejects_bad_values(timeout: object) -> None:
    with pytest.raises(InvalidArgument, match="timeout"):
        check_timeout(timeout)


def test_check_timeout_names_the_option() -> None:
    with pytest.raises(InvalidArgument, match="coalesce_delay"):
        check_timeout(-1, name="coalesce_delay")


@pytest.mark.parametrize("timeout", [math.inf, 1e300, 10**400])
def test_check_timeout_caps_huge_values_below_the_threading_limit(timeout: float) -> None:
    # threading waits raise OverflowError above TIMEOUT_MAX; a cap keeps barriers typed.
    assert check_timeout(timeout) == MAX_TIMEOUT_S


# -- encode_item ----------------------------------------------------------------------------

@pytest.mark.parametrize("item", [None, [], "event_msg", 3, [("type", "x")]])
def test_encode_item_rejects_non_objects(item: object) -> None:
    with pytest.raises(InvalidItem, match="JSON object"):
        encode_item(item, NOW_US, BIG)


@pytest.mark.parametrize("item", [{}, {"payload": {}}, {"type": ""}, {"type": None}, {"type": 3}])
def test_encode_item_requires_a_non_empty_string_type(item: dict[str, Any]) -> None:
    with pytest.raises(InvalidItem, match="'type'"):
        encode_item(item, NOW_US, BIG)


@pytest.mark.parametrize("timestamp", ["", "yesterday", "2024-13-01T00:00:00Z", 1700000000, None,
                                       "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-01:00",
                                       "2024-01-01T00:00:00Z" + " " * 60])
def test_encode_item_rejects_bad_timestamps(timestamp: object) -> None:
    with pytest.raises(InvalidItem, match="timestamp"):
        encode_item({"type": "x", "timestamp": timestamp}, NOW_US, BIG)


def test_encode_item_uses_its_own_timestamp_else_now() -> None:
    assert encode_item({"type": "x"}, NOW_US, BIG).ts_us == NOW_US
    stamped = encode_item({"type": "x", "timestamp": "2024-01-01T02:00:00+02:00"}, NOW_US, BIG)
    assert stamped.ts_us == us_from_utc(datetime(2024, 1, 1, tzinfo=timezone.utc))


def _circular() -> dict[str, Any]:
    item: dict[str, Any] = {"type": "x"}
    item["self"] = item
    return item


def _deep(depth: int) -> dict[str, Any]:
    item: dict[str, Any] = {"type": "x"}
    inner = item
    for _ in range(depth):
        inner["n"] = {}
        inner = inner["n"]
    return item


@pytest.mark.parametrize("item", [
    {"type": "x", "v": math.nan}, {"type": "x", "v": math.inf}, {"type": "x", "v": {1, 2}},
    {"type": "x", "v": object()}, {"type": "x", "v": b"bytes"}, {"type": "x", ("a", "b"): 1},
    _circular(), _deep(100_000),
], ids=["nan", "inf", "set", "object", "bytes", "tuple-key", "circular", "deep"])
def test_encode_item_rejects_non_serializable_items(item: dict[str, Any]) -> None:
    with pytest.raises(InvalidItem, match="not JSON-serializable"):
        encode_item(item, NOW_US, BIG)


def test_encode_item_enforces_max_bytes_on_the_serialized_form() -> None:
    item = {"type": "x", "text": "a" * 100}
    size = len(json.dumps(item, separators=(",", ":")))
    assert encode_item(item, NOW_US, size).text
    with pytest.raises(InvalidItem, match="max_item_bytes"):
        encode_item(item, NOW_US, size - 1)


def test_encode_item_counts_escaped_bytes_not_characters() -> None:
    # 50 non-ASCII characters become 50 six-byte escapes in the stored text.
    item = {"type": "x", "text": "é" * 50}
    with pytest.raises(InvalidItem, match="max_item_bytes"):
        encode_item(item, NOW_US, 200)


@pytest.mark.parametrize("text", ["\ud800", "a\x00b", "\udfff\ud83d", "日本語 🎉", "\u2028"])
def test_encode_item_round_trips_awkward_strings_as_ascii(text: str) -> None:
    item = {"type": "x", "payload": {"message": text, text: [text]}}
    encoded = encode_item(item, NOW_US, BIG)
    assert encoded.text.isascii()
    assert json.loads(encoded.text) == item


@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20))
def test_encode_item_round_trips_any_json_payload(payload: Any) -> None:
    item = {"type": "x", "payload": payload}
    assert json.loads(encode_item(item, NOW_US, BIG).text) == item


# -- time conversions -----------------------------------------------------------------------

def test_utc_of_zero_is_the_epoch() -> None:
    assert utc(0) == datetime(1970, 1, 1, tzinfo=timezone.utc)
    assert utc(0).tzinfo is timezone.utc
    assert utc_from_us(None) is None
    assert utc_from_us(1) == utc(1)


def test_us_from_utc_treats_naive_as_utc_and_converts_offsets() -> None:
    aware = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone.utc)
    assert us_from_utc(aware.replace(tzinfo=None)) == us_from_utc(aware)
    shifted = aware.astimezone(timezone(timedelta(hours=-5, minutes=-30)))
    assert us_from_utc(shifted) == us_from_utc(aware)


@given(st.integers(min_value=-62_135_596_800_000_000, max_value=253_402_300_799_999_999))
def test_utc_and_us_from_utc_are_inverse(value: int) -> None:
    assert us_from_utc(utc(value)) == value


@given(st.datetimes(timezones=st.timezones()))
def test_parse_timestamp_agrees_with_isoformat(when: datetime) -> None:
    try:
        expected = us_from_utc(when.astimezone(timezone.utc))
    except OverflowError:  # in UTC it falls outside datetime's range: unreadable, so refused
        assert parse_timestamp(when.isoformat()) is None
        return
    assert parse_timestamp(when.isoformat()) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("2024-01-01T00:00:00Z", datetime(2024, 1, 1, tzinfo=timezone.utc)),
    ("2024-01-01T00:00:00.5+01:00", datetime(2023, 12, 31, 23, 0, 0, 500000, tzinfo=timezone.utc)),
    ("2024-01-01", datetime(2024, 1, 1, tzinfo=timezone.utc)),
])
def test_parse_timestamp_reads_rfc3339(text: str, expected: datetime) -> None:
    assert parse_timestamp(text) == us_from_utc(expected)


@pytest.mark.parametrize("text", [None, 5, "2024", "not a timestamp", "2024-01-01T00:00:00Z" + "0" * 50])
def test_parse_timestamp_returns_none_for_non_timestamps(text: object) -> None:
    assert parse_timestamp(text) is None


# -- ThreadMetadata -------------------------------------------------------------------------

def test_to_json_keys_are_the_dataclass_fields_and_serialize() -> None:
    meta = ThreadMetadata(thread_id="t", title="hi", token_usage={"total_tokens": 3},
                          created_at=utc(NOW_US), updated_at=utc(NOW_US + 1), recency_at=utc(NOW_US),
                          item_count=2, projected_seq=2)
    out = meta.to_json()
    assert list(out) == [f.name for f in dataclasses.fields(ThreadMetadata)]
    assert out["created_at"] == utc(NOW_US).isoformat()
    assert datetime.fromisoformat(out["updated_at"]) == meta.updated_at
    assert out["archived_at"] is None and out["token_usage"] == {"total_tokens": 3}
    assert json.loads(json.dumps(out)) == out


def test_thread_metadata_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ThreadMetadata(thread_id="t").title = "x"  # type: ignore[misc]
