"""Assemble one host: open the state, register the host, bootstrap, wire routes and
middlewares, run housekeeping in the background, and tear it all down in order."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from auth import middleware as auth_middleware
from auth.middleware import Authenticator
from auth.sessions import (
    RevokedSessions,
    SessionSigner,
    load_or_create_pool_secret,
    load_or_create_secret,
)
from auth.users import UserStore
from common.logfields import LOG_FIELDS, event
from transfer import __version__, checkpoints, files, reserve
from transfer.coalesce import INTERVAL as COALESCE_INTERVAL
from transfer.coalesce import Coalescer
from transfer.config import Config
from transfer.db import open_database
from transfer.events import EventLog
from transfer.handlers.errors import errors_as_json
from transfer.handlers.routes import add_routes
from transfer.handlers.streams import force_close_taken
from transfer.hosts import HostService, load_or_create_host_uuid
from transfer.limits import Pacing, TransferSlots
from transfer.logs import redact_query
from transfer.metrics import Metrics
from transfer.parts import PartedUploads
from transfer.pipeline import Budget
from transfer.services import SERVICES, Services
from transfer.srs import SrService
from transfer.tasks import CANCEL_POLL, SHUTTING_DOWN, TaskManager
from transfer.vdis import VdiService

log = logging.getLogger("vdi_transfer")
access_log = logging.getLogger("vdi_transfer.access")


class AccessLog(AbstractAccessLogger):
    """One structured line per request, without credentials, and the request's metrics.
    `bytes_in` and `bytes_out` are body bytes that crossed the connection (an export sent
    by sendfile never passes aiohttp's counters: the transfer says what it sent), and
    `bytes` their sum."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        fields = dict(request.get(LOG_FIELDS, {}))
        bytes_in = fields.pop("bytes_in", None)
        if bytes_in is None:
            bytes_in = getattr(request.content, "total_bytes", 0)
        bytes_out = fields.pop("bytes_out", None)
        if bytes_out is None:
            bytes_out = response.body_length
        event(
            access_log,
            "http.request",
            method=request.method,
            path=request.path,
            query=redact_query(dict(request.query)) or None,
            status=response.status,
            bytes=bytes_in + bytes_out,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            duration=time,
            remote=request.remote,
            **fields,
        )
        svc = request.app.get(SERVICES) if isinstance(request, web.Request) else None
        if svc is not None:
            svc.metrics.request(
                _route(request), request.method, response.status, time, fields.get("error")
            )


def _route(request: web.Request) -> str:
    """The route as declared (`/vdis/{id}`), never the path a client sent."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


async def _bootstrap_admin(svc: Services) -> None:
    if await svc.users.count():
        return
    password = svc.config.admin_password
    generated = not password
    if generated:
        password = secrets.token_urlsafe(18)
    await svc.users.add("admin", password, "admin")
    if generated:
        # The contract: a generated first password is printed once, to the log.
        event(
            log,
            "admin.created",
            logging.WARNING,
            user="admin",
            password=password,
            note="generated; change it with: vdi-transfer user passwd admin",
        )
    else:
        event(log, "admin.created", user="admin", note="password from VDIT_ADMIN_PASSWORD")


async def open_services(config: Config) -> Services:
    """This host's services on its state store, none started: the offline CLI opens them too."""
    config.state_dir.mkdir(parents=True, exist_ok=True)
    db = await open_database(config.database)
    host_uuid = load_or_create_host_uuid(config.state_dir)
    user_store = UserStore(db)
    # One host: the secret in its state dir (0600). A pool (PostgreSQL): in the shared
    # database, so sessions and their revocation hold on every host.
    if db.dialect == "postgresql":
        secret = await load_or_create_pool_secret(db)
    else:
        secret = load_or_create_secret(config.state_dir)
    signer = SessionSigner(secret, config.session_ttl)
    hosts = HostService(db, host_uuid, config.heartbeat_interval)
    srs = SrService(db, host_uuid, config.state_dir)
    events = EventLog(db)
    tasks = TaskManager(db, host_uuid, config.task_ttl, events)
    metrics = Metrics()
    tasks.on_ended = metrics.task_ended
    upload_budget = Budget(config.upload_budget)
    metrics.watch_upload_buffer(lambda: upload_budget.used, upload_budget.limit)
    svc = Services(
        config=config,
        db=db,
        hosts=hosts,
        srs=srs,
        vdis=VdiService(db, srs, hosts, events),
        tasks=tasks,
        events=events,
        metrics=metrics,
        users=user_store,
        auth=Authenticator(RevokedSessions(db), user_store, signer),
        upload_budget=upload_budget,
        slots=TransferSlots(config.max_transfers, config.max_user_transfers),
        pacing=Pacing(config.idle_timeout, config.min_rate_bytes, config.rate_window),
    )
    svc.parted = PartedUploads(svc)
    return svc


async def _every(seconds: float, what: str, job: Callable[[], Awaitable[object]]) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await job()
        except Exception:
            log.exception(f"{what} failed")


def mark_shutting_down(app: web.Application) -> None:
    """From here on, a transfer that is stopped ends as a failure of the shutdown, not as a
    client's cancel. Called as soon as the stop is decided, before aiohttp cancels handlers."""
    svc = app.get(SERVICES)
    if svc:
        svc.tasks.shutting_down = True
        for transfer in svc.tasks.running.values():
            transfer.abort_error = SHUTTING_DOWN


def create_app(config: Config) -> web.Application:
    """One host's app: its lifecycle opens the services, starts the background loops, and closes
    both in order."""
    app = web.Application(
        middlewares=[errors_as_json, auth_middleware.middleware(lambda r: r.app[SERVICES].auth)],
        client_max_size=config.max_json_body_bytes,  # request.json(); transfers stream
    )
    app.on_response_prepare.append(force_close_taken)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        started = time.monotonic()
        svc = await open_services(config)
        app[SERVICES] = svc
        await svc.hosts.register(config.name_label, config.advertise)
        local_sr = await svc.srs.ensure_local_sr()
        await svc.srs.record_physical_size(local_sr)  # for the other hosts of a pool
        for sr in await svc.srs.unreachable_shared():
            event(
                log,
                "sr.unreachable",
                logging.WARNING,
                sr=sr["uuid"],
                path=sr["path"],
                note="shared SR not mounted here (or not this SR): its VDIs will fail here",
            )
        if not await files.in_thread(reserve.take, config.state_dir):
            event(log, "state.reserve_missing", logging.WARNING, state_dir=str(config.state_dir))
        await _bootstrap_admin(svc)
        recovered = await svc.tasks.recover_after_restart()
        coalescer = Coalescer(svc)
        await coalescer.recover()
        await svc.vdis.drop_readers_of_this_host()
        released = await svc.vdis.release_own_locks()
        if released:
            event(log, "vdi.locks_released", logging.WARNING, count=released,
                  note="snapshots or CBT switches cut by the last stop")  # fmt: skip

        async def collect_garbage() -> None:
            await svc.tasks.collect_garbage()
            await svc.auth.revoked.forget_expired(time.time())
            await svc.events.prune(time.time())

        async def housekeeping() -> None:
            await files.in_thread(reserve.take, config.state_dir)  # back, once there is room
            await collect_garbage()
            srs = [Path(row["path"]) for row in await svc.srs.list() if svc.srs.owner(row) is None]
            await svc.tasks.expire_uploads(config.upload_ttl)
            # Checkpoints of uploads that ended, here or (a cancel, an expiry) elsewhere.
            saved = await files.in_thread(checkpoints.saved_tasks, config.state_dir)
            for task in await svc.tasks.finished_among(saved):
                await files.in_thread(checkpoints.discard, config.state_dir, task, srs)

        await collect_garbage()

        async def heartbeat() -> None:
            await svc.hosts.heartbeat()
            hosts = await svc.hosts.list()
            live = sum(1 for row in hosts if svc.hosts.is_live(row))
            svc.metrics.hosts.labels("live").set(live)
            svc.metrics.hosts.labels("unreachable").set(len(hosts) - live)

        await heartbeat()
        loops = [
            asyncio.create_task(_every(config.heartbeat_interval, "heartbeat", heartbeat)),
            asyncio.create_task(svc.metrics.watch_loop_lag()),
            asyncio.create_task(_every(config.task_gc_interval, "task gc", housekeeping)),
            asyncio.create_task(_every(CANCEL_POLL, "transfer watch", svc.tasks.watch)),
            asyncio.create_task(_every(COALESCE_INTERVAL, "coalesce", coalescer.run_once)),
        ]
        event(
            log,
            "server.ready",
            host=svc.hosts.uuid,
            version=__version__,
            database=svc.db.dialect,
            recovered_tasks=recovered,
            startup=time.monotonic() - started,
        )
        try:
            yield
        finally:
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await svc.tasks.abort_all(SHUTTING_DOWN)
            if svc.parted is not None:
                await svc.parted.wait_closed()
            await svc.db.close()
            event(log, "server.stopped", host=svc.hosts.uuid)

    async def on_shutdown(app: web.Application) -> None:
        mark_shutting_down(app)

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(on_shutdown)
    add_routes(app)
    return app
