"""Sessions are JWTs (HS256) signed with the pool secret; revocation is a table of ids.

A JWT carries who and until when, so any host holding the secret can check it without a
database round trip; the revocation list (checked on every use) makes logout immediate.
Only HS256 is accepted: tokens with "alg": "none" or any other algorithm are rejected.
"""

from __future__ import annotations

import os
import secrets
import stat
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import jwt

from common.db import Database
from common.errors import ApiError

ALGORITHM = "HS256"
SECRET_FILE = "pool-secret"


def load_or_create_secret(state_dir: Path) -> bytes:
    """The signing key, kept in the state dir readable by the owner only (0600)."""
    path = state_dir / SECRET_FILE
    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            os.chmod(path, 0o600)
        secret = bytes.fromhex(path.read_text().strip())
        if len(secret) < 32:
            raise ValueError(f"{path}: the pool secret is shorter than 32 bytes") from None
        return secret
    secret = secrets.token_bytes(32)
    with os.fdopen(fd, "w") as f:
        f.write(secret.hex() + "\n")
        f.flush()
        os.fsync(f.fileno())
    return secret


async def load_or_create_pool_secret(db: Database) -> bytes:
    """The signing key of a pool, kept in the database all its hosts share, so a session
    from any host is valid on every host. Created by whichever host asks first."""
    await db.execute(
        "INSERT INTO pool_settings (name, value) VALUES ('session_secret', ?) "
        "ON CONFLICT (name) DO NOTHING",
        secrets.token_bytes(32).hex(),
    )
    row = await db.fetchone("SELECT value FROM pool_settings WHERE name = 'session_secret'")
    return bytes.fromhex(row["value"])


class RevokedSessions:
    """The ids of sessions logged out before they expire: checked on every use of a session
    (or of a ticket issued under one), forgotten once the session would have expired."""

    def __init__(self, db: Database):
        self.db = db

    async def contains(self, jti: str) -> bool:
        return (
            await self.db.fetchone("SELECT 1 FROM revoked_sessions WHERE jti = ?", jti) is not None
        )

    async def add(self, jti: str, expires: float) -> None:
        await self.db.execute(
            "INSERT INTO revoked_sessions (jti, expires) VALUES (?, ?) "
            "ON CONFLICT (jti) DO NOTHING",
            jti,
            expires,
        )

    async def forget_expired(self, now: float) -> int:
        """Entries of sessions that have expired anyway; returns how many went."""
        return await self.db.execute("DELETE FROM revoked_sessions WHERE expires < ?", now)


@dataclass(frozen=True)
class Session:
    """An issued session: the token the client keeps, and the id, user and expiry it stands for."""

    token: str
    jti: str
    username: str
    expires: float


class SessionSigner:
    """Issues and checks session tokens, signed with the pool secret, valid `ttl` seconds."""

    def __init__(self, secret: bytes, ttl: int):
        self._secret = secret
        self.ttl = ttl

    @property
    def secret(self) -> bytes:
        """The pool secret; tickets (auth/tickets.py) are signed with it too."""
        return self._secret

    def issue(self, username: str) -> Session:
        now = int(time.time())
        jti = str(uuid.uuid4())
        claims = {"typ": "session", "sub": username, "jti": jti, "iat": now, "exp": now + self.ttl}
        token = jwt.encode(claims, self._secret, algorithm=ALGORITHM)
        return Session(token, jti, username, float(claims["exp"]))

    def verify(self, token: str) -> Session:
        """The session a token stands for; SESSION_INVALID if forged, malformed or expired."""
        claims = decode(
            token,
            self._secret,
            "session",
            ("sub", "jti"),
            expired="the session has expired",
            invalid="the session id is not valid",
        )
        return Session(token, str(claims["jti"]), claims["sub"], float(claims["exp"]))


def decode(
    token: str, secret: bytes, typ: str, strings: tuple[str, ...], *, expired: str, invalid: str
) -> dict:
    """The claims of an HS256 token of type `typ` whose `strings` claims are strings;
    SESSION_INVALID (with `expired` or `invalid` as message) otherwise."""
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"require": ["exp", "iat", "typ", *strings]},
        )
    except jwt.ExpiredSignatureError:
        raise ApiError("SESSION_INVALID", expired) from None
    except jwt.InvalidTokenError:
        raise ApiError("SESSION_INVALID", invalid) from None
    if claims["typ"] != typ or not all(isinstance(claims[k], str) for k in strings):
        raise ApiError("SESSION_INVALID", invalid)
    return claims
