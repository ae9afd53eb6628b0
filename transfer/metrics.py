"""What an operator's Prometheus scrapes at GET /metrics: bytes moved, transfers running,
tasks ended, request latency, errors, event-loop lag, upload memory, pool liveness, and the
background work (checkpoints, merges).

Label values come from small fixed sets (directions, formats, routes as declared, status
codes, error codes, task kinds): never a VDI uuid, a user name or a client's task label,
so a series count stays bounded whatever clients do."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import choose_encoder

disable_created_metrics()  # the `_created` series double the output for no use here

LAG_INTERVAL = 0.5  # seconds between looks at how late the event loop wakes a sleeper
# Request latency buckets (seconds): from a record lookup to a long transfer.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)
TASK_KINDS = {"import_raw_vdi": "import", "export_raw_vdi": "export", "coalesce": "coalesce"}


def task_kind(name_label: str) -> str:
    """The `operation` label of a task, from its name: ours are known; a client's own task
    names (XenAPI task.create) are `client`, XenAPI Async calls `async`."""
    first = name_label.split(" ", 1)[0]
    if first in TASK_KINDS:
        return TASK_KINDS[first]
    return "async" if first.startswith("Async.") else "client"


class Metrics:
    """One host's metrics, in a registry of its own (several apps may share a process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.transfer_bytes = Counter(
            "vdit_transfer_bytes",
            "Body bytes of transfers, counted as they move.",
            ["direction", "format"],
            registry=r,
        )
        self.in_flight = Gauge(
            "vdit_transfers_in_flight", "Transfers moving bytes now.", ["direction"], registry=r
        )
        for direction in ("import", "export"):
            self.in_flight.labels(direction)
        self.tasks = Counter(
            "vdit_tasks", "Tasks that ended, by kind and status.", ["operation", "status"],
            registry=r,
        )  # fmt: skip
        self.requests = Histogram(
            "vdit_request_duration_seconds",
            "HTTP requests, from the request line to the last byte of the answer.",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "vdit_errors", "Error answers, by the contract's error code.", ["code"], registry=r
        )
        self.loop_lag = Histogram(
            "vdit_event_loop_lag_seconds",
            f"How late the event loop wakes a {LAG_INTERVAL} s sleep.",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.upload_buffer = Gauge(
            "vdit_upload_buffer_bytes", "Upload body bytes held in memory now.", registry=r
        )
        self.upload_buffer_limit = Gauge(
            "vdit_upload_buffer_limit_bytes", "The most upload bytes held at once.", registry=r
        )
        self.hosts = Gauge(
            "vdit_pool_hosts", "Hosts of the pool, by whether they beat.", ["state"], registry=r
        )
        self.checkpoints = Counter(
            "vdit_checkpoints", "Durable checkpoints of resumable uploads.", registry=r
        )
        self.coalesces = Counter(
            "vdit_coalesces", "Background merges of layers, by result.", ["result"], registry=r
        )

    def watch_upload_buffer(self, used: Callable[[], float], limit: int) -> None:
        self.upload_buffer.set_function(used)
        self.upload_buffer_limit.set(limit)

    def moved(self, direction: str, fmt: str, n: int) -> None:
        self.transfer_bytes.labels(direction, fmt).inc(n)

    def request(self, route: str, method: str, status: int, seconds: float, code: str | None):
        self.requests.labels(route, method, str(status)).observe(seconds)
        if code:
            self.errors.labels(code).inc()

    def task_ended(self, name_label: str, status: str) -> None:
        self.tasks.labels(task_kind(name_label), status).inc()

    def render(self, accept: str) -> tuple[bytes, str]:
        """(body, content type): the Prometheus text format 0.0.4, or OpenMetrics when
        the scraper's Accept asks for it."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type

    async def watch_loop_lag(self) -> None:
        """Runs for the app's life: each LAG_INTERVAL sleep that wakes late is lag that every
        request and transfer of this host felt."""
        while True:
            before = time.monotonic()
            await asyncio.sleep(LAG_INTERVAL)
            self.loop_lag.observe(max(0.0, time.monotonic() - before - LAG_INTERVAL))
