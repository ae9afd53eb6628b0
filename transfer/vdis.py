"""VDI records and their files: create, look up, list, delete, and the transfer lock."""

from __future__ import annotations

import errno
import time
from collections import Counter
from pathlib import Path

from transfer import storage
from transfer.db import Database, Row
from transfer.errors import ApiError, bad_request
from transfer.ids import iso, new_ref, new_uuid
from transfer.sizes import round_to_sector
from transfer.srs import SrService

# Runtime formats whose drivers exist; the SR may advertise more (see srs.IMAGE_FORMATS).
RUNTIME_FORMATS = ("raw",)
MAX_NAME = 255
MAX_VIRTUAL_SIZE = 2**63 - 2**20  # what an off_t holds; the filesystem may allow less


class VdiService:
    def __init__(self, db: Database, srs: SrService):
        self.db = db
        self.srs = srs
        # Exports running on this host, per VDI: a writer must wait until they are done.
        self.readers: Counter[str] = Counter()

    async def get(self, ident: str) -> Row:
        row = await self.db.fetchone("SELECT * FROM vdis WHERE uuid = ? OR ref = ?", ident, ident)
        if row is None:
            raise ApiError("VDI_NOT_FOUND", f"no VDI {ident}", ident)
        return row

    async def list(self, sr: str | None = None) -> list[Row]:
        if sr is not None:
            sr_row = await self.srs.get(sr)
            return await self.db.fetchall(
                "SELECT * FROM vdis WHERE sr = ? ORDER BY created, uuid", sr_row["uuid"]
            )
        return await self.db.fetchall("SELECT * FROM vdis ORDER BY created, uuid")

    async def path(self, row: Row) -> Path:
        sr = await self.srs.get(row["sr"])
        return Path(sr["path"]) / row["path"]

    async def create(
        self, sr: Row, name_label: str, virtual_size: int, image_format: str | None = None
    ) -> Row:
        """A new, empty (sparse) VDI: the file exists and is durable before the record does."""
        if not isinstance(name_label, str) or len(name_label) > MAX_NAME:
            raise bad_request(f"name_label must be a string of at most {MAX_NAME} characters")
        fmt = (image_format or sr["default_image_format"]).lower()
        supported = self.srs.formats(sr)
        if fmt not in supported:
            raise ApiError(
                "FORMAT_UNSUPPORTED",
                f"SR {sr['name_label']!r} supports image formats {', '.join(supported)}, not {fmt}",
                fmt,
                sr["uuid"],
            )
        if fmt not in RUNTIME_FORMATS:
            raise ApiError(
                "FORMAT_UNSUPPORTED",
                f"VDIs stored as {fmt} are not implemented yet; use image_format raw",
                fmt,
            )
        size = round_to_sector(virtual_size)
        if size <= 0:
            raise bad_request("virtual_size must be greater than zero", virtual_size)
        vdi_uuid = new_uuid()
        filename = f"{vdi_uuid}.{fmt}"
        path = Path(sr["path"]) / filename
        too_big = bad_request(
            f"virtual_size {size} is larger than SR {sr['name_label']!r} can hold", size
        )
        if size > MAX_VIRTUAL_SIZE:
            raise too_big
        try:
            await storage.in_thread(storage.create_sparse, path, size)
        except OSError as exc:
            if exc.errno in (errno.EFBIG, errno.EINVAL):
                raise too_big from None
            raise
        try:
            await self.db.execute(
                "INSERT INTO vdis (uuid, ref, name_label, sr, virtual_size, image_format, "
                "path, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                vdi_uuid,
                new_ref(),
                name_label,
                sr["uuid"],
                size,
                fmt,
                filename,
                time.time(),
            )
        except BaseException:
            await storage.in_thread(storage.remove, path)
            raise
        return await self.get(vdi_uuid)

    async def delete(self, ident: str) -> Row:
        row = await self.get(ident)
        changed = await self.db.execute(
            "DELETE FROM vdis WHERE uuid = ? AND locked_by IS NULL", row["uuid"]
        )
        if not changed:
            raise ApiError(
                "VDI_IN_USE", f"VDI {row['uuid']} is in use by task {row['locked_by']}", row["uuid"]
            )
        # The record goes first: a crash in between leaves an orphan file, never a record
        # pointing at nothing.
        await storage.in_thread(storage.remove, await self.path(row))
        return row

    @staticmethod
    def check_not_written(row: Row) -> None:
        """VDI_IN_USE if a writer holds the VDI (anywhere: the lock is in the database)."""
        if row["locked_by"]:
            raise ApiError(
                "VDI_IN_USE",
                f"VDI {row['uuid']} is in use by task {row['locked_by']}",
                row["uuid"],
                row["locked_by"],
            )

    def check_free(self, row: Row) -> None:
        """VDI_IN_USE if a writer holds the VDI or an export here is reading it."""
        self.check_not_written(row)
        if self.readers[row["uuid"]]:
            raise ApiError("VDI_IN_USE", f"VDI {row['uuid']} is being exported", row["uuid"])

    async def lock(self, vdi_uuid: str, task_uuid: str) -> None:
        """Take the VDI for one writer; VDI_IN_USE if another holds it or an export reads it.
        The lock is a conditional UPDATE, so it holds across processes; it also bumps the
        generation, so ETags of the old content stop matching."""
        changed = await self.db.execute(
            "UPDATE vdis SET locked_by = ?, generation = generation + 1 "
            "WHERE uuid = ? AND locked_by IS NULL",
            task_uuid,
            vdi_uuid,
        )
        if not changed:
            self.check_free(await self.get(vdi_uuid))
            raise ApiError("VDI_IN_USE", f"VDI {vdi_uuid} is in use", vdi_uuid)
        if self.readers[vdi_uuid]:
            await self.unlock(vdi_uuid, task_uuid)
            raise ApiError("VDI_IN_USE", f"VDI {vdi_uuid} is being exported", vdi_uuid)

    async def bump_generation(self, vdi_uuid: str) -> None:
        """The content changed: strong ETags of the old content must not match any more."""
        await self.db.execute(
            "UPDATE vdis SET generation = generation + 1 WHERE uuid = ?", vdi_uuid
        )

    async def unlock(self, vdi_uuid: str, task_uuid: str) -> None:
        await self.db.execute(
            "UPDATE vdis SET locked_by = NULL WHERE uuid = ? AND locked_by = ?",
            vdi_uuid,
            task_uuid,
        )

    async def backing_chain(self, row: Row) -> list[dict]:
        chain, seen = [], set()
        current: Row | None = row
        while current is not None and current["uuid"] not in seen:
            seen.add(current["uuid"])
            chain.append({"uuid": current["uuid"], "image_format": current["image_format"]})
            parent = current["parent"]
            current = (
                await self.db.fetchone("SELECT * FROM vdis WHERE uuid = ?", parent)
                if parent
                else None
            )
        return chain

    async def to_json(self, row: Row) -> dict:
        path = await self.path(row)
        return {
            "uuid": row["uuid"],
            "ref": row["ref"],
            "name_label": row["name_label"],
            "sr": row["sr"],
            "virtual_size": row["virtual_size"],
            "physical_utilisation": await storage.in_thread(storage.allocated_bytes, path),
            "image_format": row["image_format"],
            "read_only": bool(row["read_only"]),
            "is_a_snapshot": bool(row["is_a_snapshot"]),
            "snapshot_of": row["snapshot_of"],
            "parent": row["parent"],
            "backing_chain": await self.backing_chain(row),
            "created": iso(row["created"]),
        }
