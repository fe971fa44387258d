"""The PostgreSQL backend: a store in one schema of a PostgreSQL database (DESIGN §6).

It needs the ``postgres`` extra (``pip install 'thread_store[postgres]'``: psycopg 3 and
psycopg_pool); nothing else in the package imports it unless a ``postgresql://`` target
is opened.
"""

from __future__ import annotations

from ._db import PoolOptions
from ._storage import PostgresStorage

__all__ = ["PoolOptions", "PostgresStorage"]
