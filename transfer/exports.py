"""The export operation: lay out the whole output before the first byte (so its length, ETag
and any byte range are known), then send the asked range from disk, off the loop.

    async with opened(svc, vdi, ...) as export:   a read lease, the checks, the layout
        await export.start(principal, task)        the client's task, or a new one
        await export.send(sink, start, end)        bytes [start, end) out; the task ends

Data extents come from the filesystem (SEEK_DATA/SEEK_HOLE): holes are sent as zeros without
reading the disk, and the chunk-framed variant carries only the data extents. The HTTP edge
(handlers/transfers.py) owns Range, headers and the connection; it hands over a `Sink`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
import select
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Protocol

from common.errors import bad_request
from formats.chain import READ, Chain
from formats.driver import DATA
from formats.layout import Data, Derived, Literal, OutputLayout, Piece, Zero
from formats.registry import RAW, Format, Identity, wire
from transfer import deltas, layers
from transfer.db import Row
from transfer.files import in_thread
from transfer.limits import Pace, Pacing, Stalled
from transfer.services import Services
from transfer.tasks import Operation

if TYPE_CHECKING:
    from auth.middleware import Principal  # (auth imports aiohttp; operations do not)

log = logging.getLogger("vdi_transfer.export")

READ_SIZE = 4 << 20  # bytes per disk read (and per piece) when the body is not sendfile'd
TICK = 0.5  # seconds between counts of bytes a sendfile thread has sent
SENDFILE_SLICE = 64 << 20  # bytes per worker-thread call
# A sendfile thread waits for a slow client's socket to take its slice: that can take
# minutes. They get a pool of their own, so that slow readers never hold the threads disk
# work and the pipeline need (the loop's default pool has cpus + 4: six stalled downloads
# froze every upload, file operation and new export here). Threads are made as needed.
SENDER_THREADS = 512
_ZEROS = memoryview(bytes(READ_SIZE))
_senders: concurrent.futures.ThreadPoolExecutor | None = None


def _sender_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _senders
    if _senders is None:
        _senders = concurrent.futures.ThreadPoolExecutor(SENDER_THREADS, "vdit-send")
    return _senders


class Sink(Protocol):
    """Where an export's bytes go: the HTTP response, as the edge offers it."""

    async def begin(self) -> None:
        """Send what comes before the body (status line and headers)."""

    async def write(self, data: bytes | memoryview) -> None: ...

    async def socket(self) -> int | None:
        """A duplicate of the connection's socket fd, with nothing queued before it, for
        sendfile(2) (the caller closes it); None where bytes must go through `write`."""


