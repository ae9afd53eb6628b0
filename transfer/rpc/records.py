"""Our hosts, SRs, VDIs and tasks as XenAPI records: XAPI's field names and types, refs
instead of uuids for links, and the fields XAPI clients read even where we have nothing to
put in them (no VBDs, no PBDs), so they find what they expect.

Refs are the `ref` column every record has; the pool, which is no row of its own, has a
uuid and ref kept in pool_settings.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse

from transfer import __version__
from transfer.db import Row
from transfer.ids import new_ref, new_uuid
from transfer.rpc.wire import NEVER, Timestamp
from transfer.services import Services

NULL_REF = "OpaqueRef:NULL"
CLASSES = ("pool", "host", "SR", "VDI", "task")  # what this server has records of


async def pool_identity(svc: Services) -> tuple[str, str]:
    """The pool's (uuid, ref), created once for the whole pool by whichever host asks first."""
    for name, value in (("pool_uuid", new_uuid()), ("pool_ref", new_ref())):
        await svc.db.execute(
            "INSERT INTO pool_settings (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
            name,
            value,
        )
    rows = await svc.db.fetchall(
        "SELECT name, value FROM pool_settings WHERE name IN ('pool_uuid', 'pool_ref')"
    )
    values = {r["name"]: r["value"] for r in rows}
    return values["pool_uuid"], values["pool_ref"]


