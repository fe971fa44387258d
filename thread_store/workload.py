"""Codex-shaped items for demos, benchmarks and tests (pure; no I/O).

Item kinds and sizes follow real Codex rollout files: a ``session_meta`` and a
``turn_context`` per session, then per turn a ``user_message``, a ``task_started``, many
``response_item`` entries (reasoning, function calls and outputs, messages) and a
``token_count`` after most of them.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

Item = dict[str, Any]

_PROMPTS = [
    "Fix the flaky test in tests/test_sync.py", "Add pagination to the threads endpoint",
    "Why does the build fail on Python 3.12?", "Refactor the retry loop into a helper",
    "Write a migration that adds an index on recency", "Explain what the projector does",
    "Rename the config flag and update the docs", "Profile the append path and report",
    "Add a --json flag to the list command", "Bump sqlite-utils and fix the deprecations",
]
_TOOLS = ["shell", "apply_patch", "read_file", "rg"]


def _ts(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


def session_meta(thread_id: str, at: datetime, cwd: str = "/work/repo") -> Item:
    """The first line of a Codex rollout."""
    return {"timestamp": _ts(at), "type": "session_meta", "payload": {
        "id": thread_id, "timestamp": _ts(at), "cwd": cwd, "originator": "codex_cli_rs",
        "cli_version": "0.46.0", "source": "cli", "model_provider": "openai",
        "git": {"commit_hash": "3f2c1e9a7b", "branch": "main",
                "repository_url": "git@github.com:example/repo.git"}}}


def turn_context(at: datetime, model: str = "gpt-5-codex", effort: str | None = "medium") -> Item:
    """A ``turn_context`` line: model and reasoning effort of the turn."""
    return {"timestamp": _ts(at), "type": "turn_context", "payload": {
        "cwd": "/work/repo", "approval_policy": "on-request", "model": model, "effort": effort,
        "summary": "auto", "sandbox_policy": {"mode": "workspace-write"}}}


def user_message(text: str, at: datetime, images: list[str] | None = None) -> Item:
    """An ``event_msg`` / ``user_message``."""
    payload: dict[str, Any] = {"type": "user_message", "message": text, "kind": "plain"}
    if images:
        payload["images"] = images
    return {"timestamp": _ts(at), "type": "event_msg", "payload": payload}


def task_started(at: datetime) -> Item:
    """An ``event_msg`` / ``task_started`` (a turn start)."""
    return {"timestamp": _ts(at), "type": "event_msg",
            "payload": {"type": "task_started", "model_context_window": 272000}}


def token_count(at: datetime, total: int, info: bool = True) -> Item:
    """An ``event_msg`` / ``token_count``; ``info=False`` gives ``info: null``."""
    usage = {"input_tokens": total * 4 // 5, "cached_input_tokens": total // 2,
             "output_tokens": total // 5, "reasoning_output_tokens": total // 10,
             "total_tokens": total}
    return {"timestamp": _ts(at), "type": "event_msg", "payload": {
        "type": "token_count",
        "info": {"total_token_usage": usage, "last_token_usage": usage,
                 "model_context_window": 272000} if info else None,
        "rate_limits": {"primary": {"used_percent": 3.0, "window_minutes": 300}}}}


def response_item(rng: random.Random, at: datetime) -> Item:
    """A ``response_item``: reasoning, a tool call, its output, or an assistant message."""
    kind = rng.choice(["reasoning", "function_call", "function_call_output", "message"])
    if kind == "reasoning":
        payload: dict[str, Any] = {"type": "reasoning", "summary": [
            {"type": "summary_text", "text": "**Planning** " + "inspect the code path " * rng.randint(2, 12)}],
            "encrypted_content": "gAAAA" + "x" * rng.randint(200, 900)}
    elif kind == "function_call":
        payload = {"type": "function_call", "name": rng.choice(_TOOLS), "call_id": f"call_{rng.getrandbits(48):x}",
                   "arguments": '{"command":["bash","-lc","rg -n append thread_store"]}'}
    elif kind == "function_call_output":
        payload = {"type": "function_call_output", "call_id": f"call_{rng.getrandbits(48):x}",
                   "output": '{"output":"' + "thread_store/store.py:120: def append\\n" * rng.randint(1, 20)
                   + '","metadata":{"exit_code":0,"duration_seconds":0.1}}'}
    else:
        payload = {"type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": "I updated the retry loop. " * rng.randint(1, 15)}]}
    return {"timestamp": _ts(at), "type": "response_item", "payload": payload}


def conversation(thread_id: str, rng: random.Random, turns: int = 3,
                 start: datetime | None = None) -> Iterator[Item]:
    """Yield a realistic session: meta, context, then ``turns`` turns of work."""
    at = start or datetime.now(timezone.utc)
    yield session_meta(thread_id, at)
    yield turn_context(at)
    total = 0
    for _ in range(turns):
        at += timedelta(seconds=rng.randint(5, 120))
        yield user_message(rng.choice(_PROMPTS), at)
        yield task_started(at)
        for _ in range(rng.randint(4, 12)):
            at += timedelta(milliseconds=rng.randint(200, 5000))
            yield response_item(rng, at)
            if rng.random() < 0.6:
                total += rng.randint(500, 5000)
                yield token_count(at, total)


def hot_path_item(rng: random.Random) -> Item:
    """One item drawn with the mix of a live session (mostly response items and token counts)."""
    at = datetime.now(timezone.utc)
    roll = rng.random()
    if roll < 0.03:
        return user_message(rng.choice(_PROMPTS), at)
    if roll < 0.35:
        return token_count(at, rng.randint(1000, 200000))
    return response_item(rng, at)
