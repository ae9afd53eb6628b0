"""What an upload sends, as a stream that can start again at any byte offset of itself
(the server's Upload-Offset after a dropped connection or a restart).

A raw regular file goes as XAPI chunk framing (chunked=true): one frame per piece of data
the file holds, found with SEEK_DATA/SEEK_HOLE; holes and all-zero pieces are not sent,
except where the VDI being overwritten holds data there (those ranges get zero frames, so
nothing of the old disk shows through). Anything else (an image format, or a pipe) goes
byte for byte."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

PIECE = 4 << 20  # bytes of data per frame (and per read)
_ZEROS = bytes(PIECE)
END = bytes(12)  # the frame of length 0 that ends chunk framing


def data_runs(fd: int, size: int) -> list[tuple[int, int]]:
    """(start, length) of the file's data, by SEEK_DATA/SEEK_HOLE (all of it where the
    filesystem cannot say)."""
    runs: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                break
            return [(0, size)] if size else []
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        runs.append((start, end - start))
        pos = end
    return runs


def merge(runs: list[tuple[int, int]], more: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The union of two lists of runs, sorted and joined."""
    out: list[list[int]] = []
    for start, length in sorted(runs + more):
        if out and start <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], start + length - out[-1][0])
        else:
            out.append([start, length])
    return [(s, n) for s, n in out]


def pieces(runs: list[tuple[int, int]], from_disk: int = 0) -> Iterator[tuple[int, int]]:
    """(offset, length) of the runs from disk offset `from_disk` on, cut at PIECE-aligned
    offsets: the frames an upload sends."""
    for start, length in runs:
        end = start + length
        pos = max(start, from_disk)
        while pos < end:
            n = min(PIECE - pos % PIECE, end - pos)
            yield pos, n
            pos += n


@dataclass
class Frame:
    """One frame of the stream: where it starts in the stream, and what it carries."""

    at: int  # stream offset of its header
    offset: int  # disk offset of its data
    length: int


@dataclass
class FramedRaw:
    """A raw file as chunk framing. `runs` are the ranges to consider (the file's data,
    plus what must be zeroed); a piece that is all zeros where the target holds nothing
    is skipped. Frames met are remembered, so a restart at a stream offset re-reads
    only the frame it falls in."""

    fd: int
    size: int
    runs: list[tuple[int, int]]
    must_zero: list[tuple[int, int]] = field(default_factory=list)
    frames: list[Frame] = field(default_factory=list)
    ended_at: int | None = None  # stream offset of END, once generated

    def _needs_zeros(self, start: int, length: int) -> bool:
        return any(s < start + length and start < s + n for s, n in self.must_zero)

    def stream(self, skip: int = 0) -> Iterator[tuple[bytes, int]]:
        """(bytes to send, disk position reached) from stream offset `skip` on."""
        at, from_disk = 0, 0
        for frame in reversed(self.frames):
            if frame.at <= skip:
                at, from_disk = frame.at, frame.offset
                del self.frames[self.frames.index(frame) :]
                break
        else:
            self.frames.clear()
        for offset, length in pieces(self.runs, from_disk):
            data = os.pread(self.fd, length, offset)
            if len(data) != length:
                raise OSError(f"the file shrank while it was read (at byte {offset})")
            if data == _ZEROS[:length] and not self._needs_zeros(offset, length):
                continue
            self.frames.append(Frame(at, offset, length))
            chunk = struct.pack("<QI", offset, length) + data
            if at + len(chunk) > skip:
                yield chunk[max(0, skip - at) :], offset + length
            at += len(chunk)
        self.ended_at = at
        if at + len(END) > skip:
            yield END[max(0, skip - at) :], self.size


@dataclass
class Plain:
    """A file sent as it is; a regular file restarts at any offset, a pipe cannot."""

    fd: int
    size: int | None  # None: a pipe
    head: bytes = b""  # bytes of a pipe already read (to detect its format)

    def stream(self, skip: int = 0) -> Iterator[tuple[bytes, int]]:
        if self.size is None:  # a pipe: only ever from the start
            if skip:
                raise OSError("standard input cannot be read again: the upload cannot resume")
            pos = 0
            if self.head:
                yield self.head, len(self.head)
                pos = len(self.head)
            while data := os.read(self.fd, PIECE):
                pos += len(data)
                yield data, pos
            return
        pos = skip
        while pos < self.size:
            data = os.pread(self.fd, min(PIECE, self.size - pos), pos)
            if not data:
                raise OSError(f"the file shrank while it was read (at byte {pos})")
            pos += len(data)
            yield data, pos
