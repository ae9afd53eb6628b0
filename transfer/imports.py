"""The import operation: everything that can be checked before the body is checked, then the
body streams through its format's decoder into the VDI, durably, under a task.

    Import.plan(...)   checks; creates and locks nothing      (the edge may still refuse)
    await op.start()   the task, the VDI (if its size is known), the VDI's write lock
    await op.run(body) the body -> the VDI; the task ends with it:
                       success, suspended (a segment, or a resumable upload cut off), or
                       failure/cancelled, after which `abandon` removes what it created

The HTTP edge (handlers/transfers.py) parses the request into ImportParams, calls these and
renders the result; this module owns the rules: which target, which size, which decoder,
and what a failure leaves behind. It knows nothing of HTTP beyond the body it reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from common.errors import ApiError, ClientGone, bad_request
from common.logfields import event
from formats.errors import FormatError, FramingError, OutOfBounds, Unsupported
from formats.events import Header
from formats.registry import RAW, RUNTIME_FORMATS, Format, wire
from transfer import cbt, checkpoints, layers, pipeline, reserve
from transfer.db import Row
from transfer.files import in_thread
from transfer.pipeline import Applier
from transfer.services import Services
from transfer.sizes import parse_size, round_to_sector
from transfer.targets import ChainTop, RawFile, Target
from transfer.tasks import Operation

if TYPE_CHECKING:
    from auth.middleware import Principal  # (auth imports aiohttp; operations do not)

log = logging.getLogger("vdi_transfer.import")

DEFAULT_NAME = "Imported VDI"


class Body(pipeline.Body, Protocol):
    """The request body: what the pipeline reads, plus `read(n)` to skip a resumed upload's
    durable start. A break in it (the client went away, the framing of the HTTP body was
    cut) is a ConnectionError."""

    async def read(self, n: int) -> bytes:
        """At most n bytes; b"" at the end."""


@dataclass
class ImportParams:
    """What the request asks, as the edge parsed it (query, cookies, upload headers)."""

    vdi: str | None
    sr: str | None
    format: str
    chunked: bool
    task_id: str | None
    virtual_size: str | None
    name_label: str | None
    content_range: tuple[int, int | None, int | None] | None = None  # start, end, total
    complete: bool = True  # Upload-Complete: ?0 makes this request one segment of the upload
    announced: bool = False  # the client speaks the resumable-upload draft: resumable too
    parts: int | None = None  # an upload in parts over several connections (transfer/parts.py)
    part: int | None = None  # which of them this request sends

    @property
    def resumable(self) -> bool:
        return bool(self.task_id) or self.announced

    @functools.cached_property
    def wire(self) -> Format:
        """What the body is: the format, or XAPI's chunk framing of raw data."""
        return wire(self.format, self.chunked)


@dataclass
class Plan:
    """What the checks decided, before a byte of the body is read."""

    vdi: Row | None  # the existing target, or None when a VDI is to be created in `sr`
    sr: Row
    virtual_size: int | None  # None: a new VDI sized by the image's header
    resume_offset: int = 0  # a resumed upload: the stream offset its task has durable
    skip: int = 0  # body bytes already durable (the request starts below the offset)


async def placement(svc: Services, params: ImportParams) -> tuple[str, str | None] | None:
    """What the import writes (a VDI uuid, or the SR uuid a new VDI goes to) and the host
    that must serve it (None: this one); None if the request names nothing (plan says so).
    A resumed upload continues where its checkpoint is: on the host that ran it."""
    if params.content_range is not None and params.task_id:
        task = await svc.tasks.get(params.task_id)
        if task["vdi"]:
            return task["vdi"], task["host"]
        return None
    if params.vdi:
        vdi = await svc.vdis.get(params.vdi)
        return vdi["uuid"], await svc.vdis.owner(vdi)
    if params.sr:
        sr = await svc.srs.get(params.sr)
        return sr["uuid"], svc.srs.owner(sr)
    return None


