"""The import operation: check everything that can be checked before the body, then stream
the body through a format decoder into the VDI, durably.

The HTTP edge (handlers/transfers.py) parses parameters and owns the connection; this module
owns the rules: which target, which size, which decoder, and what a failure leaves behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from aiohttp import StreamReader

from common.errors import ApiError, bad_request
from formats.errors import FormatError, FramingError, OutOfBounds, Unsupported
from formats.events import Decoder, Header, Write
from formats.registry import RAW, Format, runtime_formats, wire
from transfer import image_import, layers, resume, storage
from transfer.db import Row
from transfer.diskio import DiskWriter
from transfer.logs import event
from transfer.services import Services
from transfer.sizes import parse_size, round_to_sector
from transfer.spillfile import FileSpill
from transfer.tasks import Transfer

log = logging.getLogger("vdi_transfer.import")

DEFAULT_NAME = "Imported VDI"


@dataclass
class ImportParams:
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

    @property
    def resumable(self) -> bool:
        return bool(self.task_id) or self.announced

    @property
    def wire(self) -> Format:
        """What the body is: the format, or XAPI's chunk framing of raw data."""
        return wire(self.format, self.chunked)


@dataclass
class ImportPlan:
    """What an import will do, decided before a byte of the body is read."""

    params: ImportParams
    vdi: Row | None  # the existing target, or None when a VDI is to be created in `sr`
    sr: Row
    virtual_size: int | None  # None: a new VDI sized by the image's header
    expected: int | None  # Content-Length, if given
    resume_offset: int = 0  # a resumed upload: the stream offset its task has durable
    skip: int = 0  # body bytes already durable (the request starts below the offset)

    @property
    def target_uuid(self) -> str | None:
        return self.vdi["uuid"] if self.vdi else None


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


async def plan(svc: Services, params: ImportParams, content_length: int | None) -> ImportPlan:
    """Every check that needs no body: target, writability, availability, size."""
    if params.content_range is not None:
        return await _plan_resume(svc, params, content_length)
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
    return ImportPlan(params, vdi, sr, size, content_length)


async def _plan_resume(
    svc: Services, params: ImportParams, content_length: int | None
) -> ImportPlan:
    """A PUT with Content-Range continues the upload of its task at the range's start."""
    if not params.task_id:
        raise bad_request("Content-Range continues an upload: give its task_id=")
    task = await svc.tasks.get(params.task_id)
    if task["status"] != "pending":
        status = 400 if task["status"] == "success" else 410
        raise ApiError(
            "BAD_REQUEST",
            f"the upload of task {task['uuid']} is {task['status']}",
            task["uuid"],
            status=status,
        )
    if not task["resumable"]:
        raise bad_request(f"task {task['uuid']} is not a resumable upload")
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
    return ImportPlan(
        params,
        vdi,
        sr,
        vdi["virtual_size"],
        content_length,
        resume_offset=durable,
        skip=durable - start,
    )


@dataclass
class ImportJob:
    plan: ImportPlan
    transfer: Transfer
    vdi: Row | None  # None until an image's header says how big a new VDI must be
    created: bool  # the import created the VDI: a failed import removes it again


async def start(svc: Services, plan: ImportPlan, user: str) -> ImportJob:
    """Attach a task; create the VDI now if its size is known (else at the image's header);
    take the VDI's write lock."""
    vdi = plan.vdi
    created = False
    if vdi is None and plan.virtual_size is not None:
        vdi = await _create_vdi(svc, plan, plan.virtual_size)
        created = True
    target = vdi["uuid"] if vdi else f"new in SR {plan.sr['uuid']}"
    try:
        transfer = await svc.tasks.begin(
            plan.params.task_id, f"import_raw_vdi {target}", user, vdi["uuid"] if vdi else None
        )
    except BaseException:
        if created:
            await svc.vdis.delete(vdi["uuid"])
        raise
    if plan.params.resumable:  # the client can name this upload again
        length = plan.params.content_range[2] if plan.params.content_range else plan.expected
        await svc.tasks.make_resumable(transfer, plan.params.format, plan.params.chunked, length)
    job = ImportJob(plan, transfer, vdi, created)
    if vdi is not None:
        try:
            await svc.vdis.lock(vdi["uuid"], transfer.task)
        except ApiError as exc:
            await svc.tasks.fail(transfer, exc.error_info)
            await abandon(svc, job, exc)
            raise
    return job


