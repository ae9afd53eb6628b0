"""A dynamic or differencing VHD file as a random-access image driver (formats.driver).

The file layout is the one formats.vhd describes (footer copy, dynamic header, BAT, blocks
of sector bitmap + data, footer at the end); the footer and header codecs are reused from
there. What this module adds is how the file is changed in place:

- Blocks are appended, in allocation order, after the last block. The data area of each
  block starts on a 4 KiB boundary (blocks of 1 MiB or more; a block's bitmap sits in the
  sector(s) just before it), so data pages line up with the host's pages: sendfile, the page
  cache and hole punching work on whole pages. That costs 3.5 KiB of sparse padding per
  2 MiB block; readers follow the BAT and do not care (gaps between blocks are legal).
- Crash safety: data is written at once; bitmaps and BAT entries stay dirty in memory until
  `flush` (or the dirty bitmaps outgrowing their budget) writes them, after an fdatasync of
  the data they describe. So after a crash the BAT never points at a block whose bitmap and
  data are not there, and a bit is never set for a sector whose data is not on disk: each
  sector reads its old or its new content (a differencing disk never shows zeros where its
  parent showed through). Blocks allocated since the last flush are lost.
- The end footer: from the first change of a session, it sits past the last block with a
  reserve (64 MiB to 1 GiB, a hole on disk), so that allocations do not move it each time;
  moving it syncs the new one before the old one is cleared, so the file always ends with a
  valid footer. `close` pulls it back behind the last block. A gap there at open therefore
  means the last session did not close, and a writable open repairs the file: it zeroes
  the data under clear bits (a write whose bit was lost left data that qemu, which ignores
  dynamic disks' bitmaps, would show and this driver would not), then cuts off the blocks
  allocated after the last flush. A read-only open reads such a file as it is.
- Invariant: in an allocated block, a sector whose bit is clear holds zeros in the file.
  qemu ignores dynamic disks' bitmaps when reading, so zeroing a dynamic disk clears the
  bits AND zeroes (punches) the data; new blocks come from the zeroed reserve.
- Differencing disks: a clear bit means "read the parent". Writes and zeros must cover
  whole sectors unless `read_parent` is set (the service sets it to read the rest of the
  chain): the rest of a partial sector would come from the parent, which this driver never
  opens. Zeros in a differencing disk are data (bits set, zeroed data) masking the parent.
- No parent locators are written: the service composes chains from its database, qemu
  ignores locators, and libvhdi takes the parent's name from the header's unicode name,
  which is written. (Windows tools that want a W2ru locator would not find the parent.)

Memory: the BAT as array('I') (4 bytes per block: 4 MiB for a 2040 GiB disk in 2 MiB
blocks), a sorted array of allocated block numbers, and a bounded cache of bitmaps
(BITMAP_CACHE_BYTES). Calls are serialised by a lock; the service may call from any thread.
"""

from __future__ import annotations

import bisect
import errno
import itertools
import os
import re
import sys
import threading
from array import array
from collections.abc import Callable, Iterator

from formats import linux
from formats.driver import DATA, PARENT, ZERO
from formats.errors import FormatError
from formats.vhd import (
    BLOCK_SIZE,
    DISK_DIFFERENCING,
    DISK_DYNAMIC,
    DISK_TYPE_NAMES,
    FOOTER,
    FOOTER_CHECKSUM_AT,
    FOOTER_COOKIE,
    FOOTER_SIZE,
    HEADER_SIZE,
    MAX_BAT_COVERAGE,
    MAX_BLOCK_SIZE,
    MAX_TABLE_ENTRIES,
    MAX_VIRTUAL_SIZE,
    MIN_BLOCK_SIZE,
    SECTOR,
    UNALLOCATED,
    DynamicHeader,
    FooterFields,
    VhdFooter,
    build_dynamic_header,
    build_footer,
    check_block_placement,
    check_new_disk,
    parse_dynamic_header,
    parse_footer,
    round_up,
    vhd_checksum,
)

DATA_ALIGN = 4096  # where block data starts in the file (blocks of ALIGN_MIN_BLOCK or more)
ALIGN_MIN_BLOCK = 1 << 20  # smaller blocks would waste too much on padding: sector-aligned
RESERVE_MIN = 64 << 20  # how far past the last block the footer goes when it must move
RESERVE_MAX = 1 << 30
BITMAP_CACHE_BYTES = 8 << 20  # bitmaps kept in memory (dirty ones are written back first)
CACHE_ENTRY_COST = 128  # a cached bitmap's bytearray and dict slot, beyond its bytes
MAX_HOST_SECTOR = UNALLOCATED - 1  # BAT entries are u32 sector numbers
ZERO_CHUNK = bytes(1 << 20)
PUNCH_MIN = 4096  # below this, zeros are written rather than punched
BAT_PER_SECTOR = SECTOR // 4
LOCATORS_AT, LOCATOR_SIZE = 576, 24  # parent locator entries in the dynamic header

