"""An upload sent as parts over several connections at once.

On a link with latency one connection cannot keep a disk's bytes flowing (Xen Orchestra
measured NBD reads at 50 ms: 11 MB/s on one connection, 80 MB/s on eight). A client cuts the
disk into N parts and sends each over a connection of its own, all at once:

    PUT /import_raw_vdi?vdi=V&task_id=T&chunked=true&parts=N&part=I

Each part is XAPI chunk framing (every frame names its disk offset), so the parts need no
order and may cover any disjoint ranges of the disk. They write one VDI under one task:

    the first part   claims the task, takes the VDI's write lock and opens the VDI, once
    each part        streams its frames in; at its end, flushed, it is recorded done
    the last part    done: the task succeeds with the VDI
    a part cut off   is not done: the client sends it again, whole. While no part is being
                     sent the task is suspended (pending, the VDI free), as a resumable
                     upload is, and it expires the same way
    a bad part       (its framing, a write beyond the disk, the SR full) fails the task and
                     stops the other parts
    a cancel         stops every part; the task ends cancelled

The parts share one target (one change-block tracker, one chain driver) behind a lock: what
latency slows, the network, runs in parallel; the disk writes (runs of up to 8 MiB) take
turns. All parts of an upload run on one host: the one that owns the VDI, or the one their
task already runs on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from common.errors import ApiError, ClientGone, bad_request
from common.logfields import event
from formats.events import Header
from formats.registry import RAW, wire
from transfer import imports, pipeline, reserve
from transfer.db import Row
from transfer.files import in_thread
from transfer.pipeline import Applier
from transfer.services import Services
from transfer.targets import Parts, Target
from transfer.tasks import Transfer, parts_done

if TYPE_CHECKING:
    from auth.middleware import Principal  # (auth imports aiohttp; operations do not)

log = logging.getLogger("vdi_transfer.parts")

MAX_PARTS = 16  # connections one upload may use (OPTIONS /import_raw_vdi: max_writers)


def check(params: imports.ImportParams) -> None:
    """What a part must be, before anything is looked up."""
    parts, part = params.parts, params.part
    assert parts is not None
    if not 1 <= parts <= MAX_PARTS:
        raise bad_request(f"parts= must be from 1 to {MAX_PARTS}, not {parts}")
    if part is None or not 0 <= part < parts:
        raise bad_request(f"part= must name one of the {parts} parts: 0 to {parts - 1}")
    if not params.task_id:
        raise bad_request("the parts of an upload share a task: give task_id= (POST /tasks)")
    if not params.vdi or params.sr:
        raise bad_request("parts write an existing VDI: give vdi= (create it with POST /vdis)")
    if params.format != RAW.name or not params.chunked:
        raise bad_request("a part is raw data in XAPI's chunk framing: give chunked=true")
    if params.content_range is not None or not params.complete:
        raise bad_request("a part is sent whole: no Content-Range, no Upload-Complete: ?0")


async def placement(svc: Services, params: imports.ImportParams) -> tuple[str, str | None]:
    """The VDI, and the host its parts go to: where the task's parts run now, else the
    host that owns the VDI."""
    assert params.vdi is not None and params.task_id is not None
    vdi = await svc.vdis.get(params.vdi)
    task = await svc.tasks.get(params.task_id)
    if task["running"] and task["host"] and task["upload_parts"] is not None:
        return vdi["uuid"], task["host"]
    return vdi["uuid"], await svc.vdis.owner(vdi)


class SharedTarget:
    """One target written by every part, one call at a time (worker threads)."""

    def __init__(self, target: Target):
        self.target = target
        self._lock = threading.Lock()

    def write_run(self, offset: int, parts: Parts, punch: bool) -> int:
        with self._lock:
            return self.target.write_run(offset, parts, punch)

    def zero(self, offset: int, length: int) -> None:
        with self._lock:
            self.target.zero(offset, length)

    def flush(self) -> None:
        with self._lock:
            self.target.flush()

    def close(self) -> None:
        self.target.close()


class Part:
    """One connection's part: its body into the shared target."""

    def __init__(self, group: Group, number: int, expected: int | None):
        self.group = group
        self.number = number
        self.expected = expected  # Content-Length, if the request gave one
        self.received = 0
        self.aio: asyncio.Task | None = None  # the request's task (its end is not stopped)

    @property
    def task(self) -> str:
        return self.group.transfer.task

    @property
    def task_ref(self) -> str:
        return self.group.transfer.ref

    @property
    def vdi(self) -> str:
        return self.group.vdi["uuid"]

    async def run(self, body: imports.Body, ready: Callable[[], Awaitable[None]]) -> dict:
        """`ready()` (the client may send), then the body; the part's answer."""
        group, me = self.group, asyncio.current_task()
        assert me is not None
        self.aio = me
        group.transfer.members.add(me)
        try:
            if group.transfer.cancel_sent:
                raise asyncio.CancelledError
            await ready()
            await self._receive(body)
            # Recording the part (and maybe ending the task) is not cut short by a cancel:
            # that waits for it, then ends the task as it finds it.
            finishing = asyncio.ensure_future(group.part_done(self))
            try:
                return await asyncio.shield(finishing)
            except asyncio.CancelledError:
                await asyncio.wait([finishing])
                raise
        except asyncio.CancelledError:
            await asyncio.shield(group.part_stopped(self, None))
            raise
        except BaseException as exc:
            await asyncio.shield(group.part_stopped(self, exc))
            raise
        finally:
            group.transfer.members.discard(me)

    async def _receive(self, body: imports.Body) -> None:
        group, svc = self.group, self.group.svc
        applier = Applier()
        applier.target = group.target
        applier.size = group.vdi["virtual_size"]
        applier.punch = True  # the VDI may hold data where a part sends zeros

        async def on_header(header: Header) -> None:
            """Chunk framing states nothing about the disk: the VDI is open already."""

        async def on_received(received: int) -> None:
            self.received = received
            await group.report()

        async def on_applied(fed: int, broke: bool) -> None:
            """A part is not resumed: nothing to checkpoint."""

        decoder = wire(RAW.name, True).decoder(applier.size, None, self.expected)
        try:
            with imports.decoding_errors(
                lambda: self.received, self.expected, f"part {self.number}: "
            ):
                received = await pipeline.run(
                    decoder, body, applier, on_header, on_received, on_applied, svc.upload_budget
                )
                if self.expected is not None and received != self.expected:
                    raise imports.short_body(received, self.expected)
                await in_thread(applier.flush)
        except OSError as exc:
            if not reserve.is_full(exc):
                raise
            raise await imports.sr_full(
                svc, group.sr, self.task, self.vdi, group.transfer.bytes, applier.written
            ) from None
        finally:
            group.written += applier.written