async def _plan(svc: Services, params: ImportParams, content_length: int | None) -> Plan:
    """Every check that needs no body: target, writability, availability, size."""
    if params.content_range is not None:
        return await _plan_resume(svc, params)
    if params.chunked and params.format != RAW.name:
        raise bad_request(
            "chunk framing (chunked=) carries raw data; it cannot be combined "
            f"with format={params.format}"
        )
    if params.vdi and params.sr:
        raise bad_request("give vdi= (an existing VDI) or sr= (a new one), not both")
    if params.vdi:
        vdi = await svc.vdis.get(params.vdi)
        if vdi["read_only"]:
            raise ApiError("VDI_READ_ONLY", f"VDI {vdi['uuid']} is read-only", vdi["uuid"])
        await svc.vdis.ensure_free(vdi)
        sr = await svc.srs.get(vdi["sr"])
        size = vdi["virtual_size"]
        if params.virtual_size is not None:
            raise bad_request("virtual_size= only applies when creating a VDI with sr=")
    elif params.sr:
        sr = await svc.srs.get(params.sr)
        vdi = None
        size: int | None
        if params.virtual_size is not None:
            size = round_to_sector(parse_size(params.virtual_size, "virtual_size"))
            if size <= 0:
                raise bad_request("the new VDI's virtual size must be greater than zero")
        elif params.wire.states_size:
            size = None  # the image's header says, once it arrives
        elif params.wire.length_is_size and content_length is not None:
            size = round_to_sector(content_length)
        else:
            raise bad_request(
                "with sr= and a body whose size says nothing about the disk (Transfer-"
                "Encoding: chunked, chunk framing, or tar), give the new VDI's size as "
                "virtual_size="
            )
    else:
        raise bad_request("give vdi= (the VDI to write) or sr= (where to create one)")
    if (
        params.wire.length_is_size
        and size is not None
        and content_length is not None
        and content_length > size
    ):
        raise ApiError(
            "VDI_TOO_SMALL",
            f"the upload has {content_length} bytes but the VDI holds {size}",
            size,
            content_length,
        )
    return Plan(vdi, sr, size)


def check_still_open(task: Row) -> None:
    """An upload goes on only while its task is pending: 400 once it succeeded, 410 (gone)
    once it failed or was cancelled."""
    if task["status"] != "pending":
        status = 400 if task["status"] == "success" else 410
        raise ApiError(
            "BAD_REQUEST",
            f"the upload of task {task['uuid']} is {task['status']}",
            task["uuid"],
            status=status,
        )


async def _plan_resume(svc: Services, params: ImportParams) -> Plan:
    """A PUT with Content-Range continues the upload of its task at the range's start."""
    if not params.task_id:
        raise bad_request("Content-Range continues an upload: give its task_id=")
    task = await svc.tasks.get(params.task_id)
    check_still_open(task)
    if not task["resumable"]:
        raise bad_request(f"task {task['uuid']} is not a resumable upload")
    if task["upload_parts"] is not None:
        raise bad_request(
            f"task {task['uuid']} is an upload in {task['upload_parts']} parts: send a part "
            "that did not arrive again, whole (part=, parts=)"
        )
    if task["running"]:
        raise ApiError(
            "VDI_IN_USE",
            f"the upload of task {task['uuid']} is in flight on another connection",
            task["vdi"] or "",
        )
    if (params.format, params.chunked) != (task["upload_format"], bool(task["upload_chunked"])):
        raise bad_request(
            f"task {task['uuid']} uploads format={task['upload_format']}"
            f"{' chunked' if task['upload_chunked'] else ''}, not format={params.format}"
        )
    if not task["vdi"]:
        raise bad_request(
            "nothing of this upload is durable yet: start it again, without Content-Range"
        )
    vdi = await svc.vdis.get(task["vdi"])
    if params.vdi and params.vdi not in (vdi["uuid"], vdi["ref"]):
        raise bad_request(f"task {task['uuid']} uploads into VDI {vdi['uuid']}, not {params.vdi}")
    durable = task["upload_offset"]
    start = params.content_range[0]
    if start > durable:
        raise ApiError(
            "UPLOAD_OFFSET_MISMATCH",
            f"the upload can continue at byte {durable}, not {start}",
            durable,
            start,
            headers={"Upload-Offset": str(durable)},
        )
    await svc.vdis.ensure_free(vdi)
    sr = await svc.srs.get(vdi["sr"])
    return Plan(vdi, sr, vdi["virtual_size"], resume_offset=durable, skip=durable - start)


