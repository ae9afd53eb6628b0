"""HTTPS: the server's TLS context, from a PEM certificate (chain) and its private key.

TLS 1.2 and later only. Under uvloop (as under asyncio), TLS runs in memory buffers on the
event loop thread: kernel TLS, which would let exports keep sendfile(2), needs the socket
handed to OpenSSL, which neither gives it; see the README's "Performance".
"""

from __future__ import annotations

import ssl
from pathlib import Path


class TlsError(Exception):
    """The certificate or key cannot be used (unreadable, not PEM, not a pair)."""


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The context to serve HTTPS with; TlsError saying what is wrong with the files."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise TlsError(f"{exc.filename}: no such file") from exc
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"cannot use certificate {cert} with key {key}: {exc}") from exc
    return context
