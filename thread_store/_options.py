"""Validation of ``ThreadStore.open``'s target and options (and ``rebuild_index``'s).

It runs before ``open`` touches the file system, so a bad option can never surface later,
after a call has already written (a ``coalesce_delay=None`` used to fail ``create_thread``
with a ``TypeError`` once the thread was committed).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Set
from pathlib import Path
from typing import Any, Mapping

from .model import RetryPolicy
from .errors import InvalidArgument
from .model import DEFAULT_MAX_ITEM_BYTES, check_count
from .storage import MEMORY

#: How long work may sit behind in the store before another process's catch-up takes it.
DEFAULT_CATCH_UP_AFTER_S = 5.0
#: Longest coalescing delay accepted: beyond an hour it is a typo, not a tuning choice.
MAX_COALESCE_DELAY_S = 3600.0
_RULE_METHODS = ("initial", "apply", "metadata")
#: The common limits of Linux and macOS file systems (NAME_MAX, PATH_MAX less the NUL).
_NAME_MAX = 255
_PATH_MAX = 4095
#: ``scheme://...``: a URL, never a directory name (DESIGN §3).
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
#: The URL schemes of the PostgreSQL backend (DESIGN §3).
POSTGRES_SCHEMES = ("postgresql", "postgres")
#: Options that only a PostgreSQL target takes (DESIGN §3's table), with their checks.
POSTGRES_OPTIONS = ("schema", "pool_min_size", "pool_max_size", "connect_timeout",
                    "statement_timeout")
#: A schema name: an unquoted lower-case PostgreSQL identifier, so it needs no quoting
#: in tools (``pg_dump --schema``) and cannot collide with a differently-cased one.
_SCHEMA = re.compile(r"[a-z_][a-z0-9_]{0,62}")
#: A libpq connection string, ``host=... dbname=...``: not a directory name either.
_CONNINFO = re.compile(r"\s*(\w+\s*=\s*('[^']*'|\S*)\s*)+")


def check_target(target: object) -> Path | str:
    """The store ``open`` names: :data:`MEMORY`, a ``postgresql://`` URL (a ``str``), or
    a directory :class:`Path`.

    :raises InvalidArgument: anything else (see :func:`check_path`).
    """
    if target == MEMORY and isinstance(target, str):
        return MEMORY
    if is_postgres(target):
        assert isinstance(target, str)
        if "\x00" in target or not target.isprintable():
            raise InvalidArgument("a postgresql:// URL must be printable text without NUL "
                                  "characters")
        return target
    return check_path(target)


def is_postgres(target: object) -> bool:
    """Whether ``target`` is a ``postgresql://`` or ``postgres://`` URL."""
    return (isinstance(target, str) and bool(_URL.match(target))
            and target.split("://", 1)[0].lower() in POSTGRES_SCHEMES)


def catch_up_for(target: Path | str, catch_up_after: float | None) -> float | None:
    """The catch-up period of a store (``None``: no other process can leave work).

    :raises InvalidArgument: ``catch_up_after`` given for ``":memory:"``.
    """
    if target == MEMORY:
        if catch_up_after is not None:
            raise InvalidArgument("catch_up_after does not apply to ':memory:': no other process "
                                  "shares an in-memory store")
        return None
    return DEFAULT_CATCH_UP_AFTER_S if catch_up_after is None else float(catch_up_after)