def runtime_format(svc: Services, plan: ImportPlan) -> str:
    """How a VDI created by an import is stored: the configured mapping from the upload's
    format, else the default; if the SR cannot store that, the SR's default."""
    config = svc.config
    wanted = config.image_mapping.get(plan.params.format, config.images_type)
    if wanted in svc.srs.formats(plan.sr) and wanted in runtime_formats():
        return wanted
    return plan.sr["default_image_format"]


async def _create_vdi(svc: Services, plan: ImportPlan, size: int) -> Row:
    return await svc.vdis.create(
        plan.sr, plan.params.name_label or DEFAULT_NAME, size, runtime_format(svc, plan)
    )


def decoder_for(plan: ImportPlan) -> Decoder:
    assert plan.virtual_size is not None
    return plan.params.wire.decoder(plan.virtual_size, None, plan.expected)


async def receive(svc: Services, job: ImportJob, body: StreamReader) -> int:
    """Stream the body into the VDI; returns the stream offset once it is durable. A
    resumable upload checkpoints as it goes; with Upload-Complete: ?0 the request is one
    segment and the upload stays open (`job.segment`)."""
    ck = None
    if job.plan.resume_offset:
        ck = await storage.in_thread(resume.load, _state_file(svc, job))
        if ck is None or ck.offset != job.plan.resume_offset:
            raise ApiError(
                "INTERNAL_ERROR",
                f"the checkpoint of task {job.transfer.task} at "
                f"byte {job.plan.resume_offset} is missing",
            )
    try:
        if job.plan.skip:
            await _skip(body, job.plan.skip)
        if job.plan.params.format == RAW.name and job.vdi and job.vdi["image_format"] == RAW.name:
            received = await _receive_raw(svc, job, body, ck)
        else:
            received = await _receive_image(svc, job, body, ck)
    except OutOfBounds as exc:
        raise ApiError("VDI_TOO_SMALL", str(exc), exc.size, exc.end) from None
    except FramingError as exc:
        raise bad_request(str(exc)) from None
    except Unsupported as exc:
        raise ApiError("FORMAT_UNSUPPORTED", str(exc)) from None
    except FormatError as exc:
        raise ApiError("IMAGE_INVALID", str(exc)) from None
    except (ConnectionError, EOFError) as exc:
        raise _short_body(job.transfer.bytes, job.plan.expected, exc) from None
    except Exception as exc:
        if _is_payload_error(exc):
            raise _short_body(job.transfer.bytes, job.plan.expected, exc) from None
        raise
    assert job.vdi is not None
    await svc.vdis.bump_generation(job.vdi["uuid"])
    if job.plan.params.complete and job.transfer.resumable:
        await storage.in_thread(
            resume.discard, svc.config.state_dir, job.transfer.task, [Path(job.plan.sr["path"])]
        )
    return received


def _state_file(svc: Services, job: ImportJob) -> Path:
    return resume.state_path(svc.config.state_dir, job.transfer.task)


async def _skip(body: StreamReader, count: int) -> None:
    """Read and drop the start of a resumed body that is durable already."""
    while count:
        chunk = await body.read(min(count, 1 << 20))
        if not chunk:
            raise ConnectionResetError("the body ended inside the bytes already received")
        count -= len(chunk)


class _Checkpoints:
    """When to checkpoint a resumable upload: every 64 MiB or second of data."""

    def __init__(self, job: ImportJob, start: int):
        self.enabled = job.transfer.resumable
        self.last_offset = start
        self.last_time = time.monotonic()

    def due(self, offset: int) -> bool:
        return self.enabled and (
            offset - self.last_offset >= resume.CHECKPOINT_BYTES
            or time.monotonic() - self.last_time >= resume.CHECKPOINT_SECONDS
        )

    def done(self, offset: int) -> None:
        self.last_offset, self.last_time = offset, time.monotonic()


