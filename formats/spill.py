"""Where a decoder parks bytes whose meaning it does not know yet.

A qcow2 written by qemu-img may put a data cluster before the L2 table that maps it; a
forward-only decoder must keep that cluster until the mapping arrives. The decoder stays
pure: it is handed a `Spill`, a random-access scratch store addressed by stream offset. The
importer gives it a sparse temporary file in the SR (bounded by the upload size); tests give
it `MemorySpill`. Decoders call it synchronously; the importer runs decoders in a worker
thread, never on the event loop.
"""

from __future__ import annotations

from typing import Protocol


class Spill(Protocol):
    """Scratch store, addressed by stream offset, for bytes a decoder must keep for later."""

    def write(self, offset: int, data: bytes | memoryview) -> None: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def discard(self, offset: int, length: int) -> None:
        """The bytes will not be read again (the store may free them)."""


class MemorySpill:
    """A Spill in memory, for tests and small images."""

    def __init__(self) -> None:
        self._chunks: dict[int, bytes] = {}

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._chunks[offset] = bytes(data)

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        for start, chunk in self._chunks.items():
            lo, hi = max(start, offset), min(start + len(chunk), offset + length)
            if lo < hi:
                out[lo - offset : hi - offset] = chunk[lo - start : hi - start]
        return bytes(out)

    def discard(self, offset: int, length: int) -> None:
        end = offset + length
        for start in [s for s, c in self._chunks.items() if offset <= s and s + len(c) <= end]:
            del self._chunks[start]

    @property
    def size(self) -> int:
        return sum(len(c) for c in self._chunks.values())
