"""Storage repositories: where VDI files live. Today: directories on this host."""

from __future__ import annotations

import time
from pathlib import Path

from transfer import storage
from transfer.db import Database, Row
from transfer.errors import ApiError
from transfer.ids import new_ref, new_uuid

IMAGE_FORMATS = ("raw", "vhd", "qcow2")
LOCAL_SR_NAME = "Local storage"


class SrService:
    def __init__(self, db: Database, host_uuid: str, state_dir: Path):
        self.db = db
        self.host_uuid = host_uuid
        self.state_dir = state_dir

    async def ensure_local_sr(self) -> Row:
        """This host's local SR, created (with its directory) on first start."""
        row = await self.db.fetchone(
            "SELECT * FROM srs WHERE host = ? AND type = 'local' ORDER BY created LIMIT 1",
            self.host_uuid,
        )
        if row is None:
            sr_uuid = new_uuid()
            path = (self.state_dir / "srs" / sr_uuid).resolve()
            await self.db.execute(
                "INSERT INTO srs (uuid, ref, name_label, type, shared, host, path, "
                "supported_image_formats, default_image_format, created) "
                "VALUES (?, ?, ?, 'local', 0, ?, ?, ?, 'raw', ?)",
                sr_uuid,
                new_ref(),
                LOCAL_SR_NAME,
                self.host_uuid,
                str(path),
                ",".join(IMAGE_FORMATS),
                time.time(),
            )
            row = await self.get(sr_uuid)
        await storage.in_thread(storage.ensure_sr_dir, Path(row["path"]))
        return row

    async def get(self, ident: str) -> Row:
        row = await self.db.fetchone("SELECT * FROM srs WHERE uuid = ? OR ref = ?", ident, ident)
        if row is None:
            raise ApiError("SR_NOT_FOUND", f"no SR {ident}", ident)
        return row

    async def list(self) -> list[Row]:
        return await self.db.fetchall("SELECT * FROM srs ORDER BY created, uuid")

    async def default(self) -> Row:
        """The SR a VDI goes to when the client names none: this host's local SR."""
        return await self.ensure_local_sr()

    @staticmethod
    def formats(row: Row) -> list[str]:
        return [f for f in row["supported_image_formats"].split(",") if f]

    async def to_json(self, row: Row) -> dict:
        path = Path(row["path"])
        files = await self.db.fetchall("SELECT path FROM vdis WHERE sr = ?", row["uuid"])

        def sizes() -> tuple[int, int]:
            total, _ = storage.filesystem_size(path)
            return total, sum(storage.allocated_bytes(path / f["path"]) for f in files)

        physical_size, used = await storage.in_thread(sizes)
        return {
            "uuid": row["uuid"],
            "ref": row["ref"],
            "name_label": row["name_label"],
            "type": row["type"],
            "shared": bool(row["shared"]),
            "host": row["host"],
            "supported_image_formats": self.formats(row),
            "default_image_format": row["default_image_format"],
            "physical_size": physical_size,
            "physical_utilisation": used,
        }
