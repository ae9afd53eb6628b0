"""Decoder of streamOptimized VMDK, the disk format inside VMware-made OVAs.

VMware "Virtual Disk Format 1.1", stream-optimized compressed sparse extents: a 512-byte
sparse extent header ('KDMV', flags with compressed grains and markers, capacity and grain
size in sectors, `overHead` sectors before the first marker), then sector-aligned markers:

- a grain marker: u64 lba (disk sector), u32 compressed size (non-zero), then that many
  bytes of deflate (zlib) data: the grain's contents, up to `grainSize` sectors;
- a metadata marker: u64 sectors of metadata that follow, u32 0, u32 type (0 end of stream,
  1 grain table, 2 grain directory, 3 footer), padded to a sector.

Every grain carries its own disk address, so the grain tables and directory are not needed to
decode: the decoder skips them and writes each grain as it arrives (one compressed grain
buffered at most). Grains left out read as zeros (the image is a whole disk). qemu-img writes
its tables inside the overhead (it seeks back) and ends with a zero sector, which reads as
the end-of-stream marker; VMware writes them at the end, with a footer: both decode the same.
"""

from __future__ import annotations

import struct
import zlib

from formats.errors import FormatError, Unsupported
from formats.events import Event, Header, Write
from formats.spill import Spill

SECTOR = 512
MAGIC = b"KDMV"
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
COMPRESSION_DEFLATE = 1
MAX_GRAIN_SECTORS = 2048  # 1 MiB; VMware uses 128 (64 KiB)
MAX_OVERHEAD = 1 << 30  # bytes skipped before the first marker

# magic, version, flags, capacity, grainSize, descriptorOffset, descriptorSize,
# numGTEsPerGT, rgdOffset, gdOffset, overHead, uncleanShutdown, 4 newline-detection chars,
# compressAlgorithm
SPARSE_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
MARKER = struct.Struct("<QII")  # lba or sectors, size, type (metadata markers only)
MARKER_TYPES = {0: "end of stream", 1: "grain table", 2: "grain directory", 3: "footer"}


class UnsupportedVariant(Unsupported):
    """A valid VMDK that is not stream-optimized (e.g. monolithic sparse without markers,
    or a descriptor file whose data lives elsewhere): not decodable from a stream."""


_HEADER = "header"
_MARKER = "marker"  # 16 bytes of a marker
_GRAIN = "grain"  # a grain's compressed data
_ENDED = "ended"


