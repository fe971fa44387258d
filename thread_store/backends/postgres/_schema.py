"""The tables of one store inside its PostgreSQL schema, and their migrations.

Every table is keyed by ``thread_id`` first and every write touches one thread, with no
global sequence, so the tables can be distributed by ``thread_id`` (Citus) unchanged:

- ``threads``: identity, history head, tombstone (``discarded_us``), ``incarnation`` (a
  re-created id gets a new one, so no projection of the old thread can land on it) and
  ``dirty_since``, set by the append that makes the thread behind and cleared by
  housekeeping once its row caught up: the durable record of what is behind (DESIGN §1.8).
  Written by create, append, discard and delete only; projections never lock it.
- ``items``: the log, exact JSON text (not ``jsonb``, which would reorder keys), and
  each traced append's ``traceparent`` on its last item (``trace``, added in version 3).
- ``append_keys``: idempotency keys with the digest of their items.
- ``meta``: the projected rows, each with its ``projected_seq`` (and in ``exact`` the
  text of values with NUL characters); written by projections.
- ``failures``: projections that failed for good (``status().last_error``).
- ``store_meta``: the schema version, the ``format`` marker and the fold rules' id.

``open`` creates and migrates them under a transaction-level advisory lock, so several
processes opening at once run each migration exactly once.
"""

from __future__ import annotations

from typing import Callable

import psycopg
from psycopg import sql

from ...errors import InvalidArgument, NotAThreadStore, SchemaTooNew

#: ``store_meta`` marks a thread_store schema with this, so foreign tables are never adopted.
FORMAT = "thread_store"
#: The first key of the two-int advisory lock: "ts" in ASCII; the second is the schema's hash.
_LOCK_CLASS = 0x7473

#: The threads' text columns, collated "C": ordering and keyset comparisons by code point,
#: the same as Python's (and the other backends').
_CREATE = """
CREATE TABLE {s}.store_meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE {s}.threads (
  thread_id    text COLLATE "C" PRIMARY KEY,
  incarnation  bigint NOT NULL,
  head         bigint NOT NULL DEFAULT 0,
  created_us   bigint NOT NULL,
  dirty_since  timestamptz,
  discarded_us bigint);
CREATE INDEX threads_dirty ON {s}.threads (dirty_since) WHERE dirty_since IS NOT NULL;
CREATE TABLE {s}.items (
  thread_id text COLLATE "C" NOT NULL,
  seq       bigint NOT NULL,
  ts_us     bigint NOT NULL,
  item      text NOT NULL,
  PRIMARY KEY (thread_id, seq));
CREATE TABLE {s}.append_keys (
  thread_id  text COLLATE "C" NOT NULL,
  key        text NOT NULL,
  digest     text NOT NULL,
  generation bigint NOT NULL,
  PRIMARY KEY (thread_id, key));
CREATE TABLE {s}.meta (
  thread_id text COLLATE "C" PRIMARY KEY,
  incarnation bigint NOT NULL,
  projected_seq bigint NOT NULL,
  name text, title text, preview text, first_user_message text, model_provider text,
  model text, reasoning_effort text, cwd text, cli_version text, source text, git_sha text,
  git_branch text, git_origin_url text,
  token_usage text,
  created_us bigint, updated_us bigint, recency_us bigint NOT NULL, archived_us bigint,
  item_count bigint NOT NULL,
  is_archived boolean NOT NULL,
  has_preview boolean NOT NULL,
  state text NOT NULL,
  search text GENERATED ALWAYS AS (coalesce(name, '') || E'\\n' || coalesce(title, '')
    || E'\\n' || coalesce(preview, '') || E'\\n' || coalesce(first_user_message, '')) STORED);
CREATE INDEX meta_listed ON {s}.meta (is_archived, has_preview, recency_us DESC, thread_id DESC);
CREATE INDEX meta_all ON {s}.meta (is_archived, recency_us DESC, thread_id DESC);
CREATE INDEX meta_by_cwd ON {s}.meta (is_archived, cwd, recency_us DESC, thread_id DESC);
CREATE TABLE {s}.failures (
  thread_id  text COLLATE "C" PRIMARY KEY,
  generation bigint NOT NULL,
  error      text NOT NULL);
"""

Migration = Callable[[psycopg.Connection, sql.Identifier], None]


def _create(conn: psycopg.Connection, schema: sql.Identifier) -> None:
    """Version 1: the tables above, and a trigram index for search where pg_trgm exists."""
    _run(conn, _CREATE, schema)
    trgm = _trigram_schema(conn)
    if trgm is not None:
        conn.execute(sql.SQL("CREATE INDEX meta_search ON {}.meta USING gin (search {}.gin_trgm_ops)")
                     .format(schema, sql.Identifier(trgm)))


def _trigram_schema(conn: psycopg.Connection) -> str | None:
    """The schema of the pg_trgm extension, created if it can be; ``None`` without it
    (search still works, by a scan)."""
    try:
        with conn.transaction():  # a savepoint: a refused CREATE EXTENSION undoes only itself
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    except psycopg.Error:
        pass
    row = conn.execute("SELECT extnamespace::regnamespace::text FROM pg_extension "
                       "WHERE extname = 'pg_trgm'").fetchone()
    return None if row is None else str(row[0]).strip('"')


