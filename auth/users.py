"""User records: creation, password changes, roles, removal. Used by the API and the CLI."""

from __future__ import annotations

import asyncio
import re
import time

from auth.passwords import HASHING, check_strength, hash_password
from auth.roles import ROLES
from common.db import Database, Row
from common.errors import ApiError, bad_request

USERNAME_MAX = 64


USERNAME = re.compile(rf"[A-Za-z0-9._@-]{{1,{USERNAME_MAX}}}")


def validate_username(username: object) -> str:
    """The user name if it is 1 to USERNAME_MAX ASCII letters, digits or . _ - @ (no look-alike
    letters of other scripts); else BAD_REQUEST."""
    if not isinstance(username, str) or not USERNAME.fullmatch(username):
        raise bad_request(
            f"username must be 1-{USERNAME_MAX} ASCII letters, digits or . _ - @", username
        )
    return username


def validate_role(role: object) -> str:
    """The role if it is one of ROLES; else BAD_REQUEST."""
    if role not in ROLES:
        raise bad_request(f"role must be one of {', '.join(ROLES)}", role)
    return role  # type: ignore[return-value]


def validate_password(password: object) -> str:
    """The password if it is a string check_strength accepts; else BAD_REQUEST."""
    if not isinstance(password, str):
        raise bad_request("password must be a string")
    problem = check_strength(password)
    if problem:
        raise bad_request(problem)
    return password


class UserStore:
    """Who may log in, with which password hash and role; never leaves the pool without an admin."""

    def __init__(self, db: Database):
        self.db = db

    async def get(self, username: str) -> Row | None:
        return await self.db.fetchone("SELECT * FROM users WHERE username = ?", username)

    async def require(self, username: str) -> Row:
        user = await self.get(username)
        if user is None:
            raise ApiError("USER_NOT_FOUND", f"no user {username!r}", username)
        return user

    async def list(self) -> list[Row]:
        return await self.db.fetchall("SELECT username, role FROM users ORDER BY username")

    async def count(self) -> int:
        row = await self.db.fetchone("SELECT COUNT(*) AS n FROM users")
        return int(row["n"]) if row else 0

    async def add(self, username: str, password: str, role: str) -> None:
        validate_username(username)
        validate_role(role)
        validate_password(password)
        hashed = await asyncio.get_running_loop().run_in_executor(HASHING, hash_password, password)
        async with self.db.transaction() as tx:
            if await tx.fetchone("SELECT 1 FROM users WHERE username = ?", username):
                raise ApiError("USER_EXISTS", f"user {username!r} already exists", username)
            await tx.execute(
                "INSERT INTO users (username, password_hash, role, created) VALUES (?, ?, ?, ?)",
                username,
                hashed,
                role,
                time.time(),
            )

    async def set_password(self, username: str, password: str) -> None:
        validate_password(password)
        hashed = await asyncio.get_running_loop().run_in_executor(HASHING, hash_password, password)
        changed = await self.db.execute(
            "UPDATE users SET password_hash = ? WHERE username = ?", hashed, username
        )
        if not changed:
            raise ApiError("USER_NOT_FOUND", f"no user {username!r}", username)

    async def set_role(self, username: str, role: str) -> None:
        validate_role(role)
        async with self.db.transaction() as tx:
            await self._keep_an_admin(tx, username, role)
            if not await tx.execute("UPDATE users SET role = ? WHERE username = ?", role, username):
                raise ApiError("USER_NOT_FOUND", f"no user {username!r}", username)

    async def remove(self, username: str) -> None:
        async with self.db.transaction() as tx:
            await self._keep_an_admin(tx, username, None)
            if not await tx.execute("DELETE FROM users WHERE username = ?", username):
                raise ApiError("USER_NOT_FOUND", f"no user {username!r}", username)

    @staticmethod
    async def _keep_an_admin(tx, username: str, new_role: str | None) -> None:
        """Refuse a change that would leave the pool without any admin."""
        if new_role == "admin":
            return
        row = await tx.fetchone(
            "SELECT COUNT(*) AS n FROM users WHERE role = 'admin' AND username <> ?", username
        )
        user = await tx.fetchone("SELECT role FROM users WHERE username = ?", username)
        if user and user["role"] == "admin" and row["n"] == 0:
            raise bad_request("the last admin cannot be removed or demoted", username)
