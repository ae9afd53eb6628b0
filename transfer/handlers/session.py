"""Login and logout: POST/GET/DELETE /session; GET /health and GET /ready."""

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
    """Liveness: 200 while the event loop answers. It touches nothing else, so a load
    balancer's probe stays fast under load and a slow database does not get the process
    restarted; `GET /ready` says whether this host can serve."""
    return json_response({"status": "ok", "host": services(request).hosts.uuid})


@public
async def ready(request: web.Request) -> web.Response:
    """Readiness: 200 when the database answers, every SR this host serves is mounted
    (its marker names it) and the server is not shutting down; else 503 with the reasons."""
    svc = services(request)
    problems: list[str] = []
    if svc.tasks.shutting_down:
        problems.append("the server is shutting down")
    try:
        await svc.db.fetchone("SELECT 1 AS ok")
        unreachable = await svc.srs.unreachable()
    except Exception as exc:
        problems.append(f"the database does not answer: {exc}")
    else:
        problems += [f"SR {sr['uuid']} is not mounted at {sr['path']}" for sr in unreachable]
    body = {"status": "unavailable" if problems else "ready", "host": svc.hosts.uuid}
    if problems:
        body["reasons"] = problems
    return json_response(body, status=503 if problems else 200)


@public
async def login(request: web.Request) -> web.Response:
    """JSON {username, password}, or else Basic auth -> a session id (also set as a
    cookie). A body, if any, must be JSON; the credentials it carries are the ones used."""
    svc = services(request)
    body = await read_json(request)
    basic = request.headers.get("Authorization", "").lower().startswith("basic ")
    if basic and not body:
        principal = await svc.auth.authenticate(request)
    else:
        username, password = body.get("username"), body.get("password")
        if not isinstance(username, str) or not isinstance(password, str):
            raise ApiError(
                "SESSION_AUTHENTICATION_FAILED",
                "give Basic auth or a JSON body with username and password",
            )
        principal = await svc.auth.check_password(username, password, request.remote)
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
