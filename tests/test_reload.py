"""SIGHUP, against the real server over HTTPS: a renewed certificate is served to new
connections, the log level changes, and a download running across the signal finishes
byte for byte; a broken certificate changes nothing."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import ssl
import time
from pathlib import Path

from tests.conftest import ServerProcess, self_signed
from tests.rawclient import AUTH_HEADER

MiB = 1 << 20


def served_cert(port: int) -> bytes:
    """The DER certificate a new connection is shown."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def der_of(pem: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.read_text())


def request(port: int, method: str, target: str, body: bytes = b"") -> ssl.SSLSocket:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    tls = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30))
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {AUTH_HEADER}\r\n"
        f"Content-Length: {len(body)}\r\nContent-Type: application/json\r\n"
        "Connection: close\r\n\r\n"
    )
    tls.sendall(head.encode() + body)
    return tls


def read_all(tls: ssl.SSLSocket) -> bytes:
    out = bytearray()
    while chunk := tls.recv(1 << 20):
        out += chunk
    return bytes(out)


def test_sighup_renews_the_certificate_and_log_level_without_dropping_a_download(tmp_path):
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    first_cert, first_key = self_signed(tls_dir, "first")
    second_cert, second_key = self_signed(tls_dir, "second")
    cert, key = tls_dir / "cert.pem", tls_dir / "key.pem"
    cert.write_bytes(first_cert.read_bytes())
    key.write_bytes(first_key.read_bytes())
    config = tmp_path / "config.toml"
    config.write_text(f'tls_cert = "{cert}"\ntls_key = "{key}"\nlog_level = "info"\n')
    srv = ServerProcess(tmp_path / "state", {"VDIT_CONFIG": str(config)}, cafile=first_cert)
    srv.start()
    try:
        port = srv.port
        assert served_cert(port) == der_of(first_cert)
        # A 64 MiB VDI, and a download of it read slowly across the reload.
        data = os.urandom(64 * MiB)
        made = read_all(request(port, "POST", "/vdis", b'{"virtual_size": 67108864}'))
        vdi = made.split(b'"uuid": "', 1)[1].split(b'"', 1)[0].decode()
        put = read_all(request(port, "PUT", f"/import_raw_vdi?vdi={vdi}", data))
        assert put.startswith(b"HTTP/1.1 200"), put[:200]
        download = request(port, "GET", f"/export_raw_vdi?vdi={vdi}")
        received = bytearray(download.recv(MiB))
        # Renew: new files in place, a log level, then the signal.
        cert.write_bytes(second_cert.read_bytes())
        key.write_bytes(second_key.read_bytes())
        config.write_text(f'tls_cert = "{cert}"\ntls_key = "{key}"\nlog_level = "debug"\n')
        srv.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while served_cert(port) != der_of(second_cert):
            assert time.monotonic() < deadline, "the new certificate is not served"
            time.sleep(0.1)
        received += read_all(download)
        body = bytes(received).split(b"\r\n\r\n", 1)[1]
        assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
        log = srv.log_path.read_text()
        assert "event=server.reloaded log_level=debug" in log
        assert "level=debug" in log.split("event=server.reloaded", 1)[1]
        # A key that does not match its certificate: logged, nothing changes.
        key.write_bytes(first_key.read_bytes())
        srv.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "event=server.reload_failed" not in srv.log_path.read_text():
            assert time.monotonic() < deadline, "the bad reload was not logged"
            time.sleep(0.1)
        assert served_cert(port) == der_of(second_cert)
    finally:
        srv.stop()
