"""The state store: one small async SQL interface, for SQLite (the embedded default) and
PostgreSQL (shared by the hosts of a pool).

Queries are written once in portable SQL with ``?`` placeholders; each backend adapts them.
"""

from __future__ import annotations

from common.db import Database, Row
from transfer.db.schema import migrate


async def open_database(url: str) -> Database:
    """Open the database named by `url` and bring its schema up to date."""
    if url.startswith("sqlite:///"):
        from transfer.db.sqlite import SQLiteDatabase

        db: Database = await SQLiteDatabase.open(url.removeprefix("sqlite:///"))
    elif url.startswith(("postgresql://", "postgres://")):
        from transfer.db.postgres import PostgresDatabase

        db = await PostgresDatabase.open(url)
    else:
        raise ValueError(f"unsupported database URL {url!r}")
    await migrate(db)
    return db


__all__ = ["Database", "Row", "open_database"]
