"""Tickets: what a redirect to another host of the pool carries in place of credentials.

A client that authenticated to host A with Basic auth or a cookie does not send either to
host B when it follows a redirect (curl drops credentials on a host change; cookies are
per host). So host A adds `ticket=<JWT>` to the redirect: signed with the pool secret,
valid for about a minute, and bound to one user, one operation and one VDI (or SR), so a
leaked ticket opens nothing else. Host B checks it like a session, then checks that the
request is the operation on the object the ticket names.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import jwt

from auth.sessions import ALGORITHM, decode

TICKET_TTL = 60  # seconds: long enough to follow a redirect, short enough not to matter


@dataclass(frozen=True)
class Ticket:
    """What a valid ticket opens: one operation of one user on one VDI or SR, until `expires`."""

    username: str
    operation: str  # "import", "export", "extents", "snapshot", ...
    target: str  # the uuid of the VDI (or SR, for a create) it opens
    expires: float
    session: str | None  # the session it was issued under: a logout ends the ticket too


class TicketSigner:
    """Issues tickets signed with the pool secret, valid for `ttl` seconds, and checks them."""

    def __init__(self, secret: bytes, ttl: int = TICKET_TTL):
        self._secret = secret
        self.ttl = ttl

    def issue(
        self,
        username: str,
        operation: str,
        target: str,
        session: str | None = None,
        not_after: float | None = None,
    ) -> str:
        """A ticket for `ttl` seconds, or until `not_after` if sooner: a ticket handed on
        for a ticket (a redirect of a redirected request) never outlives the one presented,
        else one ticket could be stretched forever."""
        now = int(time.time())
        expires = now + self.ttl
        if not_after is not None:
            expires = min(expires, int(not_after))
        claims: dict[str, object] = {
            "typ": "ticket",
            "sub": username,
            "op": operation,
            "obj": target,
            "jti": str(uuid.uuid4()),
            "iat": now,
            "exp": expires,
        }
        if session is not None:
            claims["sid"] = session
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def verify(self, token: str) -> Ticket:
        """The ticket a token stands for; SESSION_INVALID if forged, malformed or expired."""
        claims = decode(
            token,
            self._secret,
            "ticket",
            ("sub", "op", "obj"),
            expired="the ticket has expired: ask the first host again",
            invalid="the ticket is not valid",
        )
        sid = claims.get("sid")
        return Ticket(
            claims["sub"],
            claims["op"],
            claims["obj"],
            float(claims["exp"]),
            sid if isinstance(sid, str) else None,
        )
