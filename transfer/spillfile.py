"""The importer's Spill: a sparse scratch file in the SR, removed when the import ends."""

from __future__ import annotations

import os
from pathlib import Path

from formats import linux


class FileSpill:
    """formats.spill.Spill over a sparse file. Blocking calls: used from the decoder's
    worker thread. Bounded by the upload's size: it holds only bytes that arrived."""

    def __init__(self, directory: Path, name: str, *, keep: bool = False):
        """`keep`: reopen what a suspended upload parked, instead of starting empty."""
        self.path = directory / f".spill-{name}"
        flags = os.O_RDWR | os.O_CREAT | (0 if keep else os.O_TRUNC)
        self.fd = os.open(self.path, flags, 0o600)

    def __getstate__(self) -> dict:
        """A checkpointed decoder refers to its spill by path (see transfer/resume.py)."""
        return {"path": str(self.path)}

    def __setstate__(self, state: dict) -> None:
        self.path = Path(state["path"])
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)

    def sync(self) -> None:
        os.fsync(self.fd)

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

    def close(self, remove: bool = True) -> None:
        """Close; remove the file unless a suspended upload will need it again."""
        os.close(self.fd)
        if remove:
            self.path.unlink(missing_ok=True)