_RUNS = re.compile(r"1+|0+")
_BIG_ENDIAN_HOST = sys.byteorder == "big"


# -- bitmaps: one bit per sector, most significant bit of byte 0 first -------------------------


def _bit(bitmap: bytearray, sector: int) -> bool:
    return bool(bitmap[sector >> 3] & (0x80 >> (sector & 7)))


def _set_bits(bitmap: bytearray, first: int, end: int, value: bool) -> bool:
    """Sets (or clears) the bits of sectors [first, end) with whole-byte slices in the middle;
    True if any bit changed, so that unchanged bitmaps are not written back."""
    if first >= end:
        return False
    fb, lb = first >> 3, (end - 1) >> 3
    head = 0xFF >> (first & 7)
    tail = (0xFF << (7 - ((end - 1) & 7))) & 0xFF
    edges = [(fb, head & tail)] if fb == lb else [(fb, head), (lb, tail)]
    changed = False
    for i, mask in edges:
        old = bitmap[i]
        new = old | mask if value else old & ~mask & 0xFF
        if new != old:
            bitmap[i] = new
            changed = True
    if lb > fb + 1:
        fill = 0xFF if value else 0
        if bitmap.count(fill, fb + 1, lb) != lb - fb - 1:
            bitmap[fb + 1 : lb] = bytes([fill]) * (lb - fb - 1)
            changed = True
    return changed


def _bit_runs(bitmap: bytearray, first: int, end: int) -> list[tuple[int, int, bool]]:
    """Maximal runs (first sector, end sector, bit) over sectors [first, end). A range whose
    bytes are all set or all clear costs one count; others one regex over the bits."""
    fb, lb = first >> 3, (end + 7) >> 3
    if bitmap.count(0xFF, fb, lb) == lb - fb:
        return [(first, end, True)]
    if bitmap.count(0, fb, lb) == lb - fb:
        return [(first, end, False)]
    bits = format(int.from_bytes(bitmap[fb:lb], "big"), f"0{8 * (lb - fb)}b")
    base = fb * 8
    return [
        (base + m.start(), base + m.end(), bits[m.start()] == "1")
        for m in _RUNS.finditer(bits, first - base, end - base)
    ]


# -- file helpers ----------------------------------------------------------------------------


def _pread_exact(fd: int, length: int, offset: int, what: str) -> bytes:
    data = os.pread(fd, length, offset)
    while len(data) < length:
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            raise FormatError(
                f"{what}: the file ends at offset {offset + len(data)}, inside "
                f"{offset}-{offset + length}"
            )
        data += more
    return data