class Import(Operation):
    """One import, from its checks to its end. See the module docstring for the order."""

    def __init__(self, svc: Services, params: ImportParams, plan: Plan, expected: int | None):
        self.svc = svc
        self.params = params
        self.sr = plan.sr
        self.vdi = plan.vdi  # None until an image's header says how big a new VDI must be
        self.virtual_size = plan.virtual_size
        self.expected = expected  # this request's body length (Content-Length), if known
        self.resume_offset = plan.resume_offset
        self.skip = plan.skip
        self.created = False  # the import created the VDI: a failed import removes it again
        self._applier = Applier()  # where the body's events land
        self._received = 0  # body bytes read after the skipped start

    @classmethod
    async def plan(cls, svc: Services, params: ImportParams, content_length: int | None) -> Import:
        """Every check that needs no body; nothing is created or locked yet."""
        return cls(svc, params, await _plan(svc, params, content_length), content_length)

    @property
    def target_uuid(self) -> str | None:
        return self.vdi["uuid"] if self.vdi else None

    @property
    def probe(self) -> bool:
        """An empty PUT that is not part of an upload: clients probe with it. It is
        answered, but nothing is created or written."""
        return self.expected == 0 and self.params.complete and not self.params.content_range

    @property
    def bytes(self) -> int:
        """Stream bytes received so far (a resumed upload counts from its start)."""
        return self.transfer.bytes if self.transfer else 0

    async def start(self, principal: Principal) -> None:
        """Attach a task (a named one must be the principal's own, or the principal an
        admin); create the VDI now if its size is known (else at the image's header); take
        the VDI's write lock."""
        svc, params = self.svc, self.params
        if params.task_id is not None:
            await svc.tasks.get_owned(params.task_id, principal)
        if self.vdi is None and self.virtual_size is not None:
            self.vdi = await self._create_vdi(self.virtual_size)
            self.created = True
        target = self.target_uuid or f"new in SR {self.sr['uuid']}"
        try:
            self.transfer = await svc.tasks.begin(
                params.task_id, f"import_raw_vdi {target}", principal.username, self.target_uuid
            )
        except BaseException:
            if self.created:
                await svc.vdis.delete(self.vdi["uuid"])
            raise
        if params.resumable:  # the client can name this upload again
            length = params.content_range[2] if params.content_range else self.expected
            await svc.tasks.make_resumable(self.transfer, params.format, params.chunked, length)
        if self.vdi is not None:
            try:
                await svc.vdis.lock(self.vdi["uuid"], self.task)
            except ApiError as exc:
                await svc.tasks.fail(self.transfer, exc.error_info)
                await self.abandon(exc)
                raise

    async def run(self, body: Body, ready: Callable[[], Awaitable[None]]) -> int:
        """Under the task: `ready()` (the edge tells the client to send its body), then the
        body into the VDI. Returns the stream offset durable at the end. The task ends here
        however the body ends; a failure or cancel abandons the import and goes up."""
        transfer = self.transfer
        assert transfer is not None
        try:
            async with self.svc.tasks.run(transfer):
                await ready()
                try:
                    received = await self._receive(body)
                except OSError as exc:
                    if not reserve.is_full(exc):
                        raise
                    raise await self._sr_full() from None
                assert self.vdi is not None
                if self.params.complete:
                    await self.svc.tasks.succeed(transfer, self.vdi["uuid"])
                else:  # one segment of a resumable upload: durable, and the upload stays open
                    await self.svc.tasks.suspend(transfer, "segment received")
        except asyncio.CancelledError:
            await asyncio.shield(self.abandon(asyncio.CancelledError()))
            raise
        except BaseException as exc:
            await self.abandon(exc)
            if isinstance(exc, ApiError) and exc.code == "SR_FULL":
                # The reserve went to write the task's end; take it again if the removed
                # VDI left room (else housekeeping does, once there is).
                await in_thread(reserve.take, self.svc.config.state_dir)
            raise
        await self.svc.vdis.usage(await self.svc.vdis.get(self.vdi["uuid"]))  # for the pool
        return received

    async def _sr_full(self) -> ApiError:
        transfer = self.transfer
        assert transfer is not None
        return await sr_full(
            self.svc, self.sr, transfer.task, self.target_uuid, transfer.bytes,
            self._applier.written,
        )  # fmt: skip

    async def abandon(self, why: BaseException) -> None:
        """After a failed or cancelled import has ended its task: remove a VDI the import
        itself created. (An existing VDI keeps what was written; it was the client's to
        overwrite.) A suspended resumable upload keeps everything, to go on later."""
        svc, transfer = self.svc, self.transfer
        assert transfer is not None
        if transfer.resumable:
            task = await svc.tasks.get(transfer.task)
            if task["status"] == "pending":
                return  # suspended: the upload may go on, its VDI with it
            await in_thread(
                checkpoints.discard, svc.config.state_dir, transfer.task, [Path(self.sr["path"])]
            )
        if self.created and self.vdi is not None:
            try:
                await svc.vdis.delete(self.vdi["uuid"])
            except ApiError:
                log.warning(
                    "could not remove the VDI of a failed import",
                    extra={"fields": {"vdi": self.vdi["uuid"], "task": transfer.task}},
                )
            else:
                event(
                    log,
                    "import.vdi_removed",
                    task=transfer.task,
                    vdi=self.vdi["uuid"],
                    reason=type(why).__name__,
                )

    # -- the body ------------------------------------------------------------------------

    async def _receive(self, body: Body) -> int:
        """Stream the body into the VDI; returns the stream offset once it is durable."""
        checkpoint = None
        if self.resume_offset:
            checkpoint = await in_thread(checkpoints.load, self._state_file)
            if checkpoint is None or checkpoint.offset != self.resume_offset:
                raise ApiError(
                    "INTERNAL_ERROR",
                    f"the checkpoint of task {self.task} at byte {self.resume_offset} is missing",
                )
        with decoding_errors(lambda: self.bytes, self.expected):
            if self.skip:
                await _skip(body, self.skip)
            received = await self._stream(body, checkpoint)
        assert self.vdi is not None
        await self.svc.vdis.bump_generation(self.vdi["uuid"])
        if self.params.complete and self.transfer.resumable:
            await in_thread(
                checkpoints.discard, self.svc.config.state_dir, self.task, [Path(self.sr["path"])]
            )
        return received

    @property
    def _state_file(self) -> Path:
        return checkpoints.state_path(self.svc.config.state_dir, self.task)

    async def _stream(self, body: Body, checkpoint: checkpoints.Checkpoint | None) -> int:
        transfer, applier, fmt = self.transfer, self._applier, self.params.wire
        assert transfer is not None
        if checkpoint is not None:  # resumed: the decoder (and its spill) go on where they were
            decoder, spill = checkpoint.decoder, checkpoint.spill
            applier.target = await self._open_target()
            applier.size, applier.punch = self.vdi["virtual_size"], checkpoint.punch
        else:
            spill = None
            if fmt.spills:
                spill = await in_thread(checkpoints.SpillFile, Path(self.sr["path"]), self.task)
            decoder = fmt.decoder(self.virtual_size, spill, self.expected)
        schedule = checkpoints.Schedule(transfer.resumable, self.resume_offset)
        finished = False

        def durable(position: int) -> bool:
            """Worker thread: data, spill and decoder state durable at `position`."""
            self._flush()
            if spill is not None:
                spill.sync()
            state = checkpoints.Checkpoint(position, decoder, applier.punch, spill)
            return checkpoints.save(self._state_file, state)

        async def checkpoint_at(position: int) -> None:
            if await in_thread(durable, position):
                await self.svc.tasks.checkpoint(transfer, position)
                self.svc.metrics.checkpoints.inc()
            schedule.done(position)

        async def on_applied(fed: int, broke: bool) -> None:
            await self._report()
            position = self.resume_offset + fed
            due = schedule.enabled and (broke or schedule.due(position))
            if due and applier.target is not None:
                await checkpoint_at(position)

        async def on_idle(fed: int) -> bool:
            """The body paused with `fed` bytes applied: a stalled resumable upload makes
            them durable within STALL_CHECKPOINT seconds of its last checkpoint, rather than
            when (if ever) more data comes. True once nothing is owed at `fed`."""
            position = self.resume_offset + fed
            if not schedule.enabled or applier.target is None:
                return True
            if position <= schedule.last_offset:
                return True
            if time.monotonic() - schedule.last_time < checkpoints.STALL_CHECKPOINT:
                return False  # a trickle: at most one checkpoint a second
            await checkpoint_at(position)
            return True

        async def on_received(received: int) -> None:
            self._received = received
            await self._report()

        try:
            received = self.skip + await pipeline.run(
                decoder,
                body,
                applier,
                self._on_header,
                on_received,
                on_applied,
                self.svc.upload_budget,
                final=self.params.complete,
                on_idle=on_idle,
            )
            if self.expected is not None and received != self.expected:
                raise short_body(received, self.expected)
            if not self.params.complete:
                await on_applied(received - self.skip, True)  # a segment ends durable
                return transfer.bytes
            if applier.target is None:
                raise ApiError("IMAGE_INVALID", f"the {fmt.name} stream ended before its header")
            await in_thread(self._flush)
            finished = True
        finally:
            if applier.target is not None:
                await in_thread(applier.target.close)
            if spill is not None:
                keep = transfer.resumable and not finished  # a suspended upload needs it again
                await in_thread(functools.partial(spill.close, remove=not keep))
        event(
            log,
            "import.done",
            task=transfer.task,
            vdi=self.vdi["uuid"],
            format=fmt.name,
            bytes=transfer.bytes,
            written=applier.written,
        )
        return transfer.bytes

    def _flush(self) -> None:
        """Worker thread: everything written is durable."""
        self._applier.flush()
        self._applier.target.flush()

    async def _report(self) -> None:
        """Progress: body bytes over Content-Length; without a length, how far into the disk
        the data has reached (raw streams, vhd-tool's framing and image blocks mostly go
        front to back)."""
        transfer = self.transfer
        transfer.bytes = self.resume_offset + self._received
        received, expected = self.skip + self._received, self.expected
        size = self._applier.size or self.virtual_size
        reached = self._applier.reached
        if self.params.wire.length_is_size:  # raw bytes: the stream offset is the disk's
            reached = max(reached, transfer.bytes)
        if expected:
            await self.svc.tasks.report(transfer, transfer.bytes, received / expected)
        else:
            estimate = 0.99 * reached / size if size else 0.0
            await self.svc.tasks.report(transfer, transfer.bytes, estimate)

    async def _on_header(self, header: Header) -> None:
        """The image says how big the disk is and whether it is whole: create the VDI if it
        is to be made now, refuse a disk larger than the VDI, clear what a whole image
        replaces, and open the target."""
        svc, transfer, applier = self.svc, self.transfer, self._applier
        declared = header.virtual_size
        if self.vdi is None:
            size = self.virtual_size or declared
            if size is None:
                raise bad_request("the image does not say its size: give virtual_size=")
            if declared is not None and declared > size:
                raise _too_small(declared, size)
            self.vdi = await self._create_vdi(round_to_sector(size))
            self.created = True
            await svc.vdis.lock(self.vdi["uuid"], self.task)
            await svc.tasks.set_vdi(transfer, self.vdi["uuid"])
        size = self.vdi["virtual_size"]
        if declared is not None and declared > size:
            raise _too_small(declared, size)
        if applier.target is None:
            applier.target = await self._open_target()
            applier.size = size
        # A VDI this import created reads as zeros: nothing needs clearing there, nor zeroing,
        # unless the stream may write a range twice (zeros over its own data). A whole image
        # replaces the disk up to its size: clear that first, so what it leaves unallocated
        # reads as zero; then its zeros need not be written.
        if header.whole_image and not self.created:
            await in_thread(applier.target.zero, 0, declared or size)
        fresh = self.created and not self.params.wire.overlaps
        applier.punch = not (header.whole_image or fresh)
        event(
            log,
            "import.header",
            task=transfer.task,
            vdi=self.vdi["uuid"],
            format=self.params.wire.name,
            virtual_size=declared,
            whole_image=header.whole_image,
        )

    async def _open_target(self) -> Target:
        assert self.vdi is not None
        return await open_target(self.svc, self.vdi["uuid"])

    def runtime_format(self) -> str:
        """How a VDI created by an import is stored: the configured mapping from the upload's
        format, else the default; if the SR cannot store that, the SR's default."""
        config = self.svc.config
        wanted = config.image_mapping.get(self.params.format, config.images_type)
        if wanted in self.svc.srs.formats(self.sr) and wanted in RUNTIME_FORMATS:
            return wanted
        return self.sr["default_image_format"]

    async def _create_vdi(self, size: int) -> Row:
        return await self.svc.vdis.create(
            self.sr, self.params.name_label or DEFAULT_NAME, size, self.runtime_format()
        )


