"""The export operation: lay out the whole output before the first byte (so its length, ETag
and any byte range are known), then send the asked range from disk, off the loop.

Data extents come from the filesystem (SEEK_DATA/SEEK_HOLE): holes are sent as zeros without
reading the disk, and the chunk-framed variant carries only the data extents.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import select
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from aiohttp import web

from common.errors import bad_request
from formats.chain import READ, Chain
from formats.driver import DATA
from formats.layout import Data, Derived, Literal, OutputLayout, Piece, Zero
from formats.registry import RAW, Format, Identity, wire
from transfer import deltas, layers, storage
from transfer.db import Row
from transfer.diskio import READ_SIZE
from transfer.services import Services
from transfer.tasks import Transfer

log = logging.getLogger("vdi_transfer.export")

_ZEROS = memoryview(bytes(READ_SIZE))


@dataclass
class ExportPlan:
    vdi: Row
    wire: Format  # what is sent: the format, or chunk framing of raw data
    base: Row | None
    layout: OutputLayout
    etag: str
    chain: Chain  # the VDI's layers, open read-only until the export is done: close() it

    async def close(self) -> None:
        await storage.in_thread(layers.close_chain, self.chain)

    @property
    def content_type(self) -> str:
        assert self.wire.content_type is not None
        return self.wire.content_type

    @property
    def filename(self) -> str:
        return f"{self.vdi['uuid']}.{self.wire.name}"


def identity(vdi: Row) -> Identity:
    """What images record of the VDI, from the database: the same content, the same bytes."""
    return Identity(uuid.UUID(vdi["uuid"]), float(vdi["created"]))


async def plan(
    svc: Services, vdi_ident: str, fmt: str, chunked: bool, base_ident: str | None
) -> ExportPlan:
    """Check the request and lay out the output. The caller holds a read claim on the VDI
    (a lease: `svc.vdis.add_reader`) so no writer can start while it is being laid out or sent. The
    VDI's chain is opened once, here, and stays open in the plan until `plan.close()`."""
    if chunked and fmt != RAW.name:
        raise bad_request(f"chunked= applies to format raw only, not {fmt}")
    sent = wire(fmt, chunked)
    vdi = await svc.vdis.get(vdi_ident)
    svc.vdis.check_not_written(vdi)
    base = await svc.vdis.get(base_ident) if base_ident else None
    files = await svc.vdis.chain_files(vdi)
    chain = await storage.in_thread(functools.partial(layers.open_chain, files, writable=False))
    try:
        if base is not None and sent.delta_layout is not None:  # else: the whole disk
            changed = await deltas.changed_runs(svc, vdi, base, chain)
            layout = _lay(vdi, sent, sent.delta_layout, changed, identity(base))
            etag = f'"{vdi["uuid"]}.{vdi["generation"]}.{base["uuid"]}.{base["generation"]}.'
            return ExportPlan(vdi, sent, base, layout, f'{etag}{sent.name}"', chain)
        extents = await storage.in_thread(data_extents, chain)
        layout = _lay(vdi, sent, sent.layout, extents)
        etag = f'"{vdi["uuid"]}.{vdi["generation"]}.{sent.name}"'
        return ExportPlan(vdi, sent, base, layout, etag, chain)
    except BaseException:
        await storage.in_thread(layers.close_chain, chain)
        raise


def _lay(vdi: Row, sent: Format, lay, runs: list, *base: Identity) -> OutputLayout:
    """The layout of `vdi` in `sent` (from its extents, or from what changed since a base).
    Identity fields come from the VDI (uuid, creation time): same content, same bytes."""
    try:
        return lay(vdi["virtual_size"], runs, identity(vdi), *base)
    except ValueError as exc:
        raise bad_request(f"VDI {vdi['uuid']} cannot be exported as {sent.name}: {exc}") from None


def data_extents(chain: Chain) -> list[tuple[int, int]]:
    """Blocking: the (offset, length) runs of the VDI that read as data."""
    return [(start, n) for start, n, kind in chain.extents() if kind == DATA]


def _blocks(layout: OutputLayout, start: int, end: int) -> Iterator[Piece]:
    """The range's pieces cut to at most READ_SIZE bytes each."""
    for piece in layout.slice(start, end):
        if isinstance(piece, Literal | Derived):
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
    request: web.Request,
    response: web.StreamResponse,
    start: int,
    end: int,
) -> int:
    """Write output bytes [start, end) to the prepared response; returns the bytes sent.

    On a plain TCP socket the body goes out by sendfile(2) from a worker thread (zero-copy
    from the page cache; uvloop has no loop.sendfile). Otherwise disk reads run in worker
    threads, one read ahead of the socket."""
    source = plan.chain
    try:
        sock_fd = await _idle_socket(request)
        if sock_fd is None:
            return await _send_with_reads(svc, plan, transfer, response, source, start, end)
        try:
            return await _send_with_sendfile(svc, plan, transfer, sock_fd, source, start, end)
        finally:
            os.close(sock_fd)  # only after the worker thread is done with it
    except ConnectionError as exc:
        raise bad_request(
            f"the download stopped after {transfer.bytes} of {end - start} bytes: the client "
            f"closed the connection ({exc.strerror or exc})"
        ) from None


