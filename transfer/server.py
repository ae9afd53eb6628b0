"""Run the server: uvloop, one listening socket, graceful stop on SIGTERM/SIGINT, and on
SIGHUP a new TLS certificate and log settings without dropping a connection."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from collections.abc import Callable

import uvloop
from aiohttp import web

from common.logfields import event
from transfer import logs
from transfer.app import AccessLog, create_app, mark_shutting_down
from transfer.config import Config, ConfigError
from transfer.handlers.connections import ConnectionLimits, GuardedAppRunner
from transfer.tls import TlsError, server_context

log = logging.getLogger("vdi_transfer")


def _reload(tls: ssl.SSLContext | None, reload: Callable[[], Config] | None) -> None:
    """SIGHUP: the configuration read again (file and environment as at start, options as
    given); its log format and level apply at once, and its certificate to every TLS
    handshake from now on (connections up keep theirs). A configuration or certificate
    that cannot be used is logged and changes nothing."""
    if reload is None:
        return
    try:
        config = reload()
        if tls is not None and config.tls_cert and config.tls_key:
            server_context(config.tls_cert, config.tls_key)  # the pair is usable: swap it in
            tls.load_cert_chain(config.tls_cert, config.tls_key)
    except (ConfigError, TlsError, OSError, ssl.SSLError) as exc:
        event(log, "server.reload_failed", logging.ERROR, error=str(exc))
        return
    logs.setup(config.log_format, config.log_level)
    event(
        log,
        "server.reloaded",
        log_level=config.log_level,
        log_format=config.log_format,
        tls_cert=str(config.tls_cert) if tls is not None else None,
    )


async def _serve(
    config: Config, tls: ssl.SSLContext | None, reload: Callable[[], Config] | None
) -> None:
    app = create_app(config)
    limits = ConnectionLimits(config.header_timeout, config.idle_timeout)
    runner = GuardedAppRunner(
        app,
        limits,
        access_log_class=AccessLog,
        handle_signals=False,
        max_line_size=config.max_header_size,
        max_field_size=config.max_header_size,
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, tls, reload)
    try:
        site = web.TCPSite(
            runner,
            config.host,
            config.port,
            shutdown_timeout=config.shutdown_timeout,
            ssl_context=tls,
        )
        await site.start()
        for address in runner.addresses:
            host, port = address[0], address[1]
            scheme = "https" if tls else "http"
            event(
                log, "server.listening", url=f"{scheme}://{host}:{port}", advertise=config.advertise
            )
        await stop.wait()
        event(log, "server.stopping", reason="signal")
        mark_shutting_down(app)
    finally:
        await runner.cleanup()


def serve(
    config: Config,
    tls: ssl.SSLContext | None = None,
    reload: Callable[[], Config] | None = None,
) -> None:
    """Run the server on uvloop until SIGTERM or SIGINT, then stop gracefully; HTTPS with a
    `tls` context; on SIGHUP, `reload` gives the settings to apply (see `_reload`)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(config, tls, reload))
