"""Microsoft VHD (qemu calls it "vpc"): a forward-only decoder and a dynamic/differencing encoder.

All integers are big-endian. A *fixed* VHD is the raw disk followed by a 512-byte footer. A
*dynamic* or *differencing* VHD is

    footer copy (512) | dynamic header (1024) | BAT | blocks ... | footer (512)

where the BAT holds one u32 per `block_size` bytes of disk: the host sector where that block
lives, or 0xFFFFFFFF. A block is a sector bitmap (one bit per sector, most significant bit
first, padded to 512 bytes) followed by `block_size` bytes of data. A set bit means "this
sector is in this file"; a clear bit reads as zeros in a dynamic disk and as the parent's
sector in a differencing disk. Parent locators and names are never followed here.

Spec: Microsoft "Virtual Hard Disk Image Format Specification" 1.0 (2006); libvhdi's notes.

How the decoder reads a stream, and what it accepts:

- A stream whose first 512 bytes are a dynamic or differencing footer (cookie, checksum) is
  sparse; any other stream is a fixed VHD: its bytes pass through as writes, the last 512
  held back and checked at the end as a fixed footer whose current_size is the data length.
- Blocks may be stored in any order (qemu-img convert -W): the BAT, once in, is sorted by
  host offset and the blocks are taken as the stream reaches them. Only set bitmap bits
  become writes; a full bitmap gives one write per block (or per fed piece of it).
- Blocks stored before the BAT need the spill (they are seen before the BAT maps them).
- Block sizes are powers of two from 4 KiB to 256 MiB (every known writer uses 2 MiB).
- `max_table_entries` must cover `current_size`, and may be larger (XenServer's vhd-util
  preallocates the BAT for a 2 TiB disk whatever the disk's size) but never beyond 2 TiB of
  disk nor `MAX_TABLE_ENTRIES` entries: that bounds the BAT we hold to 16 MiB.
- A dynamic `current_size` of at most 2040 GiB (the format's maximum, as in qemu and
  Hyper-V); a size that is not a multiple of 512 (no known writer makes one) is rounded up
  to whole sectors, in `Header.virtual_size` as in a fixed VHD's.
- Sectors a block maps beyond `current_size` (the tail of the last block) are ignored.
- Bytes between the structures (parent locators, XenServer's batmap, alignment gaps) are
  skipped; the footer must be the stream's last 512 bytes and equal the copy at offset 0.
- No block may overlap the footer copy, the header, the BAT or another block.
"""

from __future__ import annotations

import bisect
import itertools
import re
import struct
import sys
from array import array
from collections import namedtuple
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from formats.errors import FormatError
from formats.events import Event, Header, Write
from formats.layout import Data, Literal, Piece, cut_pieces
from formats.layout import Zero as ZeroPiece
from formats.spill import Spill

SECTOR = 512
FOOTER_SIZE = 512
HEADER_SIZE = 1024
FOOTER_COOKIE = b"conectix"
HEADER_COOKIE = b"cxsparse"
FORMAT_VERSION = 0x00010000
DISK_FIXED, DISK_DYNAMIC, DISK_DIFFERENCING = 2, 3, 4
UNALLOCATED = 0xFFFFFFFF
NO_OFFSET = 0xFFFFFFFFFFFFFFFF
VHD_EPOCH = 946684800  # 2000-01-01T00:00:00Z as a Unix time: VHD timestamps count from there

MAX_VIRTUAL_SIZE = 2040 << 30  # the format's maximum (Hyper-V, qemu's VHD_MAX_SECTORS)
MIN_BLOCK_SIZE = 4 << 10
MAX_BLOCK_SIZE = 256 << 20
MAX_BAT_COVERAGE = 2 << 40  # vhd-util preallocates BATs for this much disk
MAX_TABLE_ENTRIES = 1 << 22  # 16 MiB of BAT: 2 TiB at 512 KiB blocks
BLOCK_SIZE = 2 << 20  # what the encoder writes, like every other VHD writer
SPILL_READ = 4 << 20  # largest piece read back from the spill at once

FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427s")
FOOTER_CHECKSUM_AT = 64
DYNAMIC_HEADER = struct.Struct(">8sQQIIII16sII512s192s256s")
HEADER_CHECKSUM_AT = 36
assert FOOTER.size == FOOTER_SIZE and DYNAMIC_HEADER.size == HEADER_SIZE
assert array("I").itemsize == 4 and array("Q").itemsize == 8  # BAT entries, block keys
FooterFields = namedtuple(
    "FooterFields",
    "cookie features version data_offset timestamp creator_app creator_version creator_os "
    "original_size current_size cylinders heads sectors_per_track disk_type checksum uuid "
    "saved_state reserved",
)
HeaderFields = namedtuple(
    "HeaderFields",
    "cookie data_offset table_offset version max_table_entries block_size checksum "
    "parent_uuid parent_timestamp reserved parent_name parent_locators reserved2",
)

DISK_TYPE_NAMES = {DISK_FIXED: "fixed", DISK_DYNAMIC: "dynamic", DISK_DIFFERENCING: "differencing"}
_SET_BITS = re.compile(r"1+")
_BIG_ENDIAN_HOST = sys.byteorder == "big"


