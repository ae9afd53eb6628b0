"""The qcow2 image driver: random-access reads and writes of one qcow2 file (formats.driver).

A VDI stored as qcow2 is a chain of files, each a layer: the service composes them
(formats.chain) and this driver opens exactly one. The backing file name is written into new
children so that qemu-img can follow the chain, but the driver never opens it: bytes of the
parent that a copy-on-write needs come from `read_parent`, which the service sets.

Structures (qemu's docs/interop/qcow2.txt): the L1 table lives in memory; L2 tables and
refcount blocks go through bounded LRU caches and are written back on `flush`, on `close`
and when the L2 cache must evict a dirty table. Refcounts are always exact (no lazy
refcounts, no dirty bit), and the order of writes makes any crash cost at most leaked
clusters, never a corrupt image:

1. data clusters are written before anything points at them (fdatasync);
2. refcount blocks (counting new clusters) before the refcount table entries and header
   fields that point at them, and all of them before the L2 tables that use the clusters;
3. L2 tables before the L1 entries that point at them;
4. a cluster that a table stops using is freed (refcount decremented, hole punched) only
   after that table is durable, and it cannot be reused before.

New clusters are taken first-fit from the refcounts, as one contiguous run per write (L2
tables a write needs are allocated before its data), so a sequentially written disk maps to
long host runs that an export can sendfile.

The header, the L1 entries and compressed clusters are parsed by the functions the
streaming decoder uses (formats.qcow2: parse_header, parse_l1, inflate_cluster), so both
refuse the same images; new images are the streaming encoder's empty layout (qcow2_layout).
"""

from __future__ import annotations

import bisect
import itertools
import os
import re
import struct
import sys
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

from formats import linux
from formats.driver import DATA, PARENT, ZERO
from formats.errors import FormatError
from formats.layout import Literal
from formats.qcow2 import (
    INCOMPAT_DIRTY,
    L2E_COMPRESSED,
    L2E_COPIED,
    L2E_STANDARD_RESERVED,
    L2E_ZERO,
    MAX_BACKING_NAME,
    OFFSET_MASK,
    RTE_RESERVED,
    SECTOR,
    V2_HEADER_LENGTH,
    check_magic,
    header_basics,
    inflate_cluster,
    parse_header,
    parse_l1,
    qcow2_layout,
)

ReadParent = Callable[[int, int], bytes]

_SWAP = sys.byteorder == "little"  # tables are big-endian on disk
_ENTRIES_PER_SECTOR = SECTOR // 8
_HEADER_AUTOCLEAR = 88  # byte offset of autoclear_features in a v3 header
_HEADER_REFCOUNT_TABLE = struct.Struct(">QI")  # refcount_table_offset, _clusters at byte 48
_HEADER_REFCOUNT_TABLE_AT = 48
_BACKING_FORMATS = ("raw", "qcow2")
# The decoder names an unaligned L1 entry by its index; the driver by the table, as it
# names every other unaligned cluster (_check_cluster).
_L1_MISALIGNED = (
    "qcow2: the L2 table of L1 entry {index} at host offset {offset:#x} is not cluster-aligned"
)

# What a run of guest clusters is in this layer (see Qcow2Image._runs).
_UNALLOCATED, _ZERO, _ZERO_ALLOCATED, _DATA, _COMPRESSED = range(5)

# 16-bit refcounts as big-endian bytes: runs of zero and of non-zero entries, pair-aligned.
_ZERO_REFCOUNTS = re.compile(rb"(?:\x00\x00)*")
_USED_REFCOUNTS = re.compile(rb"(?:\x00[^\x00]|[^\x00].)*", re.S)


def _be_table(data: bytes) -> array:
    table = array("Q")
    table.frombytes(data)
    if _SWAP:
        table.byteswap()
    return table


def _table_bytes(table: array, start: int = 0, stop: int | None = None) -> bytes:
    part = table[start:stop]
    if _SWAP:
        part.byteswap()
    return part.tobytes()


def _run_length(table: array, i: int, end: int, first: int, step: int) -> int:
    """How many entries from table[i] (which equals `first`) continue first + k * step,
    before index `end`: doubling probes then a binary search, so a run costs array
    comparisons in C rather than a Python step per entry."""
    if i + 1 >= end or table[i + 1] != first + step:
        return 1
    k = 2
    span = 2
    while i + k < end:
        span = min(span * 2, end - i - k)
        start = first + k * step
        expect = (
            array("Q", range(start, start + span * step, step))
            if step
            else array("Q", [first]) * span
        )
        if table[i + k : i + k + span] == expect:
            k += span
            continue
        good, bad = 0, span  # a prefix of `good` entries matches, one of `bad` does not
        while bad - good > 1:
            mid = (good + bad) // 2
            if table[i + k : i + k + mid] == expect[:mid]:
                good = mid
            else:
                bad = mid
        return k + good
    return k


