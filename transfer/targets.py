"""Where an import's decoded data lands: the VDI, written from a worker thread.

A raw VDI's file is the disk, so it is written directly: data runs with pwritev straight
from the received buffers (no joining copy), all-zero 64 KiB blocks skipped (or punched,
when the file may hold data there). An upload keeps few pages in the page cache: writeback
of each run starts at once, and before a run returns, the run before it is written back and
its pages dropped. Unbounded, an upload's dirty pages piled up until the kernel throttled the
writer, and every page was a newly allocated one to copy into: an upload into a new VDI took
2.9 s per GiB on this machine, against about 1 s bounded (README, "Performance"). A VHD or
QCOW2 VDI is written through the driver of its chain's top layer, which allocates blocks or
clusters; zero runs are zeroed there (masking the layers below).

Both are blocking: the import pipeline (transfer/pipeline.py) calls them in a worker thread.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Protocol

from formats import linux
from formats.chain import Chain
from transfer import layers

ZERO_BLOCK = 64 << 10  # granularity of zero detection, aligned to disk offsets
_ZEROS = bytes(4 << 20)
IOV_MAX = 1024

Parts = list  # contiguous buffers (bytes or memoryviews) of disk data, in order


class Target(Protocol):
    """What the import pipeline writes a VDI through. Blocking: called in a worker thread."""

    def write_run(self, offset: int, parts: Parts, punch: bool) -> int:
        """Write `parts`, contiguous from disk `offset`. All-zero blocks are not written:
        skipped, or zeroed when `punch` (the disk may hold data there). Returns the data
        bytes written."""

    def zero(self, offset: int, length: int) -> None:
        """Make the range read as zeros."""

    def flush(self) -> None:
        """Everything written so far is durable."""

    def close(self) -> None: ...


class RawFile:
    """A raw VDI's file, written directly."""

    def __init__(self, fd: int):
        self.fd = fd
        self._writeback = linux.Writeback(fd)

    @classmethod
    def open(cls, path: os.PathLike | str) -> RawFile:
        return cls(os.open(path, os.O_WRONLY | os.O_CLOEXEC))

    def write_run(self, offset: int, parts: Parts, punch: bool) -> int:
        written, end = 0, offset
        for kind, start, item in zero_and_data_runs(offset, parts):
            if kind == "data":
                _pwritev_all(self.fd, item, start)
                length = sum(len(v) for v in item)
                written += length
            else:
                length = item
                if punch:
                    self.zero(start, length)
            end = start + length
        self._writeback.written(offset, end - offset)
        return written

    def zero(self, offset: int, length: int) -> None:
        if not linux.punch_hole(self.fd, offset, length):
            zeros = memoryview(_ZEROS)
            for pos in range(0, length, len(zeros)):
                _pwritev_all(self.fd, [zeros[: min(len(zeros), length - pos)]], offset + pos)

    def flush(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


class ChainTop:
    """A VHD/QCOW2 VDI: written through the driver of its chain's top layer."""

    def __init__(self, chain: Chain):
        self.chain = chain

    def write_run(self, offset: int, parts: Parts, punch: bool) -> int:
        written = 0
        for kind, at, item in zero_and_data_runs(offset, parts):
            if kind == "data":
                data = item[0] if len(item) == 1 else b"".join(item)
                self.chain.top.write(at, data)
                written += len(data)
            elif punch:
                self.chain.top.zero(at, item)
        return written

    def zero(self, offset: int, length: int) -> None:
        self.chain.top.zero(offset, length)

    def flush(self) -> None:
        self.chain.top.flush()

    def close(self) -> None:
        layers.close_chain(self.chain)


def zero_and_data_runs(offset: int, parts: Parts) -> Iterator[tuple[str, int, object]]:
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