class Export(Operation):
    """One export of a VDI, laid out; its chain stays open (read-only) until it is closed."""

    def __init__(
        self, svc: Services, vdi: Row, sent: Format, layout: OutputLayout, etag: str, chain: Chain
    ):
        self.svc = svc
        self.vdi = vdi
        self.wire = sent  # what is sent: the format, or chunk framing of raw data
        self.layout = layout
        self.etag = etag
        self.chain = chain

    @property
    def length(self) -> int:
        return self.layout.length

    @property
    def bytes_sent(self) -> int:
        """Body bytes that left so far (none before `start`)."""
        return self.transfer.bytes if self.transfer is not None else 0

    def _moved(self, n: int) -> None:
        self.svc.metrics.moved("export", self.wire.name, n)

    def _count(self, sent: int, counted: int) -> int:
        """The metrics learn of bytes sent since `counted`; returns `sent`."""
        self._moved(sent - counted)
        return sent

    @property
    def content_type(self) -> str:
        assert self.wire.content_type is not None
        return self.wire.content_type

    @property
    def filename(self) -> str:
        return f"{self.vdi['uuid']}.{self.wire.name}"

    async def start(self, principal: Principal, task: str | None = None) -> None:
        """The body's transfer runs under the client's `task` (XAPI clients create one and
        wait for it; it must be theirs), or under a new task."""
        if task is not None:
            await self.svc.tasks.get_owned(task, principal)
        self.transfer = await self.svc.tasks.begin(
            task, f"export_raw_vdi {self.vdi['uuid']}", principal.username, self.vdi["uuid"]
        )

    async def send(self, sink: Sink, start: int, end: int, pacing: Pacing | None = None) -> int:
        """Output bytes [start, end) into the sink, under the task, which ends with it;
        returns the bytes sent. A client that takes no byte, or too few (`pacing`), is cut.

        On a plain TCP socket the body goes out by sendfile(2) from a worker thread
        (zero-copy from the page cache; uvloop has no loop.sendfile). Otherwise disk reads
        run in worker threads, one read ahead of the socket."""
        transfer = self.transfer
        assert transfer is not None
        async with self.svc.tasks.run(transfer):
            await sink.begin()
            pace = Pace(pacing or Pacing(), "the download")
            try:
                sock_fd = await sink.socket()
                if sock_fd is None:
                    sent = await self._send_with_reads(sink, start, end, pace)
                else:
                    try:
                        sent = await self._send_with_sendfile(sock_fd, start, end, pace)
                    finally:
                        os.close(sock_fd)  # only after the worker thread is done with it
            except Stalled as exc:
                raise bad_request(
                    f"the download stopped after {transfer.bytes} of {end - start} bytes: {exc}"
                ) from None
            except ConnectionError as exc:
                raise bad_request(
                    f"the download stopped after {transfer.bytes} of {end - start} bytes: the "
                    f"client closed the connection ({exc.strerror or exc})"
                ) from None
            await self.svc.tasks.succeed(transfer, None)
        return sent

    async def _send_with_sendfile(self, sock_fd: int, start: int, end: int, pace: Pace) -> int:
        loop = asyncio.get_running_loop()
        transfer = self.transfer
        assert transfer is not None
        stop = threading.Event()
        sent = [0]  # bytes on the wire, counted by the worker thread
        total = end - start
        blocks = _blocks(self.layout, start, end)
        counted = 0  # of them, in the metrics
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
                    _sender_pool(), _sendfile_blocks, sock_fd, self.chain, group, stop, sent
                )
                try:
                    # Bytes count as they leave (metrics, the task), also while a slow
                    # client takes a long slice.
                    while not (await asyncio.wait([future], timeout=TICK))[0]:
                        moved = sent[0] - counted
                        counted = self._count(sent[0], counted)
                        pace.moved(moved)  # Stalled: the thread is stopped below
                        await self.svc.tasks.report(transfer, counted, counted / total)
                    future.result()
                    pace.moved(sent[0] - counted)
                except (asyncio.CancelledError, Stalled):
                    stop.set()  # the thread notices within 0.2 s; the fd must outlive it
                    await asyncio.wait([future])
                    if not future.cancelled():
                        future.exception()  # it stopped because we asked: nothing to report
                    raise
                finally:
                    counted = self._count(sent[0], counted)
                await self.svc.tasks.report(transfer, sent[0], sent[0] / total if total else 1.0)
        finally:
            transfer.bytes = sent[0]

    async def _send_with_reads(self, sink: Sink, start: int, end: int, pace: Pace) -> int:
        loop = asyncio.get_running_loop()
        transfer, source = self.transfer, self.chain
        assert transfer is not None
        total, sent = end - start, 0
        pending: asyncio.Future | None = None

        def read(block: Piece | None) -> asyncio.Future | None:
            if isinstance(block, Derived):
                return loop.run_in_executor(None, _render, source, block)
            if not isinstance(block, Data):
                return None
            return loop.run_in_executor(None, source.read, block.offset, block.length)

        try:
            blocks = _blocks(self.layout, start, end)
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
                await _paced_write(sink, data, pace)
                self._moved(len(data))
                sent += len(data)
                transfer.bytes = sent
                await self.svc.tasks.report(transfer, sent, sent / total if total else 1.0)
                block = following
        finally:
            if pending is not None:
                await asyncio.wait([pending])
        return sent


async def _paced_write(sink: Sink, data: bytes | memoryview, pace: Pace) -> None:
    """Write, waiting for the client to take it no longer than the pace allows (a piece is
    4 MiB: a timeout around each costs nothing next to it)."""
    try:
        async with asyncio.timeout(pace.wait_left()):
            await sink.write(data)
    except TimeoutError:
        # Stalled; or a rate window ended in time, and the piece is in the transport's
        # buffer already: the next write waits for the client to take it.
        pace.check()
    pace.moved(len(data))


