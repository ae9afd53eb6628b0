"""The interface every state-store backend implements."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

Row = dict[str, Any]


class Executor(Protocol):
    """Something that runs statements: the database itself, or an open transaction."""

    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement; return the number of rows it changed."""

    async def fetchone(self, sql: str, *args: Any) -> Row | None: ...

    async def fetchall(self, sql: str, *args: Any) -> list[Row]: ...


class Database(Executor, Protocol):
    """A state store (SQLite or PostgreSQL): an executor that also opens transactions."""

    dialect: str  # "sqlite" or "postgresql"

    def transaction(self) -> AbstractAsyncContextManager[Executor]:
        """Statements on the yielded executor commit together, or not at all."""

    async def close(self) -> None: ...