def _preadv_into(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise FormatError(f"the file ends at offset {offset}, inside a block")
        view, offset = view[n:], offset + n


def _pwritev_all(fd: int, buffers: list[bytes | bytearray | memoryview], offset: int) -> None:
    total = sum(len(b) for b in buffers)
    n = os.pwritev(fd, buffers, offset)
    if n < total:  # short write (signal, quota): finish the rest one buffer at a time
        rest = memoryview(b"".join(buffers))[n:]
        offset += n
        while rest:
            m = os.pwrite(fd, rest, offset)
            rest, offset = rest[m:], offset + m


def _differences(a: bytes, b: bytes) -> str:
    """Names of the footer fields in which two footers differ, for error messages."""
    fa, fb = FOOTER.unpack(a), FOOTER.unpack(b)
    names = FooterFields._fields
    return ", ".join(name for name, x, y in zip(names, fa, fb, strict=True) if x != y)


def read_disk_uuid(path: str | os.PathLike) -> bytes:
    """The disk uuid in a dynamic or differencing VHD's footer copy at offset 0: what a child
    layer names as its parent (it stays the uuid the disk was created with, whatever the
    file is named or recorded as later)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        raw = _pread_exact(fd, FOOTER_SIZE, 0, "the footer copy")
    finally:
        os.close(fd)
    return parse_footer(raw, f"{os.fspath(path)}: the footer copy").uuid


_FOOTER_UUID_AT = 68  # the disk uuid's 16 bytes in a footer (after disk type and checksum)


def set_disk_uuid(path: str | os.PathLike, disk_uuid: bytes) -> None:
    """Give a closed dynamic or differencing VHD another disk uuid (the one its child layers
    name it by), in the footer copy at offset 0 and the footer at the end, then sync. Done
    again after a crash between the two writes, it completes them (the file does not open
    while they differ)."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        footer = bytearray(_pread_exact(fd, FOOTER_SIZE, 0, "the footer copy"))
        parse_footer(bytes(footer), f"{os.fspath(path)}: the footer copy")
        footer[_FOOTER_UUID_AT : _FOOTER_UUID_AT + 16] = disk_uuid
        footer[FOOTER_CHECKSUM_AT : FOOTER_CHECKSUM_AT + 4] = vhd_checksum(
            footer, FOOTER_CHECKSUM_AT
        ).to_bytes(4, "big")
        _pwritev_all(fd, [bytes(footer)], 0)
        _pwritev_all(fd, [bytes(footer)], size - FOOTER_SIZE)
        os.fsync(fd)
    finally:
        os.close(fd)


class VhdImage:
    """One dynamic or differencing VHD file, read and written in place (ImageDriver).

    Extents: DATA where a sector's bitmap bit is set; elsewhere ZERO in a dynamic disk and
    PARENT in a differencing one. `read_parent(offset, length)`, if set, lets writes and
    zeros of a differencing disk cover partial sectors (see the module docstring).
    """

    read_parent: Callable[[int, int], bytes] | None

    def __init__(
        self,
        path: str | os.PathLike,
        fd: int,
        *,
        writable: bool,
        footer_raw: bytes,
        footer: VhdFooter,
        header: DynamicHeader,
        bat: array,
        allocated: array,
        footer_at: int,
        next_free: int,
    ):
        self.path = path
        self.fd = fd
        self.writable = writable
        self.virtual_size = round_up(footer.current_size, SECTOR)
        self.disk_type = footer.disk_type
        self.uuid = footer.uuid
        self.timestamp = footer.timestamp
        self.block_size = header.block_size
        self.parent: tuple[bytes, int, str] | None = None
        if footer.disk_type == DISK_DIFFERENCING:
            self.parent = (header.parent_uuid, header.parent_timestamp, header.parent_name)
        self.read_parent = None
        self._footer_raw = footer_raw
        self._table_offset = header.table_offset
        self._entries = -(-self.virtual_size // self.block_size)  # blocks inside the disk
        self._sectors_per_block = self.block_size // SECTOR
        self._bitmap_used = self._sectors_per_block // 8
        self._bitmap_size = round_up(self._bitmap_used, SECTOR)
        self._align = DATA_ALIGN if self.block_size >= ALIGN_MIN_BLOCK else SECTOR
        self._hole_kind = PARENT if self.disk_type == DISK_DIFFERENCING else ZERO
        self._bat = bat  # host sector of each block's bitmap, native byte order
        self._allocated = allocated  # allocated block numbers below _entries, sorted
        self._footer_at = footer_at  # where the end footer is now
        self._next_free = next_free  # where the next block may start (past every structure)
        self._bitmaps: dict[int, bytearray] = {}
        self._dirty_bitmaps: set[int] = set()
        self._dirty_bat: set[int] = set()  # BAT sectors (entry // 128) to write back
        self._cache_limit = max(16, BITMAP_CACHE_BYTES // (self._bitmap_used + CACHE_ENTRY_COST))
        self._unsynced = False
        self._closed = False
        self._lock = threading.RLock()

    # -- creating and opening ----------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        virtual_size: int,
        *,
        disk_uuid: bytes,
        timestamp: int,
        parent: tuple[bytes, int, str] | None = None,
        block_size: int = BLOCK_SIZE,
    ) -> VhdImage:
        """A new, empty dynamic VHD (differencing with `parent` = (parent uuid, parent VHD
        timestamp, parent file name)), open for writing. The file must not exist. Nothing is
        synced: `flush` before relying on it."""
        current_size = check_new_disk(virtual_size, disk_uuid, timestamp, parent)
        if block_size & (block_size - 1) or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
            raise ValueError(
                f"block size {block_size} is not a power of two from {MIN_BLOCK_SIZE} to "
                f"{MAX_BLOCK_SIZE}"
            )
        entries = -(-current_size // block_size)
        table_offset = FOOTER_SIZE + HEADER_SIZE
        metadata_end = table_offset + round_up(4 * entries, SECTOR)
        # Every block allocated must stay addressable by a u32 sector number.
        bitmap_size = round_up(block_size // SECTOR // 8, SECTOR)
        align = DATA_ALIGN if block_size >= ALIGN_MIN_BLOCK else SECTOR
        full_end = metadata_end + entries * (round_up(bitmap_size, align) + block_size)
        if full_end // SECTOR > MAX_HOST_SECTOR:
            raise ValueError(
                f"a {current_size}-byte disk in blocks of {block_size} would outgrow the "
                "2 TiB a VHD can address: use larger blocks"
            )
        disk_type = DISK_DYNAMIC if parent is None else DISK_DIFFERENCING
        footer_raw = build_footer(current_size, disk_type, FOOTER_SIZE, bytes(disk_uuid), timestamp)
        if parent is not None:
            parent = (bytes(parent[0]), parent[1], parent[2])
        header_raw = build_dynamic_header(table_offset, entries, block_size, parent)
        metadata = b"".join(
            (footer_raw, header_raw, b"\xff" * (metadata_end - table_offset), footer_raw)
        )
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        try:
            _pwritev_all(fd, [metadata], 0)
            footer = parse_footer(footer_raw, "the new footer")
            header = parse_dynamic_header(header_raw, "the new header")
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        bat = array("I", [UNALLOCATED]) * entries
        image = cls(
            path,
            fd,
            writable=True,
            footer_raw=footer_raw,
            footer=footer,
            header=header,
            bat=bat,
            allocated=array("I"),
            footer_at=metadata_end,
            next_free=metadata_end,
        )
        image._unsynced = True
        return image

    @classmethod
    def open(cls, path: str | os.PathLike, *, writable: bool) -> VhdImage:
        """Opens and validates a dynamic or differencing VHD (never its parent). A writable
        open of a file whose last session did not close cleanly repairs it first (see the
        module docstring)."""
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        try:
            image = cls._load(path, fd, writable)
            if writable and image._footer_at != image._next_free:
                image._repair()
                image._trim()
        except BaseException:
            os.close(fd)
            raise
        return image

    @classmethod
    def _load(cls, path: str | os.PathLike, fd: int, writable: bool) -> VhdImage:
        name = os.fspath(path)
        size = os.fstat(fd).st_size
        if size < 2 * FOOTER_SIZE + HEADER_SIZE:
            raise FormatError(
                f"{name}: {size} bytes is too short for a dynamic VHD (footer copy, "
                "header and footer take 2048)"
            )
        first = _pread_exact(fd, FOOTER_SIZE, 0, name)
        if first[:8] != FOOTER_COOKIE and _pread_exact(fd, 8, size - FOOTER_SIZE, name) == (
            FOOTER_COOKIE
        ):
            raise FormatError(
                f"{name}: no footer copy at offset 0 but a footer at the end: a fixed VHD? "
                "Only dynamic and differencing VHDs are opened as images"
            )
        footer = parse_footer(first, f"{name}: the footer copy at offset 0")
        if footer.disk_type not in (DISK_DYNAMIC, DISK_DIFFERENCING):
            raise FormatError(
                f"{name}: a {DISK_TYPE_NAMES[footer.disk_type]} VHD; only dynamic and "
                "differencing VHDs are opened as images"
            )
        footer_at = size - FOOTER_SIZE
        last = _pread_exact(fd, FOOTER_SIZE, footer_at, name)
        if last != first:
            where = f"{name}: the footer at the end (offset {footer_at})"
            parse_footer(last, where)
            raise FormatError(
                f"{where} differs from its copy at offset 0 in: {_differences(last, first)}"
            )
        if footer.current_size > MAX_VIRTUAL_SIZE:
            raise FormatError(
                f"{name}: the disk size {footer.current_size} exceeds the VHD maximum of 2040 GiB"
            )
        header_at = footer.data_offset
        if not FOOTER_SIZE <= header_at <= footer_at - HEADER_SIZE:
            raise FormatError(
                f"{name}: the dynamic header offset {header_at} is not between the footer copy "
                f"and the end footer at {footer_at}"
            )
        raw_header = _pread_exact(fd, HEADER_SIZE, header_at, name)
        header = parse_dynamic_header(raw_header, f"{name}: the dynamic header at {header_at}")
        block_size = header.block_size
        virtual_size = round_up(footer.current_size, SECTOR)
        needed = -(-virtual_size // block_size)
        entries = header.max_table_entries
        limit = min(max(needed, -(-MAX_BAT_COVERAGE // block_size)), MAX_TABLE_ENTRIES)
        if not needed <= entries <= limit:
            raise FormatError(
                f"{name}: the BAT has {entries} entries (max_table_entries) but a "
                f"{footer.current_size}-byte disk in blocks of {block_size} needs {needed} "
                f"(at most {limit} are accepted)"
            )
        table_at = header.table_offset
        header_end = header_at + HEADER_SIZE
        bat_end = table_at + 4 * entries
        if table_at < header_end or bat_end > footer_at:
            raise FormatError(
                f"{name}: the BAT at {table_at}-{bat_end} is not between the dynamic header "
                f"(ends at {header_end}) and the end footer at {footer_at}"
            )
        bat = array("I", _pread_exact(fd, 4 * entries, table_at, name))
        if not _BIG_ENDIAN_HOST:
            bat.byteswap()
        bat_region_end = min(table_at + round_up(4 * entries, SECTOR), footer_at)
        bitmap_size = round_up(block_size // SECTOR // 8, SECTOR)
        blocks_end = _check_blocks(
            name,
            bat,
            bitmap_size + block_size,
            footer_at,
            (
                (0, FOOTER_SIZE, "the footer copy"),
                (header_at, header_end, "the dynamic header"),
                (table_at, bat_region_end, "the BAT"),
            ),
        )
        allocated = array("I", _allocated_indices(bat, needed))
        ends = [header_end, bat_region_end, blocks_end]
        for at in range(LOCATORS_AT, LOCATORS_AT + 8 * LOCATOR_SIZE, LOCATOR_SIZE):
            # Parent locator data of other writers: new blocks must go past it too.
            code, length = (
                raw_header[at : at + 4],
                int.from_bytes(raw_header[at + 8 : at + 12], "big"),
            )
            data_at = int.from_bytes(raw_header[at + 16 : at + 24], "big")
            if code != bytes(4) and length and data_at + length <= footer_at:
                ends.append(data_at + length)
        next_free = round_up(max(ends), SECTOR)
        return cls(
            path,
            fd,
            writable=writable,
            footer_raw=first,
            footer=footer,
            header=header,
            bat=bat,
            allocated=allocated,
            footer_at=footer_at,
            next_free=next_free,
        )

    # -- the ImageDriver interface -----------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """This layer's bytes; sectors it does not hold read as zeros (PARENT included)."""
        self._check_range(offset, length)
        with self._lock:
            runs = self._map(offset, offset + length)
        if not runs:
            return bytes(length)
        if len(runs) == 1 and runs[0][1] == length:
            return _pread_exact(self.fd, length, runs[0][2], os.fspath(self.path))
        out = bytearray(length)
        view = memoryview(out)
        for start, n, host in runs:
            _preadv_into(self.fd, view[start - offset : start - offset + n], host)
        return bytes(out)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Writes `data`, allocating blocks on demand; the sectors written become DATA.
        Partial sectors keep the rest of their content (from this layer, or zeros in a
        dynamic disk; a differencing disk needs `read_parent` for them)."""
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        length = len(view)
        self._check_range(offset, length)
        self._check_writable()
        self._check_sectors(offset, length, "write")
        if not length:
            return
        with self._lock:
            self._begin_changes()
            for block, lo, hi in self._block_spans(offset, length):
                start = block * self.block_size + lo - offset
                self._write_in_block(block, lo, view[start : start + hi - lo])

    def zero(self, offset: int, length: int) -> None:
        """Makes the range read as zero. Dynamic: whole sectors become ZERO (bits cleared,
        data punched), partial ones get zero bytes. Differencing: DATA of zeros, masking the
        parent (blocks are allocated for it; their data stays a hole)."""
        self._check_range(offset, length)
        self._check_writable()
        self._check_sectors(offset, length, "zero")
        if not length:
            return
        with self._lock:
            self._begin_changes()
            zero_in_block = (
                self._zero_differencing
                if self.disk_type == DISK_DIFFERENCING
                else self._zero_dynamic
            )
            for block, lo, hi in self._block_spans(offset, length):
                zero_in_block(block, lo, hi)

    def _block_spans(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(block, lo, hi): the byte range [lo, hi) within each block the range touches."""
        bs = self.block_size
        pos, end = offset, offset + length
        while pos < end:
            block = pos // bs
            hi = min(end, (block + 1) * bs)
            yield block, pos - block * bs, hi - block * bs
            pos = hi

    def extents(self, offset: int = 0, length: int | None = None) -> list[tuple[int, int, str]]:
        """(start, length, kind) runs of this layer over the range, coalesced, in order."""
        if length is None:
            length = self.virtual_size - offset
        self._check_range(offset, length)
        out: list[tuple[int, int, str]] = []
        hole = self._hole_kind
        with self._lock:
            for lo, hi, host in self._layer_runs(offset, offset + length):
                kind = DATA if host >= 0 else hole
                if out and out[-1][2] == kind:
                    out[-1] = (out[-1][0], hi - out[-1][0], kind)
                else:
                    out.append((lo, hi - lo, kind))
        return out

    def map(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(virtual offset, length, host offset) of the DATA runs in the range; a run never
        crosses a block (the next block's data is elsewhere in the file)."""
        self._check_range(offset, length)
        with self._lock:
            return self._map(offset, offset + length)

    def flush(self) -> None:
        """Makes every write so far durable: data first, then the bitmaps and BAT entries
        that point at it, then a final sync."""
        with self._lock:
            self._check_open()
            self._write_back()
            os.fdatasync(self.fd)
            self._unsynced = False

    def close(self) -> None:
        """Writes back metadata, pulls the end footer back behind the last block and closes.
        Durable if anything changed since the last flush."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self.writable:
                    self._write_back()
                    self._trim()
                    if self._unsynced:
                        os.fdatasync(self.fd)
            finally:
                os.close(self.fd)

    def __enter__(self) -> VhdImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = DISK_TYPE_NAMES[self.disk_type]
        return f"<VhdImage {os.fspath(self.path)!r} {kind} {self.virtual_size} bytes>"

    # -- checks --------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{os.fspath(self.path)} is closed")

    def _check_range(self, offset: int, length: int) -> None:
        self._check_open()
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise ValueError(
                f"range {offset}+{length} is not within the {self.virtual_size}-byte disk"
            )

    def _check_writable(self) -> None:
        if not self.writable:
            raise PermissionError(f"{os.fspath(self.path)} is open read-only")

    def _check_sectors(self, offset: int, length: int, what: str) -> None:
        if (
            self.disk_type == DISK_DIFFERENCING
            and self.read_parent is None
            and (offset | length) % SECTOR
        ):
            raise ValueError(
                f"{what} {offset}+{length} in a differencing VHD must cover whole 512-byte "
                "sectors: the rest of a partial sector is in the parent (set read_parent)"
            )

    # -- runs and bitmaps ------------------------------------------------------------------------

    def _layer_runs(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        """(lo, hi, host) runs covering [start, end): host is where the data of a run this
        layer holds starts in the file, -1 for runs it does not hold. Unallocated stretches
        are found by bisecting the allocated blocks, full and empty bitmaps in one test."""
        bs = self.block_size
        allocated = self._allocated
        k = bisect.bisect_left(allocated, start // bs)
        pos = start
        while pos < end:
            block = pos // bs
            if k == len(allocated) or allocated[k] > block:
                hi = end if k == len(allocated) else min(end, allocated[k] * bs)
                yield pos, hi, -1
                pos = hi
                continue
            block_lo = block * bs
            hi = min(end, block_lo + bs)
            data_at = self._bat[block] * SECTOR + self._bitmap_size - block_lo
            bitmap = self._bitmap(block, for_update=False)
            first, last = (pos - block_lo) // SECTOR, -(-(hi - block_lo) // SECTOR)
            for a, z, bit in _bit_runs(bitmap, first, last):
                lo, run_hi = max(pos, block_lo + a * SECTOR), min(hi, block_lo + z * SECTOR)
                yield lo, run_hi, data_at + lo if bit else -1
            pos = hi
            k += 1

    def _map(self, start: int, end: int) -> list[tuple[int, int, int]]:
        return [(lo, hi - lo, host) for lo, hi, host in self._layer_runs(start, end) if host >= 0]

    def _bitmap(self, block: int, *, for_update: bool) -> bytearray:
        """The used bytes of a block's bitmap, from the cache or the file. Reads do not
        grow the cache past its budget; updates make room by writing back dirty bitmaps."""
        bitmap = self._bitmaps.get(block)
        if bitmap is not None:
            return bitmap
        if len(self._bitmaps) >= self._cache_limit:
            if not for_update:
                return bytearray(self._read_bitmap(block))
            self._write_back()
            self._bitmaps.clear()
        bitmap = bytearray(self._read_bitmap(block))
        self._bitmaps[block] = bitmap
        return bitmap

    def _read_bitmap(self, block: int) -> bytes:
        at = self._bat[block] * SECTOR
        return _pread_exact(self.fd, self._bitmap_used, at, os.fspath(self.path))

    # -- writing -----------------------------------------------------------------------------

    def _block_data_at(self, block: int) -> tuple[int, bool]:
        """(host offset of the block's data, newly allocated?), allocating it at the end."""
        sector = self._bat[block]
        if sector != UNALLOCATED:
            return sector * SECTOR + self._bitmap_size, False
        data_at = round_up(self._next_free + self._bitmap_size, self._align)
        bitmap_at = data_at - self._bitmap_size
        end = data_at + self.block_size
        if bitmap_at // SECTOR > MAX_HOST_SECTOR:
            raise OSError(errno.EFBIG, f"{os.fspath(self.path)}: a VHD cannot address past 2 TiB")
        if end >= self._footer_at:  # keep a gap before the footer: the session's mark
            self._move_footer(end + SECTOR)
        self._bat[block] = bitmap_at // SECTOR
        self._dirty_bat.add(block // BAT_PER_SECTOR)
        bisect.insort(self._allocated, block)
        self._next_free = end
        if len(self._bitmaps) >= self._cache_limit:
            self._write_back()
            self._bitmaps.clear()
        self._bitmaps[block] = bytearray(self._bitmap_used)  # the reserve reads as zeros
        return data_at, True

    def _begin_changes(self) -> None:
        """Before the first change of a session: moves the end footer away from the last
        block, so that a file left with a gap there tells the next writable open that this
        session may not have ended cleanly (close takes the gap away)."""
        self._unsynced = True
        if self._footer_at <= self._next_free:
            self._move_footer(self._next_free + SECTOR)

    def _move_footer(self, needed_end: int) -> None:
        """Puts the end footer past `needed_end` plus a reserve, and clears the old one, in
        that order with a sync between: the file always ends with a valid footer."""
        remaining = max(0, self._entries - len(self._allocated) - 1)
        slot = round_up(self._bitmap_size, self._align) + self.block_size
        reserve = min(max(RESERVE_MIN, self._footer_at // 8), RESERVE_MAX)
        target = max(needed_end, min(self._footer_at + reserve, needed_end + remaining * slot))
        target = round_up(target, SECTOR)
        _pwritev_all(self.fd, [self._footer_raw], target)
        os.fdatasync(self.fd)
        _pwritev_all(self.fd, [bytes(FOOTER_SIZE)], self._footer_at)
        self._footer_at = target

    def _write_in_block(self, block: int, lo: int, piece: memoryview) -> None:
        data_at, _ = self._block_data_at(block)
        bitmap = self._bitmap(block, for_update=True)
        hi = lo + len(piece)
        first, end = lo // SECTOR, -(-hi // SECTOR)
        head, tail = lo % SECTOR, hi % SECTOR
        buffers: list[bytes | bytearray | memoryview] = [piece]
        at = lo
        if head and not _bit(bitmap, first):
            buffers.insert(0, self._old_bytes(block, first * SECTOR, head))
            at -= head
        if tail and not _bit(bitmap, end - 1):
            buffers.append(self._old_bytes(block, hi, SECTOR - tail))
        _pwritev_all(self.fd, buffers, data_at + at)
        if _set_bits(bitmap, first, end, True):
            self._dirty_bitmaps.add(block)

    def _old_bytes(self, block: int, lo: int, length: int) -> bytes:
        """What a sector this layer does not hold reads as below it: zeros in a dynamic disk,
        the parent's bytes in a differencing one."""
        if self.disk_type == DISK_DYNAMIC:
            return bytes(length)
        assert self.read_parent is not None  # _check_sectors let a partial sector through
        data = self.read_parent(block * self.block_size + lo, length)
        if len(data) != length:
            raise ValueError(f"read_parent returned {len(data)} bytes for {length}")
        return data

    def _zero_dynamic(self, block: int, lo: int, hi: int) -> None:
        """Zeroes the data (partial sectors included: a clear sector holds zeros anyway)
        and clears the bits of the whole sectors, which then read as ZERO."""
        if self._bat[block] == UNALLOCATED:
            return  # reads as zeros already
        data_at, _ = self._block_data_at(block)
        bitmap = self._bitmap(block, for_update=True)
        self._zero_host(data_at + lo, hi - lo)
        if _set_bits(bitmap, -(-lo // SECTOR), hi // SECTOR, False):
            self._dirty_bitmaps.add(block)

    def _zero_differencing(self, block: int, lo: int, hi: int) -> None:
        """Whole sectors: bits set over zeroed data (a new block's data is a hole already);
        partial ones: zero bytes written over the parent's (read_parent)."""
        fresh = self._bat[block] == UNALLOCATED
        first, end = -(-lo // SECTOR), hi // SECTOR
        if first >= end:
            self._write_in_block(block, lo, memoryview(bytes(hi - lo)))
            return
        if lo % SECTOR:
            self._write_in_block(block, lo, memoryview(bytes(first * SECTOR - lo)))
        if hi % SECTOR:
            self._write_in_block(block, end * SECTOR, memoryview(bytes(hi - end * SECTOR)))
        data_at, _ = self._block_data_at(block)
        bitmap = self._bitmap(block, for_update=True)
        if not fresh:
            self._zero_host(data_at + first * SECTOR, (end - first) * SECTOR)
        if _set_bits(bitmap, first, end, True):
            self._dirty_bitmaps.add(block)

    def _zero_host(self, at: int, length: int) -> None:
        """Zeros in the file: a punched hole where the filesystem can, else written zeros."""
        if length >= PUNCH_MIN and linux.punch_hole(self.fd, at, length):
            return
        for pos in range(0, length, len(ZERO_CHUNK)):
            n = min(len(ZERO_CHUNK), length - pos)
            _pwritev_all(self.fd, [memoryview(ZERO_CHUNK)[:n]], at + pos)

    # -- metadata --------------------------------------------------------------------------------

    def _write_back(self) -> None:
        """Dirty bitmaps, then dirty BAT sectors, after a sync of the data they describe."""
        if not self._dirty_bitmaps and not self._dirty_bat:
            return
        os.fdatasync(self.fd)
        for block in sorted(self._dirty_bitmaps):
            _pwritev_all(self.fd, [self._bitmaps[block]], self._bat[block] * SECTOR)
        self._dirty_bitmaps.clear()
        sectors = sorted(self._dirty_bat)
        i = 0
        while i < len(sectors):
            j = i + 1
            while j < len(sectors) and sectors[j] == sectors[j - 1] + 1:
                j += 1
            lo, hi = sectors[i] * BAT_PER_SECTOR, sectors[j - 1] * BAT_PER_SECTOR + BAT_PER_SECTOR
            chunk = self._bat[lo:hi]
            if not _BIG_ENDIAN_HOST:
                chunk.byteswap()
            _pwritev_all(self.fd, [chunk.tobytes()], self._table_offset + 4 * lo)
            i = j
        self._dirty_bat.clear()

    def _repair(self) -> None:
        """After an unclean session: zeroes what lies under clear bits. A write whose bit
        never reached the disk left its data there, which qemu (it ignores dynamic disks'
        bitmaps) would show and this driver would not; now neither does. Holes are skipped
        with SEEK_DATA, so this reads no data."""
        spb = self._sectors_per_block
        for block in self._allocated:
            bitmap = bytearray(self._read_bitmap(block))
            if bitmap.count(0xFF) == len(bitmap):
                continue
            data_at = self._bat[block] * SECTOR + self._bitmap_size
            for first, end, bit in _bit_runs(bitmap, 0, spb):
                if not bit:
                    self._zero_data_in(data_at + first * SECTOR, data_at + end * SECTOR)

    def _zero_data_in(self, start: int, end: int) -> None:
        """Zeroes [start, end) of the file from its first byte that is not in a hole."""
        try:
            start = os.lseek(self.fd, start, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            return  # only holes from there to the end of the file
        if start < end:
            self._zero_host(start, end - start)

    def _trim(self) -> None:
        """Puts the end footer right behind the last block and cuts the file there: what a
        crash left past the BAT's blocks goes, and the reserve's hole too."""
        if self._footer_at == self._next_free:
            return
        _pwritev_all(self.fd, [self._footer_raw], self._next_free)
        os.fdatasync(self.fd)
        os.ftruncate(self.fd, self._next_free + FOOTER_SIZE)
        self._footer_at = self._next_free
        self._unsynced = True


def _allocated_indices(bat: array, count: int) -> list[int]:
    """Indices of allocated BAT entries among the first `count`, found at C speed: opening a
    100 GiB disk scans 51,200 entries, and a chain opens every layer."""
    marks = array("I")
    marks.frombytes(bat[:count].tobytes().translate(_NOT_FF))  # nonzero: allocated
    return list(itertools.compress(range(count), marks))


_NOT_FF = bytes([1] * 255 + [0])  # byte -> 0 if it is 0xFF (unallocated entries are all FF)


def _check_blocks(
    name: str,
    bat: array,
    stride: int,
    footer_at: int,
    metadata: tuple[tuple[int, int, str], ...],
) -> int:
    """Checks that every allocated block lies before the end footer, clear of the metadata
    and of every other block; returns where the last block ends (0 if none)."""
    keys = sorted((bat[index] << 32) | index for index in _allocated_indices(bat, len(bat)))
    if not keys:
        return 0
    last = keys[-1]
    last_end = (last >> 32) * SECTOR + stride
    if last_end > footer_at:
        raise FormatError(
            f"{name}: BAT entry {last & UNALLOCATED} points to a block at "
            f"{(last >> 32) * SECTOR}-{last_end}, past the end footer at {footer_at}"
        )
    check_block_placement(keys, stride, metadata, name)
    return last_end
