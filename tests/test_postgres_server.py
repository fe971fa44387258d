"""The throwaway PostgreSQL server the PostgreSQL tests run against (tests/pg_server.py)."""

from __future__ import annotations

import os

import psycopg
from pg_server import PostgresServer


def test_throwaway_server_accepts_connections_as_an_unprivileged_user(postgres_server: PostgresServer) -> None:
    with psycopg.connect(postgres_server.url, connect_timeout=30) as conn:
        version, encoding, collate = conn.execute(
            "SELECT current_setting('server_version_num')::int, current_setting('server_encoding'), "
            "datcollate FROM pg_database WHERE datname = current_database()").fetchone()
    assert version >= 150000
    assert (encoding, collate) == ("UTF8", "C.UTF-8")
    data = postgres_server.directory / "data"
    assert data.stat().st_uid != 0  # postgres refuses root; as root the cluster belongs to another user
    assert os.stat(postgres_server.directory).st_mode & 0o005 == 0o005  # root's tests reach the socket


def test_throwaway_server_has_pg_trgm_for_search(postgres_server: PostgresServer) -> None:
    with psycopg.connect(postgres_server.url, connect_timeout=30, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS trgm_check")
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm SCHEMA trgm_check")
        similarity = conn.execute("SELECT trgm_check.similarity('three little pigs', 'thr')").fetchone()
        conn.execute("DROP SCHEMA trgm_check CASCADE")
    assert similarity is not None and similarity[0] > 0


def test_stop_removes_the_cluster() -> None:
    server = PostgresServer()
    with server:
        assert (server.directory / "data" / "PG_VERSION").is_file()
        with psycopg.connect(server.url, connect_timeout=30) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    assert not server.directory.exists()
