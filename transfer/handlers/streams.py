"""The request body and the response as the import and export operations see them: the
aiohttp specifics of moving bytes (payload errors, interim responses, idle sockets for
sendfile) stay here, at the edge."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable

from aiohttp import StreamReader, http_exceptions, web

from transfer.limits import Pace, Stalled

DIRECT_READ = 1 << 20  # bytes asked of the socket at a time on the direct path
PACE_CHECK = 1.0  # seconds between looks at whether a body's client stalled
TAKEN = web.RequestKey("body_taken", bool)  # read past aiohttp: close after answering


class RequestBody:
    """A request's body for transfer.imports.Body: aiohttp's errors for a body cut short
    (Content-Length or chunked encoding unmet) become ConnectionResetError, the one way the
    operation learns the client went away.

    `take_over()`, called before the client is told to send, moves a plain-TCP
    Content-Length body off aiohttp's parser: the bytes are then received straight from the
    socket into the bytes objects the pipeline writes, one copy (the kernel's) instead of
    three (into uvloop's buffer, out of it, out of the parser), which under eight concurrent
    uploads was most of the event loop's time. The connection closes after the answer,
    since aiohttp's parser never saw the body."""

    def __init__(
        self,
        request: web.BaseRequest,
        on_bytes: Callable[[int], None] | None = None,
        pace: Pace | None = None,
    ):
        self._request = request
        self._pace = pace  # a client that sends no byte, or too few, is cut (Stalled)
        self._content: StreamReader = request.content
        self._sock: socket.socket | None = None
        self._left = 0  # body bytes still to come on the direct path
        self.received = 0  # body bytes this request delivered (the access log's bytes_in)
        self._on_bytes = on_bytes  # told of each piece as it arrives (metrics)
        self._watch: asyncio.TimerHandle | None = None
        self._stalled: Stalled | None = None

    def _count(self, data: bytes) -> bytes:
        self.received += len(data)
        if self._on_bytes is not None and data:
            self._on_bytes(len(data))
        if self._pace is not None:
            self._pace.moved(len(data))
        return data

    async def _paced(self, receive: Callable[[], Awaitable[bytes]]) -> bytes:
        """The next bytes; Stalled once the pace's limits are crossed. A timer looks at the
        pace once a second and wakes a waiting read with the error: a timeout around every
        read would cost more than the read (6 us each, 30 000 reads a second)."""
        if self._pace is not None and self._watch is None and self._stalled is None:
            self._watch = asyncio.get_running_loop().call_later(PACE_CHECK, self._look)
        if self._stalled is not None:
            raise self._stalled
        return self._count(await receive())

    def _look(self) -> None:
        assert self._pace is not None
        try:
            self._pace.check()
        except Stalled as exc:
            self._stalled, self._watch = exc, None
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RD)  # the waiting receive sees the end
            else:
                self._content.set_exception(exc)
            return
        self._watch = asyncio.get_running_loop().call_later(PACE_CHECK, self._look)

    def take_over(self) -> bool:
        """Read the rest of the body from the socket if nothing of it reached aiohttp yet,
        the transport is plain TCP and the length is known. True if taken."""
        request, content = self._request, self._content
        transport = request.transport
        length = request.content_length
        if (
            self._sock is not None
            or not length
            or content.total_bytes  # some of it is in aiohttp's buffers: leave it there
            or content.is_eof()
            or transport is None
            or transport.get_extra_info("sslcontext") is not None
        ):
            return False
        sock = transport.get_extra_info("socket")
        if sock is None:
            return False
        # No event-loop step between the check above and this pause: no byte of the body
        # can reach aiohttp from here on. Our own fd: see ResponseSink.socket.
        transport.pause_reading()
        self._sock = socket.socket(fileno=os.dup(sock.fileno()))
        self._sock.setblocking(False)  # it is already (the flag is shared): say so to Python
        self._left = length
        request[TAKEN] = True
        return True

    async def readany(self) -> bytes:
        """The next piece the connection delivered, as it was delivered: aiohttp's own
        readany() joins all pieces waiting into one new bytes, a copy of every byte that the
        server spent a third of its time on under concurrent uploads (perf)."""
        if self._sock is not None:
            return await self._paced(lambda: self._receive(DIRECT_READ))
        try:
            return await self._paced(self._next_chunk)
        except http_exceptions.HttpProcessingError as exc:
            raise ConnectionResetError(str(exc)) from exc

    async def _next_chunk(self) -> bytes:
        while True:
            data, end_of_http_chunk = await self._content.readchunk()
            if data or not end_of_http_chunk:  # (b"", False) is the end of the body
                return data

    async def read(self, n: int) -> bytes:
        if self._sock is not None:
            return await self._paced(lambda: self._receive(n))
        try:
            return await self._paced(lambda: self._content.read(n))
        except http_exceptions.HttpProcessingError as exc:
            raise ConnectionResetError(str(exc)) from exc

    async def _receive(self, n: int) -> bytes:
        """Up to n bytes of the body from the socket. It waits for readability and only
        then receives, so a cancel (the pipeline wakes its reader that way at a pause)
        never takes bytes with it, as loop.sock_recv's finished-but-unread result would."""
        sock = self._sock
        assert sock is not None
        while self._left:
            try:
                data = sock.recv(min(n, self._left))
            except (BlockingIOError, InterruptedError):
                await _readable(sock)
                continue
            if not data:
                if self._stalled is not None:
                    raise self._stalled
                raise ConnectionResetError(
                    f"the connection ended {self._left} bytes before the end of the body"
                )
            self._left -= len(data)
            return data
        return b""

    def close(self) -> None:
        """After the body's last use: aiohttp must not wait for the body it never saw."""
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._sock is not None:
            self._sock.close()
            if not self._content.is_eof():
                self._content.feed_eof()


async def _readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(sock, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(sock)


async def force_close_taken(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """on_response_prepare: a connection whose body was taken past aiohttp's parser is
    closed after the answer (the parser still waits for that body)."""
    if request.get(TAKEN):
        response.force_close()
        response.headers["Connection"] = "close"  # aiohttp chose its headers before this hook


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
