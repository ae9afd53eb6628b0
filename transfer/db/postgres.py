"""PostgreSQL backend (asyncpg): the state store several hosts of a pool share.

Queries arrive in the portable form (`?` placeholders) and are rewritten once to asyncpg's
`$1, $2, ...`. A transaction holds one pooled connection for its statements; everything else
borrows a connection per statement.
"""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from common.db import Row

_PLACEHOLDER = re.compile(r"\?")


@functools.lru_cache(maxsize=512)
def to_postgres(sql: str) -> str:
    """`?` placeholders -> `$n` (our SQL has no `?` inside string literals)."""
    counter = iter(range(1, 10_000))
    return _PLACEHOLDER.sub(lambda _: f"${next(counter)}", sql)


def _rowcount(status: str) -> int:
    """asyncpg's command status ("UPDATE 3", "INSERT 0 1", "CREATE TABLE") -> rows changed."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


class _PgConn:
    def __init__(self, conn: asyncpg.Connection):
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        return _rowcount(await self._conn.execute(to_postgres(sql), *args))

    async def fetchone(self, sql: str, *args: Any) -> Row | None:
        record = await self._conn.fetchrow(to_postgres(sql), *args)
        return dict(record) if record is not None else None

    async def fetchall(self, sql: str, *args: Any) -> list[Row]:
        return [dict(r) for r in await self._conn.fetch(to_postgres(sql), *args)]


class PostgresDatabase:
    """The state store a pool's hosts share: a Database on an asyncpg connection pool."""

    dialect = "postgresql"

    def __init__(self, pool: asyncpg.Pool):
        self._pool = pool

    @classmethod
    async def open(cls, url: str) -> PostgresDatabase:
        pool = await asyncpg.create_pool(url, min_size=1, max_size=10)
        return cls(pool)

    async def execute(self, sql: str, *args: Any) -> int:
        async with self._pool.acquire() as conn:
            return await _PgConn(conn).execute(sql, *args)

    async def fetchone(self, sql: str, *args: Any) -> Row | None:
        async with self._pool.acquire() as conn:
            return await _PgConn(conn).fetchone(sql, *args)

    async def fetchall(self, sql: str, *args: Any) -> list[Row]:
        async with self._pool.acquire() as conn:
            return await _PgConn(conn).fetchall(sql, *args)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_PgConn]:
        async with self._pool.acquire() as conn, conn.transaction():
            yield _PgConn(conn)

    async def close(self) -> None:
        await self._pool.close()