async def _receive_raw(
    svc: Services, job: ImportJob, body: StreamReader, ck: resume.Checkpoint | None
) -> int:
    plan, transfer = job.plan, job.transfer
    assert job.vdi is not None and plan.virtual_size is not None
    decoder = ck.decoder if ck else decoder_for(plan)
    path: Path = await svc.vdis.path(job.vdi)
    fd = await storage.in_thread(os.open, path, os.O_WRONLY)
    # A VDI this import created is all holes: zeros need no punching there.
    writer = DiskWriter(fd, punch=not job.created or bool(ck))
    position = plan.resume_offset  # stream offset of the next byte
    body_bytes = plan.skip
    reached = 0
    expected = plan.expected  # this request's body length, framing included
    checkpoints = _Checkpoints(job, position)
    state_file = _state_file(svc, job)

    async def checkpoint() -> None:
        await writer.checkpoint()
        if await storage.in_thread(resume.save, state_file, resume.Checkpoint(position, decoder)):
            await svc.tasks.checkpoint(transfer, position)
        checkpoints.done(position)

    try:
        while True:
            chunk = await body.readany()
            if not chunk:
                break
            body_bytes += len(chunk)
            position += len(chunk)
            transfer.bytes = position
            for ev in decoder.feed(chunk):
                if isinstance(ev, Write):
                    await writer.write(ev.offset, ev.data)
                    reached = max(reached, ev.offset + len(ev.data))
            progress = _progress(body_bytes, expected, reached, plan.virtual_size)
            await svc.tasks.report(transfer, position, progress)
            if checkpoints.due(position):
                await checkpoint()
        if expected is not None and body_bytes != expected:
            raise _short_body(body_bytes, expected)
        if not plan.params.complete:
            await checkpoint()  # a segment: durable, and the upload stays open
            return position
        for _ in decoder.finish():
            pass  # raw data and chunk framing complete no write at the end
        await writer.finish()
    except BaseException:
        if checkpoints.enabled:
            # What arrived before the break is kept: make it durable and say so.
            with contextlib.suppress(Exception):
                await asyncio.shield(checkpoint())
        raise
    finally:
        try:
            await writer.drain()
        finally:
            await storage.in_thread(os.close, fd)
    event(
        log,
        "import.done",
        task=transfer.task,
        vdi=job.vdi["uuid"],
        format="raw",
        bytes=position,
        written=writer.stats.data,
        zero=writer.stats.zero,
    )
    return position


def _progress(received: int, expected: int | None, reached: int, size: int | None) -> float:
    """Body bytes over Content-Length; without a length, how far into the disk the data has
    reached (raw streams, vhd-tool's framing and image blocks mostly go front to back)."""
    if expected:
        return received / expected
    return 0.99 * reached / size if size else 0.0


async def _receive_image(
    svc: Services, job: ImportJob, body: StreamReader, ck: resume.Checkpoint | None
) -> int:
    plan, transfer = job.plan, job.transfer
    fmt = plan.params.format
    spill = None
    sink = image_import.Sink()
    if ck is not None:  # resumed: the decoder (and its spill) continue where they were
        decoder = ck.decoder
        spill = getattr(decoder, "spill", None)
        assert job.vdi is not None
        sink.target = await _open(svc, job.vdi)
        sink.size, sink.punch = job.vdi["virtual_size"], ck.punch
    else:
        if plan.params.wire.spills:
            spill = await storage.in_thread(FileSpill, Path(plan.sr["path"]), transfer.task)
        decoder = plan.params.wire.decoder(plan.virtual_size, spill, plan.expected)
    checkpoints = _Checkpoints(job, plan.resume_offset)
    state_file = _state_file(svc, job)
    finished = False

    def durable_state(position: int) -> bool:
        """Worker thread: data, spill and decoder state durable at `position`."""
        sink.target.flush()
        if spill is not None and hasattr(spill, "sync"):
            spill.sync()
        return resume.save(state_file, resume.Checkpoint(position, decoder, sink.punch))

    async def on_batch(body_bytes: int, force: bool = False) -> None:
        position = plan.resume_offset + body_bytes
        if sink.target is not None and checkpoints.enabled and (force or checkpoints.due(position)):
            if await storage.in_thread(durable_state, position):
                await svc.tasks.checkpoint(transfer, position)
            checkpoints.done(position)

    async def on_header(header: Header) -> None:
        declared = header.virtual_size
        if job.vdi is None:
            size = plan.virtual_size or declared
            if size is None:
                raise bad_request("the image does not say its size: give virtual_size=")
            if declared is not None and declared > size:
                raise _too_small(declared, size)
            job.vdi = await _create_vdi(svc, plan, round_to_sector(size))
            job.created = True
            await svc.vdis.lock(job.vdi["uuid"], transfer.task)
            await svc.tasks.set_vdi(transfer, job.vdi["uuid"])
            sink.target = await _open(svc, job.vdi)
            sink.size = job.vdi["virtual_size"]
        else:
            size = job.vdi["virtual_size"]
            if declared is not None and declared > size:
                raise _too_small(declared, size)
            if sink.target is None:
                sink.target = await _open(svc, job.vdi)
                sink.size = size
            if header.whole_image:
                # A whole image replaces the disk up to its size: clear that first, so what
                # it leaves unallocated reads as zero.
                await storage.in_thread(sink.target.zero, 0, declared or size)
        sink.punch = not header.whole_image
        event(
            log,
            "import.header",
            task=transfer.task,
            vdi=job.vdi["uuid"],
            format=fmt,
            virtual_size=declared,
            whole_image=header.whole_image,
        )

    async def on_progress(received: int, current: image_import.Sink) -> None:
        transfer.bytes = plan.resume_offset + received
        size = current.size or plan.virtual_size
        progress = _progress(received, plan.expected, current.reached, size)
        await svc.tasks.report(transfer, received, progress)

    try:
        received = plan.skip + await image_import.run_pipeline(
            decoder, body, sink, on_header, on_progress, on_batch, final=plan.params.complete
        )
        transfer.bytes = plan.resume_offset + received - plan.skip
        if plan.expected is not None and received != plan.expected:
            raise _short_body(received, plan.expected)
        if not plan.params.complete:
            await on_batch(received - plan.skip, True)  # a segment ends durable
            return transfer.bytes
        if sink.target is None:
            raise ApiError("IMAGE_INVALID", f"the {fmt} stream ended before its header")
        await storage.in_thread(sink.target.flush)
        finished = True
    finally:
        if sink.target is not None:
            await storage.in_thread(sink.target.close)
        if spill is not None:
            keep = transfer.resumable and not finished  # a suspended upload needs it again
            await storage.in_thread(functools.partial(spill.close, remove=not keep))
    event(
        log,
        "import.done",
        task=transfer.task,
        vdi=job.vdi["uuid"],
        format=fmt,
        bytes=transfer.bytes,
        written=sink.written,
    )
    return transfer.bytes


