"""Where an import's decoded data lands: the VDI, written from a worker thread.

Each run of contiguous data is copied, a window at a time, into an aligned staging buffer,
where all-zero 64 KiB blocks (aligned to disk offsets) are found and left out: skipped, or
zeroed when the disk may hold data there (`punch`).

A raw VDI's file is the disk. Its data goes out of the staging buffer with O_DIRECT, the
bytes that do not fill whole 4 KiB blocks (a run's edges) through the page cache. Measured on
this machine (README, "Performance"): buffered writes into new VDIs spent most of the
server's time in the kernel copying into freshly allocated page-cache pages, and stalled when
the kernel throttled the dirty pages; eight uploads at once took 3.3 s of CPU for 1 GiB
buffered, 1.1 s direct. Filesystems without O_DIRECT get buffered writes, with the dirty pages
of an upload bounded: writeback of each run starts at once, and the run before it must be
written back before the next one is accepted. A VHD or QCOW2 VDI is written through the
driver of its chain's top layer, which allocates blocks or clusters; zero runs are zeroed
there (masking the layers below).

Both are blocking: the import pipeline (transfer/pipeline.py) calls them in a worker thread.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
from collections.abc import Iterator
from typing import Protocol

from formats import linux
from formats.chain import Chain
from transfer import layers

ZERO_BLOCK = 64 << 10  # granularity of zero detection, aligned to disk offsets
ALIGN = 4096  # O_DIRECT: offsets, lengths and memory on 4 KiB boundaries
STAGE = 4 << 20  # bytes staged (and written) at a time
_ZEROS = bytes(STAGE)

Parts = list  # contiguous buffers (bytes or memoryviews) of disk data, in order
Run = tuple[bool, int, memoryview | int]  # (True, offset, data) or (False, offset, zero length)


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


# Staging buffers are lent to a write for its duration: there are as many as writes run at
# once (worker threads), however many uploads are open.
_idle_stages: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()


def staged_runs(offset: int, parts: Parts) -> Iterator[Run]:
    """The data and zero runs of `parts` (contiguous from disk `offset`), in order. A data run
    is a view into a page-aligned staging buffer whose byte i sits at a disk offset of the
    same alignment (to ZERO_BLOCK: so no zero block is split between two fillings of the
    buffer), and its 4 KiB-aligned pieces can go out with O_DIRECT; it is valid until the
    next run is asked for."""
    try:
        stage = _idle_stages.get_nowait()
    except queue.Empty:
        stage = mmap.mmap(-1, STAGE)
    view = memoryview(stage)
    try:
        pending = [memoryview(p) for p in parts]
        pos = offset
        while pending:
            head = pos % ZERO_BLOCK
            n = 0
            while pending and head + n < STAGE:
                part = pending[0]
                take = min(len(part), STAGE - head - n)
                view[head + n : head + n + take] = part[:take]
                n += take
                pending[0] = part[take:]
                if not pending[0]:
                    pending.pop(0)
            yield from _window(view, pos, head, n)
            pos += n
    finally:
        view.release()
        _idle_stages.put(stage)


def _window(view: memoryview, pos: int, head: int, n: int) -> Iterator[Run]:
    """The runs of disk bytes [pos, pos + n), staged at view[head:head + n]."""
    base, end = pos - head, pos + n

    def run(data: bool, start: int, stop: int) -> Run:
        if data:
            return True, start, view[start - base : stop - base]
        return False, start, stop - start

    start, data, at = pos, None, pos
    while at < end:
        block_end = min(end, at - at % ZERO_BLOCK + ZERO_BLOCK)
        nonzero = not _ZEROS.startswith(view[at - base : block_end - base])
        if data is None:
            data = nonzero
        elif data != nonzero:  # the kind changes: the run so far is complete
            yield run(data, start, at)
            start, data = at, nonzero
        at = block_end
    if data is not None:
        yield run(data, start, end)


class RawFile:
    """A raw VDI's file, written directly: whole 4 KiB blocks with O_DIRECT where the
    filesystem allows it, the rest through the page cache."""

    def __init__(self, fd: int, direct_fd: int | None = None):
        self.fd = fd
        self.direct_fd = direct_fd  # the same file opened O_DIRECT, if the filesystem can
        self._last: tuple[int, int] | None = None  # buffered bytes whose writeback may run

    @classmethod
    def open(cls, path: os.PathLike | str) -> RawFile:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            direct_fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                os.close(fd)
                raise
            direct_fd = None  # this filesystem has no O_DIRECT: buffered writes only
        return cls(fd, direct_fd)

    def write_run(self, offset: int, parts: Parts, punch: bool) -> int:
        previous, written = self._last, 0
        for data, at, item in staged_runs(offset, parts):
            if data:
                assert isinstance(item, memoryview)
                self._write(item, at)
                written += len(item)
            elif punch:
                assert isinstance(item, int)
                self.zero(at, item)
        if previous is not None and previous != self._last:
            # Bounded dirty pages: the previous run's are written back before the next run.
            linux.finish_writeback(self.fd, *previous)
        return written

    def _write(self, view: memoryview, offset: int) -> None:
        end = offset + len(view)
        lo = min(end, -(-offset // ALIGN) * ALIGN)
        hi = max(lo, end - end % ALIGN)
        done = self._write_direct(view[lo - offset : hi - offset], lo) if lo < hi else 0
        self._write_buffered(view[: lo - offset], offset)
        self._write_buffered(view[lo - offset + done :], lo + done)

    def _write_direct(self, view: memoryview, offset: int) -> int:
        """Bytes written with O_DIRECT: all of them, unless the filesystem has no O_DIRECT
        (or refuses it now: it gets no more of them) or stops at an unaligned count."""
        done = 0
        while self.direct_fd is not None and done < len(view):
            try:
                n = os.pwrite(self.direct_fd, view[done:], offset + done)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                os.close(self.direct_fd)
                self.direct_fd = None
                break
            done += n
            if n % ALIGN:
                break
        return done

    def _write_buffered(self, view: memoryview, offset: int) -> None:
        if not view:
            return
        _pwrite_all(self.fd, view, offset)
        linux.start_writeback(self.fd, offset, len(view))
        self._last = (offset, len(view))

    def zero(self, offset: int, length: int) -> None:
        if not linux.punch_hole(self.fd, offset, length):
            zeros = memoryview(_ZEROS)
            for pos in range(0, length, len(zeros)):
                _pwrite_all(self.fd, zeros[: min(len(zeros), length - pos)], offset + pos)

    def flush(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.direct_fd is not None:
            os.close(self.direct_fd)
        os.close(self.fd)


class ChainTop:
    """A VHD/QCOW2 VDI: written through the driver of its chain's top layer."""

    def __init__(self, chain: Chain):
        self.chain = chain

    def write_run(self, offset: int, parts: Parts, punch: bool) -> int:
        written = 0
        for data, at, item in staged_runs(offset, parts):
            if data:
                assert isinstance(item, memoryview)
                self.chain.top.write(at, item)
                written += len(item)
            elif punch:
                assert isinstance(item, int)
                self.chain.top.zero(at, item)
        return written

    def zero(self, offset: int, length: int) -> None:
        self.chain.top.zero(offset, length)

    def flush(self) -> None:
        self.chain.top.flush()

    def close(self) -> None:
        layers.close_chain(self.chain)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
