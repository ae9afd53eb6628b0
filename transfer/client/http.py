"""The client's HTTP: one request at a time over http.client, with what the server's API
needs and the standard library does not do: `Expect: 100-continue` (a refused or
redirected upload is answered before a byte of the body leaves), redirects of any method
to the host that owns a VDI (302/307/308, the body sent again), and the API's JSON errors
as exceptions."""

from __future__ import annotations

import http.client
import io
import json
import select
import socket
import ssl
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

# Errors after which a transfer tries again (the server restarting, busy, or out of reach),
# waiting BACKOFF_MAX seconds at most between tries.
RETRYABLE = frozenset({"CONNECTION", "HOST_OFFLINE", "SERVICE_UNAVAILABLE", "TOO_MANY_TRANSFERS"})
BACKOFF_MAX = 15.0
CONTINUE_WAIT = 60.0  # seconds to wait for 100 Continue (the server checks first)
MAX_REDIRECTS = 3
TIMEOUT = 120.0  # seconds a socket operation may take


class ClientError(Exception):
    """The server refused (its JSON error), or could not be reached. `code` is the API's
    error code, or CONNECTION for a network failure."""

    def __init__(self, code: str, message: str, status: int = 0, headers: dict | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.headers = headers or {}


@dataclass
class Response:
    """An answer; `stream` reads the body (closed by `close`)."""

    status: int
    headers: dict[str, str]
    raw: http.client.HTTPResponse
    conn: http.client.HTTPConnection = field(repr=False)

    def read(self) -> bytes:
        try:
            return self.raw.read()
        finally:
            self.close()

    def json(self):
        data = self.read()
        return json.loads(data) if data else None

    def stream(self, size: int = 1 << 20) -> Iterator[bytes]:
        try:
            while chunk := self.raw.read(size):
                yield chunk
        finally:
            self.close()

    def close(self) -> None:
        self.raw.close()
        self.conn.close()


def error_of(response: Response) -> ClientError:
    """The API error an answer carries (or a description of a non-JSON one)."""
    body = response.read()
    try:
        data = json.loads(body)
        return ClientError(
            data["error"], data.get("message", ""), response.status, response.headers
        )
    except (ValueError, KeyError, TypeError):
        text = body[:200].decode(errors="replace").strip()
        return ClientError(f"HTTP_{response.status}", text or "no body", response.status)


class Api:
    """The server at `url`, with an Authorization header; TLS verified against `cafile` (or
    the system's CAs), or not at all with `insecure`."""

    def __init__(
        self,
        url: str,
        authorization: str | None,
        cafile: str | None = None,
        insecure: bool = False,
    ):
        parsed = urllib.parse.urlsplit(url.rstrip("/"))
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ClientError("BAD_URL", f"{url!r} is not an http:// or https:// URL")
        self.url = f"{parsed.scheme}://{parsed.netloc}"
        self.authorization = authorization
        self.tls: ssl.SSLContext | None = None
        if parsed.scheme == "https":
            self.tls = ssl.create_default_context(cafile=cafile)
            if insecure:
                self.tls.check_hostname = False
                self.tls.verify_mode = ssl.CERT_NONE

    def _connect(self, base: str) -> http.client.HTTPConnection:
        parsed = urllib.parse.urlsplit(base)
        if parsed.scheme == "https":
            return http.client.HTTPSConnection(
                parsed.hostname, parsed.port, timeout=TIMEOUT, context=self.tls
            )
        return http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=TIMEOUT)

    def request(
        self,
        method: str,
        target: str,
        body: bytes | Iterable[bytes] | None = None,
        headers: dict[str, str] | None = None,
        length: int | None = None,
    ) -> Response:
        """One request, following redirects. A body is bytes, or an iterable of pieces
        (re-iterable if a redirect may come: a list, or an object whose __iter__ starts
        over) sent with Content-Length `length`, or chunked when it is None. Bodies wait
        for 100 Continue. Network failures are ClientError("CONNECTION")."""
        base = self.url
        for _ in range(MAX_REDIRECTS + 1):
            try:
                response = self._once(base, method, target, body, headers or {}, length)
            except (OSError, http.client.HTTPException) as exc:
                raise ClientError("CONNECTION", f"{base}: {exc}") from exc
            if response.status in (301, 302, 303, 307, 308) and "location" in response.headers:
                response.close()
                moved = urllib.parse.urlsplit(
                    urllib.parse.urljoin(base + target, response.headers["location"])
                )
                base = f"{moved.scheme}://{moved.netloc}"
                target = moved.path + (f"?{moved.query}" if moved.query else "")
                continue
            return response
        raise ClientError("TOO_MANY_REDIRECTS", f"{method} {target}: more than {MAX_REDIRECTS}")

    def call(self, method: str, target: str, payload: object = None, ok=(200, 201, 204)):
        """A JSON API call: the decoded answer, or ClientError."""
        body = json.dumps(payload).encode() if payload is not None else None
        headers = {"Content-Type": "application/json"} if body is not None else {}
        response = self.request(method, target, body, headers)
        if response.status not in ok:
            raise error_of(response)
        return response.json()

    def _once(self, base, method, target, body, headers, length) -> Response:
        conn = self._connect(base)
        conn.putrequest(method, target, skip_accept_encoding=True)
        if self.authorization:
            conn.putheader("Authorization", self.authorization)
        for name, value in headers.items():
            conn.putheader(name, value)
        if body is None:
            if method in ("PUT", "POST", "PATCH"):
                conn.putheader("Content-Length", "0")
            conn.endheaders()
            return self._answer(conn, method)
        if isinstance(body, bytes):
            length = len(body)
        chunked = length is None
        conn.putheader("Transfer-Encoding" if chunked else "Content-Length",
                       "chunked" if chunked else str(length))  # fmt: skip
        conn.putheader("Expect", "100-continue")
        conn.endheaders()
        early = _wait_for_continue(conn)
        if early is not None:  # refused or redirected before the body: nothing was sent
            return self._answer(conn, method)
        pieces = [body] if isinstance(body, bytes) else body
        for piece in pieces:
            if not piece:
                continue
            if chunked:
                conn.send(b"%x\r\n" % len(piece))
                conn.send(piece)
                conn.send(b"\r\n")
            else:
                conn.send(piece)
        if chunked:
            conn.send(b"0\r\n\r\n")
        return self._answer(conn, method)

    @staticmethod
    def _answer(conn: http.client.HTTPConnection, method: str) -> Response:
        raw = conn.getresponse()
        headers = {name.lower(): value for name, value in raw.getheaders()}
        return Response(raw.status, headers, raw, conn)