async def _open(svc: Services, vdi: Row) -> image_import.FdTarget | image_import.ChainTarget:
    """Where an import writes: a raw VDI's file directly, any other through its chain."""
    if vdi["image_format"] == RAW.name:  # the file is the disk: write it directly
        fd = await storage.in_thread(os.open, await svc.vdis.path(vdi), os.O_WRONLY)
        return image_import.FdTarget(fd)
    files = await svc.vdis.chain_files(vdi)
    chain = await storage.in_thread(functools.partial(layers.open_chain, files, writable=True))
    return image_import.ChainTarget(chain)


def _too_small(declared: int, size: int) -> ApiError:
    return ApiError(
        "VDI_TOO_SMALL",
        f"the image declares a disk of {declared} bytes but the VDI holds {size}",
        size,
        declared,
    )


def _is_payload_error(exc: Exception) -> bool:
    """aiohttp's errors for a body cut short (Content-Length or chunked encoding unmet)."""
    from aiohttp import http_exceptions

    return isinstance(exc, http_exceptions.HttpProcessingError)


class ClientGone(ApiError):
    """The body stopped before its end. A resumable upload is suspended, not failed."""

    suspends = True


def _short_body(received: int, expected: int | None, cause: BaseException | None = None):
    of = f" of {expected}" if expected is not None else ""
    why = f" ({cause})" if cause and str(cause) else ""
    return ClientGone(
        "BAD_REQUEST",
        f"the upload ended after {received}{of} bytes: the client closed the connection{why}",
    )


async def abandon(svc: Services, job: ImportJob, why: BaseException) -> None:
    """After a failed or cancelled import has ended its task: remove a VDI the import itself
    created. (An existing VDI keeps what was written; it was the client's to overwrite.)"""
    if job.transfer.resumable:
        task = await svc.tasks.get(job.transfer.task)
        if task["status"] == "pending":
            return  # suspended: the upload may go on, its VDI with it
        await storage.in_thread(
            resume.discard, svc.config.state_dir, job.transfer.task, [Path(job.plan.sr["path"])]
        )
    if job.created and job.vdi is not None:
        try:
            await svc.vdis.delete(job.vdi["uuid"])
        except ApiError:
            log.warning(
                "could not remove the VDI of a failed import",
                extra={"fields": {"vdi": job.vdi["uuid"], "task": job.transfer.task}},
            )
        else:
            event(
                log,
                "import.vdi_removed",
                task=job.transfer.task,
                vdi=job.vdi["uuid"],
                reason=type(why).__name__,
            )
