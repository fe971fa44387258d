"""Every Python snippet in the README runs as written (in a fresh directory).

Snippets may use placeholders that a reader fills in, such as ``item``; the test supplies
them. A snippet with top-level ``await`` runs as a coroutine, the way the REPL
``python -m asyncio`` would run it.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import new_schema, user_msg

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def _snippets() -> list[tuple[int, str]]:
    text = README.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in _BLOCK.finditer(text)]


def _placeholders() -> dict[str, Any]:
    """What the README's snippets leave for the reader to supply."""
    return {"__name__": "readme", "item": user_msg("Fix the flaky test")}


def test_the_readme_has_python_snippets() -> None:
    assert len(_snippets()) >= 2


@pytest.mark.parametrize("line, source", _snippets(), ids=lambda v: f"line{v}" if isinstance(v, int) else "")
def test_readme_snippet_runs(line: int, source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             request: pytest.FixtureRequest) -> None:
    monkeypatch.chdir(tmp_path)
    if "postgresql://" in source:  # the reader's server: the test's own, in a schema of its own
        url = request.getfixturevalue("pg_url")
        source = re.sub(r'"postgresql://[^"]*"', repr(url), source)
        source = source.replace('schema="thread_store"', f"schema={new_schema()!r}")
    code = compile(source, f"README.md:{line}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    namespace = _placeholders()
    result = eval(code, namespace)  # noqa: S307 - the README's own code, run on purpose
    if inspect.iscoroutine(result):
        asyncio.run(result)  # an exception anywhere in the snippet fails the test
