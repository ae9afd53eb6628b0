"""Who is calling, and may they? The authentication middleware and per-handler role marks.

Credentials are looked for in this order: the Authorization header (Basic or Bearer), a
`ticket` query parameter (on handlers that accept one: see auth/tickets.py), the
`session_id` query parameter, the `session_id` cookie. The first one present decides: a bad
one is not silently replaced by a later one. Handlers declare the role they need with
`@requires(role)`, or `@public`; an undeclared handler needs admin, so forgetting is safe.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import os
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from auth.passwords import DUMMY_HASH, HASHING, verify_password
from auth.roles import allows
from auth.sessions import RevokedSessions, SessionSigner
from auth.throttle import Locked, LoginThrottle
from auth.tickets import Ticket, TicketSigner
from auth.users import UserStore
from common.errors import ApiError
from common.logfields import LOG_FIELDS, event

log = logging.getLogger("vdi_transfer.auth")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REALM = 'Basic realm="vdi-transfer"'


@dataclass(frozen=True)
class Principal:
    """Who a request comes from, with which role, and how they proved it."""

    username: str
    role: str
    via: str  # "basic" | "session" | "ticket"
    session_jti: str | None = None
    ticket: Ticket | None = None  # via a ticket: the one operation on one object it opens


PRINCIPAL = web.RequestKey("principal", Principal)


def requires(role: str) -> Callable[[Handler], Handler]:
    """Mark a handler as needing `role`, or a role above it (auth/roles.py)."""

    def mark(handler: Handler) -> Handler:
        handler.required_role = role  # type: ignore[attr-defined]
        return handler

    return mark


def accepts_ticket(operation: str) -> Callable[[Handler], Handler]:
    """The handler may be reached through a redirect to this host, with a ticket for
    `operation`; the handler itself checks that the ticket names its VDI or SR."""

    def mark(handler: Handler) -> Handler:
        handler.ticket_operation = operation  # type: ignore[attr-defined]
        return handler

    return mark


def public(handler: Handler) -> Handler:
    """Mark a handler as open to anyone, without credentials."""
    handler.required_role = None  # type: ignore[attr-defined]
    return handler


class _VerifiedCache:
    """Remembers recent successful Basic logins so each request does not pay for scrypt.

    Keyed by user; holds a keyed digest of the password (never the password) and the stored
    hash it was checked against, so a password change anywhere in the pool invalidates it.
    """

    def __init__(self, size: int = 1024, ttl: float = 300.0):
        self._key = os.urandom(32)
        self._entries: OrderedDict[str, tuple[bytes, str, float]] = OrderedDict()
        self._size = size
        self._ttl = ttl

    def _digest(self, username: str, password: str) -> bytes:
        return hmac.new(self._key, f"{username}\0{password}".encode(), hashlib.sha256).digest()

    def hit(self, username: str, password: str, stored_hash: str) -> bool:
        entry = self._entries.get(username)
        if entry is None or entry[2] < time.monotonic() or entry[1] != stored_hash:
            return False
        return hmac.compare_digest(entry[0], self._digest(username, password))

    def add(self, username: str, password: str, stored_hash: str) -> None:
        self._entries[username] = (
            self._digest(username, password),
            stored_hash,
            time.monotonic() + self._ttl,
        )
        self._entries.move_to_end(username)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


class Authenticator:
    """Turns a request's credentials (Basic, Bearer, ticket or session id) into a Principal."""

    def __init__(self, revoked: RevokedSessions, users: UserStore, signer: SessionSigner):
        self.revoked = revoked
        self.users = users
        self.signer = signer
        self.tickets = TicketSigner(signer.secret)
        self._cache = _VerifiedCache()
        self.throttle = LoginThrottle()

    async def check_password(
        self, username: str, password: str, address: str | None = None
    ) -> Principal:
        """SESSION_AUTHENTICATION_FAILED unless the user exists and the password matches;
        TOO_MANY_ATTEMPTS (429) while the user name or the client `address` is throttled
        (auth/throttle.py), unless these very credentials were verified recently."""
        user = await self.users.get(username)
        stored = user["password_hash"] if user else DUMMY_HASH
        if user and self._cache.hit(username, password, stored):
            return Principal(username, user["role"], "basic")
        try:
            self.throttle.check(username, address)
        except Locked as locked:
            event(
                log,
                "auth.throttled",
                logging.WARNING,
                user=username,
                remote=address,
                by=locked.kind,
                retry_after=locked.retry_after,
            )
            raise ApiError(
                "TOO_MANY_ATTEMPTS",
                f"too many failed logins for this {locked.kind}: try again in "
                f"{locked.retry_after} s",
                locked.retry_after,
                headers={"Retry-After": str(locked.retry_after)},
            ) from None
        loop = asyncio.get_running_loop()
        # In HASHING, never in the pool that moves disk bytes: a flood of logins waits for
        # that one thread (and the throttle) instead of stalling every transfer.
        ok = await loop.run_in_executor(HASHING, verify_password, password, stored)
        if not (ok and user):
            self.throttle.failed(username, address)
            event(log, "auth.failed", logging.WARNING, user=username, remote=address)
            raise ApiError("SESSION_AUTHENTICATION_FAILED", "wrong user name or password", username)
        self.throttle.succeeded(username, address)
        self._cache.add(username, password, stored)
        return Principal(username, user["role"], "basic")

    async def check_session(self, token: str) -> Principal:
        session = self.signer.verify(token)
        if await self.revoked.contains(session.jti):
            raise ApiError("SESSION_INVALID", "the session has been logged out")
        user = await self.users.get(session.username)
        if user is None:
            raise ApiError("SESSION_INVALID", "the session's user no longer exists")
        return Principal(session.username, user["role"], "session", session.jti)

    async def revoke(self, token: str) -> None:
        session = self.signer.verify(token)
        await self.revoked.add(session.jti, session.expires)

    async def check_ticket(self, token: str, operation: str | None) -> Principal:
        ticket = self.tickets.verify(token)
        if operation is None:
            raise ApiError("SESSION_INVALID", "a ticket opens only the request it was issued for")
        if ticket.operation != operation:
            raise ApiError(
                "SESSION_INVALID", f"the ticket was issued for {ticket.operation}, not {operation}"
            )
        if ticket.session and await self.revoked.contains(ticket.session):
            raise ApiError("SESSION_INVALID", "the session of this ticket has been logged out")
        user = await self.users.get(ticket.username)
        if user is None:
            raise ApiError("SESSION_INVALID", "the ticket's user no longer exists")
        return Principal(
            ticket.username, user["role"], "ticket", session_jti=ticket.session, ticket=ticket
        )

    async def authenticate(
        self, request: web.Request, ticket_operation: str | None = None
    ) -> Principal:
        header = request.headers.get("Authorization")
        if header:
            scheme, _, value = header.partition(" ")
            scheme = scheme.lower()
            if scheme == "basic":
                username, password = _parse_basic(value.strip())
                return await self.check_password(username, password, request.remote)
            if scheme == "bearer" and value.strip():
                return await self.check_session(value.strip())
            raise ApiError(
                "SESSION_INVALID", "unsupported Authorization scheme; use Basic or Bearer"
            )
        ticket = request.query.get("ticket")
        if ticket:
            return await self.check_ticket(ticket, ticket_operation)
        token = session_token(request)
        if token:
            return await self.check_session(token)
        raise ApiError("SESSION_INVALID", "authentication required: Basic auth or a session_id")


