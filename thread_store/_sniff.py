"""An item's type, and its payload's, read off its stored JSON text without parsing it.

Stored items are written by ``json.dumps(item, separators=(",", ":"))`` (ASCII, no
duplicate keys), so an item built as Codex builds its rollout lines starts
``{"timestamp":"…","type":"…","payload":{"type":"…"``. Reading those few keys costs one
anchored regular-expression match instead of a parse of the whole item. Any other layout
(keys in another order, spaces, an escape in a type) does not match, and the caller
parses the item: a miss costs speed, never a wrong answer.
"""

from __future__ import annotations

import re

#: A pattern of the text before an item's type: ``{``, an optional ``timestamp``, the key.
TYPE_AT = r'\{(?:"timestamp":"[^"\\]*",)?"type":"'
#: A pattern of the text between an item's type and its payload's, when the payload comes
#: next with its type first.
PAYLOAD_TYPE_AT = r'","payload":\{"type":"'
#: A pattern of a type's value without escapes, and its closing quote.
NAME = r'[^"\\]*"'
#: ``match_type(text)``: a match whose group 1 is the item's type, or ``None`` (parse it).
match_type = re.compile(TYPE_AT + r'([^"\\]*)"').match


def item_type(text: str) -> str | None:
    """The ``type`` of a stored item, when its text starts with it (after an optional
    ``timestamp``); ``None`` when it does not, and the caller parses the item."""
    found = match_type(text)
    return found[1] if found else None