class Group:
    """The parts of one upload that run on this host: one task, one VDI, one target."""

    def __init__(self, uploads: PartedUploads, transfer: Transfer, vdi: Row, sr: Row,
                 parts: int, done: set[int]):  # fmt: skip
        self.uploads = uploads
        self.svc = uploads.svc
        self.transfer = transfer
        self.vdi, self.sr = vdi, sr
        self.parts = parts
        self.done = done  # parts durable (from earlier connections too)
        self.active: dict[int, Part] = {}
        self.target: SharedTarget | None = None
        self.ended = False  # the task ended or was suspended: no part joins this group
        self.written = 0  # data bytes written by this group's parts
        self._bytes_before = transfer.bytes  # body bytes of parts that ended here
        self._finishing = asyncio.Lock()  # one part's end is recorded at a time

    async def report(self) -> None:
        """Progress: the parts done, and the active ones by their share of their body."""
        active = self.active.values()
        share = sum(p.received / p.expected for p in active if p.expected)
        nbytes = self._bytes_before + sum(p.received for p in active)
        await self.svc.tasks.report(self.transfer, nbytes, (len(self.done) + share) / self.parts)

    async def part_done(self, part: Part) -> dict:
        """The part's body is all in: durable, recorded; the last one ends the task."""
        svc, transfer = self.svc, self.transfer
        async with self._finishing:
            assert self.target is not None
            await in_thread(self.target.flush)
            self._leave(part)
            if self.ended:  # another part failed the upload meanwhile, or it was cancelled
                self._close_if_idle()
                raise ApiError(
                    "BAD_REQUEST",
                    f"the upload of task {transfer.task} ended while part {part.number} "
                    "arrived: its task says why",
                    transfer.task,
                    status=410,
                )
            self.done.add(part.number)
            await svc.tasks.record_parts(transfer, sorted(self.done))
            complete = len(self.done) == self.parts
            event(
                log,
                "import.part_done",
                task=transfer.task,
                vdi=self.vdi["uuid"],
                part=part.number,
                parts=self.parts,
                done=len(self.done),
                bytes=part.received,
            )
            if complete:
                await svc.vdis.bump_generation(self.vdi["uuid"])
                await self._end(lambda: svc.tasks.succeed(transfer, self.vdi["uuid"]), part)
                await svc.vdis.usage(await svc.vdis.get(self.vdi["uuid"]))  # for the pool
                event(
                    log,
                    "import.done",
                    task=transfer.task,
                    vdi=self.vdi["uuid"],
                    format="raw-chunked",
                    parts=self.parts,
                    bytes=transfer.bytes,
                    written=self.written,
                )
            elif not self.active:
                await self._suspend("no part is being sent")
        return {
            "task": transfer.task,
            "task_ref": transfer.ref,
            "vdi": self.vdi["uuid"],
            "part": part.number,
            "parts": self.parts,
            "parts_done": sorted(self.done),
            "complete": complete,
            "bytes": part.received,
        }

    async def part_stopped(self, part: Part, why: BaseException | None) -> None:
        """The part ended before its end (`why` None: its request was cancelled). A break
        leaves the others going (the part is sent again); a bad part fails the upload; a
        cancel ends it cancelled; a shutdown suspends it."""
        svc, transfer = self.svc, self.transfer
        self._leave(part)
        if self.ended:
            self._close_if_idle()
            return
        if why is None:
            if transfer.abort_error is not None:
                await self._suspend("the server is stopping")
            else:
                await self._end(lambda: svc.tasks.end_cancelled(transfer), part)
        elif isinstance(why, ClientGone):
            event(
                log,
                "import.part_broke",
                logging.WARNING,
                task=transfer.task,
                vdi=self.vdi["uuid"],
                part=part.number,
                reason=why.message,
            )
            if not self.active:
                await self._suspend(why.message)
        elif isinstance(why, ApiError):
            await self._end(lambda: svc.tasks.fail(transfer, why.error_info), part)
        else:
            log.error(
                "a part of an upload failed",
                exc_info=why,
                extra={"fields": {"task": transfer.task, "vdi": self.vdi["uuid"]}},
            )
            info = ["INTERNAL_ERROR", str(why) or repr(why)]
            await self._end(lambda: svc.tasks.fail(transfer, info), part)

    def _leave(self, part: Part) -> None:
        if self.active.get(part.number) is part:
            del self.active[part.number]
            self._bytes_before += part.received

    async def _suspend(self, why: str) -> None:
        """No part is being sent: the task waits for the rest (pending, the VDI free)."""
        self.ended = True
        self.uploads.forget(self)
        await self.svc.tasks.suspend(self.transfer, why)
        self._close_if_idle()

    async def _end(self, end_task: Callable[[], Awaitable[None]], by: Part) -> None:
        """End the task (the VDI's lock goes with it) and stop the parts still running
        (not `by`, whose request answers)."""
        self.ended = True
        self.uploads.forget(self)
        await end_task()
        for other in list(self.transfer.members):
            if other is not by.aio:
                other.cancel()
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        """Close the target once no part can write through it (a stopped part's worker
        has finished when its pipeline returns: the fd outlives every write)."""
        if self.ended and not self.active and self.target is not None:
            target, self.target = self.target, None
            task = asyncio.get_running_loop().run_in_executor(None, target.close)
            self.uploads.closing.add(task)
            task.add_done_callback(self.uploads.closing.discard)