class RecordView:
    """Builds XenAPI records for one call, remembering the refs it has looked up."""

    def __init__(self, svc: Services):
        self.svc = svc
        self._refs: dict[tuple[str, str], str] = {}

    async def ref_of(self, table: str, uuid: str | None) -> str:
        """The ref of the `table` row `uuid`; OpaqueRef:NULL for none (or a hidden layer)."""
        if not uuid:
            return NULL_REF
        key = (table, uuid)
        if key not in self._refs:
            extra = " AND hidden = 0" if table == "vdis" else ""
            row = await self.svc.db.fetchone(f"SELECT ref FROM {table} WHERE uuid = ?{extra}", uuid)
            self._refs[key] = row["ref"] if row and row["ref"] else NULL_REF
        return self._refs[key]

    # -- pool and hosts --------------------------------------------------------------------

    async def pool(self) -> tuple[str, dict]:
        uuid, ref = await pool_identity(self.svc)
        this_host = await self.svc.hosts.get(self.svc.hosts.uuid)
        default_sr = await self.svc.srs.default()
        return ref, {
            "uuid": uuid,
            "name_label": "",
            "name_description": "",
            # A pool of vdi-transfer hosts has no master: the host a client talks to
            # serves it, so that host is the one it should keep talking to.
            "master": this_host["ref"],
            "default_SR": default_sr["ref"],
            "suspend_image_SR": NULL_REF,
            "crash_dump_SR": NULL_REF,
            "ha_enabled": False,
            "other_config": {},
            "tags": [],
            "allowed_operations": [],
            "current_operations": {},
        }

    async def host(self, row: Row) -> dict:
        address = urllib.parse.urlsplit(row["address"]).hostname or row["address"]
        live = self.svc.hosts.is_live(row)
        return {
            "uuid": row["uuid"],
            "name_label": row["name_label"],
            "name_description": "",
            "hostname": address,
            "address": address,  # XAPI: an IP or name; the HTTP base URL is in other_config
            "enabled": live,
            "API_version_major": 2,
            "API_version_minor": 21,
            "API_version_vendor": "XenSource",
            "software_version": {"product_brand": "vdi-transfer", "xapi": __version__},
            "other_config": {"advertise_url": row["address"]},
            "resident_VMs": [],
            "PBDs": [],
            "PIFs": [],
            "metrics": NULL_REF,
            "tags": [],
            "allowed_operations": [],
            "current_operations": {},
        }

    # -- SRs -------------------------------------------------------------------------------

    async def sr(self, row: Row) -> dict:
        physical_size, used = await self.svc.srs.sizes(row)
        vdis = await self.svc.db.fetchall(
            "SELECT ref, virtual_size FROM vdis WHERE sr = ? AND hidden = 0 ORDER BY created",
            row["uuid"],
        )
        return {
            "uuid": row["uuid"],
            "name_label": row["name_label"],
            "name_description": "",
            "type": row["type"],
            "content_type": "user",
            "shared": bool(row["shared"]),
            "VDIs": [v["ref"] for v in vdis],
            "PBDs": [],
            "physical_size": physical_size,
            "physical_utilisation": used,
            "virtual_allocation": sum(v["virtual_size"] for v in vdis),
            "sm_config": {
                "supported-image-formats": ",".join(self.svc.srs.formats(row)),
                "default-image-format": row["default_image_format"],
            },
            "other_config": {},
            "tags": [],
            "blobs": {},
            "local_cache_enabled": False,
            "introduced_by": NULL_REF,
            "clustered": False,
            "is_tools_sr": False,
            "allowed_operations": ["vdi_create", "vdi_destroy", "vdi_snapshot", "vdi_clone"],
            "current_operations": {},
        }

    # -- VDIs ------------------------------------------------------------------------------

    async def vdi(self, row: Row) -> dict:
        vdis = self.svc.vdis
        snapshots = await self.svc.db.fetchall(
            "SELECT ref FROM vdis WHERE snapshot_of = ? AND hidden = 0 ORDER BY created",
            row["uuid"],
        )
        sm_config = {"image-format": row["image_format"]}
        if row["parent"]:
            sm_config["vhd-parent"] = row["parent"]  # XAPI names the parent layer so
        busy = row["locked_by"] is not None
        return {
            "uuid": row["uuid"],
            "name_label": row["name_label"],
            "name_description": "",
            "SR": await self.ref_of("srs", row["sr"]),
            "VBDs": [],
            "crash_dumps": [],
            "virtual_size": row["virtual_size"],
            "physical_utilisation": await vdis.usage(row),
            "type": "cbt_metadata" if row["data_destroyed"] else "user",
            "sharable": False,
            "read_only": bool(row["read_only"]),
            "managed": True,
            "missing": False,
            "parent": NULL_REF,
            "location": row["uuid"],
            "storage_lock": False,
            "is_a_snapshot": bool(row["is_a_snapshot"]),
            "snapshot_of": await self.ref_of("vdis", row["snapshot_of"]),
            "snapshots": [s["ref"] for s in snapshots],
            "snapshot_time": Timestamp(row["created"]) if row["is_a_snapshot"] else NEVER,
            "sm_config": sm_config,
            "other_config": {},
            "xenstore_data": {},
            "tags": [],
            "allow_caching": False,
            "on_boot": "persist",
            "metadata_of_pool": NULL_REF,
            "metadata_latest": False,
            "is_tools_iso": False,
            "cbt_enabled": bool(row["cbt_enabled"]),
            "allowed_operations": [] if busy else _vdi_operations(row),
            "current_operations": {row["locked_by"]: "update"} if busy else {},
        }

    # -- tasks -----------------------------------------------------------------------------

    async def task(self, row: Row) -> dict:
        live = self.svc.tasks.to_json(row)  # progress of a transfer running here
        status = row["status"]
        return {
            "uuid": row["uuid"],
            "name_label": row["name_label"],
            "name_description": "",
            "allowed_operations": ["cancel"] if status == "pending" else [],
            "current_operations": {},
            "created": Timestamp(row["created"]),
            "finished": Timestamp(row["finished"]) if row["finished"] else NEVER,
            "status": status,
            "resident_on": await self.ref_of("hosts", row["host"]),
            "progress": float(live["progress"]),
            "type": "<none/>",
            "result": await self.task_result(row),
            "error_info": json.loads(row["error_info"]),
            "other_config": {},
            "subtask_of": NULL_REF,
            "subtasks": [],
            "backtrace": "()",
        }

    async def task_result(self, row: Row) -> str:
        """An import's result as XAPI writes it: the new VDI's ref as an XML-RPC value."""
        if row["status"] != "success" or not row["result"]:
            return ""
        ref = await self.ref_of("vdis", row["result"])
        return f"<value>{ref}</value>" if ref != NULL_REF else ""

    # -- by class --------------------------------------------------------------------------

    async def all_of(self, cls: str) -> dict[str, dict]:
        """{ref: record} of every `cls` object (a XenAPI class name)."""
        if cls == "pool":
            ref, record = await self.pool()
            return {ref: record}
        rows = await self.rows_of(cls)
        build = getattr(self, cls.lower())
        records = await asyncio.gather(*(build(r) for r in rows))
        return {r["ref"]: rec for r, rec in zip(rows, records, strict=True)}

    async def rows_of(self, cls: str) -> list[Row]:
        if cls == "host":
            return await self.svc.hosts.list()
        if cls == "SR":
            return await self.svc.srs.list()
        if cls == "VDI":
            return await self.svc.vdis.list()
        if cls == "task":
            return await self.svc.tasks.list()
        raise KeyError(cls)

    async def one(self, cls: str, uuid: str) -> tuple[str, dict] | None:
        """(ref, record) of the `cls` object `uuid` (event.from's snapshot), None if gone."""
        if cls == "pool":
            ref, record = await self.pool()
            return (ref, record) if record["uuid"] == uuid else None
        table = {"VDI": "vdis", "task": "tasks", "SR": "srs", "host": "hosts"}[cls]
        extra = " AND hidden = 0" if cls == "VDI" else ""
        row = await self.svc.db.fetchone(f"SELECT * FROM {table} WHERE uuid = ?{extra}", uuid)
        if row is None:
            return None
        return row["ref"], await getattr(self, cls.lower())(row)


def _vdi_operations(row: Row) -> list[str]:
    if row["read_only"]:
        return ["clone", "destroy", "copy"]
    return ["clone", "destroy", "snapshot", "copy", "update"]