def session_token(request: web.Request) -> str | None:
    """The session id the request carries outside the Authorization header, if any."""
    return request.query.get("session_id") or request.cookies.get("session_id") or None


def _parse_basic(value: str) -> tuple[str, str]:
    try:
        decoded = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise ApiError("SESSION_AUTHENTICATION_FAILED", "malformed Basic credentials") from None
    username, sep, password = decoded.partition(":")
    if not sep:
        raise ApiError("SESSION_AUTHENTICATION_FAILED", "malformed Basic credentials")
    return username, password


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _cookie_authenticated(request: web.Request) -> bool:
    """The request's credential is the session cookie: the one a browser adds by itself,
    whichever site made it send the request."""
    return (
        "Authorization" not in request.headers
        and not request.query.get("ticket")
        and not request.query.get("session_id")
        and bool(request.cookies.get("session_id"))
    )


def _refuse_cross_site(request: web.Request) -> None:
    """A write that carries the session cookie must come from this server's own pages:
    refused if the browser says it is cross-site (Sec-Fetch-Site) or names another origin
    (Origin). SameSite=Strict alone does not cover another port or a sibling host."""
    fetch_site = request.headers.get("Sec-Fetch-Site", "").strip().lower()
    origin = request.headers.get("Origin")
    why = None
    if fetch_site == "cross-site":
        why = "the browser says it is cross-site (Sec-Fetch-Site: cross-site)"
    elif origin is not None and not _same_origin(origin, request):
        why = f"it comes from {origin}, not from this server"
    if why:
        raise ApiError(
            "PERMISSION_DENIED",
            f"a {request.method} with the session cookie is refused: {why}. Clients that are "
            "not this server's pages send the session as Authorization: Bearer",
            "cross-site",
        )


def _same_origin(origin: str, request: web.Request) -> bool:
    """`origin` names the host and port this request was sent to (the scheme may differ
    behind a TLS-terminating proxy)."""
    parsed = urllib.parse.urlsplit(origin.strip())
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return False  # "null" (sandboxed frames, file: pages) and anything odd
    try:
        origin_port = parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError:
        return False
    target = urllib.parse.urlsplit(f"//{request.host}")
    if (target.hostname or "").lower() != parsed.hostname.lower():
        return False
    try:
        target_port = target.port
    except ValueError:
        return False
    if target_port is None:  # Host without a port: the scheme's default, http or https
        return origin_port in (80, 443)
    return origin_port == target_port


def middleware(authenticator_of: Callable[[web.Request], Authenticator]):
    """The middleware; `authenticator_of` finds the Authenticator for a request's app."""

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.match_info.http_exception is not None:
            return await handler(request)  # no such route or method: say so, whoever asks
        required = getattr(request.match_info.handler, "required_role", "admin")
        if required is None:
            return await handler(request)
        principal = await authenticator_of(request).authenticate(
            request, getattr(request.match_info.handler, "ticket_operation", None)
        )
        if request.method not in SAFE_METHODS and _cookie_authenticated(request):
            _refuse_cross_site(request)
        request[PRINCIPAL] = principal
        request[LOG_FIELDS]["user"] = principal.username
        if not allows(principal.role, required):
            raise ApiError(
                "PERMISSION_DENIED",
                f"this needs the {required} role; user {principal.username!r} is {principal.role}",
                required,
            )
        return await handler(request)

    return authenticate
