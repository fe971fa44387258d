"""Reading an item's type off its stored text: right when it answers, ``None`` when unsure."""

from __future__ import annotations

import json
import re

import pytest

from thread_store._sniff import NAME, PAYLOAD_TYPE_AT, TYPE_AT, item_type


@pytest.mark.parametrize(("text", "kind"), [
    ('{"type":"response_item","payload":{"type":"message"}}', "response_item"),
    ('{"timestamp":"2026-01-02T03:04:05.678Z","type":"event_msg","payload":{}}', "event_msg"),
    ('{"payload":{"type":"x"},"type":"response_item"}', None),  # type not first: parse
    ('{"timestamp":"2026-01-02","payload":{},"type":"x"}', None),  # nor after the timestamp
    ('{"timestamp":"a\\"b","type":"x"}', None),  # an escape in the timestamp: parse
    ('{"type":"a\\"b","payload":{}}', None),  # an escape in the type: parse
    ('{"type":"unterminated', None),
    ('{"type": "spaced"}', None),  # not as json.dumps(separators=...) writes it
    ('{"id":1,"type":"x"}', None),
])
def test_item_type_reads_a_leading_type_or_gives_up(text: str, kind: str | None) -> None:
    assert item_type(text) == kind
    if kind is not None:
        assert json.loads(text)["type"] == kind


EVENT_TYPE = re.compile(TYPE_AT + "event_msg" + PAYLOAD_TYPE_AT + "(" + NAME + ")").match


@pytest.mark.parametrize(("text", "kind"), [
    ('{"type":"event_msg","payload":{"type":"token_count","info":null}}', "token_count"),
    ('{"timestamp":"t","type":"event_msg","payload":{"type":"user_message"}}', "user_message"),
    ('{"type":"event_msg","payload":{"info":null,"type":"token_count"}}', None),
    ('{"type":"event_msg","timestamp":"t","payload":{"type":"token_count"}}', None),
    ('{"type":"event_msg","payload":"token_count"}', None),
    ('{"type":"event_msg","payload":{"type":"a\\"b"}}', None),
])
def test_the_payload_type_is_read_only_right_after_the_type(text: str, kind: str | None) -> None:
    found = EVENT_TYPE(text)
    assert (found[1][:-1] if found else None) == kind
    if kind is not None:
        assert json.loads(text)["payload"]["type"] == kind
