"""Changed block tracking: which 64 KiB blocks of a disk changed between two of its versions.

Each version of a disk (the live VDI, and each snapshot taken of it) owns the log of one
epoch: the blocks written between the version before it (`cbt_prev`) and it. A snapshot
takes the live VDI's log with it, and the VDI starts an empty one. The blocks changed
between two versions are the union of the logs of the epochs between them. An epoch's log is
complete (`cbt_complete`) only if tracking was on all through it.

A log is a bitmap file beside the VDI's image, `<uuid>.cbt`, in XAPI's list_changed_blocks
order: bit i is block i, most significant bit first in each byte. Writes are logged ahead:
an import marks the blocks of a run in the file and makes that durable before it writes the
run, so a block written before a crash is always in the log (at worst, a block is logged
whose write never happened). Bits only ever go from 0 to 1 in place, so a torn write of the
file can only lose bits of blocks not yet written.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from transfer.files import fsync_dir
from transfer.targets import Parts, Target

BLOCK = 64 << 10  # XAPI's CBT block size


def size_of(virtual_size: int) -> int:
    """Bytes of the bitmap of a disk of `virtual_size` bytes."""
    blocks = -(-virtual_size // BLOCK)
    return -(-blocks // 8)


def path_of(image: Path, vdi_uuid: str) -> Path:
    """A version's log: beside its image file, named by the version's uuid."""
    return image.parent / f"{vdi_uuid}.cbt"


def create(path: Path, virtual_size: int) -> None:
    """An empty, durable log (nothing changed yet)."""
    tmp = path.with_suffix(".cbt.tmp")
    with open(tmp, "wb") as f:
        f.truncate(size_of(virtual_size))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)


def load(path: Path, virtual_size: int) -> bytearray | None:
    """The log's bitmap, or None if there is none (then the epoch is not tracked)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    bitmap = bytearray(size_of(virtual_size))
    bitmap[: min(len(data), len(bitmap))] = data[: len(bitmap)]
    return bitmap


def remove(path: Path) -> None:
    """Discard a log (tracking was turned off, or its version is gone)."""
    path.unlink(missing_ok=True)


def rename(source: Path, dest: Path) -> None:
    """Hand a log to another version (a snapshot takes the live VDI's)."""
    source.replace(dest)
    fsync_dir(dest.parent)


def union(bitmaps: list[bytearray], size: int) -> bytes:
    """The blocks set in any of the bitmaps."""
    out = bytearray(size)
    for bitmap in bitmaps:
        value = int.from_bytes(out, "big") | int.from_bytes(bitmap[:size].ljust(size, b"\0"), "big")
        out = bytearray(value.to_bytes(size, "big"))
    return bytes(out)


def merge_into(path: Path, other: bytearray, virtual_size: int) -> None:
    """OR `other` into the log at `path` (a deleted version's epoch joins the next one)."""
    mine = load(path, virtual_size) or bytearray(size_of(virtual_size))
    merged = union([mine, other], len(mine))
    with open(path, "r+b") as f:
        f.write(merged)
        f.flush()
        os.fsync(f.fileno())


def spans(bitmap: bytes, virtual_size: int) -> list[tuple[int, int]]:
    """The (offset, length) byte ranges of the blocks set, consecutive blocks merged."""
    out: list[tuple[int, int]] = []
    for block in blocks_set(bitmap):
        start = block * BLOCK
        if start >= virtual_size:
            break
        end = min(start + BLOCK, virtual_size)
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], end - out[-1][0])
        else:
            out.append((start, end - start))
    return out


def blocks_set(bitmap: bytes) -> list[int]:
    """The numbers of the blocks set, in order; zero bytes are skipped by the regex
    engine, so a sparse log of a large disk costs little."""
    out = []
    for match in _NONZERO.finditer(bitmap):
        at, byte = match.start(), match.group()[0]
        out.extend(at * 8 + bit for bit in range(8) if byte & (0x80 >> bit))
    return out


_NONZERO = re.compile(rb"[^\x00]")


class TrackedTarget:
    """A Target whose writes are logged ahead in the VDI's change log (blocking)."""

    def __init__(self, inner: Target, path: Path, virtual_size: int):
        self.inner = inner
        self.bitmap = load(path, virtual_size) or bytearray(size_of(virtual_size))
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _mark(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        first, last = offset // BLOCK, (offset + length - 1) // BLOCK
        lo, hi = first // 8, last // 8
        before = bytes(self.bitmap[lo : hi + 1])
        head = 0xFF >> (first % 8)
        tail = (0xFF << (7 - last % 8)) & 0xFF
        if lo == hi:
            self.bitmap[lo] |= head & tail
        else:
            self.bitmap[lo] |= head
            self.bitmap[lo + 1 : hi] = b"\xff" * (hi - lo - 1)
            self.bitmap[hi] |= tail
        if bytes(self.bitmap[lo : hi + 1]) != before:
            os.pwrite(self.fd, self.bitmap[lo : hi + 1], lo)
            os.fdatasync(self.fd)  # logged before the data is written

    def write_run(self, offset: int, parts: Parts, punch: bool) -> int:
        self._mark(offset, sum(len(p) for p in parts))
        return self.inner.write_run(offset, parts, punch)

    def zero(self, offset: int, length: int) -> None:
        self._mark(offset, length)
        self.inner.zero(offset, length)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        try:
            os.close(self.fd)
        finally:
            self.inner.close()
