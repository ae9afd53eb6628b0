"""Tasks: the record a client polls while a transfer runs, and the life cycle behind it.

    pending --> success | failure          (the transfer ends)
    pending --> cancelling --> cancelled   (POST /tasks/{id}/cancel while a transfer runs)
    pending --> cancelled                  (cancel of a task no transfer is using)

Every transition is a conditional UPDATE, so two racing writers (a cancel and a finishing
transfer, or two hosts) cannot both win. A running transfer is a `Transfer` registered here:
cancelling its task cancels its asyncio task; progress is kept in memory and written to the
database at most once a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from common.db import Executor
from common.errors import ApiError, ClientGone, bad_request
from common.logfields import event
from transfer.db import Database, Row
from transfer.events import EventLog
from transfer.ids import iso, new_ref, new_uuid

if TYPE_CHECKING:
    from auth.middleware import Principal  # (auth imports aiohttp; operations do not)

log = logging.getLogger("vdi_transfer.tasks")

FINISHED = ("success", "failure", "cancelled")
PROGRESS_WRITE_INTERVAL = 1.0
CANCEL_POLL = 0.5  # seconds: how soon a cancel asked on another host stops a transfer here
RESTARTED = ["INTERNAL_ERROR", "server restarted"]
SHUTTING_DOWN = ["INTERNAL_ERROR", "server shutting down"]


@dataclass(eq=False)
class Transfer:
    """A running operation reporting into a task."""

    task: str
    vdi: str | None
    user: str | None
    ref: str = ""  # the task's OpaqueRef, for the task-id header
    aio_task: asyncio.Task | None = None
    bytes: int = 0
    progress: float = 0.0
    abort_error: list[str] | None = None  # why we cancelled it, if not the client's cancel
    resumable: bool = False  # an upload that may continue: a disconnect suspends it
    members: set[asyncio.Task] = field(default_factory=set)  # a parted upload's connections
    cancel_sent: bool = False  # its asyncio task was cancelled once; never twice
    written: tuple[int, float] = (0, 0.0)  # bytes and progress last written to the database
    written_at: float = field(default_factory=time.monotonic)
    started: float = field(default_factory=time.monotonic)

    def cancel_work(self) -> None:
        """Cancel what runs the transfer: its request's asyncio task, or each part's."""
        for task in [self.aio_task, *self.members]:
            if task is not None:
                task.cancel()


class Operation:
    """An import or an export: from its `start` on it runs under a task, as a Transfer."""

    transfer: Transfer | None = None

    @property
    def task(self) -> str:
        assert self.transfer is not None
        return self.transfer.task

    @property
    def task_ref(self) -> str:
        """The task's OpaqueRef, as XAPI's task-id header carries it."""
        assert self.transfer is not None
        return self.transfer.ref


def parts_done(row: Row) -> list[int] | None:
    """The parts of a parted upload (transfer/parts.py) that are durable, in order."""
    if row["upload_parts"] is None:
        return None
    return sorted(json.loads(row["upload_parts_done"] or "[]"))


class TaskManager:
    """Task records and the transfers running under them on this host."""

    def __init__(self, db: Database, host_uuid: str, ttl: int, events: EventLog):
        self.db = db
        self.events = events  # every change a XenAPI client sees goes there (event.from)
        self.host_uuid = host_uuid
        self.ttl = ttl
        self.running: dict[str, Transfer] = {}
        self.shutting_down = False  # no new transfers; stopped ones fail with SHUTTING_DOWN
        self.on_ended: Callable[[str, str], None] | None = None  # (name_label, status): metrics

    # -- records ---------------------------------------------------------------------------

    async def create(
        self, name_label: str, owner: str | None, vdi: str | None = None, *, running: bool = False
    ) -> Row:
        """A pending task. `running` creates it already claimed by a transfer on this host,
        in the same statement, so a crash can never leave it looking like a client's idle
        task."""
        if not isinstance(name_label, str) or not 0 < len(name_label) <= 255:
            raise bad_request("name_label must be a non-empty string of at most 255 characters")
        task_uuid = new_uuid()
        async with self.db.transaction() as tx:
            await tx.execute(
                "INSERT INTO tasks (uuid, ref, name_label, status, created, owner, host, vdi, "
                "running) VALUES (?, ?, ?, 'pending', ?, ?, ?, ?, ?)",
                task_uuid,
                new_ref(),
                name_label,
                time.time(),
                owner,
                self.host_uuid,
                vdi,
                int(running),
            )
            await self.events.record("task", task_uuid, "add", db=tx)
        event(log, "task.created", task=task_uuid, name=name_label, user=owner, vdi=vdi)
        return await self.get(task_uuid)

    async def get(self, ident: str) -> Row:
        row = await self.db.fetchone("SELECT * FROM tasks WHERE uuid = ? OR ref = ?", ident, ident)
        if row is None:
            raise ApiError("TASK_NOT_FOUND", f"no task {ident}", ident)
        return row

    async def list(self) -> list[Row]:
        return await self.db.fetchall("SELECT * FROM tasks ORDER BY created, uuid")

    def to_json(self, row: Row) -> dict:
        live = self.running.get(row["uuid"])
        running = live is not None and row["status"] in ("pending", "cancelling")
        return {
            "uuid": row["uuid"],
            "ref": row["ref"],
            "name_label": row["name_label"],
            "status": row["status"],
            "progress": live.progress if running else row["progress"],
            "created": iso(row["created"]),
            "finished": iso(row["finished"]),
            "result": row["result"],
            "error_info": json.loads(row["error_info"]),
            "bytes_transferred": live.bytes if running else row["bytes_transferred"],
            "upload_offset": row["upload_offset"] if row["resumable"] else None,
            "upload_active": bool(row["running"]) if row["resumable"] else None,
            "upload_parts": row["upload_parts"],
            "upload_parts_done": parts_done(row),
            "vdi": row["vdi"],
            "owner": row["owner"],
        }

    async def get_owned(self, ident: str, principal: Principal) -> Row:
        """The task, if `principal` may act on it (cancel, delete, transfer under it)."""
        row = await self.get(ident)
        self.check_owner(row, principal)
        return row

    @staticmethod
    def check_owner(row: Row, principal: Principal) -> None:
        """Only a task's owner or an admin may act on it: anyone else gets
        PERMISSION_DENIED, whatever their role."""
        if principal.role != "admin" and row["owner"] not in (None, principal.username):
            raise ApiError(
                "PERMISSION_DENIED",
                f"task {row['uuid']} belongs to {row['owner']!r}: only its owner or an admin "
                "may cancel it, delete it or transfer under it",
                row["uuid"],
            )

    async def fail_unused(self, ident: str, principal: Principal, error_info: list[str]) -> None:
        """A request that named this task failed before its transfer began. A task nothing
        has used yet (a XenAPI client creates one to wait for its request) fails with the
        request's error, as XAPI's do, so whoever waits for it learns why; the task of a
        resumable upload, or someone else's, is left as it is."""
        try:
            row = await self.get(ident)
            self.check_owner(row, principal)
        except ApiError:
            return
        if row["status"] == "pending" and not row["running"] and not row["resumable"]:
            await self._transition(row["uuid"], "failure", error_info, where_running=0)

    async def destroy(self, ident: str) -> None:
        row = await self.get(ident)
        async with self.db.transaction() as tx:
            changed = await tx.execute(
                "DELETE FROM tasks WHERE uuid = ? AND running = 0", row["uuid"]
            )
            if changed:
                await self.events.record("task", row["uuid"], "del", ref=row["ref"], db=tx)
        if not changed:
            raise ApiError(
                "OTHER_OPERATION_IN_PROGRESS",
                f"task {row['uuid']} has a transfer running; cancel it first",
                row["uuid"],
            )
        event(log, "task.destroyed", task=row["uuid"])

    async def cancel(self, ident: str) -> Row:
        """Cancel a pending task. A task with a transfer turns `cancelling` and its transfer is
        stopped; the transfer's end turns it `cancelled`. A finished task is left alone."""
        row = await self.get(ident)
        task_uuid = row["uuid"]
        if row["status"] in FINISHED or row["status"] == "cancelling":
            return row
        for _ in range(3):  # a transfer may let go (a suspended upload) between the two
            if await self._transition(task_uuid, "cancelled", ["CANCELLED"], where_running=0):
                return await self.get(task_uuid)
            async with self.db.transaction() as tx:
                cancelling = await tx.execute(
                    "UPDATE tasks SET status = 'cancelling' WHERE uuid = ? "
                    "AND status = 'pending' AND running = 1",
                    task_uuid,
                )
                if cancelling:
                    await self.events.record("task", task_uuid, db=tx)
            if cancelling:
                break
        if cancelling:
            event(log, "task.transition", task=task_uuid, status="cancelling", vdi=row["vdi"])
        transfer = self.running.get(task_uuid)
        if transfer is not None:
            self._stop(transfer)
        # A transfer on another host sees `cancelling` within CANCEL_POLL (`watch`).
        return await self.get(task_uuid)

    @staticmethod
    def _stop(transfer: Transfer) -> None:
        if not transfer.cancel_sent:
            transfer.cancel_sent = True
            transfer.cancel_work()

    async def watch(self) -> None:
        """Every CANCEL_POLL while transfers run here: progress that has not reached the
        database yet (a stalled transfer reports nothing new) goes there, so every host
        shows it; and transfers whose task was cancelled through another host stop (the
        cancel reaches us through the database, as status `cancelling`)."""
        if not self.running:
            return
        now = time.monotonic()
        for transfer in list(self.running.values()):
            stale = transfer.written != (transfer.bytes, transfer.progress)
            if stale and now - transfer.written_at >= PROGRESS_WRITE_INTERVAL:
                await self._write_progress(transfer)
        rows = await self.db.fetchall(
            "SELECT uuid FROM tasks WHERE host = ? AND running = 1 AND status = 'cancelling'",
            self.host_uuid,
        )
        for row in rows:
            transfer = self.running.get(row["uuid"])
            if transfer is not None and not transfer.cancel_sent:
                event(log, "task.cancel_seen", task=transfer.task, vdi=transfer.vdi)
                self._stop(transfer)

    # -- transfers -------------------------------------------------------------------------

    async def begin(
        self, task_ident: str | None, name_label: str, user: str | None, vdi: str | None
    ) -> Transfer:
        """Attach a transfer to the client's task (`task_id=`), or to a new task."""
        if task_ident is None:
            row = await self.create(name_label, user, vdi, running=True)
            claimed = 1
        else:
            row = await self.get(task_ident)
            claimed = await self.db.execute(
                "UPDATE tasks SET running = 1, host = ?, vdi = COALESCE(?, vdi) "
                "WHERE uuid = ? AND status = 'pending' AND running = 0",
                self.host_uuid,
                vdi,
                row["uuid"],
            )
        if not claimed:
            row = await self.get(row["uuid"])
            if row["status"] != "pending":
                raise bad_request(f"task {row['uuid']} is already {row['status']}", row["uuid"])
            raise ApiError(
                "OTHER_OPERATION_IN_PROGRESS",
                f"task {row['uuid']} already has a transfer running",
                row["uuid"],
            )
        transfer = Transfer(
            task=row["uuid"], vdi=vdi, user=user, ref=row["ref"], aio_task=asyncio.current_task()
        )
        if self.shutting_down:
            transfer.abort_error = SHUTTING_DOWN
        self.running[transfer.task] = transfer
        event(log, "task.started", task=transfer.task, vdi=vdi, user=user)
        # A cancel that arrived before we were registered found nothing to stop: honour it.
        current = await self.db.fetchone("SELECT status FROM tasks WHERE uuid = ?", transfer.task)
        if current and current["status"] == "cancelling":
            self._stop(transfer)
        return transfer

    async def set_vdi(self, transfer: Transfer, vdi: str) -> None:
        """The transfer's VDI became known (an import that created it from an image header)."""
        transfer.vdi = vdi
        await self.db.execute("UPDATE tasks SET vdi = ? WHERE uuid = ?", vdi, transfer.task)

    async def report(self, transfer: Transfer, nbytes: int, progress: float) -> None:
        """Record progress; written through to the database at most once a second."""
        transfer.bytes = nbytes
        transfer.progress = max(0.0, min(1.0, progress))
        if time.monotonic() - transfer.written_at >= PROGRESS_WRITE_INTERVAL:
            await self._write_progress(transfer)

    async def _write_progress(self, transfer: Transfer) -> None:
        transfer.written_at = time.monotonic()
        transfer.written = (transfer.bytes, transfer.progress)
        async with self.db.transaction() as tx:
            await tx.execute(
                "UPDATE tasks SET progress = ?, bytes_transferred = ? WHERE uuid = ?",
                transfer.progress,
                transfer.bytes,
                transfer.task,
            )
            await self.events.record("task", transfer.task, db=tx)

    async def make_resumable(
        self, transfer: Transfer, fmt: str, chunked: bool, length: int | None
    ) -> None:
        """This upload may be continued after a disconnect or a restart."""
        transfer.resumable = True
        await self.db.execute(
            "UPDATE tasks SET resumable = 1, upload_format = ?, upload_chunked = ?, "
            "upload_length = COALESCE(?, upload_length), last_activity = ? WHERE uuid = ?",
            fmt,
            int(chunked),
            length,
            time.time(),
            transfer.task,
        )

    async def make_parted(self, transfer: Transfer, parts: int) -> None:
        """This upload comes in `parts` parts (transfer/parts.py); it waits, like a resumable
        upload, while none is being sent."""
        transfer.resumable = True
        await self.db.execute(
            "UPDATE tasks SET resumable = 1, upload_format = 'raw', upload_chunked = 1, "
            "upload_parts = ?, last_activity = ? WHERE uuid = ?",
            parts,
            time.time(),
            transfer.task,
        )

    async def record_parts(self, transfer: Transfer, done: list[int]) -> None:
        """These parts of a parted upload are durable."""
        async with self.db.transaction() as tx:
            await tx.execute(
                "UPDATE tasks SET upload_parts_done = ?, last_activity = ?, bytes_transferred = ? "
                "WHERE uuid = ?",
                json.dumps(done),
                time.time(),
                transfer.bytes,
                transfer.task,
            )
            await self.events.record("task", transfer.task, db=tx)

    async def checkpoint(self, transfer: Transfer, offset: int) -> None:
        """`offset` stream bytes are durable (data and decoder state): Upload-Offset."""
        await self.db.execute(
            "UPDATE tasks SET upload_offset = ?, last_activity = ?, bytes_transferred = ? "
            "WHERE uuid = ?",
            offset,
            time.time(),
            transfer.bytes,
            transfer.task,
        )

    async def suspend(self, transfer: Transfer, why: str) -> None:
        """A resumable upload stopped before its end: the task stays pending with its
        Upload-Offset, and the VDI is free for the next writer (or the resumed upload). If a
        cancel met the break (the task is `cancelling`), the upload will not go on: the task
        ends cancelled."""
        if self.running.pop(transfer.task, None) is None:
            return
        async with self.db.transaction() as tx:
            await tx.execute(
                "UPDATE tasks SET running = 0, last_activity = ? WHERE uuid = ? "
                "AND status = 'pending'",
                time.time(),
                transfer.task,
            )
            cancelled = await self._transition(
                transfer.task,
                "cancelled",
                ["CANCELLED"],
                nbytes=transfer.bytes,
                from_status=("cancelling",),
                db=tx,
            )
            await tx.execute("UPDATE vdis SET locked_by = NULL WHERE locked_by = ?", transfer.task)
        if cancelled:
            event(log, "task.finished", task=transfer.task, vdi=transfer.vdi, status="cancelled")
            return
        event(
            log,
            "task.suspended",
            task=transfer.task,
            vdi=transfer.vdi,
            user=transfer.user,
            bytes=transfer.bytes,
            reason=why,
        )

    async def expire_uploads(self, ttl: float) -> list[str]:
        """Resumable uploads nobody continued for `ttl` seconds fail; returns their tasks."""
        now = time.time()
        rows = await self.db.fetchall(
            "SELECT uuid FROM tasks WHERE resumable = 1 AND running = 0 AND status = 'pending' "
            "AND last_activity < ?",
            now - ttl,
        )
        expired = []
        for row in rows:
            info = ["UPLOAD_EXPIRED", f"the upload was not resumed within {int(ttl)} s"]
            if await self._transition(row["uuid"], "failure", info, where_running=0):
                expired.append(row["uuid"])
                event(log, "task.expired", task=row["uuid"])
        return expired

    async def finished_among(self, task_uuids: list[str]) -> list[str]:
        """Those of the tasks that are over (or gone): their upload will not continue."""
        sql = "SELECT 1 FROM tasks WHERE uuid = ? AND status IN ('pending', 'cancelling')"
        return [t for t in task_uuids if not await self.db.fetchone(sql, t)]

    async def succeed(self, transfer: Transfer, result: str | None) -> None:
        transfer.progress = 1.0
        await self._end(transfer, "success", [], result)

    async def fail(self, transfer: Transfer, error_info: list[str]) -> None:
        await self._end(transfer, "failure", error_info)

    async def end_cancelled(self, transfer: Transfer) -> None:
        """The client cancelled the transfer's task, and the transfer stopped."""
        await self._end(transfer, "cancelled", ["CANCELLED"])

    async def set_progress(self, task_uuid: str, progress: float) -> None:
        """Progress of work that runs under a task without a transfer (a merge)."""
        async with self.db.transaction() as tx:
            changed = await tx.execute(
                "UPDATE tasks SET progress = ? WHERE uuid = ? AND status = 'pending'",
                max(0.0, min(1.0, progress)),
                task_uuid,
            )
            if changed:
                await self.events.record("task", task_uuid, db=tx)

    async def settle(
        self,
        task_uuid: str,
        error_info: list[str] | None = None,
        result: str | None = None,
        *,
        cancelled: bool = False,
    ) -> bool:
        """End a task no transfer runs under (XenAPI's Async calls, merges): success with
        `result`, failure with `error_info`, or cancelled (with it); False if it had ended
        already (cancelled)."""
        status = "cancelled" if cancelled else "failure" if error_info else "success"
        done = await self._transition(task_uuid, status, error_info or [], result=result)
        if done:
            event(log, "task.finished", task=task_uuid, status=status, error=error_info or None)
        return done

    @contextlib.asynccontextmanager
    async def run(self, transfer: Transfer) -> AsyncIterator[Transfer]:
        """Ends the task however the body ends: cancelled by the client (cancelled), stopped
        by shutdown (failure), an ApiError (failure with its code), or a bug (INTERNAL_ERROR).
        The body calls `succeed` itself once the result is durable."""
        try:
            yield transfer
        except asyncio.CancelledError:
            if transfer.abort_error is not None and transfer.resumable:
                await asyncio.shield(self.suspend(transfer, "the server is stopping"))
            elif transfer.abort_error is not None:
                await asyncio.shield(self.fail(transfer, transfer.abort_error))
            else:
                await asyncio.shield(self.end_cancelled(transfer))
            raise
        except ApiError as exc:
            if transfer.resumable and isinstance(exc, ClientGone):
                await asyncio.shield(self.suspend(transfer, exc.message))
            else:
                await asyncio.shield(self.fail(transfer, exc.error_info))
            raise
        except Exception as exc:
            log.exception("transfer failed", extra={"fields": {"task": transfer.task}})
            await asyncio.shield(self.fail(transfer, ["INTERNAL_ERROR", str(exc) or repr(exc)]))
            raise
        else:
            if transfer.task in self.running:
                await self.fail(transfer, ["INTERNAL_ERROR", "the transfer ended without result"])

    async def _end(
        self, transfer: Transfer, status: str, error_info: list[str], result: str | None = None
    ) -> None:
        if self.running.pop(transfer.task, None) is None:
            return  # already ended
        # One commit: the task's end and the VDI's release are seen together (a client that
        # saw the task succeed may write the VDI at once), and cost one fsync, not two.
        async with self.db.transaction() as tx:
            await self._transition(
                transfer.task,
                status,
                error_info,
                result=result,
                progress=transfer.progress,
                nbytes=transfer.bytes,
                db=tx,
            )
            # Whatever the outcome, the VDI is free for the next writer.
            await tx.execute("UPDATE vdis SET locked_by = NULL WHERE locked_by = ?", transfer.task)
        event(
            log,
            "task.finished",
            task=transfer.task,
            vdi=transfer.vdi,
            user=transfer.user,
            status=status,
            bytes=transfer.bytes,
            duration=time.monotonic() - transfer.started,
            error=error_info or None,
        )

    async def _transition(
        self,
        task_uuid: str,
        status: str,
        error_info: list[str],
        *,
        result: str | None = None,
        progress: float | None = None,
        nbytes: int | None = None,
        where_running: int | None = None,
        from_status: tuple[str, ...] = ("pending", "cancelling"),
        db: Executor | None = None,
    ) -> bool:
        """Move an unfinished task (in one of `from_status`) to a final status; False if it
        was not in a state to. `db`: a transaction to do it in (default: a statement of its
        own)."""
        assert set(from_status) <= {"pending", "cancelling"}
        sql = (
            "UPDATE tasks SET status = ?, error_info = ?, result = ?, finished = ?, running = 0, "
            "progress = COALESCE(?, progress), bytes_transferred = COALESCE(?, bytes_transferred) "
            f"WHERE uuid = ? AND status IN ({', '.join(repr(s) for s in from_status)})"
        )
        args: list[object] = [
            status,
            json.dumps(error_info),
            result,
            time.time(),
            1.0 if status == "success" else progress,
            nbytes,
            task_uuid,
        ]
        if where_running is not None:
            sql += " AND running = ?"
            args.append(where_running)
        if db is None:
            async with self.db.transaction() as tx:
                return await self._transition(
                    task_uuid,
                    status,
                    error_info,
                    result=result,
                    progress=progress,
                    nbytes=nbytes,
                    where_running=where_running,
                    from_status=from_status,
                    db=tx,
                )
        changed = await db.execute(sql, *args)
        if changed:
            await self.events.record("task", task_uuid, db=db)
            if self.on_ended is not None:
                row = await db.fetchone("SELECT name_label FROM tasks WHERE uuid = ?", task_uuid)
                self.on_ended(row["name_label"] if row else "", status)
        if changed and where_running is not None:
            event(log, "task.transition", task=task_uuid, status=status)
        return bool(changed)

    # -- housekeeping ----------------------------------------------------------------------

    async def recover_after_restart(self) -> int:
        """Tasks whose transfer was running here when the process died can never finish:
        fail them (or complete a cancel that was asked for), and free the VDIs they held.
        Tasks no transfer was using stay pending."""
        now = time.time()
        stale = await self.db.fetchall(
            "SELECT uuid, status, vdi, resumable FROM tasks WHERE host = ? AND running = 1 "
            "AND status IN ('pending', 'cancelling')",
            self.host_uuid,
        )
        async with self.db.transaction() as tx:
            for row in stale:
                if row["resumable"] and row["status"] == "pending":
                    # A resumable upload survives: pending again, at its durable offset.
                    await tx.execute(
                        "UPDATE tasks SET running = 0, last_activity = ? WHERE uuid = ?",
                        now,
                        row["uuid"],
                    )
                    await tx.execute(
                        "UPDATE vdis SET locked_by = NULL WHERE locked_by = ?", row["uuid"]
                    )
                    continue
                cancelled = row["status"] == "cancelling"
                await tx.execute(
                    "UPDATE tasks SET status = ?, error_info = ?, finished = ?, running = 0 "
                    "WHERE uuid = ?",
                    "cancelled" if cancelled else "failure",
                    json.dumps(["CANCELLED"] if cancelled else RESTARTED),
                    now,
                    row["uuid"],
                )
                await self.events.record("task", row["uuid"], db=tx)
                await tx.execute(
                    "UPDATE vdis SET locked_by = NULL WHERE locked_by = ?", row["uuid"]
                )
        for row in stale:
            event(
                log,
                "task.recovered",
                logging.WARNING,
                task=row["uuid"],
                vdi=row["vdi"],
                status="suspended"
                if row["resumable"] and row["status"] == "pending"
                else "cancelled"
                if row["status"] == "cancelling"
                else "failure",
            )
        return len(stale)

    async def abort_all(self, error_info: list[str]) -> None:
        """Stop every running transfer (shutdown): each fails with `error_info`."""
        transfers = list(self.running.values())
        for transfer in transfers:
            transfer.abort_error = error_info
            transfer.cancel_work()
        # Transfers whose handler is gone (or never reacts) are failed here directly.
        await asyncio.sleep(0)
        for transfer in transfers:
            await self.fail(transfer, error_info)

    async def collect_garbage(self) -> int:
        """Delete finished tasks older than the TTL."""
        now = time.time()
        where = "status IN ('success', 'failure', 'cancelled') AND finished < ?"
        old = await self.db.fetchall(f"SELECT uuid, ref FROM tasks WHERE {where}", now - self.ttl)
        if not old:
            return 0
        async with self.db.transaction() as tx:
            removed = await tx.execute(f"DELETE FROM tasks WHERE {where}", now - self.ttl)
            for row in old:
                await self.events.record("task", row["uuid"], "del", ref=row["ref"], db=tx)
        if removed:
            event(log, "task.gc", removed=removed)
        return removed