class VmdkStreamDecoder:
    """Sans-I/O decoder of a streamOptimized VMDK: `feed(bytes)`/`finish()` return events.

    `spill` is accepted for the common decoder interface and not used: grains are
    self-describing. `stream_length`, when known, lets a stream that ends exactly after its
    last grain without an end-of-stream marker count as complete."""

    def __init__(self, spill: Spill | None = None, stream_length: int | None = None):
        self.stream_length = stream_length
        self.virtual_size: int | None = None
        self.grains = 0
        self.position = 0  # stream bytes consumed
        self._state = _HEADER
        self._need = SECTOR
        self._buf = bytearray()
        self._buf_start = 0  # stream offset of the buffered unit
        self._skip = 0  # bytes to pass over (descriptor, tables, padding)
        self._grain_bytes = 0
        self._grain_lba = 0
        self._grain_at = 0  # stream offset of the current grain's marker
        self._finished = False

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        if self._finished:
            raise FormatError("the VMDK stream was fed after it was finished")
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        events: list[Event] = []
        pos, end = 0, len(view)
        while pos < end:
            if self._skip:
                take = min(self._skip, end - pos)
                self._skip -= take
            elif self._state == _ENDED:
                take = end - pos  # qemu-img pads with zeros after the end marker
            else:
                if not self._buf:
                    self._buf_start = self.position
                take = min(self._need - len(self._buf), end - pos)
                self._buf += view[pos : pos + take]
            pos += take
            self.position += take
            if self._buf and len(self._buf) == self._need:
                unit = bytes(self._buf)
                self._buf.clear()
                self._process(unit, events)
        return events

    def finish(self) -> list[Event]:
        self._finished = True
        if self._state == _ENDED:
            return []
        at_boundary = self._state == _MARKER and not self._buf and not self._skip
        if at_boundary and self.stream_length is not None and self.position == self.stream_length:
            return []  # the whole stream arrived; only the end marker is missing
        if self._state == _HEADER:
            raise FormatError(
                f"the VMDK stream is {self.position} bytes, shorter than its {SECTOR}-byte header"
            )
        raise FormatError(
            f"the VMDK stream ends at byte {self.position} before its end-of-stream marker "
            f"(after {self.grains} grains): it was probably cut short"
        )

    def _process(self, unit: bytes, events: list[Event]) -> None:
        if self._state == _HEADER:
            events.append(self._parse_header(unit))
        elif self._state == _MARKER:
            self._parse_marker(unit, events)
        elif self._state == _GRAIN:
            self._end_grain(unit, events)

    def _end_grain(self, compressed: bytes, events: list[Event]) -> None:
        """A grain's compressed bytes are all here: write it, then skip to the next sector."""
        write = self._inflate(compressed)
        if write is not None:
            events.append(write)
        grain_end = MARKER.size - 4 + len(compressed)  # 12-byte marker, then the data
        read = max(MARKER.size, grain_end)  # a marker is read as 16 bytes
        self._skip = grain_end + (-grain_end % SECTOR) - read
        self._state, self._need = _MARKER, MARKER.size

    def _parse_header(self, block: bytes) -> Header:
        (
            magic,
            version,
            flags,
            capacity,
            grain_size,
            _descriptor_offset,
            _descriptor_size,
            _gtes_per_gt,
            _rgd_offset,
            _gd_offset,
            overhead,
            _unclean,
            _newline_chars,
            compression,
        ) = SPARSE_HEADER.unpack_from(block)
        if magic != MAGIC:
            if block.lstrip().startswith(b"#") or b"createType" in block:
                raise UnsupportedVariant(
                    "the VMDK is a text descriptor whose data is in other files; only "
                    "streamOptimized VMDK can be imported"
                )
            raise FormatError(f"not a VMDK: the sparse extent magic is {magic!r}, not 'KDMV'")
        if not 1 <= version <= 3:
            raise FormatError(f"the VMDK has sparse extent version {version}, expected 1 to 3")
        if not (flags & FLAG_COMPRESSED and flags & FLAG_MARKERS):
            raise UnsupportedVariant(
                f"the VMDK is a sparse extent without compressed grains and markers "
                f"(flags {flags:#x}): only streamOptimized VMDK can be imported"
            )
        if compression != COMPRESSION_DEFLATE:
            raise FormatError(f"the VMDK uses compression algorithm {compression}, not deflate")
        if not (8 <= grain_size <= MAX_GRAIN_SECTORS and grain_size & (grain_size - 1) == 0):
            raise FormatError(
                f"the VMDK grain size is {grain_size} sectors; expected a power of two "
                f"from 8 to {MAX_GRAIN_SECTORS}"
            )
        if not 1 <= overhead <= MAX_OVERHEAD // SECTOR:
            raise FormatError(f"the VMDK overhead of {overhead} sectors is out of range")
        self.virtual_size = capacity * SECTOR
        self._grain_bytes = grain_size * SECTOR
        self._skip = overhead * SECTOR - SECTOR
        self._state, self._need = _MARKER, MARKER.size
        return Header(virtual_size=self.virtual_size, whole_image=True)

    def _parse_marker(self, marker: bytes, events: list[Event]) -> None:
        value, size, marker_type = MARKER.unpack(marker)
        at = self._buf_start
        if size:  # a grain marker: `value` is the disk sector, `size` the compressed length
            limit = 2 * self._grain_bytes + 4096  # far above deflate's worst-case growth
            if size > limit:
                raise FormatError(
                    f"the VMDK grain at byte {at} claims {size} compressed bytes, more than "
                    f"a {self._grain_bytes}-byte grain can take"
                )
            self._grain_lba = value
            self._grain_at = at
            # What was read as `type` are the first bytes of the compressed data.
            if size <= 4:
                self._end_grain(marker[12 : 12 + size], events)
                return
            self._buf += marker[12:16]
            self._state, self._need = _GRAIN, size
            return
        if marker_type not in MARKER_TYPES:
            raise FormatError(
                f"the VMDK has an unknown metadata marker type {marker_type} at byte {at}"
            )
        if marker_type == 0:
            self._state = _ENDED
            return
        if value > MAX_OVERHEAD // SECTOR:
            raise FormatError(
                f"the VMDK {MARKER_TYPES[marker_type]} at byte {at} claims {value} sectors"
            )
        self._skip = SECTOR - MARKER.size + value * SECTOR

    def _inflate(self, compressed: bytes) -> Write | None:
        at = self._grain_at
        for wbits in (zlib.MAX_WBITS, -zlib.MAX_WBITS):  # zlib-wrapped, or raw deflate
            inflater = zlib.decompressobj(wbits)
            try:
                data = inflater.decompress(compressed, self._grain_bytes + 1)
            except zlib.error:
                continue
            if len(data) > self._grain_bytes:
                raise FormatError(
                    f"the VMDK grain at byte {at} inflates beyond the "
                    f"{self._grain_bytes}-byte grain size"
                )
            if inflater.eof:
                break
        else:
            raise FormatError(f"the VMDK grain at byte {at} is not complete deflate data")
        assert self.virtual_size is not None
        offset = self._grain_lba * SECTOR
        beyond = offset + len(data) - self.virtual_size
        if beyond > 0:
            inside = max(0, len(data) - beyond)
            if data[inside:].strip(b"\0"):
                raise FormatError(
                    f"the VMDK grain at byte {at} writes disk bytes {offset}-"
                    f"{offset + len(data) - 1}, beyond the capacity of {self.virtual_size}"
                )
            data = data[:inside]  # the zero tail of the last grain of an odd-sized disk
        self.grains += 1
        return Write(offset, data) if data else None