def vhd_checksum(structure: bytes | bytearray, checksum_at: int) -> int:
    """Ones' complement of the byte sum, the checksum field itself counted as zeros."""
    total = sum(structure) - sum(structure[checksum_at : checksum_at + 4])
    return ~total & 0xFFFFFFFF


def vhd_timestamp(unix_seconds: float) -> int:
    """A Unix time as a VHD timestamp (seconds since 2000-01-01 UTC)."""
    return max(0, int(unix_seconds) - VHD_EPOCH) & 0xFFFFFFFF


def round_up(value: int, multiple: int) -> int:
    """`value` rounded up to a multiple of `multiple`."""
    return -(-value // multiple) * multiple


def chs_geometry(total_sectors: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) by the algorithm in the spec's appendix: what
    Virtual PC shows a guest. Readers that trust current_size (Hyper-V, and qemu for the
    creator "qem2") ignore it, but a footer should still carry it."""
    total = min(total_sectors, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        sectors_per_track, heads = 255, 16
        cylinders_times_heads = total // sectors_per_track
    else:
        sectors_per_track = 17
        cylinders_times_heads = total // sectors_per_track
        heads = max((cylinders_times_heads + 1023) // 1024, 4)
        if cylinders_times_heads >= heads * 1024 or heads > 16:
            sectors_per_track, heads = 31, 16
            cylinders_times_heads = total // sectors_per_track
        if cylinders_times_heads >= heads * 1024:
            sectors_per_track, heads = 63, 16
            cylinders_times_heads = total // sectors_per_track
    return cylinders_times_heads // heads, heads, sectors_per_track


@dataclass(frozen=True, slots=True)
class VhdFooter:
    """The fields of a checked footer (parse_footer) that the decoder and the driver use."""

    data_offset: int
    timestamp: int
    creator_app: bytes
    current_size: int
    disk_type: int
    uuid: bytes


@dataclass(frozen=True, slots=True)
class DynamicHeader:
    """The fields of a checked dynamic header (parse_dynamic_header) the decoder and driver use."""

    table_offset: int
    max_table_entries: int
    block_size: int
    parent_uuid: bytes
    parent_timestamp: int
    parent_name: str  # informational only: never opened or followed


def check_block_placement(
    keys: Sequence[int], stride: int, metadata: tuple[tuple[int, int, str], ...], where: str = ""
) -> int:
    """FormatError unless every allocated block lies clear of the metadata regions
    (lo, hi, name) and of every other block. `keys` are (sector << 32 | BAT index), sorted;
    a block takes `stride` bytes (bitmap and data). Returns how many blocks start before
    the metadata ends: only those can touch it."""
    prefix = f"{where}: " if where else ""
    metadata_end = max(hi for _, hi, _ in metadata)
    early = bisect.bisect_left(keys, -(-metadata_end // SECTOR) << 32)
    for key in keys[:early]:
        start = (key >> 32) * SECTOR
        for lo, hi, what in metadata:
            if start < hi and lo < start + stride:
                raise FormatError(
                    f"{prefix}BAT entry {key & UNALLOCATED} points to offset {start}, inside "
                    f"{what} ({lo}-{hi})"
                )
    sectors = array("Q", (key >> 32 for key in keys))  # 8 bytes a block, not an int object
    if len(sectors) > 1 and min(map(int.__sub__, sectors[1:], sectors[:-1])) < stride // SECTOR:
        for a, b in itertools.pairwise(keys):
            if (b >> 32) - (a >> 32) < stride // SECTOR:
                at, bt = (a >> 32) * SECTOR, (b >> 32) * SECTOR
                ia, ib = a & UNALLOCATED, b & UNALLOCATED
                if at == bt:
                    raise FormatError(
                        f"{prefix}BAT entries {ia} and {ib} both point to offset {at}"
                    )
                raise FormatError(
                    f"{prefix}blocks {ia} (offset {at}) and {ib} (offset {bt}) overlap: a "
                    f"block takes {stride} bytes"
                )
    return early


def parse_footer(raw: bytes, where: str) -> VhdFooter:
    """Checks a footer's cookie, checksum, version and disk type."""
    f = FooterFields._make(FOOTER.unpack(raw))
    if f.cookie != FOOTER_COOKIE:
        raise FormatError(f"{where}: cookie {f.cookie!r} is not {FOOTER_COOKIE!r}")
    expected = vhd_checksum(raw, FOOTER_CHECKSUM_AT)
    if f.checksum != expected:
        raise FormatError(
            f"{where}: bad footer checksum 0x{f.checksum:08x} (the bytes sum to 0x{expected:08x})"
        )
    if f.version >> 16 != 1:
        raise FormatError(f"{where}: file format version 0x{f.version:08x} is not 1.x")
    if f.disk_type not in DISK_TYPE_NAMES:
        raise FormatError(
            f"{where}: disk type {f.disk_type} is not fixed (2), dynamic (3) or differencing (4)"
        )
    return VhdFooter(f.data_offset, f.timestamp, f.creator_app, f.current_size, f.disk_type, f.uuid)


def parse_dynamic_header(raw: bytes, where: str) -> DynamicHeader:
    """Checks a dynamic disk header's cookie, checksum, version and block size."""
    h = HeaderFields._make(DYNAMIC_HEADER.unpack(raw))
    if h.cookie != HEADER_COOKIE:
        raise FormatError(f"{where}: cookie {h.cookie!r} is not {HEADER_COOKIE!r}")
    expected = vhd_checksum(raw, HEADER_CHECKSUM_AT)
    if h.checksum != expected:
        raise FormatError(
            f"{where}: bad header checksum 0x{h.checksum:08x} (the bytes sum to 0x{expected:08x})"
        )
    if h.version >> 16 != 1:
        raise FormatError(f"{where}: header version 0x{h.version:08x} is not 1.x")
    block_size = h.block_size
    if block_size & (block_size - 1) or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise FormatError(
            f"{where}: block size {block_size} is not a power of two from "
            f"{MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
        )
    name = h.parent_name.decode("utf-16-be", errors="replace").split("\0", 1)[0]
    return DynamicHeader(
        h.table_offset, h.max_table_entries, block_size, h.parent_uuid, h.parent_timestamp, name
    )


def _field_differences(a: bytes, b: bytes) -> list[str]:
    """Names of the footer fields in which two footers differ, for error messages."""
    fa, fb = FOOTER.unpack(a), FOOTER.unpack(b)
    return [name for name, x, y in zip(FooterFields._fields, fa, fb, strict=True) if x != y]


# Decoder states.
_START, _FIXED, _METADATA, _BLOCKS, _TAIL, _DONE = range(6)


class VhdDecoder:
    """Sans-I/O decoder of a VHD upload (fixed, dynamic or differencing), forward only.

    `feed` returns the events its bytes complete; `Write` data may be memoryviews of the fed
    buffer, so apply them before reusing it. Memory is bounded by the declared structures
    (the BAT, one bitmap, 512 held-back bytes), never by the disk or the stream.
    """

    def __init__(self, spill: Spill | None = None, stream_length: int | None = None):
        self.spill = spill
        self.stream_length = stream_length
        self.footer: VhdFooter | None = None
        self.header: DynamicHeader | None = None
        self.virtual_size: int | None = None
        self.position = 0  # stream bytes consumed
        self._state = _START
        self._buffer = bytearray()  # the structure being assembled: footer, header, BAT, bitmap
        self._footer_raw = b""
        self._held = b""  # fixed: the last bytes seen, which may be the footer
        # Dynamic geometry, set from the header.
        self._bat_length = 0
        self._bat_region_end = 0
        self._bitmap_size = 0
        self._block_size = 0
        self._sectors_per_block = 0
        self._full_bitmap = b""
        self._empty_bitmap = b""
        # Blocks still due after the BAT: (host sector << 32 | block index), by host sector.
        self._blocks = array("Q")
        self._next_block = 0
        self._allocated = 0
        self._content_end = 0  # where the footer belongs if nothing follows the last block
        # The block being received.
        self._block_index = -1
        self._block_start = 0
        self._runs: list[tuple[int, int]] = []
        self._run_cursor = 0
        # After the last block: the bytes that should be the footer.
        self._tail_first = bytearray()
        self._tail_last = b""
        self._tail_length = 0

    # -- feeding ---------------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if self._state == _DONE:
            raise RuntimeError("feed() after finish()")
        if self.stream_length is not None and self.position + len(view) > self.stream_length:
            raise FormatError(f"the upload is longer than its declared {self.stream_length} bytes")
        events: list[Event] = []
        at = 0
        while at < len(view):
            state = self._state
            if state == _BLOCKS:
                at = self._feed_blocks(view, at, events)
            elif state == _TAIL:
                at = self._feed_tail(view, at)
            elif state == _FIXED:
                at = self._feed_fixed(view, at, events)
            elif state == _METADATA:
                at = self._feed_metadata(view, at, events)
            else:
                at = self._feed_start(view, at, events)
        return events

    def _take(self, view: memoryview, at: int, need: int) -> int:
        """Appends up to `need` bytes to the structure buffer; returns how many."""
        n = min(need, len(view) - at)
        self._buffer += view[at : at + n]
        self.position += n
        return n

    def _feed_start(self, view: memoryview, at: int, events: list[Event]) -> int:
        at += self._take(view, at, FOOTER_SIZE - len(self._buffer))
        if len(self._buffer) < FOOTER_SIZE:
            return at
        first = bytes(self._buffer)
        self._buffer.clear()
        disk_type = int.from_bytes(first[60:64], "big")
        if first[:8] == FOOTER_COOKIE and disk_type in (DISK_DYNAMIC, DISK_DIFFERENCING):
            self._start_dynamic(first)
        else:
            # Not a sparse VHD: a fixed one, whose first sector is disk data. Its footer, if
            # it is one, is the last 512 bytes, checked at the end.
            self._state = _FIXED
            self._held = first
            size = None
            if self.stream_length is not None:
                size = round_up(self.stream_length - FOOTER_SIZE, SECTOR)
            self.virtual_size = size
            events.append(Header(virtual_size=size, whole_image=True))
        return at

    def _feed_fixed(self, view: memoryview, at: int, events: list[Event]) -> int:
        """Passes the stream through, holding back the last 512 bytes (maybe the footer)."""
        chunk = view[at:]
        start = self.position - len(self._held)
        if len(chunk) >= FOOTER_SIZE:
            if self._held:
                events.append(Write(start, self._held))
            if len(chunk) > FOOTER_SIZE:
                events.append(Write(self.position, chunk[:-FOOTER_SIZE]))
            self._held = bytes(chunk[-FOOTER_SIZE:])
        else:
            joined = self._held + bytes(chunk)
            excess = len(joined) - FOOTER_SIZE
            if excess > 0:
                events.append(Write(start, joined[:excess]))
                joined = joined[excess:]
            self._held = joined
        self.position += len(chunk)
        return len(view)

    def _start_dynamic(self, first: bytes) -> None:
        footer = parse_footer(first, "the footer copy at offset 0")
        if footer.current_size > MAX_VIRTUAL_SIZE:
            raise FormatError(
                f"the disk size {footer.current_size} exceeds the VHD maximum of 2040 GiB"
            )
        if not FOOTER_SIZE <= footer.data_offset < NO_OFFSET:
            raise FormatError(
                f"the footer's dynamic header offset {footer.data_offset} is not after the "
                "footer copy"
            )
        self._check_fits(footer.data_offset + HEADER_SIZE, "the dynamic header")
        self.footer = footer
        self._footer_raw = first
        self.virtual_size = round_up(footer.current_size, SECTOR)
        self._state = _METADATA

    def _check_fits(self, end: int, what: str) -> None:
        """With a known stream length, a structure must end before the end footer."""
        if self.stream_length is not None and end > self.stream_length - FOOTER_SIZE:
            raise FormatError(
                f"{what} ends at offset {end}, beyond the end footer of this "
                f"{self.stream_length}-byte upload"
            )

    def _skip(self, view: memoryview, at: int, until: int) -> int:
        """Passes over bytes before `until`. Before the BAT is known, any of them may turn
        out to be a block: those go to the spill, if there is one."""
        n = min(until - self.position, len(view) - at)
        if self._state == _METADATA and self.spill is not None:
            self.spill.write(self.position, view[at : at + n])
        self.position += n
        return at + n

    def _feed_metadata(self, view: memoryview, at: int, events: list[Event]) -> int:
        assert self.footer is not None
        if self.header is None:
            header_at = self.footer.data_offset
            if self.position < header_at:
                return self._skip(view, at, header_at)
            at += self._take(view, at, HEADER_SIZE - len(self._buffer))
            if len(self._buffer) == HEADER_SIZE:
                raw = bytes(self._buffer)
                self._buffer.clear()
                self._start_header(raw, events)
            return at
        if self.position < self.header.table_offset:
            return self._skip(view, at, self.header.table_offset)
        at += self._take(view, at, self._bat_length - len(self._buffer))
        if len(self._buffer) == self._bat_length:
            self._start_blocks(events)
        return at

    def _start_header(self, raw: bytes, events: list[Event]) -> None:
        assert self.footer is not None and self.virtual_size is not None
        header_at = self.footer.data_offset
        header = parse_dynamic_header(raw, f"the dynamic disk header at offset {header_at}")
        block_size = header.block_size
        needed = -(-self.virtual_size // block_size)
        entries = header.max_table_entries
        if entries < needed:
            raise FormatError(
                f"the BAT has {entries} entries (max_table_entries) but a "
                f"{self.footer.current_size}-byte disk needs {needed} blocks of {block_size}"
            )
        limit = min(max(needed, -(-MAX_BAT_COVERAGE // block_size)), MAX_TABLE_ENTRIES)
        if entries > limit:
            raise FormatError(
                f"the BAT declares {entries} entries (max_table_entries): a "
                f"{self.footer.current_size}-byte disk in blocks of {block_size} needs "
                f"{needed}, and at most {limit} are accepted"
            )
        table_at = header.table_offset
        if table_at < header_at + HEADER_SIZE:
            raise FormatError(
                f"the BAT offset {table_at} is not after the dynamic header at "
                f"{header_at}-{header_at + HEADER_SIZE}"
            )
        self._bat_length = 4 * entries
        self._bat_region_end = table_at + round_up(self._bat_length, SECTOR)
        self._check_fits(table_at + self._bat_length, "the BAT")
        self._block_size = block_size
        self._sectors_per_block = block_size // SECTOR
        self._bitmap_size = round_up(self._sectors_per_block // 8, SECTOR)
        self._full_bitmap = b"\xff" * (self._sectors_per_block // 8)
        self._empty_bitmap = bytes(self._sectors_per_block // 8)
        self.header = header
        events.append(
            Header(
                virtual_size=self.virtual_size,
                whole_image=self.footer.disk_type == DISK_DYNAMIC,
            )
        )
        if self._bat_length == 0 and self.position >= table_at:
            self._start_blocks(events)

    def _start_blocks(self, events: list[Event]) -> None:
        """The BAT is in: orders the allocated blocks by where they are in the stream and
        checks that none overlaps the metadata or another block."""
        assert self.header is not None
        bat = array("I", bytes(self._buffer))
        self._buffer.clear()
        if not _BIG_ENDIAN_HOST:
            bat.byteswap()
        keys = array("Q", sorted((s << 32) | i for i, s in enumerate(bat) if s != UNALLOCATED))
        del bat
        self._allocated = len(keys)
        stride = self._bitmap_size + self._block_size
        assert self.footer is not None
        header_at = self.footer.data_offset
        table_at = self.header.table_offset
        metadata = (
            (0, FOOTER_SIZE, "the footer copy"),
            (header_at, header_at + HEADER_SIZE, "the dynamic header"),
            (table_at, self._bat_region_end, "the BAT"),
        )
        # The BAT ends the metadata (the header comes before it in the stream).
        early = check_block_placement(keys, stride, metadata)
        if keys:
            self._check_fits((keys[-1] >> 32) * SECTOR + stride, f"block {keys[-1] & UNALLOCATED}")
        self._content_end = max(
            self._bat_region_end, (keys[-1] >> 32) * SECTOR + stride if keys else 0
        )
        if early:
            self._emit_spilled_blocks(keys[:early], events)
        if self.spill is not None:
            self.spill.discard(FOOTER_SIZE, table_at - FOOTER_SIZE)
        self._blocks = keys[early:]
        self._next_block = 0
        self._block_index = -1
        self._state = _BLOCKS

    def _emit_spilled_blocks(self, keys: array, events: list[Event]) -> None:
        """Blocks stored before the BAT went to the spill as unknown bytes; now they are known."""
        assert self.header is not None
        table_at = self.header.table_offset
        if self.spill is None:
            first = keys[0]
            raise FormatError(
                f"block {first & UNALLOCATED} is stored at offset {(first >> 32) * SECTOR}, "
                f"before the BAT at {table_at}: decoding this layout needs a spill"
            )
        for key in keys:
            start = (key >> 32) * SECTOR
            index = key & UNALLOCATED
            runs = self._sector_runs(self.spill.read(start, self._bitmap_size), index)
            data_at = start + self._bitmap_size
            base = index * self._block_size
            for lo, hi in runs:
                for piece in range(lo, hi, SPILL_READ):
                    n = min(SPILL_READ, hi - piece)
                    events.append(Write(base + piece, self.spill.read(data_at + piece, n)))

    def _sector_runs(self, bitmap: bytes | bytearray, index: int) -> list[tuple[int, int]]:
        """Byte ranges [lo, hi) of block `index` whose sectors are present, cut at the end of
        the disk. A full or empty bitmap costs one comparison; others a regex over the bits."""
        assert self.virtual_size is not None
        used = bytes(bitmap[: self._sectors_per_block // 8])
        limit = min(self._block_size, self.virtual_size - index * self._block_size)
        if limit <= 0 or used == self._empty_bitmap:
            return []
        if used == self._full_bitmap:
            return [(0, limit)]
        bits = format(int.from_bytes(used, "big"), f"0{self._sectors_per_block}b")
        runs = []
        for match in _SET_BITS.finditer(bits):
            lo, hi = match.start() * SECTOR, min(match.end() * SECTOR, limit)
            if lo >= limit:
                break
            runs.append((lo, hi))
        return runs

    def _feed_blocks(self, view: memoryview, at: int, events: list[Event]) -> int:
        if self._block_index < 0:
            if self._next_block == len(self._blocks):
                if self.position < self._content_end:
                    return self._skip(view, at, self._content_end)
                self._state = _TAIL
                return at
            key = self._blocks[self._next_block]
            self._next_block += 1
            self._block_index = key & UNALLOCATED
            self._block_start = (key >> 32) * SECTOR
            self._runs = []
            self._run_cursor = 0
        start = self._block_start
        if self.position < start:
            return self._skip(view, at, start)
        data_at = start + self._bitmap_size
        if self.position < data_at:
            at += self._take(view, at, data_at - self.position)
            if self.position == data_at:
                self._runs = self._sector_runs(self._buffer, self._block_index)
                self._buffer.clear()
            return at
        lo = self.position - data_at
        n = min(self._block_size - lo, len(view) - at)
        hi = lo + n
        runs = self._runs
        cursor = self._run_cursor
        while cursor < len(runs) and runs[cursor][1] <= lo:
            cursor += 1
        self._run_cursor = cursor
        base = self._block_index * self._block_size
        while cursor < len(runs) and runs[cursor][0] < hi:
            run_lo, run_hi = runs[cursor]
            a, b = max(run_lo, lo), min(run_hi, hi)
            events.append(Write(base + a, view[at + a - lo : at + b - lo]))
            cursor += 1
        self.position += n
        if hi == self._block_size:
            self._block_index = -1
        return at + n

    def _feed_tail(self, view: memoryview, at: int) -> int:
        """After the last block: only the footer should follow (gaps are tolerated)."""
        chunk = view[at:]
        missing = FOOTER_SIZE - len(self._tail_first)
        if missing > 0:
            self._tail_first += chunk[:missing]
        if len(chunk) >= FOOTER_SIZE:
            self._tail_last = bytes(chunk[-FOOTER_SIZE:])
        else:
            self._tail_last = (self._tail_last + bytes(chunk))[-FOOTER_SIZE:]
        self._tail_length += len(chunk)
        self.position += len(chunk)
        return len(view)

    # -- the end -----------------------------------------------------------------------------

    def finish(self) -> list[Event]:
        """The stream ended: checks that nothing is missing and that the footer is right."""
        if self._state == _DONE:
            return []
        try:
            return self._finish()
        finally:
            self._state = _DONE

    def _finish(self) -> list[Event]:
        state = self._state
        if self.stream_length is not None and self.position != self.stream_length:
            raise FormatError(
                f"the upload ended after {self.position} of its declared {self.stream_length} bytes"
            )
        if state == _START:
            raise FormatError(
                f"the upload is {self.position} bytes: too short for a VHD footer (512)"
            )
        if state == _FIXED:
            self._finish_fixed()
            return []
        events: list[Event] = []
        if state == _METADATA:
            assert self.footer is not None
            if self.header is None:
                at = self.footer.data_offset
                raise FormatError(
                    f"the upload ended at offset {self.position}, before the end of the "
                    f"dynamic header at {at}-{at + HEADER_SIZE}"
                )
            table_at = self.header.table_offset
            if self._bat_length or self.position < table_at:
                raise FormatError(
                    f"the upload ended at offset {self.position}, before the end of the BAT "
                    f"at {table_at}-{table_at + self._bat_length}"
                )
            self._start_blocks(events)
            state = _BLOCKS
        if state == _BLOCKS:
            if self._block_index >= 0 or self._next_block < len(self._blocks):
                self._raise_missing_blocks()
            if self.position < self._content_end:
                raise FormatError(
                    f"the upload ended at offset {self.position}, before the end of the BAT "
                    f"region at {self._content_end}"
                )
        self._finish_tail()
        return events

    def _raise_missing_blocks(self) -> None:
        if self._block_index >= 0:
            index, start = self._block_index, self._block_start
            received = self._next_block - 1
        else:
            key = self._blocks[self._next_block]
            index, start = key & UNALLOCATED, (key >> 32) * SECTOR
            received = self._next_block
        received += self._allocated - len(self._blocks)
        stride = self._bitmap_size + self._block_size
        raise FormatError(
            f"the upload ended at offset {self.position}: block {index} at offset "
            f"{start}-{start + stride} is incomplete or missing ({received} of "
            f"{self._allocated} allocated blocks received)"
        )

    def _finish_tail(self) -> None:
        if self._tail_length < FOOTER_SIZE:
            raise FormatError(
                f"the upload ends {self._tail_length} bytes after its last block or table "
                f"(offset {self._content_end}): the 512-byte footer at the end is missing"
            )
        last = self._tail_last
        if last == self._footer_raw:
            return
        if self._tail_first == self._footer_raw:
            raise FormatError(
                f"{self._tail_length - FOOTER_SIZE} bytes follow the footer at offset "
                f"{self._content_end}"
            )
        parse_footer(last, f"the footer at the end (offset {self.position - FOOTER_SIZE})")
        fields = ", ".join(_field_differences(last, self._footer_raw))
        raise FormatError(f"the footer at the end differs from its copy at offset 0 in: {fields}")

    def _finish_fixed(self) -> None:
        held = self._held
        data_length = self.position - FOOTER_SIZE
        where = f"the footer at the end (offset {data_length})"
        if held[:8] != FOOTER_COOKIE:
            raise FormatError(
                "not a VHD: the upload neither starts with a dynamic VHD's footer nor ends "
                "with a fixed VHD's footer (cookie 'conectix')"
            )
        footer = parse_footer(held, where)
        if footer.disk_type != DISK_FIXED:
            raise FormatError(
                f"{where} is that of a {DISK_TYPE_NAMES[footer.disk_type]} disk, but the "
                "upload does not start with its footer copy"
            )
        if footer.current_size != data_length:
            raise FormatError(
                f"{where}: the fixed disk is {footer.current_size} bytes (current_size) but "
                f"the upload carries {data_length} bytes of data"
            )
        self.footer = footer


# -- encoder ---------------------------------------------------------------------------------


def build_footer(
    current_size: int, disk_type: int, data_offset: int, disk_uuid: bytes, timestamp: int
) -> bytes:
    """A footer as qemu-img writes with force_size: creator "qem2", so that qemu (like
    Hyper-V) takes the disk size from current_size rather than from the CHS geometry."""
    cylinders, heads, sectors_per_track = chs_geometry(current_size // SECTOR)
    fields = FooterFields(
        cookie=FOOTER_COOKIE,
        features=2,  # "reserved, must be set"
        version=FORMAT_VERSION,
        data_offset=data_offset,
        timestamp=timestamp,
        creator_app=b"qem2",
        creator_version=0x00050003,
        creator_os=b"Wi2k",
        original_size=current_size,
        current_size=current_size,
        cylinders=cylinders,
        heads=heads,
        sectors_per_track=sectors_per_track,
        disk_type=disk_type,
        checksum=0,
        uuid=disk_uuid,
        saved_state=0,
        reserved=b"",
    )
    raw = bytearray(FOOTER.pack(*fields))
    raw[FOOTER_CHECKSUM_AT : FOOTER_CHECKSUM_AT + 4] = vhd_checksum(
        raw, FOOTER_CHECKSUM_AT
    ).to_bytes(4, "big")
    return bytes(raw)


def build_dynamic_header(
    table_offset: int, entries: int, block_size: int, parent: tuple[bytes, int, str] | None
) -> bytes:
    """A checksummed dynamic header; with `parent` (uuid, timestamp, name) a differencing one's."""
    parent_uuid, parent_timestamp, parent_name = parent or (bytes(16), 0, "")
    name = parent_name.encode("utf-16-be")
    fields = HeaderFields(
        cookie=HEADER_COOKIE,
        data_offset=NO_OFFSET,
        table_offset=table_offset,
        version=FORMAT_VERSION,
        max_table_entries=entries,
        block_size=block_size,
        checksum=0,
        parent_uuid=parent_uuid,
        parent_timestamp=parent_timestamp,
        reserved=0,
        parent_name=name,
        parent_locators=b"",
        reserved2=b"",
    )
    raw = bytearray(DYNAMIC_HEADER.pack(*fields))
    raw[HEADER_CHECKSUM_AT : HEADER_CHECKSUM_AT + 4] = vhd_checksum(
        raw, HEADER_CHECKSUM_AT
    ).to_bytes(4, "big")
    return bytes(raw)


def check_new_disk(
    virtual_size: int, disk_uuid: bytes, timestamp: int, parent: tuple[bytes, int, str] | None
) -> int:
    """The arguments of a new VHD (encoded or created in place), checked; returns its
    current_size (whole sectors). ValueError names what is wrong."""
    if not isinstance(virtual_size, int) or virtual_size < 0:
        raise ValueError(f"virtual size {virtual_size!r} is not a non-negative size")
    current_size = round_up(virtual_size, SECTOR)
    if current_size > MAX_VIRTUAL_SIZE:
        raise ValueError(
            f"virtual size {virtual_size} exceeds the VHD maximum of 2040 GiB "
            f"({MAX_VIRTUAL_SIZE} bytes)"
        )
    check_identity(disk_uuid, timestamp, "disk")
    if parent is not None:
        check_identity(parent[0], parent[1], "parent")
        if len(parent[2].encode("utf-16-be")) > 512:
            raise ValueError("the parent name is longer than 256 UTF-16 code units")
    return current_size


def check_identity(uuid: bytes, timestamp: int, what: str) -> None:
    """ValueError unless `uuid` is 16 bytes and `timestamp` a 32-bit VHD timestamp."""
    if not isinstance(uuid, bytes | bytearray) or len(uuid) != 16:
        raise ValueError(f"the {what} uuid must be 16 bytes")
    if not isinstance(timestamp, int) or not 0 <= timestamp <= 0xFFFFFFFF:
        raise ValueError(f"the {what} timestamp {timestamp!r} is not a 32-bit VHD timestamp")


class VhdLayout:
    """The bytes of a dynamic (or differencing) VHD, computed on demand.

    Only the footer, dynamic header and BAT are materialised (at most 4 MiB of BAT for
    2040 GiB). Blocks are described by a sorted array of allocated block indices and the
    sector-rounded extents: `slice` finds the blocks a range touches by arithmetic and builds
    their bitmaps and pieces then, so memory is O(extents + allocated blocks) in machine
    integers, never a Python object per block.
    """

    def __init__(
        self,
        virtual_size: int,
        extents: list[tuple[int, int]],
        *,
        disk_uuid: bytes,
        timestamp: int,
        parent: tuple[bytes, int, str] | None = None,
    ):
        self.virtual_size = virtual_size
        self.current_size = check_new_disk(virtual_size, disk_uuid, timestamp, parent)
        self.block_size = BLOCK_SIZE
        spb = BLOCK_SIZE // SECTOR
        self._sectors_per_block = spb
        self._bitmap_size = round_up(spb // 8, SECTOR)
        self._stride = self._bitmap_size + BLOCK_SIZE
        self._full_bitmap = b"\xff" * (spb // 8) + bytes(self._bitmap_size - spb // 8)
        self._starts, self._ends = self._sector_extents(extents)
        self._blocks = self._allocated_blocks()

        entries = -(-self.current_size // BLOCK_SIZE)
        table_offset = FOOTER_SIZE + HEADER_SIZE
        bat_size = round_up(4 * entries, SECTOR)
        self._blocks_at = table_offset + bat_size
        bat = array("I", [UNALLOCATED]) * entries
        sector = self._blocks_at // SECTOR
        for index in self._blocks:
            bat[index] = sector
            sector += self._stride // SECTOR
        if not _BIG_ENDIAN_HOST:
            bat.byteswap()
        disk_type = DISK_DYNAMIC if parent is None else DISK_DIFFERENCING
        self._footer = build_footer(
            self.current_size, disk_type, FOOTER_SIZE, bytes(disk_uuid), timestamp
        )
        self._metadata = b"".join(
            (
                self._footer,
                build_dynamic_header(table_offset, entries, BLOCK_SIZE, parent),
                bat.tobytes(),
                b"\xff" * (bat_size - 4 * entries),
            )
        )
        self._blocks_end = self._blocks_at + len(self._blocks) * self._stride
        self.length = self._blocks_end + FOOTER_SIZE

    def _sector_extents(self, extents: list[tuple[int, int]]) -> tuple[array, array]:
        """The extents rounded out to whole sectors, merged where they touch."""
        starts, ends = array("Q"), array("Q")
        for offset, length in extents:
            if length == 0:
                continue
            if offset < 0 or length < 0 or offset + length > self.virtual_size:
                raise ValueError(
                    f"extent ({offset}, {length}) is not within the {self.virtual_size}-byte disk"
                )
            lo = offset // SECTOR * SECTOR
            hi = round_up(offset + length, SECTOR)
            if starts and lo < starts[-1]:
                raise ValueError("extents must be sorted by offset")
            if starts and lo <= ends[-1]:
                ends[-1] = max(ends[-1], hi)
            else:
                starts.append(lo)
                ends.append(hi)
        return starts, ends

    def _allocated_blocks(self) -> array:
        blocks = array("I")
        for lo, hi in zip(self._starts, self._ends, strict=True):
            first, last = lo // BLOCK_SIZE, (hi - 1) // BLOCK_SIZE
            if blocks and blocks[-1] >= first:
                first = blocks[-1] + 1
            if first <= last:
                blocks.extend(range(first, last + 1))
        return blocks

    def _block_pieces(self, slot: int) -> list[Piece]:
        """The bitmap and data of the `slot`-th stored block: extents as Data, the rest Zero."""
        index = self._blocks[slot]
        block_lo = index * BLOCK_SIZE
        block_hi = block_lo + BLOCK_SIZE
        runs: list[tuple[int, int]] = []
        k = bisect.bisect_right(self._ends, block_lo)
        while k < len(self._starts) and self._starts[k] < block_hi:
            runs.append((max(self._starts[k], block_lo), min(self._ends[k], block_hi)))
            k += 1
        if runs == [(block_lo, block_hi)]:
            bitmap = self._full_bitmap
        else:
            spb = self._sectors_per_block
            bits = 0
            for lo, hi in runs:
                first, end = (lo - block_lo) // SECTOR, (hi - block_lo) // SECTOR
                bits |= ((1 << (end - first)) - 1) << (spb - end)
            bitmap = bits.to_bytes(spb // 8, "big") + bytes(self._bitmap_size - spb // 8)
        pieces: list[Piece] = [Literal(bitmap)]
        at = block_lo
        for lo, hi in runs:
            if lo > at:
                pieces.append(ZeroPiece(lo - at))
            data_hi = min(hi, self.virtual_size)  # the last sector may overhang the disk
            pieces.append(Data(lo, data_hi - lo))
            if hi > data_hi:
                pieces.append(ZeroPiece(hi - data_hi))
            at = hi
        if at < block_hi:
            pieces.append(ZeroPiece(block_hi - at))
        return pieces

    def slice(self, start: int, end: int) -> Iterator[Piece]:
        """The pieces covering output bytes [start, end), cut to fit exactly, in order."""
        if not 0 <= start <= end <= self.length:
            raise ValueError(f"range {start}-{end} outside 0-{self.length}")
        pos = start
        if pos < end and pos < self._blocks_at:
            hi = min(end, self._blocks_at)
            yield Literal(self._metadata[pos:hi])
            pos = hi
        while pos < end and pos < self._blocks_end:
            slot = (pos - self._blocks_at) // self._stride
            slot_at = self._blocks_at + slot * self._stride
            hi = min(end, slot_at + self._stride)
            yield from cut_pieces(self._block_pieces(slot), pos - slot_at, hi - slot_at)
            pos = hi
        if pos < end:
            yield Literal(self._footer[pos - self._blocks_end : end - self._blocks_end])


def vhd_layout(
    virtual_size: int,
    extents: list[tuple[int, int]],
    *,
    disk_uuid: bytes,
    timestamp: int,
    parent: tuple[bytes, int, str] | None = None,
) -> VhdLayout:
    """A dynamic VHD of the disk, holding only the blocks `extents` touch (bitmaps set
    exactly for the sectors they cover); with `parent` = (parent uuid, parent timestamp,
    parent name) a differencing VHD. Timestamps are VHD timestamps (see `vhd_timestamp`).
    The same inputs always give the same bytes."""
    return VhdLayout(virtual_size, extents, disk_uuid=disk_uuid, timestamp=timestamp, parent=parent)
