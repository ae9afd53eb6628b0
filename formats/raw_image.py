"""The raw image driver: the file is the disk. Zeros become holes."""

from __future__ import annotations

import os

from formats import linux
from formats.driver import DATA, ZERO

ZERO_CHUNK = bytes(1 << 20)


class RawImage:
    """A raw file as an ImageDriver (formats.driver). A raw layer has no parent: what it
    does not hold (holes) reads as zero."""

    read_parent = None  # a raw file is a whole disk: there is never a layer below it

    def __init__(self, path: str | os.PathLike, fd: int, virtual_size: int, writable: bool):
        self.path = path
        self.fd = fd
        self.virtual_size = virtual_size
        self.writable = writable

    @classmethod
    def create(cls, path: str | os.PathLike, virtual_size: int) -> RawImage:
        """A new file of `virtual_size` bytes with no block allocated, open for writing. The
        file must not exist. Nothing is synced: `flush` before relying on it."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        try:
            os.ftruncate(fd, virtual_size)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        return cls(path, fd, virtual_size, True)

    @classmethod
    def open(cls, path: str | os.PathLike, *, writable: bool) -> RawImage:
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        return cls(path, fd, os.fstat(fd).st_size, writable)

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        return data + bytes(length - len(data))

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def zero(self, offset: int, length: int) -> None:
        if not linux.punch_hole(self.fd, offset, length):
            for pos in range(0, length, len(ZERO_CHUNK)):
                self.write(offset + pos, ZERO_CHUNK[: min(len(ZERO_CHUNK), length - pos)])

    def extents(self, offset: int = 0, length: int | None = None) -> list[tuple[int, int, str]]:
        end = self.virtual_size if length is None else offset + length
        runs: list[tuple[int, int, str]] = []
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole after pos
                data = end
            data = min(data, end)
            if data > pos:
                runs.append((pos, data - pos, ZERO))
            if data >= end:
                break
            hole = min(os.lseek(self.fd, data, os.SEEK_HOLE), end)
            runs.append((data, hole - data, DATA))
            pos = hole
        return runs

    def map(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        return [
            (start, n, start) for start, n, kind in self.extents(offset, length) if kind == DATA
        ]

    def flush(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)