@contextlib.asynccontextmanager
async def opened(
    svc: Services, vdi_uuid: str, fmt: str, chunked: bool, base_ident: str | None
) -> AsyncIterator[Export]:
    """The export of a VDI, laid out, for the time of the block. It holds a read lease on
    the VDI (no writer on any host starts while it is laid out or sent) and its chain, open
    once, read-only; both are let go at the end, whatever happens."""
    lease = await svc.vdis.add_reader(vdi_uuid)
    try:
        export = await _plan(svc, vdi_uuid, fmt, chunked, base_ident)
        try:
            yield export
        finally:
            await asyncio.shield(in_thread(layers.close_chain, export.chain))
    finally:
        await asyncio.shield(svc.vdis.drop_reader(lease))


def identity(vdi: Row) -> Identity:
    """What images record of the VDI, from the database: the same content, the same bytes."""
    return Identity(uuid.UUID(vdi["uuid"]), float(vdi["created"]))


async def _plan(
    svc: Services, vdi_ident: str, fmt: str, chunked: bool, base_ident: str | None
) -> Export:
    """Check the request and lay out the output, with the VDI's chain open."""
    if chunked and fmt != RAW.name:
        raise bad_request(f"chunked= applies to format raw only, not {fmt}")
    sent = wire(fmt, chunked)
    vdi = await svc.vdis.get(vdi_ident)
    svc.vdis.check_not_written(vdi)
    svc.vdis.check_has_data(vdi)
    base = await svc.vdis.get(base_ident) if base_ident else None
    files = await svc.vdis.chain_files(vdi)
    chain = await in_thread(functools.partial(layers.open_chain, files, writable=False))
    try:
        if base is not None and sent.delta_layout is not None:  # else: the whole disk
            changed = await deltas.changed_runs(svc, vdi, base, chain)
            layout = _lay(vdi, sent, sent.delta_layout, changed, identity(base))
            etag = f'"{vdi["uuid"]}.{vdi["generation"]}.{base["uuid"]}.{base["generation"]}.'
            return Export(svc, vdi, sent, layout, f'{etag}{sent.name}"', chain)
        extents = await in_thread(data_extents, chain)
        layout = _lay(vdi, sent, sent.layout, extents)
        etag = f'"{vdi["uuid"]}.{vdi["generation"]}.{sent.name}"'
        return Export(svc, vdi, sent, layout, etag, chain)
    except BaseException:
        await in_thread(layers.close_chain, chain)
        raise


def _lay(vdi: Row, sent: Format, lay, runs: list, *base: Identity) -> OutputLayout:
    """The layout of `vdi` in `sent` (from its extents, or from what changed since a base).
    Identity fields come from the VDI (uuid, creation time): same content, same bytes."""
    try:
        return lay(vdi["virtual_size"], runs, identity(vdi), *base)
    except ValueError as exc:
        raise bad_request(f"VDI {vdi['uuid']} cannot be exported as {sent.name}: {exc}") from None


async def extents(svc: Services, vdi: Row, base: Row | None) -> list[tuple[int, int, bool]]:
    """(start, length, zero) runs covering the whole disk (data and holes); with a base,
    only the runs that differ from it."""
    svc.vdis.check_has_data(vdi)
    if base is not None:
        changed = await deltas.changed_runs(svc, vdi, base)
        return [(start, n, kind != DATA) for start, n, kind in changed]
    files = await svc.vdis.chain_files(vdi)
    chain = await in_thread(functools.partial(layers.open_chain, files, writable=False))
    try:
        data = await in_thread(data_extents, chain)
    finally:
        await in_thread(layers.close_chain, chain)
    out, pos = [], 0
    for start, length in data:
        if start > pos:
            out.append((pos, start - pos, True))
        out.append((start, length, False))
        pos = start + length
    if pos < vdi["virtual_size"]:
        out.append((pos, vdi["virtual_size"] - pos, True))
    return out


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


class _Stopped(Exception):
    pass


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
