"""Login and logout: POST/GET/DELETE /session, and GET /health."""

from __future__ import annotations

import contextlib
import time

from aiohttp import web

from auth.middleware import PRINCIPAL, public, requires, session_token
from common.errors import ApiError
from common.logfields import LOG_FIELDS
from transfer.handlers.common import json_response, read_json
from transfer.ids import iso
from transfer.services import services


@public
async def health(request: web.Request) -> web.Response:
    """For load balancers: 200 while this host can reach its database, else 503."""
    svc = services(request)
    try:
        await svc.db.fetchone("SELECT 1 AS ok")
    except Exception as exc:
        return json_response({"status": "unavailable", "reason": str(exc)}, status=503)
    return json_response({"status": "ok", "host": svc.hosts.uuid})


@public
async def login(request: web.Request) -> web.Response:
    """Basic auth or JSON {username, password} -> a session id (also set as a cookie)."""
    svc = services(request)
    if request.headers.get("Authorization", "").lower().startswith("basic "):
        principal = await svc.auth.authenticate(request)
    else:
        body = await read_json(request)
        username, password = body.get("username"), body.get("password")
        if not isinstance(username, str) or not isinstance(password, str):
            raise ApiError(
                "SESSION_AUTHENTICATION_FAILED",
                "give Basic auth or a JSON body with username and password",
            )
        principal = await svc.auth.check_password(username, password)
    request[LOG_FIELDS]["user"] = principal.username
    session = svc.auth.signer.issue(principal.username)
    response = json_response(
        {
            "session_id": session.token,
            "expires_at": iso(session.expires),
            "username": principal.username,
            "role": principal.role,
        }
    )
    response.set_cookie(
        "session_id",
        session.token,
        max_age=int(session.expires - time.time()),
        path="/",
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )
    return response


@requires("reader")
async def whoami(request: web.Request) -> web.Response:
    """GET /session: the caller's user name, role, and how they authenticated."""
    principal = request[PRINCIPAL]
    return json_response(
        {"username": principal.username, "role": principal.role, "via": principal.via}
    )


@requires("reader")
async def logout(request: web.Request) -> web.Response:
    """Revoke the session this request used (and the cookie's, if it carries one)."""
    svc = services(request)
    principal = request[PRINCIPAL]
    tokens = set()
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        tokens.add(header[7:].strip())
    if token := session_token(request):
        tokens.add(token)
    for token in tokens:
        # An already invalid cookie next to a valid credential: nothing to revoke there.
        with contextlib.suppress(ApiError):
            await svc.auth.revoke(token)
    if principal.via != "session" and not tokens:
        raise ApiError("SESSION_INVALID", "this request used no session to log out of")
    response = web.Response(status=204)
    response.del_cookie("session_id", path="/")
    return response