async def _idle_socket(request: web.Request) -> int | None:
    """A duplicate of the connection's socket fd, once everything aiohttp queued on it (the
    headers) is out; None where sendfile cannot be used (TLS, no real socket). The caller
    closes it."""
    transport = request.transport
    if transport is None or transport.get_extra_info("sslcontext") is not None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    for _ in range(1000):
        if transport.get_write_buffer_size() == 0:
            # A duplicate, owned by us: if the peer goes away the event loop closes its fd,
            # and that number may at once belong to another client's connection. Writing
            # through our own fd can only ever reach this connection.
            return os.dup(sock.fileno())
        await asyncio.sleep(0.005)
    return None  # the client does not even take the headers: let the slow path wait


class _Stopped(Exception):
    pass


SENDFILE_SLICE = 64 << 20  # bytes per worker-thread call; progress is reported between


async def _send_with_sendfile(
    svc: Services,
    plan: ExportPlan,
    transfer: Transfer,
    sock_fd: int,
    source: Chain,
    start: int,
    end: int,
) -> int:
    loop = asyncio.get_running_loop()
    stop = threading.Event()
    sent = [0]  # bytes on the wire, counted by the worker thread
    total = end - start
    blocks = _blocks(plan.layout, start, end)
    try:
        while True:
            group, size = [], 0
            for block in blocks:
                group.append(block)
                size += block.length
                if size >= SENDFILE_SLICE:
                    break
            if not group:
                return sent[0]
            future = loop.run_in_executor(
                None, _sendfile_blocks, sock_fd, source, group, stop, sent
            )
            try:
                await asyncio.shield(future)
            except asyncio.CancelledError:
                stop.set()  # the thread notices within 0.2 s; the fd must outlive it
                await asyncio.wait([future])
                if not future.cancelled():
                    future.exception()  # it stopped because we asked: nothing to report
                raise
            await svc.tasks.report(transfer, sent[0], sent[0] / total if total else 1.0)
    finally:
        transfer.bytes = sent[0]


def _sendfile_blocks(
    sock_fd: int, source: Chain, blocks: list, stop: threading.Event, sent: list[int]
) -> None:
    """Blocking: send `blocks` on the non-blocking socket, waiting for room with poll and
    adding to `sent` as bytes go out. Disk data goes by sendfile from whichever layer of the
    VDI's chain holds it; runs no layer holds are zeros."""
    for block in blocks:
        if stop.is_set():
            raise _Stopped
        if isinstance(block, Data):
            for at, n, layer, host in source.segments(block.offset, block.length):
                if layer is None:
                    _write_all(sock_fd, _ZEROS[:n], stop, sent)
                elif host == READ:
                    _write_all(sock_fd, memoryview(source.layers[layer].read(at, n)), stop, sent)
                else:
                    _sendfile_all(sock_fd, source.layers[layer].fd, host, n, stop, sent)
        elif isinstance(block, Literal):
            _write_all(sock_fd, memoryview(block.data), stop, sent)
        elif isinstance(block, Derived):
            _write_all(sock_fd, memoryview(_render(source, block)), stop, sent)
        else:
            _write_all(sock_fd, _ZEROS[: block.length], stop, sent)


def _sendfile_all(
    sock_fd: int, fd: int, offset: int, left: int, stop: threading.Event, sent: list[int]
) -> None:
    while left:
        try:
            n = os.sendfile(sock_fd, fd, offset, left)
        except BlockingIOError:
            _wait_writable(sock_fd, stop)
            continue
        if n == 0:
            raise OSError(f"short read at {offset}: the VDI file was truncated")
        offset += n
        left -= n
        sent[0] += n


def _write_all(sock_fd: int, view: memoryview, stop: threading.Event, sent: list[int]) -> None:
    while view:
        try:
            n = os.write(sock_fd, view)
        except BlockingIOError:
            _wait_writable(sock_fd, stop)
            continue
        view = view[n:]
        sent[0] += n


def _render(source: Chain, piece: Derived) -> bytes:
    """Blocking: the bytes of a Derived piece, from its source on disk."""
    data = piece.render(source.read(piece.offset, piece.source_length))
    if len(data) != piece.length:
        raise ValueError(f"a derived piece rendered {len(data)} bytes, not {piece.length}")
    return data


def _wait_writable(sock_fd: int, stop: threading.Event) -> None:
    poller = select.poll()
    poller.register(sock_fd, select.POLLOUT)
    while not poller.poll(200):
        if stop.is_set():
            raise _Stopped


async def _send_with_reads(
    svc: Services,
    plan: ExportPlan,
    transfer: Transfer,
    response: web.StreamResponse,
    source: Chain,
    start: int,
    end: int,
) -> int:
    loop = asyncio.get_running_loop()
    total, sent = end - start, 0
    pending: asyncio.Future | None = None

    def read(block: Piece | None) -> asyncio.Future | None:
        if isinstance(block, Derived):
            return loop.run_in_executor(None, _render, source, block)
        if not isinstance(block, Data):
            return None
        return loop.run_in_executor(None, source.read, block.offset, block.length)

    try:
        blocks = _blocks(plan.layout, start, end)
        block = next(blocks, None)
        pending = read(block)
        while block is not None:
            following = next(blocks, None)
            if isinstance(block, Data | Derived):
                assert pending is not None
                data = await pending
                if len(data) != block.length:
                    raise OSError("short read: the VDI file was truncated")
            elif isinstance(block, Literal):
                data = block.data
            else:
                data = _ZEROS[: block.length]
            pending = read(following)  # read ahead while this block goes out
            await response.write(data)
            sent += len(data)
            transfer.bytes = sent
            await svc.tasks.report(transfer, sent, sent / total if total else 1.0)
            block = following
    finally:
        if pending is not None:
            await asyncio.wait([pending])
    return sent
