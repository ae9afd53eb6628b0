"""The import operation: check everything that can be checked before the body, then stream
the body through a format decoder into the VDI, durably.

The HTTP edge (handlers/transfers.py) parses parameters and owns the connection; this module
owns the rules: which target, which size, which decoder, and what a failure leaves behind.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from aiohttp import StreamReader

from formats.chunked import ChunkDecoder
from formats.errors import FormatError, FramingError, OutOfBounds
from formats.raw import RawDecoder
from transfer import storage
from transfer.db import Row
from transfer.diskio import DiskWriter
from transfer.errors import ApiError, bad_request, choose_format
from transfer.logs import event
from transfer.services import Services
from transfer.sizes import parse_size, round_to_sector
from transfer.tasks import Transfer

log = logging.getLogger("vdi_transfer.import")

IMPORT_FORMATS = ("raw", "vhd", "qcow2", "tar", "ova")
DECODED_FORMATS = ("raw",)  # the others arrive with the streaming-conversion work
DEFAULT_NAME = "Imported VDI"


class Decoder(Protocol):
    def feed(self, data: bytes | memoryview): ...

    def finish(self) -> None: ...


@dataclass
class ImportParams:
    vdi: str | None
    sr: str | None
    format: str
    chunked: bool
    task_id: str | None
    virtual_size: str | None
    name_label: str | None


@dataclass
class ImportPlan:
    """What an import will do, decided before a byte of the body is read."""

    params: ImportParams
    vdi: Row | None  # the existing target, or None when a VDI is to be created in `sr`
    sr: Row
    virtual_size: int
    expected: int | None  # Content-Length, if given

    @property
    def target_uuid(self) -> str | None:
        return self.vdi["uuid"] if self.vdi else None


def parse_format(value: str | None) -> str:
    return choose_format(value, IMPORT_FORMATS, DECODED_FORMATS, "import")


async def plan(svc: Services, params: ImportParams, content_length: int | None) -> ImportPlan:
    """Every check that needs no body: target, writability, availability, size."""
    if params.chunked and params.format != "raw":
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
        svc.vdis.check_free(vdi)
        sr = await svc.srs.get(vdi["sr"])
        size = vdi["virtual_size"]
        if params.virtual_size is not None:
            raise bad_request("virtual_size= only applies when creating a VDI with sr=")
    elif params.sr:
        sr = await svc.srs.get(params.sr)
        vdi = None
        if params.virtual_size is not None:
            size = round_to_sector(parse_size(params.virtual_size, "virtual_size"))
        elif content_length is not None and not params.chunked:
            size = round_to_sector(content_length)
        else:
            raise bad_request(
                "with sr= and a body of unknown length (Transfer-Encoding: chunked, or "
                "chunk framing), give the new VDI's size as virtual_size="
            )
        if size <= 0 and content_length != 0:
            raise bad_request("the new VDI's virtual size must be greater than zero")
    else:
        raise bad_request("give vdi= (the VDI to write) or sr= (where to create one)")
    if content_length is not None and not params.chunked and content_length > size:
        raise ApiError(
            "VDI_TOO_SMALL",
            f"the upload has {content_length} bytes but the VDI holds {size}",
            size,
            content_length,
        )
    return ImportPlan(params, vdi, sr, size, content_length)


@dataclass
class ImportJob:
    plan: ImportPlan
    transfer: Transfer
    vdi: Row
    created: bool  # the import created the VDI: a failed import removes it again


async def start(svc: Services, plan: ImportPlan, user: str) -> ImportJob:
    """Create the VDI if asked, attach a task, take the VDI's write lock."""
    created = plan.vdi is None
    vdi = plan.vdi
    if vdi is None:
        vdi = await svc.vdis.create(
            plan.sr, plan.params.name_label or DEFAULT_NAME, plan.virtual_size, "raw"
        )
    try:
        transfer = await svc.tasks.begin(
            plan.params.task_id, f"import_raw_vdi {vdi['uuid']}", user, vdi["uuid"]
        )
    except BaseException:
        if created:
            await svc.vdis.delete(vdi["uuid"])
        raise
    job = ImportJob(plan, transfer, vdi, created)
    try:
        await svc.vdis.lock(vdi["uuid"], transfer.task)
    except ApiError as exc:
        await svc.tasks.fail(transfer, exc.error_info)
        await abandon(svc, job, exc)
        raise
    return job


def decoder_for(plan: ImportPlan) -> Decoder:
    if plan.params.chunked:
        return ChunkDecoder(plan.virtual_size)
    return RawDecoder(plan.virtual_size)


async def receive(svc: Services, job: ImportJob, body: StreamReader) -> int:
    """Stream the body into the VDI; returns the body's byte count once it is durable."""
    plan, transfer = job.plan, job.transfer
    decoder = decoder_for(plan)
    path: Path = await svc.vdis.path(job.vdi)
    fd = await storage.in_thread(os.open, path, os.O_WRONLY)
    # A VDI this import created is all holes: zeros need no punching there.
    writer = DiskWriter(fd, punch=not job.created)
    received = reached = 0
    expected = plan.expected  # the stream's length, framing included
    try:
        try:
            while True:
                chunk = await body.readany()
                if not chunk:
                    break
                received += len(chunk)
                for offset, data in decoder.feed(chunk):
                    await writer.write(offset, data)
                    reached = max(reached, offset + len(data))
                # Without a length, how far into the disk the data has reached is the best
                # estimate (raw streams and vhd-tool's framing both go front to back).
                progress = received / expected if expected else 0.99 * reached / plan.virtual_size
                await svc.tasks.report(transfer, received, progress)
            if expected is not None and received != expected:
                raise _short_body(received, expected)
            decoder.finish()
        except OutOfBounds as exc:
            raise ApiError("VDI_TOO_SMALL", str(exc), exc.size, exc.end) from None
        except FramingError as exc:
            raise bad_request(str(exc)) from None
        except FormatError as exc:
            raise ApiError("IMAGE_INVALID", str(exc)) from None
        except (ConnectionError, EOFError) as exc:
            raise _short_body(received, expected, exc) from None
        except Exception as exc:
            if _is_payload_error(exc):
                raise _short_body(received, expected, exc) from None
            raise
        await writer.finish()
    finally:
        try:
            await writer.drain()
        finally:
            await storage.in_thread(os.close, fd)
        transfer.bytes = received
    await svc.vdis.bump_generation(job.vdi["uuid"])
    event(
        log,
        "import.done",
        task=transfer.task,
        vdi=job.vdi["uuid"],
        bytes=received,
        written=writer.stats.data,
        zero=writer.stats.zero,
    )
    return received


def _is_payload_error(exc: Exception) -> bool:
    """aiohttp's errors for a body cut short (Content-Length or chunked encoding unmet)."""
    from aiohttp import http_exceptions

    return isinstance(exc, http_exceptions.HttpProcessingError)


def _short_body(received: int, expected: int | None, cause: BaseException | None = None):
    of = f" of {expected}" if expected is not None else ""
    why = f" ({cause})" if cause and str(cause) else ""
    return bad_request(
        f"the upload ended after {received}{of} bytes: the client closed the connection{why}"
    )


async def abandon(svc: Services, job: ImportJob, why: BaseException) -> None:
    """After a failed or cancelled import has ended its task: remove a VDI the import itself
    created. (An existing VDI keeps what was written; it was the client's to overwrite.)"""
    if job.created:
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
