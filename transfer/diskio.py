"""Moving bytes between a transfer and a disk file, off the event loop, in large batches.

`DiskWriter` gathers incoming writes into batches of about 8 MiB and writes each batch from
a worker thread (several in flight), skipping all-zero blocks (or punching holes there, when
the file may hold data), starting writeback after each batch so the closing fsync is short.
`data_extents` maps a file's data with SEEK_DATA/SEEK_HOLE. See ../shared/notes/performance.md
for the measurements behind the sizes.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass

from formats import linux

BATCH = 8 << 20  # bytes gathered before a write is issued
IN_FLIGHT = 4  # batches being written at once; bounds memory per transfer to ~40 MiB
ZERO_BLOCK = 64 << 10  # granularity of zero detection, aligned to disk offsets
READ_SIZE = 4 << 20  # bytes per pread on export
_ZEROS = bytes(max(ZERO_BLOCK, READ_SIZE))


@dataclass
class WriteStats:
    data: int = 0  # bytes written
    zero: int = 0  # bytes found zero (skipped or punched)


IOV_MAX = 1024


def _pwritev_all(fd: int, bufs: list[memoryview], offset: int) -> None:
    """Write the buffers back to back at `offset`, however many calls that takes."""
    while bufs:
        batch = bufs[:IOV_MAX]
        n = os.pwritev(fd, batch, offset)
        offset += n
        done = 0
        for buf in batch:
            if n < len(buf):
                break
            n -= len(buf)
            done += 1
        bufs = bufs[done:]
        if n:  # a partial write inside one buffer
            bufs[0] = bufs[0][n:]


def zero_range(fd: int, offset: int, length: int) -> None:
    if not linux.punch_hole(fd, offset, length):
        zeros = memoryview(_ZEROS)
        for pos in range(0, length, len(zeros)):
            _pwritev_all(fd, [zeros[: min(len(zeros), length - pos)]], offset + pos)


def zero_and_data_runs(offset: int, parts: list):
    """Split contiguous `parts` (starting at disk `offset`) into runs: ("data", start,
    [views]) and ("zero", start, length). Zero detection looks at blocks aligned to disk
    offsets, cut at part edges; views point into the parts (no copies)."""
    data: list[memoryview] = []
    data_start = zero_start = -1
    pos = offset
    for part in parts:
        view = memoryview(part)
        n, i = len(view), 0
        while i < n:
            block_end = min(n, i + ZERO_BLOCK - (pos + i) % ZERO_BLOCK)
            block = view[i:block_end]
            if _ZEROS.startswith(block):
                if data:
                    yield "data", data_start, data
                    data = []
                if zero_start < 0:
                    zero_start = pos + i
            else:
                if zero_start >= 0:
                    yield "zero", zero_start, pos + i - zero_start
                    zero_start = -1
                if not data:
                    data_start = pos + i
                data.append(block)
            i = block_end
        pos += n
    if data:
        yield "data", data_start, data
    if zero_start >= 0:
        yield "zero", zero_start, pos - zero_start


def write_batch(fd: int, offset: int, parts: list, punch: bool) -> WriteStats:
    """Write contiguous `parts` at `offset` into a raw file: data runs with pwritev straight
    from the received buffers (no joining copy), all-zero blocks skipped (or punched when
    `punch`). Runs in a worker thread; returns what it wrote and skipped."""
    stats = WriteStats()
    end = offset
    for kind, start, item in zero_and_data_runs(offset, parts):
        if kind == "data":
            _pwritev_all(fd, item, start)
            length = sum(len(v) for v in item)
            stats.data += length
        else:
            length = item
            if punch:
                zero_range(fd, start, length)
            stats.zero += length
        end = start + length
    linux.start_writeback(fd, offset, end - offset)
    return stats


class DiskWriter:
    """Async front of `write_batch`: call `write` in stream order, then `finish` (fsync)."""

    def __init__(self, fd: int, *, punch: bool, executor: Executor | None = None):
        self.fd = fd
        self.punch = punch
        self.executor = executor
        self.stats = WriteStats()
        self._parts: list = []
        self._start = 0
        self._size = 0
        self._pending: deque[asyncio.Future] = deque()

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        if self._parts and offset != self._start + self._size:
            await self._issue(final=True)
        if not self._parts:
            self._start = offset
        self._parts.append(data)
        self._size += len(data)
        if self._size >= BATCH:
            await self._issue()

    async def _issue(self, final: bool = False) -> None:
        """Send the gathered parts to a worker. Unless `final`, a batch ends on a
        ZERO_BLOCK-aligned disk offset and the rest waits for the next one: a zero run
        punched up to the middle of a page would leave that page allocated."""
        if not self._parts:
            return
        end = self._start + self._size
        cut = end - end % ZERO_BLOCK
        carry: list = []
        if not final and self._start < cut < end:
            keep = end - cut
            while keep:
                tail = memoryview(self._parts.pop())
                if len(tail) > keep:
                    self._parts.append(tail[: len(tail) - keep])
                    carry.insert(0, tail[len(tail) - keep :])
                    keep = 0
                else:
                    carry.insert(0, tail)
                    keep -= len(tail)
            self._size = cut - self._start
        while len(self._pending) >= IN_FLIGHT:
            await self._pending.popleft()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(
            self.executor, write_batch, self.fd, self._start, self._parts, self.punch
        )
        future.add_done_callback(self._count)
        self._pending.append(future)
        self._parts, self._size = carry, sum(len(c) for c in carry)
        self._start = cut if carry else end

    def _count(self, future: asyncio.Future) -> None:
        if not future.cancelled() and future.exception() is None:
            done = future.result()
            self.stats.data += done.data
            self.stats.zero += done.zero

    async def checkpoint(self) -> None:
        """Everything written so far is durable (the upload may go on afterwards)."""
        await self._issue(final=True)
        await self.drain()
        await asyncio.get_running_loop().run_in_executor(self.executor, os.fsync, self.fd)

    async def finish(self) -> None:
        """Write what is gathered, wait for every batch, fsync: the data is durable."""
        await self._issue(final=True)
        await self.drain()
        await asyncio.get_running_loop().run_in_executor(self.executor, os.fsync, self.fd)

    async def drain(self) -> None:
        """Wait for every batch in flight (also on failure: the fd must outlive them)."""
        error: BaseException | None = None
        while self._pending:
            future = self._pending.popleft()
            try:
                await asyncio.shield(future)
            except asyncio.CancelledError:
                # Our caller is being cancelled; the thread still runs: wait for it anyway.
                error = error or asyncio.CancelledError()
                await asyncio.wait([future])
                if not future.cancelled():
                    future.exception()  # retrieved; the cancel is what we report
            except Exception as exc:
                error = error or exc
        if error is not None:
            raise error


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The (offset, length) runs of `fd` within [0, size) that hold data, from the
    filesystem's allocation map; holes are left out. Blocking: call in a thread."""
    extents: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                break
            if exc.errno == errno.EINVAL:  # no SEEK_DATA support: all data
                return [(pos, size - pos)] if pos < size else []
            raise
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        extents.append((start, end - start))
        pos = end
    return extents


def file_extents(path: os.PathLike | str, size: int) -> list[tuple[int, int]]:
    """`data_extents` of the file at `path`. Blocking: call in a thread."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return data_extents(fd, size)
    finally:
        os.close(fd)
