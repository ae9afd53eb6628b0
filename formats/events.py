"""What a decoder tells the importer, in stream order.

Decoders are sans-I/O: `feed(bytes)` returns the events those bytes complete, `finish()`
the events the end of the stream completes (and raises if the stream is truncated). The
importer applies the events to the VDI in order.

- `Header` comes once, before any write, as soon as the image's header says how big the disk
  is (None where the format does not say, e.g. XAPI's block tar) and whether the image is a
  whole disk (everything it leaves unallocated reads as zero afterwards: the importer clears
  the target first) or a delta (only what it allocates changes).
- `Write(offset, data)`: these bytes of the virtual disk get `data`.
- `Zero(offset, length)`: these bytes of the virtual disk must read as zeros afterwards
  (qcow2 zero clusters in a delta, for example). Whole images need not send Zero for what
  they leave unallocated: the importer cleared the disk at `Header`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Header:
    virtual_size: int | None
    whole_image: bool


@dataclass(frozen=True, slots=True)
class Write:
    offset: int
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class Zero:
    offset: int
    length: int


Event = Header | Write | Zero