async def open_target(svc: Services, vdi_uuid: str) -> Target:
    """A raw VDI's file is the disk: written directly. Any other through its chain.
    With changed block tracking on, every write is logged ahead (transfer/cbt.py)."""
    vdi = await svc.vdis.get(vdi_uuid)  # as it is under the writer's lock
    target: Target
    if vdi["image_format"] == RAW.name:
        target = await in_thread(RawFile.open, await svc.vdis.path(vdi))
    else:
        files = await svc.vdis.chain_files(vdi)
        chain = await in_thread(functools.partial(layers.open_chain, files, writable=True))
        target = ChainTop(chain)
    if not vdi["cbt_enabled"]:
        return target
    log = cbt.path_of(await svc.vdis.path(vdi), vdi["uuid"])
    if not await in_thread(log.exists):  # lost (a crash while it changed hands)
        await svc.db.execute("UPDATE vdis SET cbt_complete = 0 WHERE uuid = ?", vdi["uuid"])
    try:
        return await in_thread(cbt.TrackedTarget, target, log, vdi["virtual_size"])
    except BaseException:
        await in_thread(target.close)
        raise


async def sr_full(
    svc: Services, sr: Row, task: str, vdi: str | None, received: int, written: int
) -> ApiError:
    """The SR ran out of space: SR_FULL (507), after freeing the database's reserve if it
    shares the SR's filesystem, so the task's end can still be written."""
    freed = await in_thread(reserve.give_up, svc.config.state_dir, Path(sr["path"]))
    event(
        log,
        "import.sr_full",
        logging.ERROR,
        task=task,
        vdi=vdi,
        sr=sr["uuid"],
        bytes=received,
        written=written,
        reserve_freed=freed,
    )
    return ApiError(
        "SR_FULL",
        f"SR {sr['name_label']!r} ({sr['uuid']}) ran out of space after {received} bytes of "
        f"the body had arrived ({written} bytes written to VDI {vdi})",
        sr["uuid"],
        written,
    )


