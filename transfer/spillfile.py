"""The importer's Spill: a sparse scratch file in the SR, removed when the import ends."""

from __future__ import annotations

import os
from pathlib import Path

from formats import linux


class FileSpill:
    """formats.spill.Spill over a sparse file. Blocking calls: used from the decoder's
    worker thread. Bounded by the upload's size: it holds only bytes that arrived."""

    def __init__(self, directory: Path, name: str):
        self.path = directory / f".spill-{name}"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        return data + bytes(length - len(data))

    def discard(self, offset: int, length: int) -> None:
        linux.punch_hole(self.fd, offset, length)

    def close(self) -> None:
        os.close(self.fd)
        self.path.unlink(missing_ok=True)