class PartedUploads:
    """The parted uploads running on this host, by task."""

    def __init__(self, svc: Services):
        self.svc = svc
        self.groups: dict[str, Group] = {}
        self.closing: set[asyncio.Future] = set()
        self._forming = asyncio.Lock()  # parts arriving together: one forms the group

    async def join(self, params: imports.ImportParams, principal: Principal,
                   expected: int | None) -> Part:  # fmt: skip
        """The part's place in its upload's group (formed by the first part here)."""
        number = params.part
        assert number is not None and params.task_id is not None and params.vdi is not None
        async with self._forming:
            task = await self.svc.tasks.get_owned(params.task_id, principal)
            group = self.groups.get(task["uuid"])
            if group is None:
                group = await self._form(task, params, principal)
            else:
                vdi = await self.svc.vdis.get(params.vdi)
                _check_same(task, vdi, params)
                if group.transfer.cancel_sent:
                    raise ApiError(
                        "BAD_REQUEST",
                        f"the upload of task {task['uuid']} is being cancelled",
                        task["uuid"],
                        status=410,
                    )
            if number in group.active:
                raise ApiError(
                    "OTHER_OPERATION_IN_PROGRESS",
                    f"part {number} of the upload of task {task['uuid']} is being sent on "
                    "another connection",
                    task["uuid"],
                )
            part = Part(group, number, expected)
            group.active[number] = part
            return part

    async def _form(self, task: Row, params: imports.ImportParams, principal: Principal) -> Group:
        """The first part here: claim the task, lock the VDI, open it."""
        svc = self.svc
        assert params.parts is not None and params.vdi is not None
        imports.check_still_open(task)
        if task["running"]:
            raise ApiError(
                "OTHER_OPERATION_IN_PROGRESS",
                f"task {task['uuid']} already has a transfer running",
                task["uuid"],
            )
        vdi = await svc.vdis.get(params.vdi)
        _check_same(task, vdi, params)
        if vdi["read_only"]:
            raise ApiError("VDI_READ_ONLY", f"VDI {vdi['uuid']} is read-only", vdi["uuid"])
        await svc.vdis.ensure_free(vdi)
        sr = await svc.srs.get(vdi["sr"])
        label = f"import_raw_vdi {vdi['uuid']} in {params.parts} parts"
        transfer = await svc.tasks.begin(task["uuid"], label, principal.username, vdi["uuid"])
        transfer.aio_task = None  # its parts' requests are its members
        transfer.bytes = task["bytes_transferred"] or 0
        try:
            await svc.tasks.make_parted(transfer, params.parts)
            await svc.vdis.lock(vdi["uuid"], transfer.task)
            target = await imports.open_target(svc, vdi["uuid"])
        except BaseException as exc:
            # Not the upload's fault (the VDI is busy): it waits, pending, for the next try.
            why = exc.message if isinstance(exc, ApiError) else type(exc).__name__
            await asyncio.shield(svc.tasks.suspend(transfer, why))
            raise
        group = Group(self, transfer, vdi, sr, params.parts, set(parts_done(task) or ()))
        group.target = SharedTarget(target)
        self.groups[transfer.task] = group
        event(
            log,
            "import.parts_started",
            task=transfer.task,
            vdi=vdi["uuid"],
            parts=params.parts,
            done=len(group.done),
        )
        return group

    def forget(self, group: Group) -> None:
        if self.groups.get(group.transfer.task) is group:
            del self.groups[group.transfer.task]

    async def wait_closed(self) -> None:
        """At shutdown: every target closed."""
        if self.closing:
            with contextlib.suppress(Exception):
                await asyncio.gather(*self.closing)


def _check_same(task: Row, vdi: Row, params: imports.ImportParams) -> None:
    """The part belongs to the upload its task is: the same VDI, the same number of parts,
    and the task an upload in parts (or not an upload yet)."""
    if task["resumable"] and task["upload_parts"] is None:
        raise bad_request(
            f"task {task['uuid']} is an upload of one stream: continue it at its Upload-Offset"
        )
    if task["upload_parts"] is not None and task["upload_parts"] != params.parts:
        raise bad_request(
            f"the upload of task {task['uuid']} has {task['upload_parts']} parts, "
            f"not {params.parts}"
        )
    if task["vdi"] and task["vdi"] != vdi["uuid"]:
        raise bad_request(f"task {task['uuid']} uploads into VDI {task['vdi']}, not {vdi['uuid']}")