def backend_options(target: Path | str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The backend-specific options given in ``options`` (already checked), for
    ``open_storage``.

    :raises InvalidArgument: one of them given for a target that does not take it.
    """
    given = {k: v for k, v in options.items() if k in POSTGRES_OPTIONS and v is not None}
    if given and not is_postgres(target):
        raise InvalidArgument(f"option(s) {', '.join(sorted(given))} apply only to postgresql:// "
                              "stores, not to an embedded or in-memory one")
    return given


def check_path(path: object) -> Path:
    """Return ``path`` as a :class:`Path`, or raise :class:`InvalidArgument`.

    A store lives in a directory named by a ``str`` or a ``str`` :class:`os.PathLike`;
    ``None``, numbers, ``bytes`` and strings the OS cannot take (empty, NUL characters,
    lone surrogates) are rejected here instead of failing with ``TypeError`` or
    ``ValueError`` deep inside ``os``.
    """
    raw: object = path
    if isinstance(path, os.PathLike):
        try:
            raw = os.fspath(path)
        except Exception as exc:  # noqa: BLE001 - a user __fspath__ may raise anything
            raise InvalidArgument(f"path {type(path).__name__} could not give its file system path: "
                                  f"{type(exc).__name__}") from exc
    if not isinstance(raw, str):
        raise InvalidArgument(f"path must be a str or os.PathLike naming a directory, not "
                              f"{type(raw).__name__}, e.g. ThreadStore.open('data/threads')")
    if not raw or "\x00" in raw:
        raise InvalidArgument(f"path must be a non-empty directory name without NUL characters, "
                              f"not {raw!r}")
    _refuse_other_targets(raw)
    try:
        encoded = os.fsencode(raw)
    except UnicodeError as exc:
        raise InvalidArgument(f"path {raw!r} cannot be encoded for the file system "
                              "(lone surrogates?); pass a valid directory name") from exc
    # Else mkdir or stat fails with a raw ENAMETOOLONG OSError, wherever it first looks.
    if len(encoded) > _PATH_MAX or any(len(part) > _NAME_MAX for part in encoded.split(b"/")):
        raise InvalidArgument(f"path is too long for the file system (at most {_NAME_MAX} bytes a "
                              f"name, {_PATH_MAX} in all): {raw[:80]!r}...")
    return Path(raw)


def _refuse_other_targets(raw: str) -> None:
    """Targets that name another backend must never become a directory of that name."""
    if raw == MEMORY:
        raise InvalidArgument("':memory:' names the in-memory backend, not a directory; "
                              "pass a directory path here")
    if _URL.match(raw):
        scheme = raw.split("://", 1)[0]
        raise InvalidArgument(f"{scheme}:// is not a store target; pass a directory path for "
                              "the embedded store, or a postgresql:// URL")
    if _CONNINFO.fullmatch(raw):
        raise InvalidArgument("a libpq 'key=value' connection string is not a store target; pass a "
                              "directory path, or a postgresql://user@host:port/database URL")


def check_open_kwargs(options: Mapping[str, Any]) -> None:
    """Check the names and values of ``open`` options passed through ``**options``.

    :raises InvalidArgument: an unknown name or a bad value.
    """
    unknown = sorted(set(options) - _OPTION_NAMES)
    if unknown:
        raise InvalidArgument(f"unknown ThreadStore.open option(s) {', '.join(map(repr, unknown))}; "
                              f"the options are {', '.join(sorted(_OPTION_NAMES))}")
    check_options(**options)


def check_rebuild_options(options: Mapping[str, Any], progress: object) -> None:
    """Check ``rebuild_index``'s options: ``open``'s but ``read_only``, and ``progress``.

    :raises InvalidArgument: an unknown name, a bad value, or ``read_only=True``.
    """
    check_open_kwargs(options)
    if options.get("read_only"):
        raise InvalidArgument("rebuild_index writes the index; it cannot use read_only=True")
    if progress is not None and not callable(progress):
        raise InvalidArgument(f"progress must be a callable progress(done, total) or None, "
                              f"not {type(progress).__name__}")


def check_options(*, projection: object = "async", durability: object = "normal",
                  tracer_provider: object = None, meter_provider: object = None,
                  projection_hook: object = None, rules: object = None,
                  max_item_bytes: object = DEFAULT_MAX_ITEM_BYTES, coalesce_delay: object = 0.005,
                  retry: object = None, caller_runs: object = True, read_only: object = False,
                  catch_up_after: object = None, schema: object = None,
                  pool_min_size: object = None, pool_max_size: object = None,
                  connect_timeout: object = None, statement_timeout: object = None) -> None:
    """Check the type and range of every ``open`` option; raise :class:`InvalidArgument`.

    ``None`` for a PostgreSQL option means its default (see the README).
    """
    _check_postgres_options(schema, pool_min_size, pool_max_size, connect_timeout,
                            statement_timeout)
    if not isinstance(projection, str) or projection not in ("async", "sync"):
        raise InvalidArgument(f"projection must be 'async' or 'sync', not {projection!r}")
    if not isinstance(durability, str) or durability not in ("normal", "full"):
        raise InvalidArgument(f"durability must be 'normal' or 'full', not {durability!r}")
    for value, name, kind, method in (
            (tracer_provider, "tracer_provider", "TracerProvider", "get_tracer"),
            (meter_provider, "meter_provider", "MeterProvider", "get_meter")):
        if value is not None and not callable(getattr(value, method, None)):
            raise InvalidArgument(f"{name} must be an OpenTelemetry {kind} (with a {method}() "
                                  f"method) or None, not {type(value).__name__}")
    if projection_hook is not None and not callable(projection_hook):
        raise InvalidArgument("projection_hook must be a callable hook(thread_id, generation) or None, "
                              f"not {type(projection_hook).__name__}")
    if rules is not None:
        _check_rules(rules)
    check_count(max_item_bytes, name="max_item_bytes", minimum=64, maximum=1 << 30)
    if (isinstance(coalesce_delay, bool) or not isinstance(coalesce_delay, (int, float))
            or math.isnan(coalesce_delay) or not 0 <= coalesce_delay <= MAX_COALESCE_DELAY_S):
        raise InvalidArgument(f"coalesce_delay must be a number of seconds from 0 to "
                              f"{MAX_COALESCE_DELAY_S:g}, not {coalesce_delay!r}")
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise InvalidArgument(f"retry must be a RetryPolicy or None, not {type(retry).__name__}")
    if catch_up_after is not None and (
            isinstance(catch_up_after, bool) or not isinstance(catch_up_after, (int, float))
            or math.isnan(catch_up_after) or not 0 < catch_up_after <= MAX_COALESCE_DELAY_S):
        raise InvalidArgument(f"catch_up_after must be a number of seconds above 0 and up to "
                              f"{MAX_COALESCE_DELAY_S:g}, or None; not {catch_up_after!r}")
    for flag, name in ((caller_runs, "caller_runs"), (read_only, "read_only")):
        if not isinstance(flag, bool):
            raise InvalidArgument(f"{name} must be True or False, not {flag!r}")


def _check_postgres_options(schema: object, pool_min_size: object, pool_max_size: object,
                            connect_timeout: object, statement_timeout: object) -> None:
    if schema is not None and (not isinstance(schema, str) or not _SCHEMA.fullmatch(schema)
                               or schema.startswith("pg_")):
        raise InvalidArgument(f"schema must be a lower-case PostgreSQL identifier of at most 63 "
                              f"characters ([a-z_][a-z0-9_]*, not pg_...), not {schema!r}")
    for size, name in ((pool_min_size, "pool_min_size"), (pool_max_size, "pool_max_size")):
        if size is not None:
            check_count(size, name=name, minimum=0 if name == "pool_min_size" else 1, maximum=1000)
    if (isinstance(pool_min_size, int) and isinstance(pool_max_size, int)
            and pool_min_size > pool_max_size):
        raise InvalidArgument(f"pool_min_size ({pool_min_size}) must not exceed pool_max_size "
                              f"({pool_max_size})")
    for seconds, name, low in ((connect_timeout, "connect_timeout", 1.0),
                               (statement_timeout, "statement_timeout", 0.0)):
        if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                    or math.isnan(seconds) or not low <= seconds <= 86400):
            raise InvalidArgument(f"{name} must be a number of seconds from {low:g} to 86400, "
                                  f"not {seconds!r}")


def _check_rules(rules: object) -> None:
    missing = [name for name in _RULE_METHODS if not callable(getattr(rules, name, None))]
    if missing:
        raise InvalidArgument(f"rules must implement ProjectionRules ({', '.join(_RULE_METHODS)}); "
                              f"{type(rules).__name__} lacks {', '.join(missing)}")
    declared = getattr(rules, "rules_id", None)
    if declared is not None and (not isinstance(declared, str) or not declared):
        raise InvalidArgument(f"rules.rules_id must be a non-empty string naming the rules and "
                              f"their version, or absent; not {declared!r}")
    types = getattr(rules, "item_types", None)
    if types is not None and (not isinstance(types, Set) or not all(isinstance(t, str) for t in types)):
        raise InvalidArgument(f"rules.item_types must be a frozenset of item type strings or None, "
                              f"not {types!r}")


_OPTION_NAMES = frozenset(check_options.__kwdefaults__ or ())
