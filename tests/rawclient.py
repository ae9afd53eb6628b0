"""Test helpers that talk to the real server the way clients do: curl, wget, raw sockets,
and a writer of XAPI's chunk framing written from its description (not from our encoder)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import struct
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.conftest import ADMIN_PASSWORD

AUTH = f"admin:{ADMIN_PASSWORD}"
AUTH_HEADER = "Basic " + base64.b64encode(AUTH.encode()).decode()


def api(url: str, method: str = "GET", body: dict | None = None):
    """A JSON API call with urllib; returns (status, parsed body)."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": AUTH_HEADER, "Content-Type": "application/json"}
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
            return resp.status, (json.loads(raw) if raw else None)
    except urllib.error.HTTPError as err:
        raw = err.read()
        return err.code, (json.loads(raw) if raw else None)


def create_vdi(base: str, size: int | str) -> dict:
    status, vdi = api(f"{base}/vdis", "POST", {"virtual_size": size, "name_label": "t"})
    assert status == 201, vdi
    return vdi


def new_task(base: str, name_label: str = "resumable") -> str:
    """A task (POST /tasks) to name as task_id=; its uuid."""
    status, body = api(f"{base}/tasks", "POST", {"name_label": name_label})
    assert status == 201, body
    return body["uuid"]


def task(base: str, ident: str) -> dict:
    status, body = api(f"{base}/tasks/{ident}")
    assert status == 200, body
    return body


def filled_vdi(url: str, tmp_path: Path, size: int = 64 << 20) -> str:
    """A VDI holding `size` random bytes (uploaded with curl); its uuid."""
    vdi = create_vdi(url, size)
    body = tmp_path / "fill.raw"
    body.write_bytes(os.urandom(size))
    status, _, err = curl_upload(f"{url}/import_raw_vdi?vdi={vdi['uuid']}", "-T", str(body))
    assert status == 200, err
    return vdi["uuid"]


def sha256_file(path: Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = limit
        while True:
            n = 1 << 20 if remaining is None else min(1 << 20, remaining)
            if n == 0:
                break
            block = f.read(n)
            if not block:
                break
            h.update(block)
            if remaining is not None:
                remaining -= len(block)
    return h.hexdigest()


def frame(offset: int, data: bytes) -> bytes:
    """One frame of XAPI chunk framing: [u64 LE offset][u32 LE length][data]."""
    return struct.pack("<QI", offset, len(data)) + data


END = b"\0" * 12


def parse_frames(stream: bytes) -> list[tuple[int, bytes]]:
    frames, pos = [], 0
    while True:
        offset, length = struct.unpack_from("<QI", stream, pos)
        pos += 12
        if offset == 0 and length == 0:
            assert pos == len(stream), "bytes after the terminator"
            return frames
        frames.append((offset, stream[pos : pos + length]))
        pos += length


def curl_upload(url: str, *args: str) -> tuple[int, dict | None, str]:
    """curl -T ...; returns (status, JSON body, stderr)."""
    result = subprocess.run(
        ["curl", "-sS", "-u", AUTH, "-w", "\n%{http_code}", *args, url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    body, _, status = result.stdout.rpartition("\n")
    parsed = json.loads(body) if body.strip() else None
    return int(status or 0), parsed, result.stderr


class RawRequest:
    """An HTTP request over a bare socket, for what curl will not do on demand: stop halfway,
    stall, wait for 100 Continue, or vanish."""

    def __init__(self, base: str, method: str, target: str, headers: dict[str, str]):
        host, port = base.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        lines = [f"{method} {target} HTTP/1.1", f"Host: {host}:{port}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_response(self, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
        """Status, headers and whatever body arrives before close or Content-Length."""
        self.sock.settimeout(timeout)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed before a response: {buf!r}")
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        if status == 100:
            self._rest = rest
            return status, headers, b""
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return status, headers, rest

    def closed_by_peer(self, timeout: float) -> bool:
        """True if the server closes (or resets) the connection within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if self.sock.recv(65536) == b"":
                    return True
            except TimeoutError:
                return False
            except ConnectionError:
                return True
        return False

    def close(self) -> None:
        self.sock.close()


def export_to(base: str, vdi: str, dest: Path, query: str = "") -> Path:
    """curl the VDI's export (raw unless `query` says otherwise) into `dest`."""
    subprocess.run(
        [
            "curl",
            "-sS",
            "-f",
            "-u",
            AUTH,
            "-o",
            str(dest),
            f"{base}/export_raw_vdi?vdi={vdi}{query}",
        ],
        check=True,
        capture_output=True,
    )
    return dest
