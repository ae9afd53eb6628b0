"""Run the server: uvloop, one listening socket, graceful stop on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl

import uvloop
from aiohttp import web

from common.logfields import event
from transfer.app import AccessLog, create_app, mark_shutting_down
from transfer.config import Config
from transfer.handlers.connections import ConnectionLimits, GuardedAppRunner

log = logging.getLogger("vdi_transfer")


async def _serve(config: Config, tls: ssl.SSLContext | None) -> None:
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


def serve(config: Config, tls: ssl.SSLContext | None = None) -> None:
    """Run the server on uvloop until SIGTERM or SIGINT, then stop gracefully; HTTPS with a
    `tls` context."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(config, tls))