class Qcow2Image:
    """One qcow2 file as an ImageDriver. Use `create` or `open`.

    `read_parent(offset, length)` returns the bytes of the rest of the chain; a partial
    write into a cluster this layer does not hold needs it (the service sets it on the top
    layer of a chain). `backing_file` / `backing_format` are what the header says, for
    information only: the file is never opened.

    Methods are serialized by a lock: the service may share a driver between worker threads.
    """

    l2_cache_bytes = 16 << 20
    refcount_cache_bytes = 4 << 20

    def __init__(
        self,
        path: str | os.PathLike,
        fd: int,
        *,
        writable: bool,
        read_parent: ReadParent | None = None,
    ):
        self.path = Path(path)
        self.fd = fd
        self.writable = writable
        self.read_parent = read_parent
        self._lock = threading.RLock()
        self._closed = False
        self._load_header()
        self._load_tables()
        self._l2_cache: OrderedDict[int, array] = OrderedDict()
        self._l2_dirty: set[int] = set()
        self._l2_fresh: set[int] = set()  # allocated, never written: their content is zeros
        self._l2_checked: set[int] = set()  # refcount 1 verified, may be modified
        self._l2_max = max(4, self.l2_cache_bytes // self.cluster_size)
        self._rb_cache: OrderedDict[int, bytearray] = OrderedDict()
        self._rb_dirty: set[int] = set()
        self._rb_max = max(4, self.refcount_cache_bytes // self.cluster_size)
        self._l1_dirty: set[int] = set()  # L1 indexes to write
        self._rt_dirty: set[int] = set()  # refcount table indexes to write
        self._rt_moved = False  # a new refcount table the header must point to
        self._pending_free: list[tuple[int, int]] = []  # (first cluster, count)
        self._unsynced = False  # written since the last fdatasync
        self._inflated: tuple[int, bytes] = (0, b"")
        self._hint = 0  # no free cluster below this one
        self._no_run: tuple[int, int] | None = None  # (n, end): no free run of n below end
        if writable:
            self._end = self._allocation_end()
            if self._autoclear:
                # Features this driver does not maintain (bitmaps) stop being valid once it
                # writes: the spec says a writer must clear their autoclear bits.
                self._pwrite(_HEADER_AUTOCLEAR, bytes(8))
                self._sync()

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        virtual_size: int,
        *,
        backing: str | None = None,
        backing_format: str | None = None,
        cluster_size: int = 65536,
        read_parent: ReadParent | None = None,
    ) -> Qcow2Image:
        """A new v3 image with no data clusters, opened writable. `backing` is the parent's
        file NAME in the same directory (written for qemu-img; never opened here). The file
        must not exist; it is durable when this returns (the caller syncs the directory)."""
        if backing is not None:
            name = backing.encode()
            if (
                not name
                or len(name) > MAX_BACKING_NAME
                or b"/" in name
                or b"\x00" in name
                or backing in (".", "..")
            ):
                raise ValueError(f"backing file {backing!r} is not a file name")
            if backing_format not in (None, *_BACKING_FORMATS):
                raise ValueError(f"backing format {backing_format!r} is not raw or qcow2")
        elif backing_format is not None:
            raise ValueError("a backing format without a backing file")
        image = qcow2_layout(
            virtual_size,
            [],
            cluster_size=cluster_size,
            backing=backing,
            backing_format=backing_format,
        )
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        try:
            pos = 0
            for piece in image.slice(0, image.length):
                if isinstance(piece, Literal) and piece.data.count(0) != len(piece.data):
                    _pwrite_all(fd, pos, piece.data)
                pos += piece.length
            os.ftruncate(fd, image.length)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            Path(path).unlink(missing_ok=True)
            raise
        os.close(fd)
        return cls.open(path, writable=True, read_parent=read_parent)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        writable: bool,
        read_parent: ReadParent | None = None,
    ) -> Qcow2Image:
        """Parse and validate the header and the L1 and refcount tables (FormatError if the
        file is not a qcow2 image this driver can use safely)."""
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        fd = os.open(path, flags)
        try:
            return cls(path, fd, writable=writable, read_parent=read_parent)
        except BaseException:
            os.close(fd)
            raise

    @property
    def backing_reader(self) -> ReadParent | None:
        return self.read_parent

    @backing_reader.setter
    def backing_reader(self, value: ReadParent | None) -> None:
        self.read_parent = value

    def _load_header(self) -> None:
        """parse_header validates what a streamed image needs too; the driver adds what
        writing in place needs."""
        self._file_size = os.fstat(self.fd).st_size
        head = os.pread(self.fd, V2_HEADER_LENGTH, 0)
        check_magic(head)
        if len(head) < V2_HEADER_LENGTH:
            raise FormatError(f"qcow2: the file is {len(head)} bytes, too short for a header")
        cs = header_basics(head)
        rest = os.pread(self.fd, cs - V2_HEADER_LENGTH, V2_HEADER_LENGTH)
        if len(rest) < cs - V2_HEADER_LENGTH:
            raise FormatError(
                f"qcow2: the file is {self._file_size} bytes, shorter than its first "
                f"cluster ({cs} bytes)"
            )
        header = parse_header(head + rest, self._file_size)
        if header.extended_l2:
            raise FormatError(
                "qcow2: images with extended L2 entries (subclusters) are not supported"
            )
        if self.writable:
            if header.version != 3:
                raise FormatError(
                    f"qcow2: version {header.version} images can only be opened read-only"
                )
            if header.incompatible_features & INCOMPAT_DIRTY:
                raise FormatError(
                    "qcow2: the image is dirty (lazy refcounts were not written back): repair "
                    "it with qemu-img check -r all before writing"
                )
            if header.refcount_order != 4:
                raise FormatError(
                    f"qcow2: {1 << header.refcount_order}-bit refcounts can only be read "
                    "(writing needs 16-bit refcounts)"
                )
            if header.nb_snapshots:
                raise FormatError(
                    f"qcow2: the image has {header.nb_snapshots} internal snapshots and can "
                    "only be read"
                )
        self.version = header.version
        self.cluster_size = cs
        self.cluster_bits = header.cluster_bits
        self.virtual_size = header.virtual_size
        self.backing_file = header.backing_file
        self.backing_format = header.backing_format
        self._compression_type = header.compression_type
        self._autoclear = header.autoclear_features
        self._l2_entries = header.l2_entries
        self._clusters = -(-header.virtual_size // cs)  # guest clusters of the disk
        self._l1_needed = header.l1_needed
        self._l1_size = header.l1_size
        self._l1_offset = header.l1_table_offset
        self._rt_offset = header.refcount_table_offset
        self._rt_clusters = header.refcount_table_clusters
        self._rb_entries = cs // 2  # 16-bit refcounts (only writing needs this width)
        rt_end = self._rt_offset + self._rt_clusters * cs
        if rt_end > self._file_size:
            raise FormatError(
                f"qcow2: the refcount table at host offset {self._rt_offset:#x} ends beyond "
                f"the end of the file ({self._file_size} bytes)"
            )

    def _load_tables(self) -> None:
        """L1 and refcount tables into memory; every cluster they point at must be aligned,
        inside the file and used once, and no metadata may overlap other metadata."""
        cs = self.cluster_size
        self._l1 = _be_table(self._pread(self._l1_offset, self._l1_size * 8, "the L1 table"))
        self._rt = _be_table(
            self._pread(self._rt_offset, self._rt_clusters * cs, "the refcount table")
        )
        meta: list[tuple[int, int, str]] = [(0, 1, "the header")]
        meta.append(
            (self._rt_offset // cs, self._rt_offset // cs + self._rt_clusters, "the refcount table")
        )
        if self._l1_size:
            l1_first = self._l1_offset // cs
            meta.append((l1_first, -(-(self._l1_offset + self._l1_size * 8) // cs), "the L1 table"))
        l2_tables = parse_l1(self._l1, cs, self._l1_needed, misaligned=_L1_MISALIGNED)
        for index, offset in l2_tables:
            what = f"the L2 table of L1 entry {index}"
            self._check_cluster(offset, what)
            meta.append((offset // cs, offset // cs + 1, what))
        for index, entry in enumerate(self._rt):
            if not entry:
                continue
            what = f"refcount block {index}"
            if entry & RTE_RESERVED:
                raise FormatError(f"qcow2: refcount table entry {index} ({entry:#x}) is invalid")
            self._check_cluster(entry, what)
            meta.append((entry // cs, entry // cs + 1, what))
        meta.sort(key=lambda m: (m[0], m[1]))  # stable: messages name the older first
        for (_, a1, a), (b0, _, b) in itertools.pairwise(meta):
            if b0 < a1:
                raise FormatError(f"qcow2: {a} and {b} overlap at host offset {b0 * cs:#x}")
        self._meta_starts = [m[0] for m in meta]
        self._meta_stops = [m[1] for m in meta]
        self._meta_names = [m[2] for m in meta]

    def _check_cluster(self, offset: int, what: str) -> None:
        if offset % self.cluster_size:
            raise FormatError(f"qcow2: {what} at host offset {offset:#x} is not cluster-aligned")
        if offset + self.cluster_size > self._file_size:
            raise FormatError(
                f"qcow2: {what} at host offset {offset:#x} is beyond the end of the file "
                f"({self._file_size} bytes)"
            )

    def _allocation_end(self) -> int:
        """The first cluster from which everything is free: the end of the file, or past
        clusters a crash left counted beyond it."""
        cs, per_block = self.cluster_size, self._rb_entries
        end = -(-self._file_size // cs)
        for block in range(end // per_block, len(self._rt)):
            if self._rt[block]:
                used = len(self._rb(block).rstrip(b"\x00"))
                if used:
                    end = max(end, block * per_block + (used + 1) // 2)
        return end

    # -- the ImageDriver API ---------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """This layer's bytes; what it leaves to the parent reads as zeros here."""
        with self._lock:
            self._check_range(offset, length)
            if not length:
                return b""
            cs = self.cluster_size
            end = offset + length
            runs = self._runs(offset // cs, (end - 1) // cs + 1)
            out = bytearray(length)
            view = memoryview(out)
            pending = (0, 0, 0)  # (start in out, host, length): host runs across tables
            for cluster, count, kind, value in runs:
                lo = max(offset, cluster * cs)
                hi = min(end, (cluster + count) * cs)
                if kind == _DATA:
                    host = value + lo - cluster * cs
                    if lo == offset and hi == end:
                        return self._pread(host, length, "data")
                    at, pending_host, n = pending
                    if n and at + n == lo - offset and pending_host + n == host:
                        pending = (at, pending_host, n + hi - lo)
                        continue
                    if n:
                        self._pread_into(view[at : at + n], pending_host)
                    pending = (lo - offset, host, hi - lo)
                elif kind == _COMPRESSED:
                    base = cluster * cs
                    view[lo - offset : hi - offset] = self._inflate(value, cluster)[
                        lo - base : hi - base
                    ]
            at, pending_host, n = pending
            if n:
                self._pread_into(view[at : at + n], pending_host)
            return bytes(out)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write in place where this layer holds the clusters; elsewhere allocate one
        contiguous run, filling partial clusters from the parent (read_parent), zeros or
        the inflated cluster, and point the L2 entries at it."""
        with self._lock:
            view = memoryview(data)
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
            self._check_writable()
            self._check_range(offset, len(view))
            if len(view):
                self._write(offset, view)

    def zero(self, offset: int, length: int) -> None:
        """Whole clusters become zero clusters (their host clusters are freed at the next
        write-back); partial clusters are written with zeros unless they already read as
        zero in this layer."""
        with self._lock:
            self._check_writable()
            self._check_range(offset, length)
            if not length:
                return
            cs = self.cluster_size
            end = offset + length
            first = -(-offset // cs)
            stop = -(-end // cs) if end == self.virtual_size else end // cs
            if first >= stop:
                self._zero_partial(offset, end)
                return
            self._zero_partial(offset, first * cs)
            self._zero_clusters(first, stop)
            self._zero_partial(stop * cs, end)

    def extents(self, offset: int = 0, length: int | None = None) -> list[tuple[int, int, str]]:
        """DATA (data or compressed clusters), ZERO (zero clusters; unallocated ones too if
        the image has no backing file) and PARENT runs covering the range, coalesced."""
        with self._lock:
            if length is None:
                length = self.virtual_size - offset
            self._check_range(offset, length)
            out: list[tuple[int, int, str]] = []
            if not length:
                return out
            cs = self.cluster_size
            end = offset + length
            unallocated = PARENT if self.backing_file is not None else ZERO
            kinds = {
                _UNALLOCATED: unallocated,
                _ZERO: ZERO,
                _ZERO_ALLOCATED: ZERO,
                _DATA: DATA,
                _COMPRESSED: DATA,
            }
            for cluster, count, kind, _ in self._runs(offset // cs, (end - 1) // cs + 1):
                lo = max(offset, cluster * cs)
                hi = min(end, (cluster + count) * cs)
                name = kinds[kind]
                if out and out[-1][2] == name:
                    out[-1] = (out[-1][0], hi - out[-1][0], name)
                else:
                    out.append((lo, hi - lo, name))
            return out

    def map(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(virtual offset, length, host offset) of the data runs in the range, contiguous
        host runs merged. Compressed clusters have no host range to send: they are DATA in
        `extents` but absent here (read() them)."""
        with self._lock:
            self._check_range(offset, length)
            out: list[tuple[int, int, int]] = []
            if not length:
                return out
            cs = self.cluster_size
            end = offset + length
            for cluster, count, kind, value in self._runs(offset // cs, (end - 1) // cs + 1):
                if kind != _DATA:
                    continue
                lo = max(offset, cluster * cs)
                hi = min(end, (cluster + count) * cs)
                host = value + lo - cluster * cs
                if out and out[-1][0] + out[-1][1] == lo and out[-1][2] + out[-1][1] == host:
                    out[-1] = (out[-1][0], out[-1][1] + hi - lo, out[-1][2])
                else:
                    out.append((lo, hi - lo, host))
            return out

    def flush(self) -> None:
        """Write back every dirty table, in crash-safe order, and fsync."""
        with self._lock:
            if self.writable and not self._closed:
                self._writeback(final=True)
                os.fsync(self.fd)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                self.flush()
            finally:
                self._closed = True
                os.close(self.fd)
                self.fd = -1

    def __enter__(self) -> Qcow2Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- checks ----------------------------------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if self._closed:
            raise ValueError("the image is closed")
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise ValueError(
                f"range ({offset}, {length}) is outside the {self.virtual_size}-byte disk"
            )

    def _check_writable(self) -> None:
        if not self.writable:
            raise ValueError(f"{self.path} is open read-only")

    # -- mapping ---------------------------------------------------------------------------

    def _runs(self, first: int, stop: int) -> Iterator[tuple[int, int, int, int]]:
        """(first guest cluster, count, kind, value) runs covering clusters [first, stop):
        value is the host offset of the first cluster for _DATA and _ZERO_ALLOCATED runs
        (their host clusters are consecutive), the L2 entry of a _COMPRESSED cluster (a run
        of one). Entries are validated as they are met."""
        per_table = self._l2_entries
        cluster = first
        while cluster < stop:
            index = cluster // per_table
            if not self._l1[index] & OFFSET_MASK:
                tables = 1
                if self._l1[index] == 0:
                    tables = _run_length(self._l1, index, self._l1_needed, 0, 0)
                run_stop = min(stop, (index + tables) * per_table)
                yield cluster, run_stop - cluster, _UNALLOCATED, 0
                cluster = run_stop
                continue
            table = self._l2(index)
            base = index * per_table
            i, end = cluster - base, min(stop, base + per_table) - base
            while i < end:
                entry = table[i]
                count, kind, value = self._classify(table, i, end, entry, base + i)
                yield base + i, count, kind, value
                i += count
            cluster = base + end

    def _classify(
        self, table: array, i: int, end: int, entry: int, guest_cluster: int
    ) -> tuple[int, int, int]:
        cs = self.cluster_size
        if entry == 0:
            return _run_length(table, i, end, 0, 0), _UNALLOCATED, 0
        where = f"the L2 entry for guest offset {guest_cluster * cs:#x}"
        if entry & L2E_COMPRESSED:
            host, stop = self._compressed_range(entry)
            if host >= self._file_size:
                raise FormatError(f"qcow2: {where}: compressed data beyond the end of the file")
            self._check_not_metadata(host // cs, -(-stop // cs), where)
            return 1, _COMPRESSED, entry
        if entry & L2E_STANDARD_RESERVED or (entry & L2E_ZERO and self.version < 3):
            raise FormatError(f"qcow2: {where} ({entry:#x}) has reserved bits set")
        host = entry & OFFSET_MASK
        if not host:
            if entry & L2E_ZERO:
                return _run_length(table, i, end, entry, 0), _ZERO, 0
            raise FormatError(f"qcow2: {where} maps host offset 0")
        if host % cs:
            raise FormatError(f"qcow2: {where} points to {host:#x}, not cluster-aligned")
        count = _run_length(table, i, end, entry, cs)
        needed = min(count * cs, self.virtual_size - guest_cluster * cs)
        if host + needed > self._file_size:
            raise FormatError(
                f"qcow2: {where} points to {host:#x}, beyond the end of the file "
                f"({self._file_size} bytes)"
            )
        self._check_not_metadata(host // cs, host // cs + count, where)
        return count, (_ZERO_ALLOCATED if entry & L2E_ZERO else _DATA), host

    def _compressed_range(self, entry: int) -> tuple[int, int]:
        """[host, end) of a compressed cluster's data, end at its last sector's end."""
        bits = 62 - (self.cluster_bits - 8)
        host = entry & ((1 << bits) - 1)
        sectors = (entry >> bits) & ((1 << (self.cluster_bits - 8)) - 1)
        return host, (host & ~(SECTOR - 1)) + (sectors + 1) * SECTOR

    def _inflate(self, entry: int, cluster: int) -> bytes:
        if self._inflated[0] == entry:
            return self._inflated[1]
        host, end = self._compressed_range(entry)
        data = os.pread(self.fd, min(end, self._file_size) - host, host)
        out = inflate_cluster(
            data, self.cluster_size, self._compression_type, cluster * self.cluster_size, host
        )
        self._inflated = (entry, out)
        return out

    def _meta_overlap(self, first: int, stop: int) -> str | None:
        """The metadata among host clusters [first, stop), if any."""
        k = max(0, bisect.bisect_right(self._meta_starts, first) - 1)
        while k < len(self._meta_starts) and self._meta_starts[k] < stop:
            if self._meta_stops[k] > first:
                return self._meta_names[k]
            k += 1
        return None

    def _check_not_metadata(self, first: int, stop: int, where: str) -> None:
        name = self._meta_overlap(first, stop)
        if name is not None:
            raise FormatError(
                f"qcow2: {where} points into {name} (host offset {first * self.cluster_size:#x})"
            )

    def _add_meta(self, first: int, stop: int, name: str) -> None:
        k = bisect.bisect_left(self._meta_starts, first)
        self._meta_starts.insert(k, first)
        self._meta_stops.insert(k, stop)
        self._meta_names.insert(k, name)

    # -- L2 tables -------------------------------------------------------------------------

    def _l2(self, index: int) -> array:
        """The L2 table of an L1 entry that points to one (cached, LRU)."""
        table = self._l2_cache.get(index)
        if table is not None:
            self._l2_cache.move_to_end(index)
            return table
        if index in self._l2_fresh:
            table = array("Q", bytes(self.cluster_size))
            self._l2_fresh.discard(index)
            self._l2_dirty.add(index)
        else:
            offset = self._l1[index] & OFFSET_MASK
            table = _be_table(
                self._pread(offset, self.cluster_size, f"the L2 table of L1 entry {index}")
            )
        self._l2_cache[index] = table
        while len(self._l2_cache) > self._l2_max:
            victim = next(iter(self._l2_cache))
            if victim in self._l2_dirty:
                self._writeback(final=False)
            del self._l2_cache[victim]
        return table

    def _l2_for_write(self, index: int) -> array:
        if index not in self._l2_checked:
            offset = self._l1[index] & OFFSET_MASK
            self._check_refcounts_one(offset // self.cluster_size, 1, f"L2 table {index}")
            self._l2_checked.add(index)
        return self._l2(index)

    def _ensure_tables(self, first: int, stop: int) -> None:
        """L2 tables for guest clusters [first, stop), allocated together before any data."""
        per_table = self._l2_entries
        missing = [
            index
            for index in range(first // per_table, (stop - 1) // per_table + 1)
            if not self._l1[index] & OFFSET_MASK
        ]
        if not missing:
            return
        host = self._allocate(len(missing))
        for k, index in enumerate(missing):
            cluster = host + k
            self._l1[index] = cluster * self.cluster_size | L2E_COPIED
            self._l1_dirty.add(index)
            self._l2_fresh.add(index)
            self._l2_checked.add(index)
            self._add_meta(cluster, cluster + 1, f"the L2 table of L1 entry {index}")

    def _set_entries(self, cluster: int, entries: array) -> None:
        index, i = divmod(cluster, self._l2_entries)
        table = self._l2_for_write(index)
        table[i : i + len(entries)] = entries
        self._l2_dirty.add(index)

    # -- writing ---------------------------------------------------------------------------

    def _write(self, offset: int, view: memoryview) -> None:
        cs = self.cluster_size
        end = offset + len(view)
        first, stop = offset // cs, (end - 1) // cs + 1
        # Whole-cluster contents the partial clusters start from, before anything changes:
        # if the parent cannot be read, the image is left as it was.
        bases: dict[int, bytes] = {}
        for cluster in {first, stop - 1}:
            lo, hi = max(offset, cluster * cs), min(end, (cluster + 1) * cs)
            if lo == cluster * cs and (hi == (cluster + 1) * cs or hi >= self.virtual_size):
                continue
            _, _, kind, value = next(self._runs(cluster, cluster + 1))
            if kind != _DATA:
                bases[cluster] = self._base(cluster, kind, value)
        self._ensure_tables(first, stop)
        runs = list(self._runs(first, stop))
        needed = sum(
            count for _, count, kind, _ in runs if kind in (_UNALLOCATED, _ZERO, _COMPRESSED)
        )
        host = self._allocate(needed) * cs if needed else 0
        unlinked = needed
        try:
            for cluster, count, kind, value in runs:
                lo = max(offset, cluster * cs)
                hi = min(end, (cluster + count) * cs)
                part = view[lo - offset : hi - offset]
                if kind == _DATA:
                    self._check_refcounts_one(value // cs, count, "a data cluster")
                    self._pwrite(value + lo - cluster * cs, part)
                    continue
                if kind == _ZERO_ALLOCATED:
                    self._check_refcounts_one(value // cs, count, "a zero cluster")
                target = value if kind == _ZERO_ALLOCATED else host
                pieces: list[bytes | memoryview] = []
                head = lo - cluster * cs
                if head:
                    pieces.append(bases[cluster][:head])
                pieces.append(part)
                last = cluster + count - 1
                tail = (last + 1) * cs - hi
                if tail:
                    pieces.append(bases[last][cs - tail :] if last in bases else bytes(tail))
                self._pwrite(target, *pieces)
                self._set_entries(
                    cluster,
                    array("Q", range(target | L2E_COPIED, (target + count * cs) | L2E_COPIED, cs)),
                )
                if kind == _COMPRESSED:
                    self._free_compressed(value)
                if kind != _ZERO_ALLOCATED:
                    host += count * cs
                    unlinked -= count
        finally:
            if unlinked:  # an error left allocated clusters unused: nothing points at them
                self._release(host // cs, unlinked)

    def _base(self, cluster: int, kind: int, value: int) -> bytes:
        """The whole current content of a cluster a partial write allocates."""
        cs = self.cluster_size
        if kind == _COMPRESSED:
            return self._inflate(value, cluster)
        if kind != _UNALLOCATED or self.backing_file is None:
            return bytes(cs)
        if self.read_parent is None:
            raise ValueError(
                f"a partial write at guest offset {cluster * cs:#x} needs the parent's data: "
                "read_parent is not set"
            )
        offset = cluster * cs
        length = min(cs, self.virtual_size - offset)
        data = self.read_parent(offset, length)
        if len(data) != length:
            raise ValueError(f"read_parent returned {len(data)} bytes, not {length}")
        return bytes(data) + bytes(cs - length)

    def _zero_partial(self, start: int, end: int) -> None:
        """Zeros written into parts of clusters that do not read as zero already."""
        cs = self.cluster_size
        while start < end:
            stop = min(end, (start // cs + 1) * cs)
            cluster = start // cs
            _, _, kind, _ = next(self._runs(cluster, cluster + 1))
            reads_zero = kind in (_ZERO, _ZERO_ALLOCATED) or (
                kind == _UNALLOCATED and self.backing_file is None
            )
            if not reads_zero:
                self._write(start, memoryview(bytes(stop - start)))
            start = stop

    def _zero_clusters(self, first: int, stop: int) -> None:
        layered = self.backing_file is not None
        if layered:
            self._ensure_tables(first, stop)
        zeros = array("Q", [L2E_ZERO])
        per_table = self._l2_entries
        cluster = first
        while cluster < stop:  # one table at a time: its runs, then its changes
            table_stop = min(stop, (cluster // per_table + 1) * per_table)
            for run_first, count, kind, value in list(self._runs(cluster, table_stop)):
                if kind == _ZERO or (kind == _UNALLOCATED and not layered):
                    continue
                self._set_entries(run_first, zeros * count)
                if kind in (_DATA, _ZERO_ALLOCATED):
                    self._pending_free.append((value // self.cluster_size, count))
                elif kind == _COMPRESSED:
                    self._free_compressed(value)
            cluster = table_stop

    def _free_compressed(self, entry: int) -> None:
        host, end = self._compressed_range(entry)
        cs = self.cluster_size
        self._pending_free.append((host // cs, (end - 1) // cs - host // cs + 1))

    # -- refcounts and allocation ----------------------------------------------------------

    def _rb(self, block: int) -> bytearray:
        """Refcount block `block` (which the refcount table has), as big-endian bytes."""
        data = self._rb_cache.get(block)
        if data is not None:
            self._rb_cache.move_to_end(block)
            return data
        data = bytearray(self._pread(self._rt[block], self.cluster_size, f"refcount block {block}"))
        self._rb_cache[block] = data
        while len(self._rb_cache) > self._rb_max:
            victim, victim_data = next(iter(self._rb_cache.items()))
            if victim in self._rb_dirty:
                # Increments, or decrements already safe: any block may be written any time.
                self._pwrite(self._rt[victim], victim_data)
                self._rb_dirty.discard(victim)
            del self._rb_cache[victim]
        return data

    def _refcount_slices(self, first: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """(block, lo, hi): entry ranges of refcount blocks covering clusters [first, stop)."""
        per_block = self._rb_entries
        cluster = first
        while cluster < stop:
            block = cluster // per_block
            hi = min(stop, (block + 1) * per_block)
            yield block, cluster - block * per_block, hi - block * per_block
            cluster = hi

    def _check_refcounts_one(self, first: int, count: int, what: str) -> None:
        """A cluster written in place must be this image's alone (refcount 1)."""
        for block, lo, hi in self._refcount_slices(first, first + count):
            ok = (
                block < len(self._rt)
                and self._rt[block]
                and self._rb(block)[2 * lo : 2 * hi] == b"\x00\x01" * (hi - lo)
            )
            if not ok:
                raise FormatError(
                    f"qcow2: {what} near host offset {first * self.cluster_size:#x} does not "
                    "have a refcount of 1: the image is damaged"
                )

    def _allocate(self, count: int) -> int:
        """`count` contiguous free clusters, counted (in memory) from now on."""
        start, tail = self._find_free(count)
        name = self._meta_overlap(start, min(start + count, self._end))
        if name is not None:
            raise FormatError(
                f"qcow2: the refcounts say host offset {start * self.cluster_size:#x} is free "
                f"but {name} is there: the image is damaged"
            )
        stop = start + count
        if stop > self._end:
            self._extend(start, stop)
        else:
            self._count(start, stop)
        if tail:
            self._no_run = (count, self._end)
        return start

    def _find_free(self, count: int) -> tuple[int, bool]:
        """First fit from the hint: (start, False) for a free run of `count` below the
        allocation end, else (start, True) for the free clusters that end the file and go
        on past it. Clusters without a refcount block below the end are treated as used."""
        per_block = self._rb_entries
        end = self._end
        cluster = self._hint
        if self._no_run is not None and count >= self._no_run[0]:
            cluster = max(cluster, self._no_run[1])
        skipped = cluster > self._hint  # holes may remain below: the hint stays
        run_start: int | None = None
        first_free: int | None = None
        while cluster < end:
            block = cluster // per_block
            base = block * per_block
            if block >= len(self._rt) or not self._rt[block]:
                run_start = None
                cluster = base + per_block
                continue
            data = self._rb(block)
            limit = min(per_block, end - base)
            i = cluster - base
            while i < limit:
                if run_start is None:
                    i = _USED_REFCOUNTS.match(data, 2 * i, 2 * limit).end() // 2
                    if i >= limit:
                        break
                    run_start = base + i
                    if first_free is None:
                        first_free = run_start
                i = _ZERO_REFCOUNTS.match(data, 2 * i, 2 * limit).end() // 2
                if base + i - run_start >= count:
                    if not skipped:
                        self._update_hint(first_free, run_start, count)
                    return run_start, False
                if i < limit:
                    run_start = None
            cluster = base + limit
        start = run_start if run_start is not None else end
        if not skipped:
            self._update_hint(first_free, start, count)
        return start, True

    def _update_hint(self, first_free: int | None, start: int, count: int) -> None:
        """Everything from the old hint to the first free cluster seen is used; if that
        cluster starts the run being allocated, everything up to the run's end is."""
        if first_free is not None and first_free < start:
            self._hint = first_free
        else:
            self._hint = start + count

    def _count(self, first: int, stop: int) -> None:
        """Refcounts of free clusters [first, stop) become 1 (their blocks exist)."""
        for block, lo, hi in self._refcount_slices(first, stop):
            data = self._rb(block)
            if _ZERO_REFCOUNTS.match(data, 2 * lo, 2 * hi).end() != 2 * hi:
                raise FormatError(
                    f"qcow2: refcount block {block} counts clusters the allocator found free"
                )
            data[2 * lo : 2 * hi] = b"\x00\x01" * (hi - lo)
            self._rb_dirty.add(block)

    def _extend(self, start: int, stop: int) -> None:
        """Allocate [start, stop) past the end of the allocated area, with the refcount
        blocks it lacks (and a larger refcount table if it is full) right after it. Those
        count themselves, so their number is found as a fixed point."""
        cs, per_block = self.cluster_size, self._rb_entries
        blocks: list[int] = []
        table_clusters = 0
        while True:
            meta_stop = stop + len(blocks) + table_clusters
            missing = [
                b
                for b in range(start // per_block, (meta_stop - 1) // per_block + 1)
                if b >= len(self._rt) or not self._rt[b]
            ]
            grow = 0
            if missing and missing[-1] >= len(self._rt):
                entries = max(missing[-1] + 1, 2 * len(self._rt))
                grow = -(-entries * 8 // cs)
            if len(missing) == len(blocks) and grow <= table_clusters:
                break
            blocks, table_clusters = missing, max(grow, table_clusters)
        new_end = stop + len(blocks) + table_clusters
        if new_end * cs > self._file_size:
            self._truncate(new_end * cs)  # counted clusters always lie inside the file
        self._end = new_end
        if table_clusters:
            table = array("Q", self._rt)
            table.frombytes(bytes(table_clusters * cs - len(table) * 8))
            old = (self._rt_offset // cs, self._rt_clusters)
            k = bisect.bisect_left(self._meta_starts, old[0])
            del self._meta_starts[k], self._meta_stops[k], self._meta_names[k]
            self._pending_free.append(old)  # once the header points at the new table
            self._rt = table
            self._rt_offset = (stop + len(blocks)) * cs
            self._rt_clusters = table_clusters
            self._rt_moved = True
            self._add_meta(stop + len(blocks), new_end, "the refcount table")
        for k, block in enumerate(blocks):
            cluster = stop + k
            self._rt[block] = cluster * cs
            self._rt_dirty.add(block)
            self._rb_cache[block] = bytearray(cs)
            self._rb_dirty.add(block)
            self._add_meta(cluster, cluster + 1, f"refcount block {block}")
        self._count(start, new_end)

    def _release(self, first: int, count: int) -> None:
        """Clusters allocated this session that nothing ever pointed at: free at once."""
        self._decrement(first, first + count)

    def _decrement(self, first: int, stop: int) -> list[tuple[int, int]]:
        """Refcounts of [first, stop) minus one; returns the ranges that became free."""
        freed: list[tuple[int, int]] = []
        for block, lo, hi in self._refcount_slices(first, stop):
            if block >= len(self._rt) or not self._rt[block]:
                raise FormatError(f"qcow2: freeing clusters refcount block {block} does not count")
            data = self._rb(block)
            base = block * self._rb_entries
            if data[2 * lo : 2 * hi] == b"\x00\x01" * (hi - lo):
                data[2 * lo : 2 * hi] = bytes(2 * (hi - lo))
                freed.append((base + lo, base + hi))
            else:
                for i in range(lo, hi):
                    value = int.from_bytes(data[2 * i : 2 * i + 2], "big")
                    if not value:
                        raise FormatError(
                            f"qcow2: the refcount of host cluster {base + i} would drop below 0"
                        )
                    data[2 * i : 2 * i + 2] = (value - 1).to_bytes(2, "big")
                    if value == 1:
                        freed.append((base + i, base + i + 1))
            self._rb_dirty.add(block)
        if freed:
            self._hint = min(self._hint, freed[0][0])
            self._no_run = None
        return freed

    # -- write-back ------------------------------------------------------------------------

    def _writeback(self, *, final: bool) -> None:
        """Dirty metadata to disk in an order that a crash at any point leaves consistent
        (at worst leaking clusters). An eviction (not final) writes L2 tables but neither
        fresh zero tables nor the L1 table, which can wait for the flush."""
        if not (
            self._rb_dirty
            or self._rt_dirty
            or self._rt_moved
            or self._l2_dirty
            or self._pending_free
            or (final and (self._l2_fresh or self._l1_dirty))
        ):
            self._sync()
            return
        cs = self.cluster_size
        self._sync()  # 1. data, before the tables that point at it
        for block in sorted(self._rb_dirty):  # 2. refcounts of new clusters
            self._pwrite(self._rt[block], self._rb_cache[block])
        self._rb_dirty.clear()
        if self._rt_moved or self._rt_dirty:
            self._sync()  # blocks before the table entries that point at them
            if self._rt_moved:
                self._pwrite(self._rt_offset, _table_bytes(self._rt))
                self._sync()  # the table before the header that points at it
                header = _HEADER_REFCOUNT_TABLE.pack(self._rt_offset, self._rt_clusters)
                self._pwrite(_HEADER_REFCOUNT_TABLE_AT, header)
                self._rt_moved = False
            else:
                self._write_sectors(self._rt_offset, self._rt, self._rt_dirty)
            self._rt_dirty.clear()
        self._sync()  # 3. every cluster counted before a table uses it
        if final:
            for index in sorted(self._l2_fresh):
                self._pwrite(self._l1[index] & OFFSET_MASK, bytes(cs))
            self._l2_fresh.clear()
        for index in sorted(self._l2_dirty):
            self._pwrite(self._l1[index] & OFFSET_MASK, _table_bytes(self._l2_cache[index]))
        self._l2_dirty.clear()
        if final and self._l1_dirty:
            self._sync()  # 4. L2 tables before the L1 entries that point at them
            self._write_sectors(self._l1_offset, self._l1, self._l1_dirty)
            self._l1_dirty.clear()
        self._sync()
        if self._pending_free:  # 5. what no durable table uses any more
            pending, self._pending_free = self._pending_free, []
            freed: list[tuple[int, int]] = []
            for first, count in pending:
                freed += self._decrement(first, first + count)
            for block in sorted(self._rb_dirty):
                self._pwrite(self._rt[block], self._rb_cache[block])
            self._rb_dirty.clear()
            self._punch(freed)
            self._sync()

    def _write_sectors(self, offset: int, table: array, indexes: set[int]) -> None:
        """The 512-byte sectors of a table holding the given entries."""
        sectors = sorted({i // _ENTRIES_PER_SECTOR for i in indexes})
        k = 0
        while k < len(sectors):
            j = k
            while j + 1 < len(sectors) and sectors[j + 1] == sectors[j] + 1:
                j += 1
            lo = sectors[k] * _ENTRIES_PER_SECTOR
            hi = min(len(table), (sectors[j] + 1) * _ENTRIES_PER_SECTOR)
            self._pwrite(offset + lo * 8, _table_bytes(table, lo, hi))
            k = j + 1

    def _punch(self, freed: list[tuple[int, int]]) -> None:
        """Give freed clusters' space back to the filesystem (best effort)."""
        cs = self.cluster_size
        merged: list[list[int]] = []
        for first, stop in sorted(freed):
            if merged and merged[-1][1] == first:
                merged[-1][1] = stop
            else:
                merged.append([first, stop])
        for first, stop in merged:
            try:
                linux.punch_hole(self.fd, first * cs, (stop - first) * cs)
            except OSError:
                return

    # -- file I/O --------------------------------------------------------------------------

    def _sync(self) -> None:
        """A write barrier: what was written before is durable before what follows."""
        if self._unsynced:
            os.fdatasync(self.fd)
            self._unsynced = False

    def _truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        self._file_size = size
        self._unsynced = True

    def _pwrite(self, offset: int, *pieces: bytes | bytearray | memoryview) -> None:
        _pwrite_all(self.fd, offset, *pieces)
        self._unsynced = True

    def _pread(self, offset: int, length: int, what: str) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) < length:
            raise FormatError(
                f"qcow2: {what} at host offset {offset:#x} ends beyond the end of the file"
            )
        return data

    def _pread_into(self, view: memoryview, offset: int) -> None:
        while len(view):
            n = os.preadv(self.fd, [view], offset)
            if n <= 0:
                raise FormatError(f"qcow2: data at host offset {offset:#x} is beyond the end")
            view, offset = view[n:], offset + n


def _pwrite_all(fd: int, offset: int, *pieces: bytes | bytearray | memoryview) -> None:
    total = sum(len(p) for p in pieces)
    written = os.pwritev(fd, list(pieces), offset)
    if written < total:  # short write: finish piece by piece
        data = memoryview(b"".join(pieces))[written:]
        offset += written
        while len(data):
            n = os.pwrite(fd, data, offset)
            data, offset = data[n:], offset + n
