"""The services one running host is made of, shared by the handlers through the app."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from auth.middleware import Authenticator
from auth.users import UserStore
from transfer.config import Config
from transfer.db import Database
from transfer.events import EventLog
from transfer.hosts import HostService
from transfer.limits import Pacing, TransferSlots
from transfer.metrics import Metrics
from transfer.pipeline import Budget
from transfer.srs import SrService
from transfer.tasks import TaskManager
from transfer.vdis import VdiService

if TYPE_CHECKING:
    from transfer.parts import PartedUploads  # (it imports the operations, which import us)


@dataclass
class Services:
    """What one running host is made of; handlers reach it with `services(request)`."""

    config: Config
    db: Database
    hosts: HostService
    srs: SrService
    vdis: VdiService
    tasks: TaskManager
    users: UserStore
    auth: Authenticator
    upload_budget: Budget  # upload body bytes all imports together may hold in memory
    events: EventLog  # changes XenAPI clients wait for with event.from
    metrics: Metrics  # what GET /metrics shows
    slots: TransferSlots  # how many transfers may run at once (--max-transfers)
    pacing: Pacing  # how slow a transfer's body may be (--idle-timeout, --min-rate)
    parted: PartedUploads | None = None  # uploads in parts running here (set by the app)


SERVICES = web.AppKey("services", Services)


def services(request: web.Request) -> Services:
    """The services of the host serving this request."""
    return request.app[SERVICES]
