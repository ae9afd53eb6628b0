"""This host's identity and liveness: registered at start, heartbeat while running."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from common.errors import ApiError
from transfer.db import Database, Row
from transfer.ids import iso, new_ref

HOST_UUID_FILE = "host-uuid"
MISSED_HEARTBEATS = 3  # a host that missed this many heartbeats is offline


def load_or_create_host_uuid(state_dir: Path) -> str:
    """A host keeps its uuid in its state dir, so it stays the same host across restarts."""
    path = state_dir / HOST_UUID_FILE
    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        return str(uuid.UUID(path.read_text().strip()))
    except FileNotFoundError:
        host_uuid = str(uuid.uuid4())
        tmp = path.with_suffix(".tmp")
        tmp.write_text(host_uuid + "\n")
        tmp.replace(path)
        return host_uuid


class HostService:
    """The pool's hosts: this one registered at start, heartbeating while it runs; who is live."""

    def __init__(self, db: Database, host_uuid: str, heartbeat_interval: int):
        self.db = db
        self.uuid = host_uuid
        self.heartbeat_interval = heartbeat_interval

    async def register(self, name_label: str, address: str) -> None:
        now = time.time()
        async with self.db.transaction() as tx:
            if await tx.fetchone("SELECT 1 FROM hosts WHERE uuid = ?", self.uuid):
                await tx.execute(
                    "UPDATE hosts SET name_label = ?, address = ?, heartbeat = ? WHERE uuid = ?",
                    name_label,
                    address,
                    now,
                    self.uuid,
                )
                # Hosts registered before hosts had refs get theirs now.
                await tx.execute(
                    "UPDATE hosts SET ref = ? WHERE uuid = ? AND ref IS NULL", new_ref(), self.uuid
                )
            else:
                await tx.execute(
                    "INSERT INTO hosts (uuid, ref, name_label, address, heartbeat, created) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    self.uuid,
                    new_ref(),
                    name_label,
                    address,
                    now,
                    now,
                )

    async def heartbeat(self) -> None:
        await self.db.execute(
            "UPDATE hosts SET heartbeat = ? WHERE uuid = ?", time.time(), self.uuid
        )

    def heard_since(self) -> float:
        """A host whose last heartbeat is later than this is live (it missed fewer than
        MISSED_HEARTBEATS); the one rule for /hosts, redirects and read leases."""
        return time.time() - MISSED_HEARTBEATS * self.heartbeat_interval

    def is_live(self, row: Row) -> bool:
        return row["uuid"] == self.uuid or row["heartbeat"] > self.heard_since()

    async def list(self) -> list[Row]:
        return await self.db.fetchall("SELECT * FROM hosts ORDER BY created, uuid")

    async def get_or_none(self, host_uuid: str) -> Row | None:
        return await self.db.fetchone("SELECT * FROM hosts WHERE uuid = ?", host_uuid)

    async def get(self, host_uuid: str) -> Row:
        row = await self.db.fetchone(
            "SELECT * FROM hosts WHERE uuid = ? OR ref = ?", host_uuid, host_uuid
        )
        if row is None:
            raise ApiError("HOST_NOT_FOUND", f"no host {host_uuid}", host_uuid)
        return row

    def to_json(self, row: Row) -> dict:
        return {
            "uuid": row["uuid"],
            "name_label": row["name_label"],
            "address": row["address"],
            "live": self.is_live(row),
            "this_host": row["uuid"] == self.uuid,
            "last_heartbeat": iso(row["heartbeat"]),
        }