def _wait_for_continue(conn: http.client.HTTPConnection) -> bool | None:
    """After the headers of a request with a body: None once the server said 100 Continue
    (consumed here) or stayed silent for CONTINUE_WAIT (send anyway, as RFC 9110 allows);
    True if a final answer came instead (left for getresponse)."""
    sock = conn.sock
    assert sock is not None
    pending = isinstance(sock, ssl.SSLSocket) and sock.pending()
    if not pending:
        readable, _, _ = select.select([sock], [], [], CONTINUE_WAIT)
        if not readable:
            return None
    line = _read_line(sock)
    if line.split(b" ", 2)[1:2] != [b"100"]:
        _push_back(conn, line)
        return True
    while _read_line(sock) not in (b"\r\n", b"\n", b""):
        pass  # the interim answer's headers, if any
    return None


def _read_line(sock: socket.socket) -> bytes:
    """One line, a byte at a time: nothing past it is taken from the socket (http.client
    reads the final answer from there)."""
    line = bytearray()
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            break
        line += byte
    return bytes(line)


class _Replay(io.RawIOBase):
    """A raw reader giving `prefix` (bytes already taken from the socket), then the socket."""

    def __init__(self, prefix: bytes, sock: socket.socket):
        self._prefix, self._raw = prefix, sock.makefile("rb", buffering=0)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._prefix:
            n = min(len(buffer), len(self._prefix))
            buffer[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()
        super().close()


class _Prefixed:
    """The connection's socket, for http.client, with the first line of the answer put
    back in front (it was read to see whether it was a 100 Continue)."""

    def __init__(self, sock: socket.socket, prefix: bytes):
        self._sock, self._prefix = sock, prefix

    def makefile(self, mode: str, *args, **kwargs):
        return io.BufferedReader(_Replay(self._prefix, self._sock))

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


def _push_back(conn: http.client.HTTPConnection, line: bytes) -> None:
    conn.sock = _Prefixed(conn.sock, line)  # type: ignore[assignment]
