"""What the commands print: help examples, one-line errors, JSON, aligned tables, progress bars.

Tables fit the terminal: one flexible column is clipped with an ellipsis, and thread ids
are shortened to unique prefixes when the full ones leave too little room.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any, NoReturn

import click

from thread_store import ThreadMetadata

if TYPE_CHECKING:
    from click._termui_impl import ProgressBar

#: Narrowest a clipped column gets; the TITLE column's width before ids are shortened.
_MIN_FLEXIBLE = 10
_MIN_TITLE = 20
_SHORT_ID = 8
#: Width of the key column in :func:`echo_fields`.
_KEY_WIDTH = 20


def example(*lines: str) -> str:
    """A help epilog showing ``lines`` as an example; ``\\b`` keeps click from re-wrapping it.

    :param lines: command lines, each starting with ``thread-store``.
    :returns: the epilog text for ``@click.command(epilog=...)``.
    """
    return "\b\nExample:\n" + "\n".join(f"  {line}" for line in lines)


def fail(message: str, code: int) -> NoReturn:
    """Print ``error: message`` as one line on stderr and exit.

    :param message: what went wrong; its white space (newlines too) is folded.
    :param code: the exit status.
    :raises SystemExit: always.
    """
    click.echo("error: " + " ".join(message.split()), err=True)
    sys.exit(code)


def plural(n: int, noun: str) -> str:
    """``1 item``, ``2 items``: ``n`` and ``noun``, in the plural unless ``n`` is 1."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def clip(text: str, width: int) -> str:
    """``text`` on one line, cut to ``width`` characters with an ellipsis when longer.

    :returns: at most ``width`` characters, white space folded.
    """
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def echo_json(value: Any) -> None:
    """Print ``value`` as indented JSON, non-ASCII characters as they are."""
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def echo_fields(fields: Mapping[str, Any]) -> None:
    """Print ``key  value`` lines for the fields that are not ``None``, clipped to the terminal.

    :param fields: e.g. :meth:`ThreadMetadata.to_json`; dict values are shown as JSON.
    """
    room = max(_terminal_width() - _KEY_WIDTH, _MIN_FLEXIBLE)
    for key, value in fields.items():
        if value is not None:
            text = json.dumps(value) if isinstance(value, dict) else str(value)
            click.echo(f"{key:<{_KEY_WIDTH}}{clip(text, room)}")


def echo_threads(threads: Sequence[ThreadMetadata]) -> None:
    """Print ``threads`` as a table (``no threads`` on stderr when there are none)."""
    if not threads:
        click.echo("no threads", err=True)
        return
    rows = [[m.thread_id, " ".join((m.name or m.title or m.preview or "").split()),
             m.model or "", str(m.item_count),
             m.recency_at.strftime("%Y-%m-%d %H:%M") if m.recency_at else ""] for m in threads]
    headers = ("ID", "TITLE", "MODEL", "ITEMS", "RECENCY (UTC)")
    if _table_width(headers, rows, flexible=1, flexible_width=_MIN_TITLE) > _terminal_width():
        # Like git: a short unique prefix, which every command taking an ID accepts.
        short = _short_ids([r[0] for r in rows])
        for row in rows:
            row[0] = short[row[0]]
    echo_table(headers, rows, flexible=1)


def echo_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *,
               flexible: int | None = None) -> None:
    """Print aligned columns; the ``flexible`` one is clipped to fit the terminal.

    :param headers: the column titles.
    :param rows: the cells, one sequence per row, as long as ``headers``.
    :param flexible: the index of the column to clip; ``None`` clips nothing.
    """
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]
    if flexible is not None:
        room = _terminal_width() - (sum(widths) - widths[flexible]) - 2 * (len(widths) - 1)
        widths[flexible] = max(min(widths[flexible], room), _MIN_FLEXIBLE)
        rows = [[clip(cell, widths[flexible]) if i == flexible else cell for i, cell in enumerate(row)]
                for row in rows]
    for row in (headers, *rows):
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def progress(bars: ExitStack, label: str) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback drawing a click progress bar on stderr.

    :param bars: closes the bar (drawn on the first call) when the command is done.
    :param label: shown before the bar.
    :returns: the callback the library's long operations take as ``progress``.
    """
    bar: ProgressBar[int] | None = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = bars.enter_context(click.progressbar(length=total, label=label, file=sys.stderr))
        bar.update(done - bar.pos)

    return update


def _terminal_width() -> int:
    return shutil.get_terminal_size((80, 24)).columns


def _table_width(headers: Sequence[str], rows: Sequence[Sequence[str]], *, flexible: int,
                 flexible_width: int) -> int:
    """How wide :func:`echo_table` would print, with the flexible column ``flexible_width`` wide."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]
    widths[flexible] = min(widths[flexible], flexible_width)
    return sum(widths) + 2 * (len(widths) - 1)


def _short_ids(ids: Sequence[str]) -> dict[str, str]:
    """The shortest prefix of each id (at least 8 characters) unique among ``ids``."""
    short = {}
    for thread_id in ids:
        length = _SHORT_ID
        while length < len(thread_id) and any(o != thread_id and o.startswith(thread_id[:length])
                                              for o in ids):
            length += 1
        short[thread_id] = thread_id[:length]
    return short
