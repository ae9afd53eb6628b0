"""XenAPI over HTTP: JSON-RPC at POST /jsonrpc, XML-RPC at POST /, /RPC2 and /xmlrpc.

Credentials travel inside the calls (a session reference as first parameter), so these
routes are public to the HTTP middleware. Every answer is XAPI's envelope with status 200,
whatever happened, as XAPI answers: a body that is no call at all gets the protocol's own
fault, and a bug gets INTERNAL_ERROR, never an HTML 500 page.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from aiohttp import web

from auth.middleware import public
from common.logfields import LOG_FIELDS, event
from transfer.rpc import api as _methods  # noqa: F401  (registers the methods)
from transfer.rpc import wire
from transfer.rpc.dispatch import Context, XapiError, dispatch
from transfer.services import services

log = logging.getLogger("vdi_transfer.rpc")

XML = "text/xml"
JSON = "application/json"  # exactly: the xen-api npm transport compares it


async def _body(request: web.Request) -> bytes | None:
    """The whole body, or None if it is larger than an RPC request may be."""
    if request.content_length is not None and request.content_length > wire.MAX_BODY:
        return None
    raw = bytearray()
    while chunk := await request.content.read(wire.MAX_BODY + 1 - len(raw)):
        raw += chunk
        if len(raw) > wire.MAX_BODY:
            return None
    return bytes(raw)


async def _answer(
    request: web.Request,
    call: wire.Call,
    success: Callable[[object], bytes],
    failure: Callable[[list[str]], bytes],
) -> bytes:
    """Run the call; its success or failure in the caller's envelope."""
    ctx = Context(services(request), request.remote)
    started = time.monotonic()
    fields = request[LOG_FIELDS]
    fields["rpc"] = call.method
    try:
        result = await dispatch(ctx, call)
    except XapiError as exc:
        fields["error"] = exc.description[0]
        return failure(exc.description)
    except Exception:
        log.exception("XenAPI call failed", extra={"fields": {"method": call.method}})
        return failure(["INTERNAL_ERROR", f"{call.method} failed; see the server log"])
    finally:
        if ctx.principal is not None:
            fields["user"] = ctx.principal.username
    if time.monotonic() - started > 5 and call.method not in ("event.from", "event_from"):
        event(log, "rpc.slow", logging.WARNING, method=call.method)
    return success(result)


@public
async def xmlrpc(request: web.Request) -> web.Response:
    """XML-RPC: XAPI's {Status, Value | ErrorDescription} struct in a methodResponse."""
    return await _serve(
        request,
        XML,
        wire.decode_xml,
        wire.xml_fault,
        lambda call: (wire.xml_success, wire.xml_failure),
    )


@public
async def jsonrpc(request: web.Request) -> web.Response:
    """JSON-RPC 2.0 (and 1.0): XAPI's error object {code: 1, message: CODE, data}."""
    return await _serve(
        request,
        JSON,
        wire.decode_json,
        wire.json_fault,
        lambda call: (
            lambda value: wire.json_success(call, value),
            lambda description: wire.json_failure(call, description),
        ),
    )


async def _serve(
    request: web.Request,
    content_type: str,
    decode: Callable[[bytes], wire.Call],
    fault: Callable[[int, str], bytes],
    envelopes: Callable[
        [wire.Call], tuple[Callable[[object], bytes], Callable[[list[str]], bytes]]
    ],
) -> web.Response:
    """Read, decode, run and answer one call in one protocol's forms."""
    body = await _body(request)
    if body is None:
        answer = fault(-32600, f"the request is larger than {wire.MAX_BODY} bytes")
        return web.Response(body=answer, status=413, content_type=content_type)
    try:
        call = decode(body)
    except wire.MalformedCall as exc:
        return web.Response(body=fault(exc.code, exc.message), content_type=content_type)
    answer = await _answer(request, call, *envelopes(call))
    return web.Response(body=answer, content_type=content_type)
