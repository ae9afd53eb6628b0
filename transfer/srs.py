"""Storage repositories: directories where VDI files live. A local SR is reachable by one
host only (its VDIs are served there: transfer/pool.py); a shared SR is a directory every
host of the pool mounts at the same path (NFS, say), and any host serves its VDIs."""

from __future__ import annotations

import time
from pathlib import Path

from common.errors import ApiError, bad_request
from formats.registry import RAW, RUNTIME_FORMATS
from transfer import files
from transfer.db import Database, Row
from transfer.ids import new_ref, new_uuid

LOCAL_SR_NAME = "Local storage"
MARKER = ".vdi-transfer-sr"  # in an SR's directory: whose it is, so a wrong mount shows


class SrService:
    """The SRs of the pool: their records, their directories, and which host serves each."""

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
            row = await self._insert(sr_uuid, LOCAL_SR_NAME, path, False, RUNTIME_FORMATS, RAW.name)
        path = Path(row["path"])
        await files.in_thread(files.ensure_sr_dir, path)
        if not (path / MARKER).exists():  # new, or made before SRs had markers
            await files.in_thread(_write_marker, path, row["uuid"])
        return row

    async def create(
        self,
        path: Path,
        *,
        shared: bool,
        name_label: str | None,
        formats: list[str],
        default_format: str,
    ) -> Row:
        """A new SR on a directory. A shared one must already exist (it is a mount every
        host has); a local one is created. Either gets a marker naming the SR."""
        if not path.is_absolute():
            raise bad_request(f"the SR's path must be absolute, not {path}")
        unknown = [f for f in formats if f not in RUNTIME_FORMATS]
        if unknown or not formats:
            raise bad_request(
                f"image formats must be some of {', '.join(RUNTIME_FORMATS)}, not {formats}"
            )
        if default_format not in formats:
            raise bad_request(f"the default image format {default_format} is not in {formats}")
        if shared and not path.is_dir():
            raise bad_request(f"{path} is not a directory: mount it on every host first")
        for row in await self.list():
            if Path(row["path"]) == path and (row["shared"] or row["host"] == self.host_uuid):
                raise bad_request(f"{path} is SR {row['uuid']} already", row["uuid"])
        sr_uuid = new_uuid()
        await files.in_thread(files.ensure_sr_dir, path)
        await files.in_thread(_write_marker, path, sr_uuid)
        name = name_label or ("Shared storage" if shared else LOCAL_SR_NAME)
        row = await self._insert(sr_uuid, name, path, shared, formats, default_format)
        await self.record_physical_size(row)
        return row

    async def _insert(
        self,
        sr_uuid: str,
        name_label: str,
        path: Path,
        shared: bool,
        formats: list[str] | tuple[str, ...],
        default_format: str,
    ) -> Row:
        await self.db.execute(
            "INSERT INTO srs (uuid, ref, name_label, type, shared, host, path, "
            "supported_image_formats, default_image_format, created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            sr_uuid,
            new_ref(),
            name_label,
            "shared" if shared else "local",
            int(shared),
            None if shared else self.host_uuid,
            str(path),
            ",".join(formats),
            default_format,
            time.time(),
        )
        return await self.get(sr_uuid)

    async def record_physical_size(self, row: Row) -> int:
        """The size of the SR's filesystem, measured here and recorded for the hosts of the
        pool that cannot see the directory."""
        total, _ = await files.in_thread(files.filesystem_size, Path(row["path"]))
        if total != row["physical_size"]:
            await self.db.execute(
                "UPDATE srs SET physical_size = ? WHERE uuid = ?", total, row["uuid"]
            )
        return total

    async def unreachable_shared(self) -> list[Row]:
        """Shared SRs this host cannot see (not mounted, or another SR's directory)."""
        return [row for row in await self.unreachable() if row["shared"]]

    async def unreachable(self) -> list[Row]:
        """SRs this host serves (shared ones, and its own local ones) whose directory is
        missing or holds another SR's marker: not mounted, or mounted wrong."""
        rows = [row for row in await self.list() if self.owner(row) is None]

        def reachable(row: Row) -> bool:
            try:
                return (Path(row["path"]) / MARKER).read_text().strip() == row["uuid"]
            except OSError:
                return False

        return [row for row in rows if not await files.in_thread(reachable, row)]

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

    def owner(self, sr: Row) -> str | None:
        """The host that must serve the SR's VDIs, or None if this host can: a shared SR,
        or one local to this host (transfer/pool.py redirects the rest)."""
        if sr["shared"] or sr["host"] in (None, self.host_uuid):
            return None
        return sr["host"]

    @staticmethod
    def formats(row: Row) -> list[str]:
        return [f for f in row["supported_image_formats"].split(",") if f]

    async def sizes(self, row: Row) -> tuple[int, int]:
        """(physical_size, physical_utilisation). A host that cannot see the SR's directory
        (another host's local SR) reports what the owner last recorded."""
        if self.owner(row) is not None:
            used = await self.db.fetchone(
                "SELECT SUM(physical_utilisation) AS n FROM vdis WHERE sr = ?", row["uuid"]
            )
            return row["physical_size"] or 0, int(used["n"] or 0) if used else 0
        path = Path(row["path"])
        vdi_files = await self.db.fetchall("SELECT path FROM vdis WHERE sr = ?", row["uuid"])

        def used() -> int:
            return sum(files.allocated_bytes(path / f["path"]) for f in vdi_files)

        return await self.record_physical_size(row), await files.in_thread(used)

    async def to_json(self, row: Row) -> dict:
        physical_size, used = await self.sizes(row)
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


def _write_marker(directory: Path, sr_uuid: str) -> None:
    marker = directory / MARKER
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(sr_uuid + "\n")
    tmp.replace(marker)
    files.fsync_dir(directory)
