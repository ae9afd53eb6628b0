"""Connections as an operator bounds them, below the handlers: aiohttp's request handler
(one per connection) with a header timeout, an idle timeout between requests, and 431 for
oversized headers. aiohttp waits for a request's headers for ever, so a client sending
one header byte a minute (or nothing) would hold a connection and its memory as long as
it liked. While a request runs, its handler bounds the body (transfer.limits.Pace)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from common.logfields import event
from transfer.handlers.common import json_response

CHECK = 1.0  # seconds between looks at a connection

log = logging.getLogger("vdi_transfer.http")


@dataclass(frozen=True)
class ConnectionLimits:
    """0 turns a limit off."""

    header_timeout: float = 0.0  # seconds from a request's first byte to its last header
    idle_timeout: float = 0.0  # seconds a connection between requests may send nothing


def _headers_too_large(exc: BaseException | None) -> bool:
    return isinstance(exc, LineTooLong) or (
        isinstance(exc, BadHttpMessage) and "too many headers" in str(exc).lower()
    )


class GuardedRequestHandler(RequestHandler):
    """aiohttp's handler of one connection, plus the limits (see the module)."""

    limits = ConnectionLimits()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._last_byte = now
        self._headers_since: float | None = now  # a new connection owes its first request
        self._check: asyncio.TimerHandle | None = loop.call_later(CHECK, self._look)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._check is not None:
            self._check.cancel()
            self._check = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        now = asyncio.get_running_loop().time()
        self._last_byte = now
        if self._headers_since is None and not self._busy():
            self._headers_since = now  # the next request begins
        super().data_received(data)
        if self._busy():
            self._headers_since = None  # its headers are all in

    def _busy(self) -> bool:
        """A request is parsed and waiting, or being handled."""
        return bool(self._messages) or self._current_request is not None

    def _look(self) -> None:
        self._check = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        limits = self.limits
        if not self._busy():
            since = self._headers_since
            if limits.header_timeout and since is not None and now - since > limits.header_timeout:
                self._cut(transport, "header_timeout", limits.header_timeout, answer=True)
                return
            if limits.idle_timeout and now - self._last_byte > limits.idle_timeout:
                self._cut(transport, "idle_timeout", limits.idle_timeout, answer=False)
                return
        self._check = loop.call_later(CHECK, self._look)

    def _cut(self, transport: asyncio.BaseTransport, why: str, limit: float, answer: bool) -> None:
        peer = transport.get_extra_info("peername")
        remote = peer[0] if isinstance(peer, tuple) else None
        event(log, "http.connection_closed", reason=why, limit=limit, remote=remote)
        if answer and hasattr(transport, "write"):  # (uvloop's is no asyncio.WriteTransport)
            body = (
                b'{"error": "REQUEST_TIMEOUT", "message": "the request\'s headers did not '
                b'arrive in time", "params": []}'
            )
            transport.write(  # type: ignore[attr-defined]
                b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
        transport.close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Headers beyond max_header_size: 431, in the API's JSON shape (aiohttp says 400)."""
        if status == 400 and _headers_too_large(exc):
            response = json_response(
                {
                    "error": "HEADERS_TOO_LARGE",
                    "message": f"the request's headers are too large: {exc}",
                    "params": [],
                },
                status=431,
            )
            response.force_close()
            return response
        return super().handle_error(request, status, exc, message)


class GuardedServer(Server):
    """aiohttp's Server making GuardedRequestHandlers."""

    limits = ConnectionLimits()

    def __call__(self) -> RequestHandler:
        handler = GuardedRequestHandler(self, loop=self._loop, **self._kwargs)
        handler.limits = self.limits
        return handler


class GuardedAppRunner(web.AppRunner):
    """An AppRunner whose connections are guarded by `limits`."""

    def __init__(self, app: web.Application, limits: ConnectionLimits, **kwargs):
        super().__init__(app, **kwargs)
        self.limits = limits

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = GuardedServer  # the same object, making guarded handlers
        server.limits = self.limits  # type: ignore[attr-defined]
        return server
