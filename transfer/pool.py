"""Which host serves a request, and how a client that asked another host gets there.

A VDI on an SR local to one host can only be read and written by that host; any other
host answers its requests with a redirect to the owner's advertise URL: same path, the
full query, plus a `ticket` that stands in for the credentials the client will not resend
(auth/tickets.py). An owner without a recent heartbeat gets HOST_OFFLINE (503) instead:
following a redirect to a dead host would only time out. Shared SRs are served by whichever
host the client reached.
"""

from __future__ import annotations

from urllib.parse import urlencode

from aiohttp import web

from auth.middleware import PRINCIPAL
from common.errors import ApiError
from common.logfields import LOG_FIELDS
from transfer.services import services

# Parameters a client may send as cookies (XAPI reads both). Cookies do not travel to
# another host, so a redirect carries them over into its query.
COOKIE_PARAMS = ("vdi", "sr", "format", "chunked", "task_id", "base", "virtual_size", "name_label")


class Redirect(Exception):
    """Answer with a redirect to the host that serves the request."""

    def __init__(self, location: str, host: str, status: int = 302):
        super().__init__(location)
        self.location = location
        self.host = host
        self.status = status


async def route(request: web.Request, operation: str, target: str, owner: str | None) -> None:
    """Return if this host serves `operation` on `target` (a VDI or SR uuid); else raise a
    Redirect to `owner`, or HOST_OFFLINE if it is down. A request that came in with a ticket
    must be the operation on the object the ticket was issued for."""
    svc = services(request)
    principal = request[PRINCIPAL]
    if principal.ticket is not None and principal.ticket.target != target:
        raise ApiError("SESSION_INVALID", f"the ticket was not issued for {target}", target)
    if owner is None or owner == svc.hosts.uuid:
        return
    host = await svc.hosts.get_or_none(owner)
    if host is None or not svc.hosts.is_live(host):
        name = host["name_label"] if host else owner
        retry = max(1, svc.hosts.heartbeat_interval)
        request[LOG_FIELDS]["host"] = owner
        raise ApiError(
            "HOST_OFFLINE",
            f"host {name} ({owner}), which holds {target}, is not answering its heartbeat; "
            f"retry in {retry} s",
            owner,
            headers={"Retry-After": str(retry)},
        )
    presented = principal.ticket
    ticket = svc.auth.tickets.issue(
        principal.username,
        operation,
        target,
        principal.session_jti,
        not_after=presented.expires if presented is not None else None,
    )
    base = host["address"].rstrip("/")
    location = f"{base}{request.rel_url.raw_path}?{_query(request, ticket)}"
    request[LOG_FIELDS]["redirect"] = owner
    # 302, as the contract says, whatever the method: curl -L keeps GET, HEAD, PUT and
    # DELETE across it, and POST with -X POST or --post302 (README, "Pools").
    raise Redirect(location, owner)


def _query(request: web.Request, ticket: str) -> str:
    pairs = [(k, v) for k, v in request.query.items() if k != "ticket"]
    for name in COOKIE_PARAMS:
        if name not in request.query and name in request.cookies:
            pairs.append((name, request.cookies[name]))
    pairs.append(("ticket", ticket))
    return urlencode(pairs)


def redirect_response(request: web.Request, redirect: Redirect) -> web.Response:
    """The redirect as it leaves: Location, and a small JSON body saying where and why."""
    response = web.json_response(
        {"redirect": redirect.location.split("?", 1)[0], "host": redirect.host},
        status=redirect.status,
        headers={"Location": redirect.location, "Cache-Control": "no-store"},
    )
    if request.method in ("PUT", "PATCH", "POST") and not request.content.at_eof():
        response.force_close()  # the body was for the other host: do not read it here
    return response
