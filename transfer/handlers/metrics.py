"""What needs no credentials to describe the service: GET /metrics, the Prometheus text
format (the series carry no VDI uuid, user or task name: see transfer/metrics.py), and
GET /openapi.json, the API's description."""

from __future__ import annotations

from aiohttp import web

from auth.middleware import public
from transfer.handlers.common import json_response
from transfer.openapi import document
from transfer.services import services


@public
async def metrics(request: web.Request) -> web.Response:
    """This host's series, rendered at scrape time."""
    body, content_type = services(request).metrics.render(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


@public
async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 description of this API (transfer/openapi.py)."""
    return json_response(document())
