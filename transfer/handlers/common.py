"""Helpers every handler uses: JSON in and out."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from common.errors import ApiError, bad_request


def json_response(data: Any, status: int = 200, **kwargs: Any) -> web.Response:
    """A JSON answer; `kwargs` (headers, ...) go to web.Response."""
    return web.Response(
        text=json.dumps(data), status=status, content_type="application/json", **kwargs
    )


async def read_json(request: web.Request) -> dict:
    """The request's JSON object body, all of it (it may arrive in several TCP segments) up
    to the app's client_max_size (`max_json_body`) bytes. A non-empty body must say it is
    JSON (`application/json`, or a `+json` type): a browser cannot send that cross-site
    without asking first (a CORS preflight, which this server never grants), so a page
    elsewhere cannot make a logged-in browser post forms here. An empty body is an empty object."""
    limit = request.client_max_size
    declared = request.content_length
    if declared is not None and declared > limit:
        raise _too_large(limit)
    raw = bytearray()
    while True:
        chunk = await request.content.read(limit + 1 - len(raw))
        if not chunk:
            break
        raw += chunk
        if len(raw) > limit:
            raise _too_large(limit)
    if not raw.strip():
        return {}
    ctype = request.content_type
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise ApiError(
            "UNSUPPORTED_MEDIA_TYPE",
            f"a JSON body needs Content-Type: application/json, not {ctype} "
            "(curl: --json '{...}' or -H 'Content-Type: application/json')",
            ctype,
        )
    try:
        data = json.loads(raw)
    except RecursionError:
        raise bad_request("the JSON body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object")
    return data


def _too_large(limit: int) -> ApiError:
    return ApiError(
        "BAD_REQUEST", f"the JSON body is larger than {limit} bytes (max_json_body)", status=413
    )


def choose_format(value: str | None, known: tuple[str, ...], doing: str) -> str:
    """The `format=` parameter, case-insensitive, raw by default; FORMAT_UNSUPPORTED (415)
    for a format the service cannot do this with."""
    fmt = (value or "raw").lower()
    if fmt not in known:
        raise ApiError(
            "FORMAT_UNSUPPORTED",
            f"unknown {doing} format {value!r}; use one of {', '.join(known)}",
            value,
        )
    return fmt


def field(data: dict, name: str, kind: type, default: Any = ..., *, required: bool = False) -> Any:
    """A typed field of a JSON body; BAD_REQUEST naming the field if absent or mistyped."""
    if name not in data or data[name] is None:
        if required or default is ...:
            raise bad_request(f"{name!r} is required", name)
        return default
    value = data[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise bad_request(f"{name!r} must be a {kind.__name__}", name)
    return value