_V2 = """
DROP INDEX {s}.meta_by_cwd;
CREATE INDEX meta_by_cwd ON {s}.meta (is_archived, md5(cwd), recency_us DESC, thread_id DESC);
ALTER TABLE {s}.meta ADD COLUMN exact text;
"""


def _any_value(conn: psycopg.Connection, schema: sql.Identifier) -> None:
    """Version 2: store every value the other backends store.

    - ``meta_by_cwd`` indexed ``cwd`` itself, so a row with a ``cwd`` over about 8 kB could
      never be written (a btree entry must fit a page): it indexes ``md5(cwd)`` instead,
      and the ``cwd`` filter compares both.
    - ``meta.exact`` holds the exact text of the fields with NUL characters, which a text
      column cannot hold (``index._text_columns``).
    """
    _run(conn, _V2, schema)


def _run(conn: psycopg.Connection, script: str, schema: sql.Identifier) -> None:
    for statement in script.replace("{s}", schema.as_string(conn)).split(";"):
        if statement.strip():
            conn.execute(statement.encode())


def _trace_contexts(conn: psycopg.Connection, schema: sql.Identifier) -> None:
    """Version 3: ``items.trace``, an append's W3C ``traceparent`` on its last item, so a
    projection in another process joins the append's trace. A nullable column without a
    default: PostgreSQL adds it without rewriting the table."""
    _run(conn, "ALTER TABLE {s}.items ADD COLUMN trace text", schema)


#: ``MIGRATIONS[n]`` takes a schema from version n to n + 1. A version that reached
#: users is never edited: a change is a new step.
MIGRATIONS: list[Migration] = [_create, _any_value, _trace_contexts]
SCHEMA_VERSION = len(MIGRATIONS)


def prepare(conn: psycopg.Connection, name: str, *, read_only: bool, where: str) -> None:
    """Create or migrate the store in schema ``name`` (in the caller's transaction).

    :raises SchemaTooNew: a newer thread_store wrote it.
    :raises NotAThreadStore: the schema holds other tables, or (read-only) no store.
    """
    schema = sql.Identifier(name)
    if not read_only:
        conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_CLASS, name))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
    version = stored_version(conn, name, where=where)
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(f"the store at {where} has schema version {version}, newer than this "
                           f"thread_store's {SCHEMA_VERSION}; upgrade the package to open it")
    if version == SCHEMA_VERSION:
        return
    if read_only:
        raise NotAThreadStore(f"{where} holds no thread store (or an older schema); open it "
                              "once without read_only=True to create or migrate it")
    for migrate in MIGRATIONS[version:]:
        migrate(conn, schema)
    conn.execute(sql.SQL("INSERT INTO {}.store_meta (key, value) VALUES ('format', %s), "
                         "('version', %s) ON CONFLICT (key) DO UPDATE SET value = excluded.value")
                 .format(schema), (FORMAT, str(SCHEMA_VERSION)))


def stored_version(conn: psycopg.Connection, name: str, *, where: str) -> int:
    """The schema version of the store in ``name``: 0 for an empty or missing schema.

    :raises NotAThreadStore: the schema holds tables that are not a thread store's.
    """
    tables = {str(r[0]) for r in conn.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = %s", (name,)).fetchall()}
    if not tables:
        return 0
    foreign = NotAThreadStore(f"the schema {name!r} of {where} holds tables that are not a "
                              "thread store's; pick another schema= for the store")
    if "store_meta" not in tables:
        raise foreign
    rows: dict[str, str] = dict(conn.execute(sql.SQL("SELECT key, value FROM {}.store_meta WHERE key IN "
                                     "('format', 'version')").format(sql.Identifier(name))).fetchall())
    if rows.get("format") != FORMAT or not str(rows.get("version", "")).isdigit():
        raise foreign
    return int(rows["version"])


def check_rules(conn: psycopg.Connection, name: str, rules_id: str, *, read_only: bool,
                where: str) -> None:
    """Adopt the fold rules' id on a new (or reindexed) store; refuse others.

    :raises InvalidArgument: the rows were projected with other rules.
    """
    schema = sql.Identifier(name)
    row = conn.execute(sql.SQL("SELECT value FROM {}.store_meta WHERE key = 'rules'").format(schema)
                       ).fetchone()
    if row is None:
        if not read_only:
            conn.execute(sql.SQL("INSERT INTO {}.store_meta (key, value) VALUES ('rules', %s) "
                                 "ON CONFLICT (key) DO NOTHING").format(schema), (rules_id,))
    elif row[0] != rules_id and not read_only:
        raise InvalidArgument(
            f"the store at {where} was projected with the fold rules {row[0]!r}, not "
            f"{rules_id!r}; open it with those rules, or apply the new ones with "
            "ThreadStore.rebuild_index(url, rules=...)")
