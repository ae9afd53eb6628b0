"""The export operation: lay out the whole output before the first byte (so its length, ETag
and any byte range are known), then send the asked range from disk, off the loop.

Data extents come from the filesystem (SEEK_DATA/SEEK_HOLE): holes are sent as zeros without
reading the disk, and the chunk-framed variant carries only the data extents.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

from aiohttp import web

from formats.chunked import frames_layout
from formats.layout import Data, Layout, Literal, Zero, raw_layout
from transfer import storage
from transfer.db import Row
from transfer.diskio import READ_SIZE, file_extents
from transfer.errors import ApiError, bad_request
from transfer.services import Services
from transfer.tasks import Transfer

log = logging.getLogger("vdi_transfer.export")

EXPORT_FORMATS = ("raw", "vhd", "qcow2", "tar")
ENCODED_FORMATS = ("raw",)  # the others arrive with the streaming-conversion work
CONTENT_TYPES = {
    "raw": "application/octet-stream",
    "vhd": "application/vhd",
    "qcow2": "application/x-qemu-disk",
    "tar": "application/x-tar",
}
_ZEROS = memoryview(bytes(READ_SIZE))


@dataclass
class ExportPlan:
    vdi: Row
    format: str
    chunked: bool
    base: Row | None
    layout: Layout
    etag: str

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]

    @property
    def filename(self) -> str:
        return f"{self.vdi['uuid']}.{'chunked' if self.chunked else self.format}"


def parse_format(value: str | None) -> str:
    fmt = (value or "raw").lower()
    if fmt not in EXPORT_FORMATS:
        raise ApiError(
            "FORMAT_UNSUPPORTED",
            f"unknown export format {value!r}; use one of {', '.join(EXPORT_FORMATS)}",
            value,
        )
    if fmt not in ENCODED_FORMATS:
        raise ApiError("FORMAT_UNSUPPORTED", f"exporting as {fmt} is not implemented yet", fmt)
    return fmt


async def plan(
    svc: Services, vdi_ident: str, fmt: str, chunked: bool, base_ident: str | None
) -> ExportPlan:
    """Check the request and lay out the output. The caller holds a read claim on the VDI
    (`svc.vdis.readers`) so no writer can start while it is being laid out or sent."""
    if chunked and fmt != "raw":
        raise bad_request(f"chunked= applies to format raw only, not {fmt}")
    vdi = await svc.vdis.get(vdi_ident)
    if vdi["locked_by"]:
        raise ApiError(
            "VDI_IN_USE",
            f"VDI {vdi['uuid']} is being written by task {vdi['locked_by']}",
            vdi["uuid"],
            vdi["locked_by"],
        )
    # A raw export is always the full disk; `base` is checked so a typo is not silent.
    base = await svc.vdis.get(base_ident) if base_ident else None
    path = await svc.vdis.path(vdi)
    extents = await storage.in_thread(file_extents, path, vdi["virtual_size"])
    layout = frames_layout(extents) if chunked else raw_layout(vdi["virtual_size"], extents)
    variant = "chunked" if chunked else fmt
    etag = f'"{vdi["uuid"]}.{vdi["generation"]}.{variant}"'
    return ExportPlan(vdi, fmt, chunked, base, layout, etag)


def _blocks(layout: Layout, start: int, end: int) -> Iterator[Literal | Data | Zero]:
    """The range's pieces cut to at most READ_SIZE bytes each."""
    for piece in layout.slice(start, end):
        if isinstance(piece, Literal):
            yield piece
            continue
        pos = 0
        while pos < piece.length:
            n = min(READ_SIZE, piece.length - pos)
            yield Data(piece.offset + pos, n) if isinstance(piece, Data) else Zero(n)
            pos += n


async def send(
    svc: Services,
    plan: ExportPlan,
    transfer: Transfer,
    response: web.StreamResponse,
    start: int,
    end: int,
) -> int:
    """Write output bytes [start, end) to the prepared response; returns the bytes sent.
    Disk reads run in worker threads, one read ahead of the socket."""
    path = await svc.vdis.path(plan.vdi)
    fd = await storage.in_thread(os.open, path, os.O_RDONLY)
    loop = asyncio.get_running_loop()
    total = end - start
    sent = 0
    pending: asyncio.Future | None = None

    def read(block: Literal | Data | Zero | None) -> asyncio.Future | None:
        if not isinstance(block, Data):
            return None
        return loop.run_in_executor(None, os.pread, fd, block.length, block.offset)

    try:
        blocks = _blocks(plan.layout, start, end)
        block = next(blocks, None)
        pending = read(block)
        while block is not None:
            following = next(blocks, None)
            if isinstance(block, Data):
                assert pending is not None
                data = await pending
                if len(data) != block.length:
                    raise OSError(f"short read at {block.offset}: the VDI file was truncated")
            elif isinstance(block, Literal):
                data = block.data
            else:
                data = _ZEROS[: block.length]
            pending = read(following)  # read ahead while this block goes out
            await response.write(data)
            sent += len(data)
            await svc.tasks.report(transfer, sent, sent / total if total else 1.0)
            block = following
    finally:
        if pending is not None:
            await asyncio.wait([pending])
        await storage.in_thread(os.close, fd)
    return sent
