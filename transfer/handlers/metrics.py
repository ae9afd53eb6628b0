"""GET /metrics: the Prometheus text format, for a scraper that holds no credentials (the
series carry no VDI uuid, user or task name: see transfer/metrics.py)."""

from __future__ import annotations

from aiohttp import web

from auth.middleware import public
from transfer.services import services


@public
async def metrics(request: web.Request) -> web.Response:
    """This host's series, rendered at scrape time."""
    body, content_type = services(request).metrics.render(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})
