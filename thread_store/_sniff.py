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

#: ``match_type(text)``: a match whose group 1 is the item's ``type``, when the text
#: starts with it (after an optional ``timestamp``); else ``None``.
match_type = re.compile(r'\{(?:"timestamp":"[^"\\]*",)?"type":"([^"\\]*)"').match
#: ``match_payload_type(text, match_type(text).end())``: a match whose group 1 is the
#: payload's ``type``, when the payload comes next with its type first; else ``None``.
match_payload_type = re.compile(r',"payload":\{"type":"([^"\\]*)"').match


def item_type(text: str) -> str | None:
    """The ``type`` of a stored item, when its text starts with it (after an optional
    ``timestamp``); ``None`` when it does not, and the caller parses the item."""
    found = match_type(text)
    return found[1] if found else None
