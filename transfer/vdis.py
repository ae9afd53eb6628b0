"""VDI records and their files: create, look up, list, delete, and the transfer lock."""

from __future__ import annotations

import asyncio
import errno
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from common.db import Executor
from common.errors import ApiError, bad_request
from formats.registry import FORMATS, Identity
from transfer import cbt, files, layers
from transfer.db import Database, Row
from transfer.events import EventLog
from transfer.hosts import HostService
from transfer.ids import iso, new_ref
from transfer.ids import new_uuid as new_uuid_str
from transfer.sizes import round_to_sector
from transfer.srs import SrService

MAX_NAME = 255
MAX_VIRTUAL_SIZE = 2**63 - 2**20  # what an off_t holds; the filesystem may allow less
READER_GRACE = 5.0  # seconds a writer waits for exports that are finishing
READER_POLL = 0.02  # how often it looks again
CHAIN_ATTEMPTS = 5  # walks of a chain that coalescing changes meanwhile, before giving up


def _being_exported(vdi_uuid: str) -> ApiError:
    return ApiError("VDI_IN_USE", f"VDI {vdi_uuid} is being exported", vdi_uuid)


class VdiService:
    """VDIs and their files kept in step: create, snapshot, clone, delete, and the locks and
    read leases transfers hold."""

    def __init__(self, db: Database, srs: SrService, hosts: HostService, events: EventLog):
        self.db = db
        self.events = events  # adds and deletes a XenAPI client sees (event.from)
        self.srs = srs
        self.hosts = hosts  # a read lease counts while its host is live
        # Locks held by background merges on this host, which give way to any client:
        # VDI uuid -> (the merge's task, a coroutine that stops it and waits for its unlock).
        self._yielding: dict[str, tuple[str, Callable[[], Awaitable[None]]]] = {}

    async def get(self, ident: str) -> Row:
        row = await self.db.fetchone(
            "SELECT * FROM vdis WHERE (uuid = ? OR ref = ?) AND hidden = 0", ident, ident
        )
        if row is None:
            raise ApiError("VDI_NOT_FOUND", f"no VDI {ident}", ident)
        return row

    async def list(self, sr: str | None = None) -> list[Row]:
        if sr is not None:
            sr_row = await self.srs.get(sr)
            return await self.db.fetchall(
                "SELECT * FROM vdis WHERE sr = ? AND hidden = 0 ORDER BY created, uuid",
                sr_row["uuid"],
            )
        return await self.db.fetchall("SELECT * FROM vdis WHERE hidden = 0 ORDER BY created, uuid")

    async def owner(self, row: Row) -> str | None:
        """The host that must serve this VDI, or None if this host can (transfer/pool.py)."""
        return self.srs.owner(await self.srs.get(row["sr"]))

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
        size = round_to_sector(virtual_size)
        if size <= 0:
            raise bad_request("virtual_size must be greater than zero", virtual_size)
        vdi_uuid = new_uuid_str()
        filename = f"{vdi_uuid}.{fmt}"
        path = Path(sr["path"]) / filename
        too_big = bad_request(
            f"virtual_size {size} is larger than SR {sr['name_label']!r} can hold", size
        )
        if size > MAX_VIRTUAL_SIZE:
            raise too_big
        identity = Identity(uuid.UUID(vdi_uuid), time.time())
        try:
            await files.in_thread(layers.create_image, path, fmt, size, identity)
        except ValueError as exc:  # the format cannot hold such a disk
            raise bad_request(f"a {fmt} VDI cannot be {size} bytes: {exc}", size) from None
        except OSError as exc:
            if exc.errno in (errno.EFBIG, errno.EINVAL):
                raise too_big from None
            raise
        try:
            async with self.db.transaction() as tx:
                await tx.execute(
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
                await self.events.record("vdi", vdi_uuid, "add", db=tx)
        except BaseException:
            await files.in_thread(files.remove, path)
            raise
        return await self.get(vdi_uuid)

    # -- changed block tracking (transfer/cbt.py) ---------------------------------------------

    async def _log(self, row: Row, vdi_uuid: str | None = None) -> Path:
        """The change log of version `vdi_uuid` (default: the row's own), in the row's SR."""
        sr = await self.srs.get(row["sr"])
        return Path(sr["path"]) / f"{vdi_uuid or row['uuid']}.cbt"

    async def set_cbt(self, ident: str, enabled: bool) -> Row:
        """Turn tracking on (an empty log; complete only for a VDI never written) or off
        (its log is discarded). Snapshots keep what they were taken with."""
        row = await self.get(ident)
        if row["read_only"]:
            raise ApiError(
                "VDI_READ_ONLY", f"VDI {row['uuid']} is a snapshot: it tracks nothing", row["uuid"]
            )
        if bool(row["cbt_enabled"]) == enabled:
            return row
        task = self._own_lock("cbt", row["uuid"])
        await self.lock(row["uuid"], task)  # no import writes while the log changes hands
        try:
            log = await self._log(row)
            if enabled:
                await files.in_thread(cbt.create, log, row["virtual_size"])
                untouched = row["generation"] == 0 and row["parent"] is None
            else:
                await files.in_thread(cbt.remove, log)
                untouched = False
            async with self.db.transaction() as tx:
                await tx.execute(
                    "UPDATE vdis SET cbt_enabled = ?, cbt_complete = ? WHERE uuid = ?",
                    int(enabled),
                    int(enabled and untouched),
                    row["uuid"],
                )
                await self.events.record("vdi", row["uuid"], db=tx)
        finally:
            await self.unlock(row["uuid"], task)
        return await self.get(row["uuid"])

    async def _cbt_freeze(self, live: Row, frozen_uuid: str) -> None:
        """A version was frozen from the live VDI (its snapshot, or a clone's hidden base):
        it takes the VDI's epoch and log, and the VDI starts an empty, complete one."""
        if not live["cbt_enabled"]:
            return
        log, frozen_log = await self._log(live), await self._log(live, frozen_uuid)

        def hand_over() -> bool:
            had = log.exists()
            if had:
                cbt.rename(log, frozen_log)
            cbt.create(log, live["virtual_size"])
            return had

        had_log = await files.in_thread(hand_over)
        async with self.db.transaction() as tx:
            await tx.execute(
                "UPDATE vdis SET cbt_enabled = 1, cbt_prev = ?, cbt_complete = ? WHERE uuid = ?",
                live["cbt_prev"],
                int(bool(live["cbt_complete"]) and had_log),
                frozen_uuid,
            )
            await tx.execute(
                "UPDATE vdis SET cbt_prev = ?, cbt_complete = 1 WHERE uuid = ?",
                frozen_uuid,
                live["uuid"],
            )

    async def _cbt_start(self, source: Row, new_uuid: str) -> None:
        """A clone of a tracked version is tracked from it on, with an empty log."""
        if not source["cbt_enabled"]:
            return
        new = await self._get_any(new_uuid)
        await files.in_thread(cbt.create, await self._log(new), new["virtual_size"])
        await self.db.execute(
            "UPDATE vdis SET cbt_enabled = 1, cbt_prev = ?, cbt_complete = 1 WHERE uuid = ?",
            source["uuid"],
            new_uuid,
        )

    async def _cbt_successors(self, row: Row, check_writers: bool = True) -> list[Row]:
        """The versions whose epoch follows the one of `row`, which is going away: its log
        is merged into theirs first (a crash after this leaves extra bits, never fewer).
        `check_writers`: VDI_IN_USE if an import holds a successor's log open."""
        successors = await self.db.fetchall("SELECT * FROM vdis WHERE cbt_prev = ?", row["uuid"])
        log = await self._log(row)
        bitmap = await files.in_thread(cbt.load, log, row["virtual_size"])
        for successor in successors:
            if check_writers:
                self.check_not_written(successor)
            if bitmap is not None:
                await files.in_thread(
                    cbt.merge_into, await self._log(successor), bitmap, successor["virtual_size"]
                )
        await files.in_thread(cbt.remove, log)
        return successors

    @staticmethod
    async def _pass_epoch(tx: Executor, row: Row, successors: list[Row]) -> None:
        """The successors take over the epoch of `row`, which goes: they follow what it
        followed, and are complete only if it was."""
        for successor in successors:
            await tx.execute(
                "UPDATE vdis SET cbt_prev = ?, cbt_complete = ? WHERE uuid = ?",
                row["cbt_prev"],
                int(bool(successor["cbt_complete"] and row["cbt_complete"])),
                successor["uuid"],
            )

    async def unlink_merged(self, layer: Row, child: Row) -> None:
        """Coalescing merged `layer` into its only `child`, whose file now holds both: the
        child reads straight from the layer's parent, and the layer leaves the chain. A
        hidden layer's record goes (its change log joins the next versions'); a cbt_metadata
        snapshot's record stays, with no data and no parent. Idempotent (a restart may
        finish a switch that a crash interrupted)."""
        successors = []
        if layer["hidden"]:  # (the merge holds or froze its successors: no writer to check)
            successors = await self._cbt_successors(layer, check_writers=False)
        async with self.db.transaction() as tx:
            current = await self._hold_row(tx, layer["uuid"])
            moved = await tx.execute(
                "UPDATE vdis SET parent = ? WHERE uuid = ? AND parent = ?",
                current["parent"],
                child["uuid"],
                layer["uuid"],
            )
            if not moved:
                raise ApiError(
                    "INTERNAL_ERROR",
                    f"VDI {child['uuid']} no longer reads through {layer['uuid']}",
                )
            await self._pass_epoch(tx, layer, successors)
            if layer["hidden"]:
                await tx.execute("DELETE FROM vdis WHERE uuid = ?", layer["uuid"])
            else:
                await tx.execute(
                    "UPDATE vdis SET parent = NULL, merging_into = NULL WHERE uuid = ?",
                    layer["uuid"],
                )
                await self.events.record("vdi", layer["uuid"], db=tx)
            await self.events.record("vdi", child["uuid"], db=tx)

    async def changed_blocks(self, to: Row, base: Row) -> bytes:
        """The bitmap of the 64 KiB blocks that differ between two versions of one disk, in
        either order; 409 VDI_NO_CBT_METADATA unless tracking covered all between them."""
        epochs = await self._epochs_between(to, base)
        if epochs is None:
            epochs = await self._epochs_between(base, to)
        if epochs is None:
            raise ApiError(
                "VDI_NO_CBT_METADATA",
                f"VDIs {base['uuid']} and {to['uuid']} are not versions of one disk tracked "
                "with changed block tracking",
                base["uuid"],
                to["uuid"],
                status=409,
            )
        size = cbt.size_of(to["virtual_size"])
        bitmaps = []
        for epoch in epochs:
            bitmap = await files.in_thread(cbt.load, await self._log(epoch), epoch["virtual_size"])
            if not epoch["cbt_complete"] or bitmap is None:
                raise ApiError(
                    "VDI_NO_CBT_METADATA",
                    f"changed block tracking was not on all the time between {base['uuid']} "
                    f"and {to['uuid']} (version {epoch['uuid']})",
                    base["uuid"],
                    to["uuid"],
                    status=409,
                )
            bitmaps.append(bitmap)
        return cbt.union(bitmaps, size)

    async def _epochs_between(self, newer: Row, older: Row) -> list[Row] | None:
        """The versions from `newer` back to (not including) `older`, following cbt_prev;
        None if `older` is not on that way."""
        epochs: list[Row] = []
        current: Row | None = newer
        seen: set[str] = set()
        while current is not None and current["uuid"] not in seen:
            if current["uuid"] == older["uuid"]:
                return epochs
            seen.add(current["uuid"])
            epochs.append(current)
            prev = current["cbt_prev"]
            current = (
                await self.db.fetchone("SELECT * FROM vdis WHERE uuid = ?", prev) if prev else None
            )
        return None

    @staticmethod
    def check_has_data(row: Row) -> None:
        """VDI_INCOMPATIBLE_TYPE for a snapshot whose data was destroyed: it has a record
        and a change log, and nothing to read."""
        if row["data_destroyed"]:
            raise ApiError(
                "VDI_INCOMPATIBLE_TYPE",
                f"VDI {row['uuid']} is cbt_metadata: its data was destroyed; it serves only as "
                "base= of incremental exports and changed_blocks",
                row["uuid"],
                "cbt_metadata",
                status=409,
            )

    async def data_destroy(self, ident: str) -> Row:
        """Release a tracked snapshot's data, keep its record and change log (type
        cbt_metadata). A raw snapshot's file goes at once; a VHD/QCOW2 snapshot's file is
        a layer the VDI still reads through, and stays until the layers are coalesced."""
        row = await self.get(ident)
        if not row["is_a_snapshot"]:
            raise ApiError(
                "VDI_INCOMPATIBLE_TYPE",
                f"VDI {row['uuid']} is not a snapshot: only a snapshot's data can be destroyed",
                row["uuid"],
                "user",
                status=409,
            )
        if not row["cbt_enabled"]:
            raise ApiError(
                "VDI_NO_CBT_METADATA",
                f"snapshot {row['uuid']} was not taken with changed block tracking on: "
                "without its data it would be of no use",
                row["uuid"],
                status=409,
            )
        if row["data_destroyed"]:
            return row
        await self.ensure_free(row)
        readers = await self.db.fetchone("SELECT 1 FROM vdis WHERE parent = ? LIMIT 1", row["uuid"])
        async with self.db.transaction() as tx:
            await self._hold_row(tx, row["uuid"])
            if await self._readers(tx, row["uuid"]):
                raise _being_exported(row["uuid"])
            await tx.execute("UPDATE vdis SET data_destroyed = 1 WHERE uuid = ?", row["uuid"])
            await self.events.record("vdi", row["uuid"], db=tx)
        if readers is None:  # no layer above: the file is nobody's
            await files.in_thread(files.remove, await self.path(row))
        return await self.get(row["uuid"])

    async def rename(self, vdi_uuid: str, name_label: str) -> None:
        if len(name_label) > MAX_NAME:
            raise bad_request(f"name_label must be at most {MAX_NAME} characters")
        async with self.db.transaction() as tx:
            await tx.execute("UPDATE vdis SET name_label = ? WHERE uuid = ?", name_label, vdi_uuid)
            await self.events.record("vdi", vdi_uuid, db=tx)

    async def delete(self, ident: str) -> Row:
        """Remove a VDI. If other VDIs read through its file (it is a layer of their chains),
        it only disappears from view; the file goes with the last VDI that needs it."""
        row = await self.get(ident)
        await self.ensure_free(row)
        successors = await self._cbt_successors(row)
        removed: list[Row] = []
        async with self.db.transaction() as tx:
            await self._hold_row(tx, row["uuid"])
            if await self._readers(tx, row["uuid"]):  # an export began since ensure_free
                raise _being_exported(row["uuid"])
            await self.events.record("vdi", row["uuid"], "del", ref=row["ref"], db=tx)
            await self._pass_epoch(tx, row, successors)
            current: Row | None = row
            while current is not None:
                if await tx.fetchone(
                    "SELECT 1 FROM vdis WHERE parent = ? LIMIT 1", current["uuid"]
                ):
                    await tx.execute("UPDATE vdis SET hidden = 1 WHERE uuid = ?", current["uuid"])
                    break
                changed = await tx.execute(
                    "DELETE FROM vdis WHERE uuid = ? AND locked_by IS NULL", current["uuid"]
                )
                if not changed:
                    raise ApiError(
                        "VDI_IN_USE", f"VDI {current['uuid']} is in use", current["uuid"]
                    )
                removed.append(current)
                parent = current["parent"]
                current = None
                if parent:
                    above = await tx.fetchone(
                        "SELECT * FROM vdis WHERE uuid = ? AND hidden = 1", parent
                    )
                    current = above  # a hidden layer nobody needs any more goes too
        # Records go first: a crash in between leaves an orphan file, never a record
        # pointing at nothing.
        for gone in removed:
            await files.in_thread(files.remove, await self.path(gone))
        return row

    async def chain_rows(self, row: Row) -> list[Row]:
        """The VDI and the layers under it, top first, from the database. Coalescing may
        take a layer out between two reads: then the walk starts again from the top."""
        for _attempt in range(CHAIN_ATTEMPTS):
            rows, seen = [row], {row["uuid"]}
            while rows[-1]["parent"]:
                parent = await self.db.fetchone(
                    "SELECT * FROM vdis WHERE uuid = ?", rows[-1]["parent"]
                )
                if parent is None or parent["uuid"] in seen:
                    break
                rows.append(parent)
                seen.add(parent["uuid"])
            else:
                return rows
            fresh = await self.db.fetchone("SELECT * FROM vdis WHERE uuid = ?", row["uuid"])
            if fresh is None:
                raise ApiError("VDI_NOT_FOUND", f"no VDI {row['uuid']}", row["uuid"])
            row = fresh
        raise ApiError(
            "INTERNAL_ERROR",
            f"the backing chain of VDI {row['uuid']} is broken at {rows[-1]['uuid']}",
        )

    async def chain_files(self, row: Row) -> list[tuple[Path, str]]:
        return [(await self.path(r), r["image_format"]) for r in await self.chain_rows(row)]

    async def snapshot(self, ident: str, name_label: str | None = None) -> Row:
        """A read-only point-in-time copy. VHD/QCOW2: the VDI's file becomes the snapshot
        and the VDI carries on in a new, empty child layer: O(1), no data copied. Raw: a
        copy (a reflink where the filesystem can, else the data extents only)."""
        row = await self.get(ident)
        snap = await self._derive(row, name_label, snapshot=True)
        await self.events.record("vdi", row["uuid"])  # its list of snapshots grew
        return snap

    async def clone(self, ident: str, name_label: str | None = None) -> Row:
        """A writable VDI starting from this one's content. Of a snapshot (VHD/QCOW2): a new
        child layer on top of it. Of a writable VDI: a hidden snapshot is taken first, and
        both continue on top of it."""
        row = await self.get(ident)
        return await self._derive(row, name_label, snapshot=False)

    async def _derive(self, row: Row, name_label: str | None, snapshot: bool) -> Row:
        self.check_has_data(row)
        sr = await self.srs.get(row["sr"])
        directory = Path(sr["path"])
        new_uuid = new_uuid_str()
        fmt = row["image_format"]
        label = name_label if name_label is not None else row["name_label"]
        now = time.time()
        if not FORMATS[fmt].layered:  # a snapshot or clone is a copy of the file
            self.check_not_written(row)
            path = directory / f"{new_uuid}.raw"
            await files.in_thread(layers.copy_sparse, await self.path(row), path)
            await self._insert(
                new_uuid,
                label,
                row,
                path.name,
                snapshot,
                parent=None,
                snapshot_of=row["uuid"] if snapshot else None,
                now=now,
            )
            if snapshot:
                await self._cbt_freeze(row, new_uuid)
            elif row["read_only"]:
                await self._cbt_start(row, new_uuid)
            return await self._get_any(new_uuid)
        task = self._own_lock("snapshot", new_uuid)
        if not row["read_only"]:
            await self.lock(row["uuid"], task)  # no writer may slip in while files move
        try:
            if row["read_only"]:  # a snapshot: only a clone can be asked of it
                child = await self._child_of(row, new_uuid, label, directory, now)
                await self._cbt_start(row, new_uuid)
                return await self._get_any(child["uuid"])
            # The current file becomes the frozen layer (the snapshot, or a hidden base
            # for a clone); the VDI continues in a new child of it.
            frozen_uuid = new_uuid if snapshot else new_uuid_str()
            child_name = f"{new_uuid_str()}.{fmt}"
            await self._create_child(row, directory / child_name, uuid.UUID(row["uuid"]))
            async with self.db.transaction() as tx:
                await self._insert(
                    frozen_uuid,
                    label if snapshot else row["name_label"],
                    row,
                    row["path"],
                    True,
                    parent=row["parent"],
                    snapshot_of=row["uuid"] if snapshot else None,
                    now=now,
                    tx=tx,
                    hidden=not snapshot,
                )
                await tx.execute(
                    "UPDATE vdis SET path = ?, parent = ?, generation = generation + 1 "
                    "WHERE uuid = ?",
                    child_name,
                    frozen_uuid,
                    row["uuid"],
                )
            await self._cbt_freeze(row, frozen_uuid)
            if snapshot:
                return await self._get_any(frozen_uuid)
            frozen = await self._get_any(frozen_uuid)
            await self._child_of(frozen, new_uuid, label, directory, now)
            await self._cbt_start(frozen, new_uuid)
            return await self._get_any(new_uuid)
        finally:
            if not row["read_only"]:
                await self.unlock(row["uuid"], task)

    async def _child_of(
        self, parent: Row, new_uuid: str, label: str, directory: Path, now: float
    ) -> Row:
        fmt = parent["image_format"]
        name = f"{new_uuid}.{fmt}"
        await self._create_child(parent, directory / name, uuid.UUID(new_uuid))
        await self._insert(
            new_uuid, label, parent, name, False, parent=parent["uuid"], now=now, snapshot_of=None
        )
        return await self._get_any(new_uuid)

    async def _create_child(self, parent: Row, path: Path, disk_uuid: uuid.UUID) -> None:
        """A new, empty image file whose parent is `parent`'s file (same format)."""
        await files.in_thread(
            layers.create_image,
            path,
            parent["image_format"],
            parent["virtual_size"],
            Identity(disk_uuid, time.time()),
            await self.path(parent),
        )

    async def _insert(
        self,
        vdi_uuid: str,
        label: str,
        source: Row,
        filename: str,
        read_only: bool,
        *,
        parent: str | None,
        snapshot_of: str | None,
        now: float,
        tx=None,
        hidden: bool = False,
    ) -> None:
        if tx is None:
            async with self.db.transaction() as tx:
                return await self._insert(
                    vdi_uuid,
                    label,
                    source,
                    filename,
                    read_only,
                    parent=parent,
                    snapshot_of=snapshot_of,
                    now=now,
                    tx=tx,
                    hidden=hidden,
                )
        if not hidden:
            await self.events.record("vdi", vdi_uuid, "add", db=tx)
        await tx.execute(
            "INSERT INTO vdis (uuid, ref, name_label, sr, virtual_size, image_format, "
            "read_only, is_a_snapshot, snapshot_of, parent, path, created, hidden) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            vdi_uuid,
            new_ref(),
            label,
            source["sr"],
            source["virtual_size"],
            source["image_format"],
            int(read_only),
            int(read_only),
            snapshot_of,
            parent,
            filename,
            now,
            int(hidden),
        )

    async def _get_any(self, vdi_uuid: str) -> Row:
        row = await self.db.fetchone("SELECT * FROM vdis WHERE uuid = ?", vdi_uuid)
        assert row is not None
        return row

    def _yields(self, row: Row) -> bool:
        """Held by a background merge of this host, which readers may share and writers
        stop (see `hold_for_merge`)."""
        held = self._yielding.get(row["uuid"])
        return held is not None and held[0] == row["locked_by"]

    async def _give_way(self, vdi_uuid: str) -> None:
        held = self._yielding.get(vdi_uuid)
        if held is not None:
            await held[1]()

    def check_not_written(self, row: Row) -> None:
        """VDI_IN_USE if a writer holds the VDI (anywhere: the lock is in the database). A
        merge's lock does not count: it changes no byte the VDI reads, and gives way."""
        if row["locked_by"] and not self._yields(row):
            raise ApiError(
                "VDI_IN_USE",
                f"VDI {row['uuid']} is in use by task {row['locked_by']}",
                row["uuid"],
                row["locked_by"],
            )

    async def _readers(self, db: Executor, vdi_uuid: str) -> int:
        """Exports reading the VDI on live hosts of the pool (leases in vdi_readers)."""
        row = await db.fetchone(
            "SELECT COUNT(*) AS n FROM vdi_readers r JOIN hosts h ON h.uuid = r.host "
            "WHERE r.vdi = ? AND (r.host = ? OR h.heartbeat > ?)",
            vdi_uuid,
            self.hosts.uuid,
            self.hosts.heard_since(),
        )
        return row["n"] if row else 0

    async def _hold_row(self, tx: Executor, vdi_uuid: str) -> Row:
        """Lock the VDI's row until the transaction ends (a no-op UPDATE takes the row lock
        in PostgreSQL; SQLite's transaction is a write lock already) and read it afresh.
        Readers and writers both start here, so a lease and a write lock never cross."""
        await tx.execute("UPDATE vdis SET locked_by = locked_by WHERE uuid = ?", vdi_uuid)
        row = await tx.fetchone("SELECT * FROM vdis WHERE uuid = ?", vdi_uuid)
        if row is None:
            raise ApiError("VDI_NOT_FOUND", f"no VDI {vdi_uuid}", vdi_uuid)
        return row

    async def add_reader(self, vdi_uuid: str) -> str:
        """A read lease for an export: no writer on any host starts until it is dropped.
        VDI_IN_USE if a writer holds the VDI now."""
        lease = new_uuid_str()
        async with self.db.transaction() as tx:
            self.check_not_written(await self._hold_row(tx, vdi_uuid))
            await tx.execute(
                "INSERT INTO vdi_readers (id, vdi, host, started) VALUES (?, ?, ?, ?)",
                lease,
                vdi_uuid,
                self.hosts.uuid,
                time.time(),
            )
        return lease

    async def drop_reader(self, lease: str) -> None:
        await self.db.execute("DELETE FROM vdi_readers WHERE id = ?", lease)

    def _own_lock(self, what: str, ident: str) -> str:
        """The lock a short operation of this host (a snapshot, a CBT switch) holds a VDI
        with: it names the host, so that one dead in the middle is released at its start."""
        return f"{what}-{self.hosts.uuid}-{ident}"

    async def release_own_locks(self) -> int:
        """At start: locks of snapshots and CBT switches this host was in the middle of when
        it died (SIGKILL between lock and unlock); their VDIs were never written."""
        return await self.db.execute(
            "UPDATE vdis SET locked_by = NULL WHERE locked_by LIKE ? OR locked_by LIKE ?",
            f"snapshot-{self.hosts.uuid}-%",
            f"cbt-{self.hosts.uuid}-%",
        )

    async def drop_readers_of_this_host(self) -> None:
        """At start: leases left by exports this process ran before it died."""
        await self.db.execute("DELETE FROM vdi_readers WHERE host = ?", self.hosts.uuid)

    async def wait_for_readers(self, vdi_uuid: str, timeout: float = READER_GRACE) -> bool:
        """Give exports of the VDI a moment to finish: a client that has just received the
        last byte of a download may ask to write or delete while the export is still
        closing its files, and should not get VDI_IN_USE for it. True once none is left."""
        deadline = time.monotonic() + timeout
        while await self._readers(self.db, vdi_uuid):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(READER_POLL)
        return True

    async def ensure_free(self, row: Row) -> None:
        """VDI_IN_USE if a writer holds the VDI, or exports of it do not finish soon. A
        background merge holding it stops first."""
        if self._yields(row):
            await self._give_way(row["uuid"])
            row = await self.get(row["uuid"])
        self.check_not_written(row)
        if not await self.wait_for_readers(row["uuid"]):
            raise _being_exported(row["uuid"])

    async def lock(self, vdi_uuid: str, task_uuid: str) -> None:
        """Take the VDI for one writer, on whichever host: the lock is the row's locked_by,
        taken under the row lock after checking for read leases. VDI_IN_USE if another
        writer holds it, or exports of it do not finish within the grace period. Taking it
        bumps the generation, so ETags of the old content stop matching."""
        deadline = time.monotonic() + READER_GRACE
        while True:
            async with self.db.transaction() as tx:
                row = await self._hold_row(tx, vdi_uuid)
                merging = self._yields(row)
                if not merging:
                    self.check_not_written(row)
                    if not await self._readers(tx, vdi_uuid):
                        await tx.execute(
                            "UPDATE vdis SET locked_by = ?, generation = generation + 1 "
                            "WHERE uuid = ?",
                            task_uuid,
                            vdi_uuid,
                        )
                        return
            if merging:  # a background merge holds it: it stops, then the lock is ours
                await self._give_way(vdi_uuid)
                continue
            if time.monotonic() >= deadline:
                raise _being_exported(vdi_uuid)
            await asyncio.sleep(READER_POLL)

    async def bump_generation(self, vdi_uuid: str) -> None:
        """The content changed: strong ETags of the old content must not match any more."""
        await self.db.execute(
            "UPDATE vdis SET generation = generation + 1 WHERE uuid = ?", vdi_uuid
        )

    async def hold_for_merge(
        self, vdi_uuid: str, task_uuid: str, give_way: Callable[[], Awaitable[None]]
    ) -> bool:
        """Hold a writable VDI for a background merge of its layer below: no writer starts,
        and none waits either: a writer, snapshot or delete calls `give_way` (which stops the
        merge and returns once `release_merge` ran) and takes the VDI. Readers share it. The
        content does not change, so neither does the generation (nor the ETags). False if a
        client holds the VDI now."""
        try:
            async with self.db.transaction() as tx:
                row = await self._hold_row(tx, vdi_uuid)
                if row["locked_by"]:
                    return False
                await tx.execute(
                    "UPDATE vdis SET locked_by = ? WHERE uuid = ?", task_uuid, vdi_uuid
                )
                self._yielding[vdi_uuid] = (task_uuid, give_way)  # before a client can see it
        except BaseException:
            self._forget_hold(vdi_uuid, task_uuid)
            raise
        return True

    async def release_merge(self, vdi_uuid: str, task_uuid: str) -> None:
        try:
            await self.unlock(vdi_uuid, task_uuid)
        finally:
            self._forget_hold(vdi_uuid, task_uuid)

    def _forget_hold(self, vdi_uuid: str, task_uuid: str) -> None:
        held = self._yielding.get(vdi_uuid)
        if held is not None and held[0] == task_uuid:
            del self._yielding[vdi_uuid]

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

    async def usage(self, row: Row) -> int:
        """Bytes the VDI's file occupies. Measured by a host that can see the file, which
        records it for the hosts that cannot (a VDI on another host's local SR)."""
        sr = await self.srs.get(row["sr"])
        if self.srs.owner(sr) is not None:
            return row["physical_utilisation"] or 0
        used = await files.in_thread(files.allocated_bytes, Path(sr["path"]) / row["path"])
        if used != row["physical_utilisation"]:
            await self.db.execute(
                "UPDATE vdis SET physical_utilisation = ? WHERE uuid = ?", used, row["uuid"]
            )
        return used

    async def to_json(self, row: Row) -> dict:
        return {
            "uuid": row["uuid"],
            "ref": row["ref"],
            "name_label": row["name_label"],
            "sr": row["sr"],
            "virtual_size": row["virtual_size"],
            "physical_utilisation": await self.usage(row),
            "image_format": row["image_format"],
            "read_only": bool(row["read_only"]),
            "is_a_snapshot": bool(row["is_a_snapshot"]),
            "snapshot_of": row["snapshot_of"],
            "parent": row["parent"],
            "backing_chain": await self.backing_chain(row),
            "cbt_enabled": bool(row["cbt_enabled"]),
            "type": "cbt_metadata" if row["data_destroyed"] else "user",
            "created": iso(row["created"]),
        }
