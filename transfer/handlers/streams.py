"""The request body and the response as the import and export operations see them: the
aiohttp specifics of moving bytes (payload errors, interim responses, idle sockets for
sendfile) stay here, at the edge."""

from __future__ import annotations

import asyncio
import os

from aiohttp import StreamReader, http_exceptions, web


class RequestBody:
    """A request's body for transfer.imports.Body: aiohttp's errors for a body cut short
    (Content-Length or chunked encoding unmet) become ConnectionResetError, the one way the
    operation learns the client went away."""

    def __init__(self, content: StreamReader):
        self._content = content

    async def readany(self) -> bytes:
        """The next piece the connection delivered, as it was delivered: aiohttp's own
        readany() joins all pieces waiting into one new bytes, a copy of every byte that the
        server spent a third of its time on under concurrent uploads (perf)."""
        try:
            while True:
                data, end_of_http_chunk = await self._content.readchunk()
                if data or not end_of_http_chunk:  # (b"", False) is the end of the body
                    return data
        except http_exceptions.HttpProcessingError as exc:
            raise ConnectionResetError(str(exc)) from exc

    async def read(self, n: int) -> bytes:
        try:
            return await self._content.read(n)
        except http_exceptions.HttpProcessingError as exc:
            raise ConnectionResetError(str(exc)) from exc


async def send_interim(request: web.Request, status: str, headers: dict[str, str]) -> None:
    """An informational response (100 Continue, 104) before the final one."""
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    await request.writer.write(f"HTTP/1.1 {status}\r\n{lines}\r\n".encode())


class ResponseSink:
    """A prepared-on-demand streaming response for transfer.exports.Sink."""

    def __init__(self, request: web.Request, response: web.StreamResponse):
        self.request = request
        self.response = response

    async def begin(self) -> None:
        await self.response.prepare(self.request)

    async def write(self, data: bytes | memoryview) -> None:
        await self.response.write(data)

    async def socket(self) -> int | None:
        """A duplicate of the connection's socket fd, once everything aiohttp queued on it
        (the headers) is out; None where sendfile cannot be used (TLS, no real socket)."""
        transport = self.request.transport
        if transport is None or transport.get_extra_info("sslcontext") is not None:
            return None
        sock = transport.get_extra_info("socket")
        if sock is None:
            return None
        for _ in range(1000):
            if transport.get_write_buffer_size() == 0:
                # A duplicate, owned by the caller: if the peer goes away the event loop
                # closes its fd, and that number may at once belong to another client's
                # connection. Writing through our own fd can only ever reach this one.
                return os.dup(sock.fileno())
            await asyncio.sleep(0.005)
        return None  # the client does not even take the headers: let the slow path wait
