"""What a decoder tells the importer, in stream order, and the contract every decoder keeps.

Decoders are sans-I/O (`Decoder` below): `feed(bytes)` returns the events those bytes
complete, `finish()` the events the end of the stream completes (and raises if the stream is
truncated). Every format, raw data and XAPI's chunk framing included, speaks in these
events, so the importer has one way to apply any upload to a VDI, in order.

- `Header` comes once, before any write, as soon as the image's header says how big the disk
  is (None where the format does not say, e.g. XAPI's block tar or raw data) and whether the
  image is a whole disk (everything it leaves unallocated reads as zero afterwards: the
  importer clears the target first) or a delta (only what it writes changes: raw data and
  chunk framing are deltas, their zeros included).
- `Write(offset, data)`: these bytes of the virtual disk get `data`.
- `Zero(offset, length)`: these bytes of the virtual disk must read as zeros afterwards
  (qcow2 zero clusters in a delta, for example). Whole images need not send Zero for what
  they leave unallocated: the importer cleared the disk at `Header`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Header:
    """How big the disk is (None: the image does not say), and whether it is whole or a delta."""

    virtual_size: int | None
    whole_image: bool


@dataclass(frozen=True, slots=True)
class Write:
    """These bytes of the virtual disk get `data`."""

    offset: int
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class Zero:
    """These bytes of the virtual disk must read as zeros afterwards."""

    offset: int
    length: int


Event = Header | Write | Zero


class Decoder(Protocol):
    """A sans-I/O decoder of one upload format. Events may hold memoryviews of the fed
    buffer (use them before changing it), and may be produced lazily: iterate them in order,
    as they come (spilled or inflated data is read only then). Raises `FormatError` (see
    formats.errors) for what it refuses."""

    def feed(self, data: bytes | bytearray | memoryview) -> Iterable[Event]:
        """The events these bytes complete."""

    def finish(self) -> Iterable[Event]:
        """The events the end of the stream completes; raises if the stream is truncated."""