async def cancel_upload(svc: Services, task: str) -> None:
    """The client gives a resumable upload up: its task is cancelled (a connection feeding
    it is closed) and its checkpoint and spill files go, from every SR this host sees."""
    await svc.tasks.cancel(task)
    srs = [Path(row["path"]) for row in await svc.srs.list()]
    await in_thread(checkpoints.discard, svc.config.state_dir, task, srs)


async def _skip(body: Body, count: int) -> None:
    """Read and drop the start of a resumed body that is durable already."""
    while count:
        chunk = await body.read(min(count, 1 << 20))
        if not chunk:
            raise ConnectionResetError("the body ended inside the bytes already received")
        count -= len(chunk)


def _too_small(declared: int, size: int) -> ApiError:
    return ApiError(
        "VDI_TOO_SMALL",
        f"the image declares a disk of {declared} bytes but the VDI holds {size}",
        size,
        declared,
    )


@contextlib.contextmanager
def decoding_errors(
    received: Callable[[], int], expected: int | None, prefix: str = ""
) -> Iterator[None]:
    """What streaming a body through its decoder raises, as the API's errors: a write
    beyond the disk is VDI_TOO_SMALL, broken framing BAD_REQUEST (`prefix` says whose),
    what we do not take FORMAT_UNSUPPORTED, a malformed image IMAGE_INVALID, and a body that
    broke off after `received()` bytes ClientGone."""
    try:
        yield
    except OutOfBounds as exc:
        raise ApiError("VDI_TOO_SMALL", str(exc), exc.size, exc.end) from None
    except FramingError as exc:
        raise bad_request(f"{prefix}{exc}") from None
    except Unsupported as exc:
        raise ApiError("FORMAT_UNSUPPORTED", str(exc)) from None
    except FormatError as exc:
        raise ApiError("IMAGE_INVALID", str(exc)) from None
    except (ConnectionError, EOFError) as exc:
        raise short_body(received(), expected, exc) from None


def short_body(received: int, expected: int | None, cause: BaseException | None = None):
    """The client stopped sending before the body's end: the upload can go on later."""
    of = f" of {expected}" if expected is not None else ""
    why = f" ({cause})" if cause and str(cause) else ""
    return ClientGone(
        "BAD_REQUEST",
        f"the upload ended after {received}{of} bytes: the client closed the connection{why}",
    )
