"""Coalescing: a layer no VDI needs any more is merged away, in the background, online.

A layer is unneeded when its snapshot was deleted (it stays hidden, as other VDIs read
through it) or its data destroyed (cbt_metadata), and it has one child layer left: a
snapshot, a hidden base, or the live VDI itself. A live VDI is held for the merge (no
writer starts), but the hold gives way: an import, snapshot or delete of the VDI stops the
merge at once (a partial copy into the layer is harmless, as below) and goes ahead; the
merge starts again later. Exports share the hold. The smaller of the two (in data) is
copied:

- Usually the child (a night's changes over the rest of the disk): its runs are written
  into the layer's own file, in place. Nobody reads the layer but through the child, which
  hides exactly what this changes. Then the journal (`merging_into` = "in-place:<child>"),
  the child's disk uuid given to the layer's file (VHD children name their parent by it),
  and a second link to it renamed over the child's name (atomic); then the database; the
  layer's own name goes after a grace period. A crash after the journal is finished at the
  next start, whatever step it cut.
- Otherwise both go into a new file:

1. a new image, `<child file>.merge`, carrying the child's identity (child layers name it by
   its disk uuid or its file name) with the layer's parent as its own, receives everything
   the child and the layer hold (what the child says first), and is made durable;
2. the layer's row is marked `merging_into` the child (the journal);
3. the new file is renamed over the child's (atomic): from here on the child's file holds
   both, and still reads through the layer's file to the same parent where neither held
   anything, so readers see the same bytes before and after;
4. the database makes the child read from the layer's parent directly and lets the layer
   go (its record, if hidden; its parent link, if a cbt_metadata snapshot);
5. the layer's file is removed a little later (readers that opened it keep it open).

A crash before 3 leaves a `.merge` file, removed at the next start; a crash between 3 and 4
is finished at the next start (`merging_into` is set and the `.merge` file is gone). The
space the layer held under data its child replaced comes back. Exports, imports and
snapshots go on meanwhile: no file they have open changes under them, only the child's name
moves to a new file with the same content. Each merge runs under a task.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from pathlib import Path

from common.errors import ApiError
from common.logfields import event
from formats.driver import DATA, PARENT
from formats.registry import FORMATS, Identity
from transfer import files, layers
from transfer.db import Row
from transfer.services import Services

log = logging.getLogger("vdi_transfer.coalesce")

INTERVAL = 2.0  # seconds between looks for layers to merge
GRACE = 30.0  # seconds a merged-away file stays for readers that may be opening it
PIECE = 4 << 20  # bytes read and written at a time
IN_PLACE = "in-place:"  # the journal's mark of a merge into the layer's own file
PROGRESS_INTERVAL = 1.0  # seconds between writes of a merge's progress to its task


class GaveWay(Exception):
    """A client of the live VDI being merged stopped the copy."""


class Progress:
    """What a copy in a worker thread shares with the event loop: how far it is (for the
    task) and whether to stop (a client wants the VDI)."""

    def __init__(self, rate: int = 0) -> None:
        self.fraction = 0.0
        self.stop = threading.Event()
        self.rate = rate  # bytes/s the copy may move (coalesce_rate); 0: no limit
        self._moved = 0
        self._started = time.monotonic()

    def advance(self, fraction: float, moved: int = 0) -> None:
        """Blocking: the copy is `fraction` done, `moved` bytes further; held back to the
        rate if there is one (a give-way ends the wait at once)."""
        if self.stop.is_set():
            raise GaveWay
        self.fraction = fraction
        if self.rate and moved:
            self._moved += moved
            ahead = self._moved / self.rate - (time.monotonic() - self._started)
            if ahead > 0 and self.stop.wait(ahead):
                raise GaveWay


async def candidates(svc: Services) -> list[tuple[Row, Row]]:
    """(layer, child) pairs to merge now, on SRs this host serves."""
    rows = await svc.db.fetchall(
        "SELECT * FROM vdis WHERE (hidden = 1 OR data_destroyed = 1) AND locked_by IS NULL "
        "AND merging_into IS NULL"
    )
    pairs = []
    for layer in rows:
        if not FORMATS[layer["image_format"]].layered:
            continue
        children = await svc.db.fetchall("SELECT * FROM vdis WHERE parent = ?", layer["uuid"])
        if len(children) != 1:
            continue
        child = children[0]
        if child["locked_by"] or child["merging_into"]:
            continue  # a client writes it: after that
        sr = await svc.srs.get(layer["sr"])
        if sr["shared"] or svc.srs.owner(sr) is not None:
            continue  # the host of a local SR merges its layers (shared SRs: not yet)
        pairs.append((layer, child))
    return pairs


def _copy_runs(runs, source, dest, progress: Progress | None) -> int:
    """Blocking: each (start, length, kind) run of `source` into `dest` at the same offset,
    data copied and zeros zeroed, PIECE at a time; `dest` flushed. Returns the data bytes
    copied; `progress` follows the fraction done (and may stop the copy)."""
    copied, done, total = 0, 0, sum(n for _, n, _ in runs) or 1
    for start, length, kind in runs:
        pos, end = start, start + length
        while pos < end:
            n = min(PIECE, end - pos)
            if kind == DATA:
                dest.write(pos, source.read(pos, n))
                copied += n
            else:
                dest.zero(pos, n)
            pos += n
            done += n
            if progress is not None:
                progress.advance(done / total, n if kind == DATA else 0)
    dest.flush()
    return copied


def build_merged(
    child: Path,
    layer: Path,
    fmt: str,
    size: int,
    identity: Identity,
    parent: Path | None,
    target: Path,
    progress: Progress | None = None,
) -> int:
    """Blocking: write `target`, a layer over `parent` holding what `child` over `layer`
    reads wherever either says anything; returns the data bytes copied. `progress`
    follows the fraction done, and stops it."""
    pair = layers.open_chain([(child, fmt), (layer, fmt)], writable=False)
    try:
        layers.create_image(target, fmt, size, identity, parent)
        merged = FORMATS[fmt].driver.open(target, writable=True)
        try:
            copied = _copy_runs(pair.reads_over(pair.touched(2)), pair, merged, progress)
        finally:
            merged.close()
        files.fsync_dir(target.parent)
        return copied
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    finally:
        layers.close_chain(pair)


def own_bytes(path: Path, fmt: str) -> int:
    """Blocking: the data bytes a layer holds (what copying it costs)."""
    image = FORMATS[fmt].driver.open(path, writable=False)
    try:
        return sum(n for _, n, kind in image.extents() if kind == DATA)
    finally:
        image.close()


def absorb(child: Path, layer: Path, fmt: str, progress: Progress | None = None) -> int:
    """Blocking: write what the child layer holds into the layer under it, in place. The
    layer is read only through the child, which hides exactly what this changes, so its
    readers see the same bytes. Returns the data bytes copied."""
    top = FORMATS[fmt].driver.open(child, writable=False)
    try:
        runs = [(s, n, kind) for s, n, kind in top.extents() if kind != PARENT]
        below = FORMATS[fmt].driver.open(layer, writable=True)
        try:
            return _copy_runs(runs, top, below, progress)
        finally:
            below.close()
    finally:
        top.close()


def _take_over(layer: Path, child: Path, fmt: str, disk: uuid.UUID | None) -> None:
    """The layer's file, holding both, becomes the child's: the child's disk uuid (which
    its own children name), then its name, atomically, by a second link renamed over the
    child's. The layer's own name stays a while for readers that found it in the database
    just before (the file says the same under both names). Redone whole after a crash."""
    setter = FORMATS[fmt].set_disk_uuid
    if disk is not None and setter is not None:
        setter(layer, disk)
    link = child.with_name(child.name + ".link")
    link.unlink(missing_ok=True)
    os.link(layer, link)
    link.replace(child)
    files.fsync_dir(child.parent)


def _switch(merged: Path, child: Path) -> None:
    merged.replace(child)
    files.fsync_dir(child.parent)


def _merge_file(child_path: Path) -> Path:
    return child_path.with_name(child_path.name + ".merge")


class Coalescer:
    """Merges unneeded layers, one at a time, on this host."""

    def __init__(self, svc: Services):
        self.svc = svc
        self._leftovers: list[tuple[float, Path]] = []  # (when, file) to remove

    async def run_once(self) -> int:
        """Merge what can be merged now, one pair at a time, each with the rows as they are
        after the merge before it; returns how many merges were tried."""
        self._sweep()
        tried: set[tuple[str, str]] = set()
        while True:
            fresh = [
                (layer, child)
                for layer, child in await candidates(self.svc)
                if (layer["uuid"], child["uuid"]) not in tried
            ]
            if not fresh:
                return len(tried)
            layer, child = fresh[0]
            tried.add((layer["uuid"], child["uuid"]))
            await self.merge(layer, child)

    async def merge(self, layer: Row, child: Row) -> None:
        svc = self.svc
        task = await svc.tasks.create(
            f"coalesce {layer['uuid']} into {child['uuid']}", None, child["uuid"], running=True
        )
        progress = Progress(svc.config.coalesce_rate_bytes)
        live = not child["read_only"]
        released = asyncio.Event()

        async def give_way() -> None:
            progress.stop.set()
            await released.wait()

        if live and not await svc.vdis.hold_for_merge(child["uuid"], task["uuid"], give_way):
            busy = ["VDI_IN_USE", f"VDI {child['uuid']} is in use: merged later", child["uuid"]]
            await svc.tasks.settle(task["uuid"], busy, cancelled=True)
            svc.metrics.coalesces.labels("gave_way").inc()
            return
        try:
            await self._merge(layer, child, task, progress)
        finally:
            if live:
                await asyncio.shield(svc.vdis.release_merge(child["uuid"], task["uuid"]))
                released.set()

    async def _merge(self, layer: Row, child: Row, task: Row, progress: Progress) -> None:
        svc = self.svc
        vdis = svc.vdis
        fmt = child["image_format"]
        child_path, layer_path = await vdis.path(child), await vdis.path(layer)
        parent = await svc.db.fetchone("SELECT * FROM vdis WHERE uuid = ?", layer["parent"])
        parent_path = await vdis.path(parent) if parent else None
        disk = await files.in_thread(FORMATS[fmt].disk_uuid, child_path)
        identity = Identity(disk or uuid.UUID(child["uuid"]), float(child["created"]))
        target = _merge_file(child_path)
        started = time.monotonic()
        reporter = asyncio.create_task(self._report(task["uuid"], progress))
        try:
            # The smaller of the two is copied: the child into the layer, in place (the
            # usual case: a night's changes over the rest of the disk), or else both into a
            # new file.
            in_place = await files.in_thread(own_bytes, child_path, fmt) <= await files.in_thread(
                own_bytes, layer_path, fmt
            )
            if in_place:
                copied = await files.in_thread(absorb, child_path, layer_path, fmt, progress)
            else:
                copied = await files.in_thread(
                    build_merged,
                    child_path,
                    layer_path,
                    fmt,
                    child["virtual_size"],
                    identity,
                    parent_path,
                    target,
                    progress,
                )
        except BaseException as exc:
            await asyncio.shield(files.in_thread(target.unlink, True))
            await svc.db.execute(
                "UPDATE vdis SET merging_into = NULL WHERE uuid = ?", layer["uuid"]
            )
            if isinstance(exc, GaveWay):
                why = ["CANCELLED", f"gave way to a client of VDI {child['uuid']}: merged later"]
                await svc.tasks.settle(task["uuid"], why, cancelled=True)
                svc.metrics.coalesces.labels("gave_way").inc()
                event(log, "vdi.coalesce_gave_way", layer=layer["uuid"], child=child["uuid"])
                return
            if isinstance(exc, ApiError):
                info = exc.error_info
            elif isinstance(exc, asyncio.CancelledError):
                info = ["INTERNAL_ERROR", "server shutting down: the merge will start again"]
            else:
                info = ["INTERNAL_ERROR", str(exc) or repr(exc)]
            await svc.tasks.settle(task["uuid"], info)
            svc.metrics.coalesces.labels("failed").inc()
            if isinstance(exc, Exception):
                log.exception("coalescing failed", extra={"fields": {"vdi": child["uuid"]}})
                return
            raise
        finally:
            reporter.cancel()
        # The journal, the switch and the database: not interrupted by a cancel (shutdown)
        # nor by a client (it waits: this is short); a crash in between is finished at the
        # next start (see `recover`).
        if in_place:
            switched = await asyncio.shield(
                self._take_over_and_finish(layer, child, layer_path, child_path, disk)
            )
        else:
            switched = await asyncio.shield(
                self._switch_and_finish(layer, child, target, child_path, layer_path)
            )
        if not switched:
            gone = ["VDI_NOT_FOUND", "the layers were deleted during the merge"]
            await svc.tasks.settle(task["uuid"], gone)
            return
        await svc.tasks.settle(task["uuid"], result=None)
        svc.metrics.coalesces.labels("merged").inc()
        event(
            log,
            "vdi.coalesced",
            layer=layer["uuid"],
            child=child["uuid"],
            task=task["uuid"],
            bytes=copied,
            in_place=in_place,
            duration=time.monotonic() - started,
        )

    async def _report(self, task_uuid: str, progress: Progress) -> None:
        """The merge's progress on its task, every PROGRESS_INTERVAL while it copies."""
        written = 0.0
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL)
            if progress.fraction != written:
                written = progress.fraction
                await self.svc.tasks.set_progress(task_uuid, written)

    async def _journal(self, layer: Row, child: Row, mark: str) -> bool:
        """Both rows still there and still stacked (a DELETE may have taken them meanwhile)?
        Then the journal says what is being switched, in the same statement."""
        return bool(
            await self.svc.db.execute(
                "UPDATE vdis SET merging_into = ? WHERE uuid = ? AND EXISTS "
                "(SELECT 1 FROM vdis WHERE uuid = ? AND parent = ?)",
                mark,
                layer["uuid"],
                child["uuid"],
                layer["uuid"],
            )
        )

    async def _take_over_and_finish(
        self, layer: Row, child: Row, layer_path: Path, child_path: Path, disk: uuid.UUID | None
    ) -> bool:
        if not await self._journal(layer, child, IN_PLACE + child["uuid"]):
            return False  # the layer holds a copy of what the child hid: harmless
        await files.in_thread(_take_over, layer_path, child_path, child["image_format"], disk)
        await self.svc.vdis.unlink_merged(layer, child)
        await self.svc.db.execute(
            "UPDATE vdis SET merging_into = NULL WHERE uuid = ?", layer["uuid"]
        )
        self._leftovers.append((time.monotonic() + GRACE, layer_path))
        return True

    async def _switch_and_finish(
        self, layer: Row, child: Row, target: Path, child_path: Path, layer_path: Path
    ) -> bool:
        if not await self._journal(layer, child, child["uuid"]):
            await files.in_thread(files.remove, target)
            return False
        await files.in_thread(_switch, target, child_path)
        await self._finish(layer, child, layer_path)
        return True

    async def _finish(self, layer: Row, child: Row, layer_path: Path) -> None:
        await self.svc.vdis.unlink_merged(layer, child)
        await self.svc.db.execute(
            "UPDATE vdis SET merging_into = NULL WHERE uuid = ?", layer["uuid"]
        )
        self._leftovers.append((time.monotonic() + GRACE, layer_path))

    def _sweep(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        keep = []
        for when, path in self._leftovers:
            if when <= now:
                files.remove(path)
            else:
                keep.append((when, path))
        self._leftovers = keep

    async def recover(self) -> int:
        """At start: finish the switches a crash interrupted after the rename, undo those
        it interrupted before; remove the layer files they left (no reader is left)."""
        rows = await self.svc.db.fetchall("SELECT * FROM vdis WHERE merging_into IS NOT NULL")
        for layer in rows:
            mark = layer["merging_into"]
            in_place = mark.startswith(IN_PLACE)
            child = await self.svc.db.fetchone(
                "SELECT * FROM vdis WHERE uuid = ?", mark.removeprefix(IN_PLACE)
            )
            layer_path = await self.svc.vdis.path(layer)
            if in_place and child is not None:
                # The layer holds both already: take its file over if not done, then finish.
                child_path = await self.svc.vdis.path(child)
                if await files.in_thread(layer_path.exists):
                    fmt = child["image_format"]
                    disk = await files.in_thread(FORMATS[fmt].disk_uuid, child_path)
                    await files.in_thread(_take_over, layer_path, child_path, fmt, disk)
                    self._leftovers.append((0.0, layer_path))
                await self.svc.vdis.unlink_merged(layer, child)
                await self.svc.db.execute(
                    "UPDATE vdis SET merging_into = NULL WHERE uuid = ?", layer["uuid"]
                )
                event(log, "vdi.coalesce_finished", layer=layer["uuid"], child=child["uuid"])
                continue
            merged = _merge_file(await self.svc.vdis.path(child)) if child else None
            if child is None or (merged is not None and await files.in_thread(merged.exists)):
                if merged is not None:
                    await files.in_thread(files.remove, merged)
                await self.svc.db.execute(
                    "UPDATE vdis SET merging_into = NULL WHERE uuid = ?", layer["uuid"]
                )
                continue
            await self._finish(layer, child, layer_path)
            event(log, "vdi.coalesce_finished", layer=layer["uuid"], child=child["uuid"])
        # `.merge` files of merges that had not reached the journal, `.link`s cut short.
        for sr in await self.svc.srs.list():
            if self.svc.srs.owner(sr) is None:
                for leftover in await files.in_thread(_merge_files, Path(sr["path"])):
                    await files.in_thread(files.remove, leftover)
        self._sweep(now=float("inf"))
        return len(rows)


def _merge_files(directory: Path) -> list[Path]:
    try:
        return [*directory.glob("*.merge"), *directory.glob("*.link")]
    except OSError:
        return []
