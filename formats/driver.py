"""Random-access image drivers: how a VDI stored as raw, VHD or QCOW2 is read and written.

A driver opens ONE file, one layer of a backing chain. It never opens its parent itself and
never reads a parent's name from the file: the service knows the chain from its database
and composes layers with `Chain`. Drivers do plain blocking file I/O (no asyncio); the
service calls them from worker threads.

Extents of one layer are (start, length, kind) with kind:
- DATA: this layer holds these bytes;
- ZERO: this layer says these bytes read as zero (masking any parent);
- PARENT: this layer says nothing; read the parent (in a base layer: zero).
The runs cover [0, virtual_size) in order, without gaps.

`map(offset, length)` says where a layer keeps its DATA: runs of (virtual offset, length,
host offset in this file) -- so an export can sendfile() straight from the layer's file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

DATA, ZERO, PARENT = "data", "zero", "parent"


class ImageDriver(Protocol):
    """One layer's image file as the service reads and writes it, whatever its format."""

    virtual_size: int
    fd: int
    # Reads the disk as the layers below this one show it (set by whoever stacks the
    # layers): what a partial write over PARENT ranges must copy up. None: no layer below.
    read_parent: Callable[[int, int], bytes] | None

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of THIS layer; PARENT ranges read as zero here (Chain resolves them)."""

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Allocate as needed; written bytes become DATA of this layer."""

    def zero(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zero, masking the parent (ZERO or DATA of
        zeros), freeing space where the format can."""

    def extents(self, offset: int = 0, length: int | None = None) -> list[tuple[int, int, str]]:
        """This layer's runs of DATA / ZERO / PARENT over the range (default: the disk)."""

    def map(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(virtual offset, length, host offset) of the DATA runs within the range."""

    def flush(self) -> None:
        """Metadata and data durable (fsync)."""

    def close(self) -> None: ...
