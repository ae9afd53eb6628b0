"""QCOW2 images (versions 2 and 3): a forward-only streaming decoder and an encoder.

The decoder reads a qcow2 file as it is uploaded, front to back, once. qemu does not write
metadata first: L2 tables are interleaved with data, the L1 table can sit at the end (after
`qemu-img resize`), refcount structures move when they grow. So every host byte is, at the
moment it streams past, either *claimed* -- its role is known because the header or an
already parsed table points at it -- or *unknown*. Claimed bytes are handled on the spot
(tables parsed, data written to the disk); unknown bytes go to the `Spill`, and come back
from it when a table parsed later claims them. A byte can be claimed once: that is what stops
an image from mapping one host cluster into several guest clusters or data onto metadata.
(Compressed clusters are the exception qcow2 itself makes: one may start in the last sector
of another.) Once the L1 table is parsed and no L2 table is still to come, nothing can claim
bytes behind the stream any more, and unknown bytes are dropped rather than spilled.

Memory: pending claims are arrays, at most one 24-byte claim per L2 entry (runs of
consecutive clusters share one), bounded by the rest of the stream when its length is known;
the spill is recorded as one bit per cluster; output that comes back from the spill or must
be inflated is produced only as the caller iterates the events.

The encoder (`qcow2_layout`) describes a v3 image as an `OutputLayout`: header, refcount
table, refcount blocks, L1, L2 tables, then the data clusters in guest order. Tables are
computed when their bytes are asked for, so a 2 TiB disk costs memory in proportion to its
number of extents, not its size.

`parse_header`, `parse_l1` and `inflate_cluster` serve the decoder and the random-access
driver (formats.qcow2_image) alike, so that both accept and refuse the same images.

Reference: qemu's docs/interop/qcow2.txt.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import struct
import sys
import zlib
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import zstandard

from formats import layout
from formats.errors import FormatError
from formats.events import Event, Header, Write, Zero
from formats.layout import Data, Literal, Piece
from formats.spill import Spill

MAGIC = b"QFI\xfb"
HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # the 72 bytes every version has
HEADER_V3 = struct.Struct(">QQQII")  # features, refcount_order, header_length: to byte 104
EXTENSION = struct.Struct(">II")
V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTENDED_L2 = 1 << 4
INCOMPAT_KNOWN = 0x1F
COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21  # qemu's limit: 2 MiB clusters
EXTENDED_L2_MIN_CLUSTER_BITS = 14
MAX_L1_BYTES = 32 << 20  # qemu's limits, so nothing qemu opens is refused here
MAX_REFCOUNT_TABLE_BYTES = 8 << 20
MAX_VIRTUAL_SIZE = 1 << 56  # L2 entries cannot address more host bytes than that anyway
MAX_HOST_OFFSET = 1 << 56  # nor can any table point further
MAX_BACKING_NAME = 1023
SECTOR = 512

OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # bits 9-55: host offset of an L2 table or cluster
L1E_RESERVED = 0x7F00_0000_0000_01FF
L2E_COPIED = 1 << 63
L2E_COMPRESSED = 1 << 62
L2E_ZERO = 1
L2E_STANDARD_RESERVED = 0x3F00_0000_0000_01FE
RTE_RESERVED = 0x1FF
SUBCLUSTERS = 32
ALL_SUBCLUSTERS = (1 << SUBCLUSTERS) - 1

_SWAP = sys.byteorder == "little"  # tables are big-endian
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_SPILL_READ = 4 << 20  # spilled data comes back in Writes of at most this many bytes

# What a claim on host bytes is for. Batches of the DATA kind carry their own per-claim
# kind in the tag: >= 0 data for that guest offset, IGNORED, or compressed (see _compressed_tag).
_L1, _REFCOUNT_TABLE, _L2_TABLES, _REFCOUNT_BLOCKS, _DATA = range(5)
IGNORED = -1  # owned by the image (preallocation, unused table) but not read


def _compressed_tag(guest: int) -> int:
    return -2 - guest


def _be_u64_array(data: bytes | bytearray | memoryview) -> array:
    table = array("Q")
    table.frombytes(data)
    if _SWAP:
        table.byteswap()
    return table


def _describe(kind: int, tag: int) -> str:
    if kind == _L1:
        return "the L1 table"
    if kind == _REFCOUNT_TABLE:
        return "the refcount table"
    if kind == _REFCOUNT_BLOCKS:
        return "a refcount block"
    if kind == _L2_TABLES:
        return f"the L2 table of L1 entry {tag}" if tag >= 0 else "an L2 table beyond the disk"
    if tag >= 0:
        return f"the data cluster for guest offset {tag:#x}"
    if tag == IGNORED:
        return "a preallocated cluster"
    return f"the compressed cluster for guest offset {-2 - tag:#x}"


# -- header and L1 table: one parser for the decoder and the driver (formats.qcow2_image) ---


@dataclass(frozen=True, slots=True)
class Qcow2Header:
    """Cluster 0 of an image, validated by `parse_header` (v3 fields are their v2 meaning
    in a version 2 image: no features, 16-bit refcounts, zlib)."""

    version: int
    cluster_bits: int
    cluster_size: int
    virtual_size: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int
    compatible_features: int
    autoclear_features: int
    refcount_order: int
    header_length: int
    compression_type: int
    extended_l2: bool
    l2_entries: int  # entries in an L2 table: extended entries take 16 bytes, others 8
    l1_needed: int  # L1 entries the virtual size reaches; those past it map nothing read
    backing_file: str | None  # informational: never opened
    backing_format: str | None


def check_magic(head: bytes | bytearray) -> None:
    """FormatError unless `head`, the first bytes of a file, can start a qcow2 image: a
    stream is refused as soon as 4 bytes have arrived."""
    if len(head) >= 4 and head[:4] != MAGIC:
        raise FormatError(f"qcow2: bad magic {bytes(head[:4])!r}, not a qcow2 image")


def header_basics(head: bytes | bytearray) -> int:
    """The cluster size, from the first 72 bytes (magic, version and cluster_bits checked):
    how many bytes `parse_header` needs."""
    check_magic(head)
    _, version, _, _, cluster_bits = struct.unpack_from(">4sIQII", head)
    if version not in (2, 3):
        raise FormatError(f"qcow2: unsupported version {version} (2 and 3 are)")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise FormatError(
            f"qcow2: cluster_bits {cluster_bits} is outside {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}"
        )
    return 1 << cluster_bits


def parse_header(buf: bytes | bytearray, stream_length: int | None = None) -> Qcow2Header:
    """Validate cluster 0 (`buf` holds at least the `header_basics` cluster size): fields,
    extensions and backing file name, so that the decoder and the driver refuse the same
    images with the same messages. `stream_length`, if known, refuses an L1 table past it."""
    cs = header_basics(buf)
    if len(buf) < cs:
        raise ValueError(f"parse_header needs the whole {cs}-byte first cluster")
    (
        _,
        version,
        backing_offset,
        backing_size,
        cluster_bits,
        size,
        crypt_method,
        l1_size,
        l1_offset,
        rt_offset,
        rt_clusters,
        nb_snapshots,
        snapshots_offset,
    ) = HEADER_V2.unpack_from(buf)
    incompatible = compatible = autoclear = 0
    header_length = V2_HEADER_LENGTH
    refcount_order = 4
    compression_type = COMPRESSION_ZLIB
    if version == 3:
        incompatible, compatible, autoclear, refcount_order, header_length = HEADER_V3.unpack_from(
            buf, V2_HEADER_LENGTH
        )
        if header_length < V3_MIN_HEADER_LENGTH or header_length % 8 or header_length > cs:
            raise FormatError(
                f"qcow2: header_length {header_length} is invalid (a multiple of 8, "
                f"at least {V3_MIN_HEADER_LENGTH}, within the {cs}-byte first cluster)"
            )
        if header_length > V3_MIN_HEADER_LENGTH:
            compression_type = buf[V3_MIN_HEADER_LENGTH]
    if crypt_method:
        raise FormatError(
            f"qcow2: encrypted images are not supported (crypt_method {crypt_method})"
        )
    if incompatible & INCOMPAT_CORRUPT:
        raise FormatError("qcow2: the image is marked corrupt (incompatible feature bit 1)")
    if incompatible & INCOMPAT_DATA_FILE:
        raise FormatError(
            "qcow2: images with an external data file are not supported "
            "(incompatible feature bit 2)"
        )
    if incompatible & ~INCOMPAT_KNOWN:
        raise FormatError(
            f"qcow2: unknown incompatible features {incompatible & ~INCOMPAT_KNOWN:#x}"
        )
    if bool(incompatible & INCOMPAT_COMPRESSION) != (compression_type != COMPRESSION_ZLIB):
        raise FormatError(
            f"qcow2: compression_type {compression_type} contradicts incompatible feature bit 3"
        )
    if compression_type not in (COMPRESSION_ZLIB, COMPRESSION_ZSTD):
        raise FormatError(f"qcow2: unknown compression_type {compression_type}")
    extended_l2 = bool(incompatible & INCOMPAT_EXTENDED_L2)
    if extended_l2 and cluster_bits < EXTENDED_L2_MIN_CLUSTER_BITS:
        raise FormatError(
            f"qcow2: extended L2 entries need clusters of at least 16 KiB, not {cs} bytes"
        )
    if refcount_order > 6:
        raise FormatError(f"qcow2: refcount_order {refcount_order} is above 6")
    if size > MAX_VIRTUAL_SIZE:
        raise FormatError(f"qcow2: virtual size {size} is absurd (limit {MAX_VIRTUAL_SIZE})")
    l2_entries = cs // (16 if extended_l2 else 8)
    span = cs * l2_entries
    l1_needed = (size + span - 1) // span

    l1_bytes = l1_size * 8
    if l1_bytes > MAX_L1_BYTES:
        raise FormatError(
            f"qcow2: L1 table of {l1_size} entries ({l1_bytes} bytes) exceeds the "
            f"{MAX_L1_BYTES >> 20} MiB limit"
        )
    if l1_size < l1_needed:
        raise FormatError(
            f"qcow2: L1 table of {l1_size} entries is too small for the virtual size "
            f"{size} ({l1_needed} needed)"
        )
    rt_bytes = rt_clusters * cs
    if rt_bytes > MAX_REFCOUNT_TABLE_BYTES:
        raise FormatError(
            f"qcow2: refcount table of {rt_clusters} clusters ({rt_bytes} bytes) exceeds "
            f"the {MAX_REFCOUNT_TABLE_BYTES >> 20} MiB limit"
        )
    if rt_clusters == 0:
        raise FormatError("qcow2: the image has no refcount table")
    for name, offset in (("L1 table", l1_offset), ("refcount table", rt_offset)):
        if offset % cs:
            raise FormatError(f"qcow2: {name} offset {offset:#x} is not cluster-aligned")
        if offset >= MAX_HOST_OFFSET:
            raise FormatError(f"qcow2: {name} offset {offset:#x} is beyond 64 PiB")
    if nb_snapshots and snapshots_offset % cs:
        raise FormatError(
            f"qcow2: snapshot table offset {snapshots_offset:#x} is not cluster-aligned"
        )
    l1_end = l1_offset + l1_bytes
    l1_cluster_end = -(-l1_end // cs) * cs
    rt_end = rt_offset + rt_bytes
    if rt_offset < cs:
        raise FormatError("qcow2: the refcount table overlaps the header")
    if l1_size and l1_offset < cs:
        raise FormatError("qcow2: the L1 table overlaps the header")
    if l1_size and l1_offset < rt_end and rt_offset < l1_cluster_end:
        raise FormatError("qcow2: the L1 table overlaps the refcount table")
    if stream_length is not None and l1_end > stream_length:
        raise FormatError(
            f"qcow2: the L1 table at host offset {l1_offset:#x} is beyond the end of the "
            f"image ({stream_length} bytes)"
        )

    backing_format = _backing_format(buf, header_length, backing_offset, cs)
    backing_file = None
    if backing_offset and backing_size:
        if backing_size > MAX_BACKING_NAME:
            raise FormatError(f"qcow2: backing file name of {backing_size} bytes is too long")
        if backing_offset < header_length or backing_offset + backing_size > cs:
            raise FormatError(
                f"qcow2: backing file name at {backing_offset:#x} is outside the first cluster"
            )
        name = buf[backing_offset : backing_offset + backing_size]
        backing_file = name.decode("utf-8", "replace")
    return Qcow2Header(
        version=version,
        cluster_bits=cluster_bits,
        cluster_size=cs,
        virtual_size=size,
        l1_size=l1_size,
        l1_table_offset=l1_offset,
        refcount_table_offset=rt_offset,
        refcount_table_clusters=rt_clusters,
        nb_snapshots=nb_snapshots,
        snapshots_offset=snapshots_offset,
        incompatible_features=incompatible,
        compatible_features=compatible,
        autoclear_features=autoclear,
        refcount_order=refcount_order,
        header_length=header_length,
        compression_type=compression_type,
        extended_l2=extended_l2,
        l2_entries=l2_entries,
        l1_needed=l1_needed,
        backing_file=backing_file,
        backing_format=backing_format,
    )


def _backing_format(
    buf: bytes | bytearray, start: int, backing_offset: int, cluster_size: int
) -> str | None:
    """The backing format extension's value, if any, after checking that every header
    extension up to the end marker fits before the backing file name."""
    end = min(backing_offset if backing_offset else cluster_size, cluster_size)
    backing_format = None
    pos = start
    while pos + EXTENSION.size <= end:
        kind, length = EXTENSION.unpack_from(buf, pos)
        if kind == EXT_END:
            break
        data_start = pos + EXTENSION.size
        if data_start + length > end:
            raise FormatError(
                f"qcow2: header extension {kind:#x} of {length} bytes runs past the end "
                f"of the header area ({end} bytes)"
            )
        if kind == EXT_BACKING_FORMAT:
            backing_format = buf[data_start : data_start + length].decode("utf-8", "replace")
        pos = data_start + (length + 7) // 8 * 8
    return backing_format


L1_MISALIGNED = "qcow2: L1 entry {index} points to {offset:#x}, not cluster-aligned"


def parse_l1(
    table: array, cluster_size: int, stop: int | None = None, *, misaligned: str = L1_MISALIGNED
) -> Iterator[tuple[int, int]]:
    """(L1 index, host offset) of each L2 table an L1 table (host-order entries) maps,
    among its first `stop` entries. FormatError for reserved bits or an unaligned offset
    (`misaligned` is the message, formatted with index and offset). Zero entries are
    skipped in C and a good entry costs one test; lazy, so that a caller's own checks of
    an entry come before those of the next entry."""
    bad = L1E_RESERVED | ((cluster_size - 1) & OFFSET_MASK)
    for index, entry in itertools.compress(enumerate(table), itertools.islice(table, stop)):
        if entry & bad:
            if entry & L1E_RESERVED:
                raise FormatError(f"qcow2: L1 entry {index} ({entry:#x}) has reserved bits set")
            raise FormatError(misaligned.format(index=index, offset=entry & OFFSET_MASK))
        offset = entry & OFFSET_MASK
        if offset:
            yield index, offset


def inflate_cluster(
    data: bytes | memoryview, cluster_size: int, compression_type: int, guest: int, host: int
) -> bytes:
    """One compressed cluster: exactly cluster_size bytes, or the image is refused (so a
    small stream cannot inflate into more than the disk it describes)."""
    cs = cluster_size
    where = f"the compressed cluster for guest offset {guest:#x} at host offset {host:#x}"
    try:
        if compression_type == COMPRESSION_ZLIB:
            out = zlib.decompressobj(-15).decompress(data, cs + 1)
        else:
            out = _zstd_inflate(bytes(data), cs + 1)
    except (zlib.error, zstandard.ZstdError, ValueError) as exc:
        raise FormatError(f"qcow2: {where} does not decompress: {exc}") from None
    if len(out) > cs:
        raise FormatError(f"qcow2: {where} decompresses to more than a cluster ({cs} bytes)")
    if len(out) < cs:
        raise FormatError(
            f"qcow2: {where} decompresses to {len(out)} bytes, not a cluster ({cs} bytes)"
        )
    return out


# -- decoder -------------------------------------------------------------------------------


class _Batch:
    """Claims one table made on bytes still to come, sorted by host offset. Parallel arrays
    keep the pending map of a fragmented disk at 24 bytes a claim (runs of consecutive
    clusters are one claim, a table entry is at most one), not a dict entry per cluster.
    `masks` holds the allocated subclusters of extended L2 entries, if any is partial."""

    __slots__ = ("ends", "kind", "masks", "next", "starts", "tags")

    def __init__(
        self,
        kind: int,
        starts: list[int],
        ends: list[int],
        tags: list[int],
        masks: list[int] | None = None,
    ):
        self.kind = kind
        self.starts = array("q", starts)
        self.ends = array("q", ends)
        self.tags = array("q", tags)
        partial = masks is not None and any(m != ALL_SUBCLUSTERS for m in masks)
        self.masks = array("q", masks) if partial else None  # type: ignore[arg-type]
        self.next = 0


class _Claim:
    """The exclusive claim the stream is inside of; buf collects a table split across feeds."""

    __slots__ = ("buf", "end", "kind", "mask", "start", "tag")

    def __init__(self, kind: int, start: int, end: int, tag: int, mask: int = ALL_SUBCLUSTERS):
        self.kind, self.start, self.end, self.tag, self.mask = kind, start, end, tag, mask
        self.buf: bytearray | memoryview | None = None


class _Compressed:
    """A compressed cluster being received. Several may be open at once: the last sector
    of one may hold the start of the next."""

    __slots__ = ("end", "guest", "parts", "start")

    def __init__(self, start: int, end: int, guest: int):
        self.start, self.end, self.guest = start, end, guest
        self.parts: list[memoryview] = []


class _FromSpill(NamedTuple):
    """Output to produce lazily: `out_length` bytes of spilled data at `host` go to `guest`."""

    guest: int
    host: int
    out_length: int
    claim_length: int


class _Inflate(NamedTuple):
    """Output to produce lazily: a compressed cluster, from `data` or (None) the spill."""

    guest: int
    host: int
    data: bytes | memoryview | None
    length: int


class _SpillMap:
    """Which stream bytes are in the spill: a bitmap of whole clusters (one bit per cluster
    of the stream, so 2 MiB a TiB at 64 KiB clusters) and, for the few clusters spilled in
    part (around compressed data, or cut by the end of the stream), intervals."""

    def __init__(self, cluster_bits: int):
        self.bits = bytearray()
        self.partial: dict[int, list[list[int]]] = {}
        self.cluster_bits = cluster_bits

    def _bit(self, cluster: int) -> bool:
        byte = cluster >> 3
        return byte < len(self.bits) and bool(self.bits[byte] >> (cluster & 7) & 1)

    def _set_bits(self, first: int, stop: int, value: bool) -> None:
        if stop > len(self.bits) * 8:
            self.bits.extend(bytes((stop + 7) // 8 - len(self.bits)))
        cluster = first
        while cluster < stop:
            if cluster & 7 == 0 and cluster + 8 <= stop:
                whole = (stop - cluster) >> 3
                byte = cluster >> 3
                self.bits[byte : byte + whole] = (b"\xff" if value else b"\x00") * whole
                cluster += whole * 8
                continue
            if value:
                self.bits[cluster >> 3] |= 1 << (cluster & 7)
            else:
                self.bits[cluster >> 3] &= ~(1 << (cluster & 7)) & 0xFF
            cluster += 1

    def _pieces(self, start: int, end: int) -> Iterator[tuple[int, int, int, bool]]:
        """(cluster, lo, hi, whole) for each cluster [start, end) touches."""
        bits = self.cluster_bits
        size = 1 << bits
        for cluster in range(start >> bits, ((end - 1) >> bits) + 1):
            base = cluster << bits
            lo, hi = max(start, base), min(end, base + size)
            yield cluster, lo, hi, lo == base and hi == base + size

    def add(self, start: int, end: int) -> None:
        bits = self.cluster_bits
        first_whole = (start + (1 << bits) - 1) >> bits
        stop_whole = end >> bits
        if first_whole < stop_whole:
            self._set_bits(first_whole, stop_whole, True)
            # Clusters now whole keep no partial intervals: a stale one would outlive the
            # bit when the cluster is removed, and still claim to cover its bytes.
            for cluster in [c for c in self.partial if first_whole <= c < stop_whole]:
                del self.partial[cluster]
        edges = {start >> bits, (end - 1) >> bits}  # only these can be partly covered
        for cluster in sorted(edges):
            base = cluster << bits
            lo, hi = max(start, base), min(end, base + (1 << bits))
            if lo == base and hi == base + (1 << bits):
                continue
            intervals = self.partial.setdefault(cluster, [])
            intervals.append([lo, hi])
            intervals.sort()
            merged = [intervals[0]]
            for a, b in intervals[1:]:
                if a <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], b)
                else:
                    merged.append([a, b])
            base = cluster << bits
            if merged == [[base, base + (1 << bits)]]:
                del self.partial[cluster]
                self._set_bits(cluster, cluster + 1, True)
            else:
                self.partial[cluster] = merged

    def covers(self, start: int, end: int) -> bool:
        for cluster, lo, hi, _ in self._pieces(start, end):
            if self._bit(cluster):
                continue
            if not any(a <= lo and hi <= b for a, b in self.partial.get(cluster, ())):
                return False
        return True

    def remove(self, start: int, end: int) -> None:
        """Forget [start, end), which `covers`."""
        size = 1 << self.cluster_bits
        for cluster, lo, hi, whole in self._pieces(start, end):
            if self._bit(cluster):
                self._set_bits(cluster, cluster + 1, False)
                self.partial.pop(cluster, None)
                if not whole:
                    base = cluster << self.cluster_bits
                    rest = [[a, b] for a, b in ((base, lo), (hi, base + size)) if a < b]
                    self.partial[cluster] = rest
                continue
            remaining = []
            for a, b in self.partial.pop(cluster, []):
                if a < lo:
                    remaining.append([a, min(b, lo)])
                if b > hi:
                    remaining.append([max(a, hi), b])
            if remaining:
                self.partial[cluster] = remaining


class Qcow2Decoder:
    """Sans-I/O decoder of a qcow2 upload. `feed` and `finish` return the events their bytes
    complete, as an iterator: spilled data and compressed clusters are read and inflated
    only as the caller iterates, so one call never holds more than a few MiB of output even
    when the L1 table at the end of the image releases everything spilled before it. All
    validation happens in the calls themselves; iterating can still raise FormatError for a
    compressed cluster that does not inflate to exactly one cluster. Writes may be
    memoryviews of the fed buffer: use them before changing that buffer.

    `spill` keeps bytes that arrive before the table mapping them (without one, such an
    image is refused when the mapping arrives). `stream_length`, if known, rejects pointers
    past the end of the upload early. `max_spill` bounds the bytes held in the spill.

    Internal snapshots and stored bitmaps are ignored: the active L1 table is decoded. The
    backing file name is recorded (`backing_file`) and only makes the image a delta; it is
    never opened.
    """

    def __init__(
        self,
        spill: Spill | None = None,
        stream_length: int | None = None,
        max_spill: int | None = None,
    ):
        self._spill = spill
        self._stream_length = stream_length
        self._max_spill = max_spill
        self._header = bytearray()
        self._header_done = False
        self._pos = 0
        self._out: list = []
        self._heap: list[tuple[int, int, _Batch]] = []
        self._seq = itertools.count()
        self._cur: _Claim | None = None
        self._last_owner = "the header"
        self._active: list[_Compressed] = []
        self._spilled: _SpillMap | None = None
        self._compressed_spilled: set[int] = set()  # spilled clusters compressed data reads
        self._finished = False
        # Once the L1 table is parsed and no L2 table is still to come, nothing can claim
        # bytes behind the stream any more: unknown bytes are dropped instead of spilled.
        self._l1_parsed = False
        self._tables_pending = 0
        self._claims_pending = 0  # exclusive claims from tables, waiting in the heap
        self.spill_used = 0
        self.spill_peak = 0
        # Set by the header:
        self.version = 0
        self.cluster_bits = 0
        self.cluster_size = 0
        self.virtual_size = 0
        self.backing_file: str | None = None
        self.backing_format: str | None = None
        self.compression_type = COMPRESSION_ZLIB
        self.extended_l2 = False
        self.nb_snapshots = 0
        self._l2_entries = 0
        self._l1_needed = 0
        self._static: list[tuple[int, int, str]] = []

    # -- public API ------------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[Event]:
        if self._finished:
            raise FormatError("qcow2: data fed after the end of the stream")
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if self._stream_length is not None and self._pos + len(view) > self._stream_length:
            raise FormatError(
                f"qcow2: more than the announced {self._stream_length} bytes were uploaded"
            )
        if not self._header_done:
            view = self._feed_header(view)
        if len(view):
            self._consume(view)
        return self._take_output()

    def finish(self) -> Iterator[Event]:
        """The stream ended: everything the active tables map must have arrived."""
        self._finished = True
        if not self._header_done:
            raise FormatError(
                f"qcow2: the image is truncated in its header ({self._pos} bytes arrived)"
            )
        eof = self._pos
        if self._stream_length is not None and eof != self._stream_length:
            raise FormatError(
                f"qcow2: the image is truncated: {eof} of {self._stream_length} bytes arrived"
            )
        cur = self._cur
        if cur is not None and self._missing(cur.kind, cur.tag, cur.mask, eof - cur.start):
            raise FormatError(
                f"qcow2: {_describe(cur.kind, cur.tag)} at host offset {cur.start:#x} ends "
                f"beyond the end of the image ({eof} bytes): it is truncated"
            )
        for comp in self._active:
            self._out.append(
                _Inflate(comp.guest, comp.start, b"".join(comp.parts), eof - comp.start)
            )
        self._active = []
        for _, _, batch in self._heap:
            for k in range(batch.next, len(batch.starts)):
                if batch.starts[k] < eof:  # the stream passed it: something else had it
                    raise FormatError(
                        f"qcow2: host offset {batch.starts[k]:#x} is used twice: by "
                        f"{_describe(batch.kind, batch.tags[k])} and by {self._last_owner}"
                    )
                if self._missing(batch.kind, batch.tags[k], 0, 0):
                    raise FormatError(
                        f"qcow2: {_describe(batch.kind, batch.tags[k])} at host offset "
                        f"{batch.starts[k]:#x} is beyond the end of the image ({eof} bytes)"
                    )
        self._heap = []
        return self._take_output()

    # -- header ----------------------------------------------------------------------------

    def _feed_header(self, view: memoryview) -> memoryview:
        """Collect cluster 0 (header, extensions, backing file name); return what follows."""
        buf = self._header
        need = self.cluster_size or V2_HEADER_LENGTH
        take = min(need - len(buf), len(view))
        buf += view[:take]
        self._pos += take
        view = view[take:]
        check_magic(buf)
        if not self.cluster_size and len(buf) >= V2_HEADER_LENGTH:
            self.cluster_size = header_basics(buf)
            take = min(self.cluster_size - len(buf), len(view))
            buf += view[:take]
            self._pos += take
            view = view[take:]
        if self.cluster_size and len(buf) == self.cluster_size:
            self._parse_header(bytes(buf))
            self._header = bytearray()
            self._header_done = True
        return view

    def _parse_header(self, buf: bytes) -> None:
        """The header (checked by parse_header) and the claims of the tables it points to."""
        header = parse_header(buf, self._stream_length)
        cs = header.cluster_size
        self.version = header.version
        self.cluster_bits = header.cluster_bits
        self.virtual_size = header.virtual_size
        self.compression_type = header.compression_type
        self.extended_l2 = header.extended_l2
        self.nb_snapshots = header.nb_snapshots
        self.backing_file = header.backing_file
        self.backing_format = header.backing_format
        self._l2_entries = header.l2_entries
        self._l1_needed = header.l1_needed
        l1_offset, l1_size = header.l1_table_offset, header.l1_size
        rt_offset = header.refcount_table_offset
        l1_end = l1_offset + l1_size * 8
        l1_cluster_end = -(-l1_end // cs) * cs
        rt_end = rt_offset + header.refcount_table_clusters * cs
        self._static = [(0, cs, "header"), (rt_offset, rt_end, "refcount table")]
        if l1_size:
            self._static.append((l1_offset, l1_cluster_end, "L1 table"))

        self._spilled = _SpillMap(header.cluster_bits)
        self._out.append(
            Header(virtual_size=header.virtual_size, whole_image=self.backing_file is None)
        )
        if l1_size:
            starts, ends, tags = [l1_offset], [l1_end], [0]
            if l1_cluster_end > l1_end:  # the rest of the last L1 cluster is padding
                starts.append(l1_end)
                ends.append(l1_cluster_end)
                tags.append(IGNORED)
            self._push(_Batch(_L1, starts, ends, tags))
        else:
            self._l1_parsed = True
        self._push(_Batch(_REFCOUNT_TABLE, [rt_offset], [rt_end], [0]))

    # -- claims ----------------------------------------------------------------------------

    def _push(self, batch: _Batch) -> None:
        if len(batch.starts):
            heapq.heappush(self._heap, (batch.starts[0], next(self._seq), batch))

    @staticmethod
    def _needs_content(kind: int, tag: int) -> bool:
        """Whether decoding needs these bytes (refcounts and preallocation it does not)."""
        if kind == _L1:
            return tag >= 0
        if kind in (_L2_TABLES, _DATA):
            return tag != IGNORED
        return False

    def _missing(self, kind: int, tag: int, mask: int, arrived: int) -> bool:
        """Whether a claim of which only `arrived` bytes came lacks bytes decoding needs."""
        if not self._needs_content(kind, tag):
            return False
        if kind != _DATA or tag < 0 or mask == ALL_SUBCLUSTERS or not arrived:
            return True
        sub = self.cluster_size // SUBCLUSTERS
        return any(hi * sub > arrived for _, hi in _bit_runs(mask))

    def _check_static(self, start: int, end: int, what: str) -> None:
        for lo, hi, name in self._static:
            if start < hi and lo < end:
                raise FormatError(f"qcow2: {what} at host offset {start:#x} points into the {name}")

    def _check_in_stream(self, start: int, end: int, what: str) -> None:
        if self._stream_length is not None and end > self._stream_length:
            raise FormatError(
                f"qcow2: {what} at host offset {start:#x} is beyond the end of the image "
                f"({self._stream_length} bytes)"
            )

    def _take_spilled(self, start: int, end: int, what: str) -> None:
        """Claim bytes that already streamed past: they must be in the spill, unclaimed."""
        spilled = self._spilled
        assert spilled is not None
        if not spilled.covers(start, end) or any(
            cluster in self._compressed_spilled
            for cluster in range(start >> self.cluster_bits, ((end - 1) >> self.cluster_bits) + 1)
        ):
            raise self._unavailable(start, what)
        spilled.remove(start, end)
        self.spill_used -= end - start

    def _unavailable(self, start: int, what: str) -> FormatError:
        if self._spill is None:
            return FormatError(
                f"qcow2: {what} at host offset {start:#x} arrived before the table that maps "
                "it; decoding this image needs a spill store"
            )
        return FormatError(
            f"qcow2: host offset {start:#x} is used twice: {what} overlaps data or metadata "
            "the image already used"
        )

    def _add_claims(
        self,
        kind: int,
        starts: list[int],
        ends: list[int],
        tags: list[int],
        masks: list[int] | None = None,
    ) -> None:
        """Claims from a table just parsed: those behind the stream are taken from the
        spill now, the others wait in the heap."""
        if masks is None:
            masks = [ALL_SUBCLUSTERS] * len(starts)
        if any(starts[k] > starts[k + 1] for k in range(len(starts) - 1)):
            order = sorted(range(len(starts)), key=starts.__getitem__)
            starts = [starts[k] for k in order]
            ends = [ends[k] for k in order]
            tags = [tags[k] for k in order]
            masks = [masks[k] for k in order]
        split = bisect.bisect_left(starts, self._pos)
        for k in range(split):
            self._claim_past(kind, starts[k], ends[k], tags[k], masks[k])
        length = self._stream_length
        # Past a known end only claims that need no content remain (the others were
        # refused): they will never be met, so they are not kept.
        stop = len(starts) if length is None else bisect.bisect_left(starts, length)
        if split >= stop:
            return
        starts, ends, tags, masks = starts[:stop], ends[:stop], tags[:stop], masks[:stop]
        if kind == _L2_TABLES:
            self._tables_pending += sum(1 for tag in tags[split:] if tag >= 0)
        self._claims_pending += sum(1 for tag in tags[split:] if kind != _DATA or tag > -2)
        if length is not None:
            # Every exclusive claim is at least a cluster of its own: more than the rest of
            # the stream can hold means clusters used twice (and would only cost memory).
            room = (length - self._pos) // self.cluster_size + 2
            if self._claims_pending > room:
                raise FormatError(
                    f"qcow2: the tables map {self._claims_pending} clusters still to come but "
                    f"only {room} fit in the rest of the image: host clusters are used twice"
                )
        self._push(_Batch(kind, starts[split:], ends[split:], tags[split:], masks[split:]))

    def _claim_past(
        self, kind: int, start: int, end: int, tag: int, mask: int = ALL_SUBCLUSTERS
    ) -> None:
        what = _describe(kind, tag)
        if end > self._pos:
            raise FormatError(
                f"qcow2: host offset {start:#x} is used twice: {what} overlaps {self._last_owner}"
            )
        if kind == _DATA and tag <= -2:
            if not self._spilled.covers(start, end):  # type: ignore[union-attr]
                raise self._unavailable(start, what)
            bits = self.cluster_bits
            self._compressed_spilled.update(range(start >> bits, ((end - 1) >> bits) + 1))
            self._out.append(_Inflate(-2 - tag, start, None, end - start))
            return
        if not self._needs_content(kind, tag):
            # Refcount blocks and preallocated space: free their spilled bytes if they were
            # kept; they may rightly have been dropped (see _unknown).
            spilled = self._spilled
            if self._spill is not None and spilled is not None and spilled.covers(start, end):
                self._take_spilled(start, end, what)
                self._spill.discard(start, end - start)
            return
        if kind == _DATA and mask != ALL_SUBCLUSTERS:
            sub = self.cluster_size // SUBCLUSTERS
            edge = 0
            for lo, hi in _bit_runs(mask):
                if lo > edge:
                    self._claim_past(kind, start + edge * sub, start + lo * sub, IGNORED)
                self._claim_past(kind, start + lo * sub, start + hi * sub, tag + lo * sub)
                edge = hi
            if edge < SUBCLUSTERS:
                self._claim_past(kind, start + edge * sub, end, IGNORED)
            return
        self._take_spilled(start, end, what)
        assert self._spill is not None
        if kind == _L2_TABLES:
            table = self._spill.read(start, end - start)
            self._spill.discard(start, end - start)
            self._parse_l2(table, tag)
        else:
            out_length = max(0, min(end - start, self.virtual_size - tag))
            self._out.append(_FromSpill(tag, start, out_length, end - start))

    def _admit(self, pos: int) -> _Claim | None:
        """Open the claims starting at `pos`; return the exclusive one, if any."""
        heap = self._heap
        while heap and heap[0][0] <= pos:
            start, seq, batch = heap[0]
            k = batch.next
            end, tag, kind = batch.ends[k], batch.tags[k], batch.kind
            mask = batch.masks[k] if batch.masks is not None else ALL_SUBCLUSTERS
            batch.next = k + 1
            if batch.next < len(batch.starts):
                heapq.heapreplace(heap, (batch.starts[k + 1], seq, batch))
            else:
                heapq.heappop(heap)
            if kind == _L2_TABLES and tag >= 0:
                self._tables_pending -= 1
            if kind not in (_L1, _REFCOUNT_TABLE) and (kind != _DATA or tag > -2):
                self._claims_pending -= 1
            what = _describe(kind, tag)
            if start < pos:
                raise FormatError(
                    f"qcow2: host offset {start:#x} is used twice: by {what} and by "
                    f"{self._last_owner}"
                )
            if kind == _DATA and tag <= -2:
                for other in self._active:
                    if start < other.end - SECTOR or start == other.start:
                        raise FormatError(
                            f"qcow2: host offset {start:#x} is used twice: {what} overlaps "
                            f"{_describe(_DATA, _compressed_tag(other.guest))}"
                        )
                if self._stream_length is not None:
                    end = min(end, self._stream_length)
                self._active.append(_Compressed(start, end, -2 - tag))
                continue
            if self._active:
                raise FormatError(
                    f"qcow2: host offset {start:#x} is used twice: {what} overlaps "
                    f"{_describe(_DATA, _compressed_tag(self._active[0].guest))}"
                )
            self._last_owner = f"{what} at host offset {start:#x}"
            return _Claim(kind, start, end, tag, mask)
        return None

    # -- the stream ------------------------------------------------------------------------

    def _consume(self, view: memoryview) -> None:
        out = self._out
        vsize = self.virtual_size
        i, n = 0, len(view)
        # The Write last appended, to extend it when the next claim continues it.
        merge_index, merge_i0, merge_i1, merge_guest0, merge_guest1 = -2, 0, 0, 0, 0
        while i < n:
            pos = self._pos
            cur = self._cur
            if cur is None:
                cur = self._cur = self._admit(pos)
            if cur is not None:
                take = min(n - i, cur.end - pos)
                kind = cur.kind
                if kind == _DATA and cur.mask != ALL_SUBCLUSTERS and cur.tag >= 0:
                    self._write_subclusters(cur, pos, view[i : i + take])
                elif kind == _DATA:
                    guest = cur.tag + pos - cur.start
                    if cur.tag >= 0 and guest < vsize:
                        length = min(take, vsize - guest)
                        if merge_index == len(out) - 1 and merge_i1 == i and merge_guest1 == guest:
                            out[-1] = Write(merge_guest0, view[merge_i0 : i + length])
                        else:
                            out.append(Write(guest, view[i : i + length]))
                            merge_index, merge_i0, merge_guest0 = len(out) - 1, i, guest
                        merge_i1, merge_guest1 = i + length, guest + length
                elif kind != _REFCOUNT_BLOCKS and cur.tag != IGNORED:
                    if cur.buf is None and take == cur.end - cur.start:
                        cur.buf = view[i : i + take]
                    elif cur.buf is None:
                        cur.buf = bytearray(view[i : i + take])
                    else:
                        cur.buf += view[i : i + take]  # type: ignore[operator]
                i += take
                self._pos = pos + take
                if self._pos == cur.end:
                    self._cur = None
                    self._complete(cur)
                continue
            stop = pos + n - i
            if self._heap and self._heap[0][0] < stop:
                stop = self._heap[0][0]
            active = self._active
            for comp in active:
                if comp.end < stop:
                    stop = comp.end
            segment = view[i : i + stop - pos]
            if active:
                for comp in active:
                    comp.parts.append(segment)
            else:
                self._unknown(pos, segment)
            i += stop - pos
            self._pos = stop
            if active:
                for comp in [c for c in active if c.end == stop]:
                    self._close_compressed(comp)
        for comp in self._active:  # the caller may reuse its buffer for the next feed
            comp.parts = [memoryview(b"".join(comp.parts))]

    def _write_subclusters(self, claim: _Claim, pos: int, segment: memoryview) -> None:
        """The allocated subclusters of an extended L2 cluster, of the part that arrived."""
        sub = self.cluster_size // SUBCLUSTERS
        rel = pos - claim.start
        for lo, hi in _bit_runs(claim.mask):
            a, b = max(lo * sub, rel), min(hi * sub, rel + len(segment))
            guest = claim.tag + a
            b = min(b, a + self.virtual_size - guest)
            if a < b:
                self._out.append(Write(guest, segment[a - rel : b - rel]))

    def _unknown(self, pos: int, segment: memoryview) -> None:
        """Bytes no table has claimed yet: keep them for a table that comes later."""
        if self._spill is None or (self._l1_parsed and not self._tables_pending):
            return
        self._spill.write(pos, segment)
        self._spilled.add(pos, pos + len(segment))  # type: ignore[union-attr]
        self.spill_used += len(segment)
        self.spill_peak = max(self.spill_peak, self.spill_used)
        if self._max_spill is not None and self.spill_used > self._max_spill:
            raise FormatError(
                f"qcow2: more than {self._max_spill} bytes of the image arrived before the "
                "tables that map them"
            )

    def _close_compressed(self, comp: _Compressed) -> None:
        self._active.remove(comp)
        data = comp.parts[0] if len(comp.parts) == 1 else b"".join(comp.parts)
        self._out.append(_Inflate(comp.guest, comp.start, data, comp.end - comp.start))
        # The final sector may hold the start of a compressed cluster mapped by a table
        # still to come: keep it, unless a known cluster starts there.
        slack = max(comp.start, comp.end - SECTOR)
        successor = min((c.start for c in self._active if c.start > comp.start), default=comp.end)
        slack_end = min(comp.end, successor)
        if self._spill is not None and slack < slack_end:
            self._unknown(slack, memoryview(data)[slack - comp.start : slack_end - comp.start])

    def _complete(self, claim: _Claim) -> None:
        data = claim.buf
        if data is None:
            return
        if claim.kind == _L1:
            self._parse_l1(data)
        elif claim.kind == _REFCOUNT_TABLE:
            self._parse_refcount_table(data)
        elif claim.kind == _L2_TABLES:
            self._parse_l2(data, claim.tag)

    # -- tables ----------------------------------------------------------------------------

    def _parse_refcount_table(self, data: bytes | bytearray | memoryview) -> None:
        cs = self.cluster_size
        starts: list[int] = []
        for entry in _be_u64_array(data):
            if not entry:
                continue
            if entry & RTE_RESERVED or entry % cs or entry >= MAX_HOST_OFFSET:
                raise FormatError(f"qcow2: refcount table entry {entry:#x} is not a cluster offset")
            self._check_static(entry, entry + cs, "a refcount block")
            starts.append(entry)
        self._add_claims(
            _REFCOUNT_BLOCKS, starts, [s + cs for s in starts], [IGNORED] * len(starts)
        )

    def _parse_l1(self, data: bytes | bytearray | memoryview) -> None:
        cs = self.cluster_size
        starts: list[int] = []
        tags: list[int] = []
        for index, offset in parse_l1(_be_u64_array(data), cs):
            tag = index if index < self._l1_needed else IGNORED
            what = _describe(_L2_TABLES, tag)
            self._check_static(offset, offset + cs, what)
            if tag != IGNORED:
                self._check_in_stream(offset, offset + cs, what)
            starts.append(offset)
            tags.append(tag)
        self._add_claims(_L2_TABLES, starts, [s + cs for s in starts], tags)
        self._l1_parsed = True

    def _parse_l2(self, data: bytes | bytearray | memoryview, l1_index: int) -> None:
        """Turn one L2 table into claims on host bytes (runs of consecutive clusters merged)
        and, in a delta, Zero events for clusters that read as zeros."""
        cs = self.cluster_size
        vsize = self.virtual_size
        delta = self.backing_file is not None
        table = _be_u64_array(data)
        guest_base = l1_index * self._l2_entries * cs
        extended = self.extended_l2
        step = 2 if extended else 1
        sub = cs // SUBCLUSTERS
        comp_bits = 62 - (self.cluster_bits - 8)
        comp_offset_mask = (1 << comp_bits) - 1
        comp_sectors_mask = (1 << (self.cluster_bits - 8)) - 1
        starts: list[int] = []
        ends: list[int] = []
        tags: list[int] = []
        masks: list[int] = []
        zero_start = zero_end = -1

        def zero(guest: int, length: int) -> None:
            nonlocal zero_start, zero_end
            if not delta or guest >= vsize:
                return
            length = min(length, vsize - guest)
            if guest == zero_end:
                zero_end += length
                return
            if zero_end > zero_start:
                self._out.append(Zero(zero_start, zero_end - zero_start))
            zero_start, zero_end = guest, guest + length

        def claim(start: int, end: int, tag: int, mask: int = ALL_SUBCLUSTERS) -> None:
            if (
                tag >= 0
                and mask == ALL_SUBCLUSTERS
                and starts
                and ends[-1] == start
                and tags[-1] >= 0
                and masks[-1] == ALL_SUBCLUSTERS
                and tags[-1] + (start - starts[-1]) == tag
            ):
                ends[-1] = end
                return
            starts.append(start)
            ends.append(end)
            tags.append(tag)
            masks.append(mask)

        for index in range(0, len(table), step):
            entry = table[index]
            bitmap = table[index + 1] if extended else 0
            if not entry and not bitmap:
                continue
            guest = guest_base + (index // step) * cs
            where = f"L2 entry for guest offset {guest:#x}"
            if entry & L2E_COMPRESSED:
                if bitmap:
                    raise FormatError(f"qcow2: {where}: compressed with a subcluster bitmap")
                host = entry & comp_offset_mask
                if host >> 56:
                    raise FormatError(f"qcow2: {where}: compressed data offset {host:#x} too large")
                sectors = (entry >> comp_bits) & comp_sectors_mask
                end = (host & ~(SECTOR - 1)) + (sectors + 1) * SECTOR
                what = _describe(_DATA, _compressed_tag(guest))
                self._check_static(host, end, what)
                if self._stream_length is not None and host >= self._stream_length:
                    self._check_in_stream(host, end, what)
                if guest < vsize:
                    claim(host, end, _compressed_tag(guest))
                continue
            if entry & L2E_STANDARD_RESERVED or (
                entry & L2E_ZERO and (extended or self.version < 3)
            ):
                raise FormatError(f"qcow2: {where} ({entry:#x}) has reserved bits set")
            host = entry & OFFSET_MASK
            if host % cs:
                raise FormatError(f"qcow2: {where} points to {host:#x}, not cluster-aligned")
            data_tag = guest if guest < vsize else IGNORED
            if not extended:
                if entry & L2E_ZERO:
                    zero(guest, cs)
                    if host:
                        claim(host, host + cs, IGNORED)
                elif host:
                    claim(host, host + cs, data_tag)
                elif entry & L2E_COPIED:
                    raise FormatError(f"qcow2: {where} maps host offset 0")
                continue
            allocated = bitmap & ALL_SUBCLUSTERS
            zeros = bitmap >> SUBCLUSTERS
            if allocated & zeros:
                raise FormatError(f"qcow2: {where}: subclusters both allocated and zero")
            if allocated and not host:
                raise FormatError(f"qcow2: {where}: allocated subclusters without a host cluster")
            for lo, hi in _bit_runs(zeros):
                zero(guest + lo * sub, (hi - lo) * sub)
            if host:
                # One claim for the whole cluster, whatever its subclusters: a table entry
                # never costs more than one pending claim.
                tag = data_tag if allocated else IGNORED
                claim(host, host + cs, tag, allocated if tag >= 0 else ALL_SUBCLUSTERS)
        if zero_end > zero_start:
            self._out.append(Zero(zero_start, zero_end - zero_start))
        for start, end, tag, mask in zip(starts, ends, tags, masks, strict=True):
            if tag > -2:
                what = _describe(_DATA, tag)
                self._check_static(start, end, what)
                if tag >= 0:  # an extended cluster may end after its last allocated subcluster
                    last = _bit_runs(mask)[-1][1] if mask != ALL_SUBCLUSTERS else SUBCLUSTERS
                    self._check_in_stream(start, start + last * sub, what)
        self._add_claims(_DATA, starts, ends, tags, masks)

    # -- output ----------------------------------------------------------------------------

    def _take_output(self) -> Iterator[Event]:
        out, self._out = self._out, []
        return self._render(out)

    def _render(self, items: list) -> Iterator[Event]:
        for item in items:
            cls = type(item)
            if cls is _FromSpill:
                spill = self._spill
                assert spill is not None
                done = 0
                while done < item.out_length:
                    n = min(_SPILL_READ, item.out_length - done)
                    yield Write(item.guest + done, spill.read(item.host + done, n))
                    spill.discard(item.host + done, n)
                    done += n
                if item.claim_length > done:
                    spill.discard(item.host + done, item.claim_length - done)
            elif cls is _Inflate:
                data = item.data
                if data is None:
                    assert self._spill is not None
                    data = self._spill.read(item.host, item.length)
                cluster = inflate_cluster(
                    data, self.cluster_size, self.compression_type, item.guest, item.host
                )
                yield Write(item.guest, cluster[: self.virtual_size - item.guest])
            else:
                yield item


def _bit_runs(mask: int) -> list[tuple[int, int]]:
    """[lo, hi) runs of set bits in a 32-bit subcluster mask."""
    runs = []
    bit = 0
    while mask >> bit:
        if mask >> bit & 1:
            hi = bit
            while mask >> hi & 1:
                hi += 1
            runs.append((bit, hi))
            bit = hi
        else:
            bit += 1
    return runs


def _zstd_frame_length(data: bytes) -> int:
    """The length of the zstd frame `data` starts with: qemu's sector-granular descriptor
    includes bytes after it, which the decompressor must not read as another frame."""
    if data[:4] != _ZSTD_MAGIC:
        raise ValueError("not a zstd frame")
    params = zstandard.get_frame_parameters(data)
    pos = zstandard.frame_header_size(data)
    while True:
        if pos + 3 > len(data):
            raise ValueError("truncated zstd frame")
        block = int.from_bytes(data[pos : pos + 3], "little")
        block_type, block_size = (block >> 1) & 3, block >> 3
        if block_type == 3:
            raise ValueError("reserved zstd block type")
        pos += 3 + (1 if block_type == 1 else block_size)
        if block & 1:
            break
    pos += 4 if params.has_checksum else 0
    if pos > len(data):
        raise ValueError("truncated zstd frame")
    return pos


def _zstd_inflate(data: bytes, limit: int) -> bytes:
    frame = data[: _zstd_frame_length(data)]
    decompressor = zstandard.ZstdDecompressor(max_window_size=1 << 23)
    reader = decompressor.stream_reader(frame, read_across_frames=False)
    out = bytearray()
    while len(out) < limit:
        piece = reader.read(limit - len(out))
        if not piece:
            break
        out += piece
    return bytes(out)


# -- encoder -------------------------------------------------------------------------------


def _cluster_ranges(extents: list[tuple[int, int]], cs: int) -> list[tuple[int, int]]:
    """Sorted, merged [first, stop) cluster ranges that byte extents touch."""
    ranges: list[tuple[int, int]] = []
    for offset, length in sorted(extents):
        if length <= 0:
            continue
        first, stop = offset // cs, -(-(offset + length) // cs)
        if ranges and first <= ranges[-1][1]:
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], stop))
        else:
            ranges.append((first, stop))
    return ranges


def _merged(extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted byte extents with overlapping or adjacent ones joined."""
    out: list[tuple[int, int]] = []
    for offset, length in sorted(extents):
        if length <= 0:
            continue
        if out and offset <= out[-1][0] + out[-1][1]:
            start = out[-1][0]
            out[-1] = (start, max(out[-1][1], offset + length - start))
        else:
            out.append((offset, length))
    return out


def _covered_clusters(
    extents: list[tuple[int, int]], cs: int, virtual_size: int
) -> list[tuple[int, int]]:
    """Sorted, merged cluster ranges that byte extents cover entirely (to the disk's end)."""
    ranges: list[tuple[int, int]] = []
    for offset, length in _merged(extents):
        end = offset + length
        first = -(-offset // cs)
        stop = -(-end // cs) if end >= virtual_size else end // cs
        if first >= stop:
            continue
        if ranges and first <= ranges[-1][1]:
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], stop))
        else:
            ranges.append((first, stop))
    return ranges


def _subtract(ranges: list[tuple[int, int]], minus: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    k = 0
    for first, stop in ranges:
        while k < len(minus) and minus[k][1] <= first:
            k += 1
        j = k
        while first < stop:
            if j < len(minus) and minus[j][0] < stop:
                if minus[j][0] > first:
                    out.append((first, minus[j][0]))
                first = max(first, minus[j][1])
                j += 1
            else:
                out.append((first, stop))
                break
    return out


def _check_extents(extents: list[tuple[int, int]], virtual_size: int, name: str) -> None:
    for offset, length in extents:
        if offset < 0 or length < 0 or offset + length > virtual_size:
            raise ValueError(f"{name} ({offset}, {length}) is outside the {virtual_size}-byte disk")


class Qcow2Layout:
    """A qcow2 v3 image as an OutputLayout: small tables are bytes, refcount blocks, L2
    tables and data clusters are computed from sorted cluster ranges as they are sliced."""

    def __init__(
        self,
        virtual_size: int,
        extents: list[tuple[int, int]],
        *,
        cluster_size: int = 65536,
        backing: str | None = None,
        zero_extents: list[tuple[int, int]] | tuple = (),
        backing_format: str | None = "raw",
    ):
        cs = cluster_size
        if cs & (cs - 1) or not 1 << MIN_CLUSTER_BITS <= cs <= 1 << MAX_CLUSTER_BITS:
            raise ValueError(f"cluster size {cs} is not a power of two in 512..2 MiB")
        if virtual_size < 0 or virtual_size % SECTOR:
            raise ValueError(f"virtual size {virtual_size} is not a multiple of {SECTOR}")
        _check_extents(list(extents), virtual_size, "extent")
        _check_extents(list(zero_extents), virtual_size, "zero extent")
        self.virtual_size = virtual_size
        self.cluster_size = cs
        cluster_bits = cs.bit_length() - 1
        entries = cs // 8
        self._entries = entries

        covered = _covered_clusters(list(zero_extents), cs, virtual_size)
        allocate = list(extents)
        if backing is not None:
            # A cluster only partly zeroed must still hide the base there: it is stored,
            # and the disk reads zeros in the zeroed part.
            for first, stop in _subtract(_cluster_ranges(list(zero_extents), cs), covered):
                allocate.append((first * cs, min(stop * cs, virtual_size) - first * cs))
        data = _cluster_ranges(allocate, cs)
        zeros = _subtract(covered, data)
        self._data_starts = array("q", [a for a, _ in data])
        self._data_stops = array("q", [b for _, b in data])
        # _data_before[r]: allocated clusters in ranges before r (length len(data) + 1)
        self._data_before = array("q", itertools.accumulate((b - a for a, b in data), initial=0))
        self._zero_starts = array("q", [a for a, _ in zeros])
        self._zero_stops = array("q", [b for _, b in zeros])
        data_clusters = self._data_before[-1]

        span = cs * entries
        l1_size = -(-virtual_size // span)
        if l1_size * 8 > MAX_L1_BYTES:
            raise ValueError(f"a {virtual_size}-byte disk needs an L1 table over 32 MiB")
        used = bytearray(l1_size)
        for first, stop in itertools.chain(data, zeros):
            lo, hi = first // entries, (stop - 1) // entries + 1
            used[lo:hi] = b"\x01" * (hi - lo)
        self._l2_indexes = list(itertools.compress(range(l1_size), used))
        l1_clusters = -(-l1_size * 8 // cs)

        # Refcount structures count themselves: iterate to the fixed point.
        per_block = cs * 8 // 16
        fixed = 1 + l1_clusters + len(self._l2_indexes) + data_clusters
        rt_clusters, blocks = 1, 1
        while True:
            total = fixed + rt_clusters + blocks
            new_blocks = -(-total // per_block)
            new_rt = -(-new_blocks * 8 // cs)
            if (new_blocks, new_rt) == (blocks, rt_clusters):
                break
            blocks, rt_clusters = new_blocks, new_rt
        if rt_clusters * cs > MAX_REFCOUNT_TABLE_BYTES:
            raise ValueError("the refcount table would exceed 8 MiB")
        self._host_clusters = total
        self._per_block = per_block

        rt_offset = cs
        blocks_offset = rt_offset + rt_clusters * cs
        l1_offset = blocks_offset + blocks * cs
        l2_offset = l1_offset + l1_clusters * cs
        self._data_offset = l2_offset + len(self._l2_indexes) * cs
        self.length = self._data_offset + data_clusters * cs

        refcount_table = array("Q", (blocks_offset + b * cs for b in range(blocks)))
        l1 = array("Q", bytes(l1_size * 8))
        for t, index in enumerate(self._l2_indexes):
            l1[index] = (l2_offset + t * cs) | L2E_COPIED
        if _SWAP:
            refcount_table.byteswap()
            l1.byteswap()

        header = self._header(
            cluster_bits, l1_size, l1_offset, rt_offset, rt_clusters, backing, backing_format
        )
        # Each region of the file, in order, with what produces its pieces.
        self._regions: list[tuple[int, int, Callable[[int, int], Iterator[Piece]]]] = [
            (0, cs, self._literal(header)),
            (rt_offset, blocks_offset, self._literal(refcount_table.tobytes())),
            (blocks_offset, l1_offset, self._refcount_blocks),
            (l1_offset, l2_offset, self._literal(l1.tobytes())),
            (l2_offset, self._data_offset, self._l2_tables),
            (self._data_offset, self.length, self._data),
        ]
        self._l2_cache: tuple[int, bytes] = (-1, b"")
        self._ones = b"\x00\x01" * per_block

    def _header(
        self,
        cluster_bits: int,
        l1_size: int,
        l1_offset: int,
        rt_offset: int,
        rt_clusters: int,
        backing: str | None,
        backing_format: str | None,
    ) -> bytes:
        header_length = 112  # through compression_type, padded to 8
        extensions = b""
        name = b""
        if backing is not None:
            name = backing.encode()
            if not name or len(name) > MAX_BACKING_NAME:
                raise ValueError(f"backing file name of {len(name)} bytes (1..1023 allowed)")
            if backing_format:
                fmt = backing_format.encode()
                extensions += EXTENSION.pack(EXT_BACKING_FORMAT, len(fmt))
                extensions += fmt + bytes(-len(fmt) % 8)
        extensions += EXTENSION.pack(EXT_END, 0)
        backing_offset = header_length + len(extensions) if name else 0
        header = HEADER_V2.pack(
            MAGIC,
            3,  # version
            backing_offset,
            len(name),
            cluster_bits,
            self.virtual_size,
            0,  # crypt_method
            l1_size,
            l1_offset,
            rt_offset,
            rt_clusters,
            0,  # nb_snapshots
            0,  # snapshots_offset
        )
        header += HEADER_V3.pack(0, 0, 0, 4, header_length)  # no features, 16-bit refcounts
        header += bytes([COMPRESSION_ZLIB]) + bytes(header_length - V3_MIN_HEADER_LENGTH - 1)
        out = header + extensions + name
        if len(out) > self.cluster_size:
            raise ValueError("the header and backing file name do not fit in one cluster")
        return out

    # Region producers: bytes [lo, hi) of the region -> pieces.

    @staticmethod
    def _literal(data: bytes) -> Callable[[int, int], Iterator[Piece]]:
        """Bytes, then zeros to the end of the region."""

        def pieces(lo: int, hi: int) -> Iterator[Piece]:
            if lo < len(data):
                yield Literal(data[lo : min(hi, len(data))])
            if hi > len(data):
                yield layout.Zero(hi - max(lo, len(data)))

        return pieces

    def _refcount_blocks(self, lo: int, hi: int) -> Iterator[Piece]:
        cs = self.cluster_size
        for block in range(lo // cs, (hi - 1) // cs + 1):
            base = block * cs
            a, b = max(lo, base) - base, min(hi, base + cs) - base
            ones = 2 * max(0, min(self._per_block, self._host_clusters - block * self._per_block))
            if a < ones:
                yield Literal(self._ones[a : min(b, ones)])
            if b > ones:
                yield layout.Zero(b - max(a, ones))

    def _l2_table(self, t: int) -> bytes:
        if self._l2_cache[0] == t:
            return self._l2_cache[1]
        cs, entries = self.cluster_size, self._entries
        first = self._l2_indexes[t] * entries
        stop = first + entries
        table = array("Q", bytes(cs))
        r = bisect.bisect_right(self._data_stops, first)
        while r < len(self._data_starts) and self._data_starts[r] < stop:
            a, b = max(first, self._data_starts[r]), min(stop, self._data_stops[r])
            host = self._data_offset + (self._data_before[r] + a - self._data_starts[r]) * cs
            table[a - first : b - first] = array(
                "Q", range(host | L2E_COPIED, (host + (b - a) * cs) | L2E_COPIED, cs)
            )
            r += 1
        r = bisect.bisect_right(self._zero_stops, first)
        while r < len(self._zero_starts) and self._zero_starts[r] < stop:
            a, b = max(first, self._zero_starts[r]), min(stop, self._zero_stops[r])
            table[a - first : b - first] = array("Q", [L2E_ZERO]) * (b - a)
            r += 1
        if _SWAP:
            table.byteswap()
        data = table.tobytes()
        self._l2_cache = (t, data)
        return data

    def _l2_tables(self, lo: int, hi: int) -> Iterator[Piece]:
        cs = self.cluster_size
        for t in range(lo // cs, (hi - 1) // cs + 1):
            base = t * cs
            yield Literal(self._l2_table(t)[max(lo, base) - base : min(hi, base + cs) - base])

    def _data(self, lo: int, hi: int) -> Iterator[Piece]:
        cs = self.cluster_size
        pos = lo
        while pos < hi:
            k = pos // cs  # the k-th allocated cluster
            r = bisect.bisect_right(self._data_before, k) - 1
            guest_cluster = self._data_starts[r] + k - self._data_before[r]
            run_end = min(hi, (self._data_before[r + 1]) * cs)  # end of this guest range
            guest = guest_cluster * cs + pos % cs
            n = run_end - pos
            real = max(0, min(n, self.virtual_size - guest))
            if real:
                yield Data(guest, real)
            if n > real:
                yield layout.Zero(n - real)
            pos = run_end

    def slice(self, start: int, end: int) -> Iterator[Piece]:
        """The pieces covering output bytes [start, end), cut to fit exactly."""
        if not 0 <= start <= end <= self.length:
            raise ValueError(f"range {start}-{end} outside 0-{self.length}")
        if start == end:
            return
        for region_start, region_end, pieces in self._regions:
            if region_end <= start or region_start == region_end:
                continue
            if region_start >= end:
                break
            lo = max(start, region_start) - region_start
            hi = min(end, region_end) - region_start
            yield from pieces(lo, hi)


def qcow2_layout(
    virtual_size: int,
    extents: list[tuple[int, int]],
    *,
    cluster_size: int = 65536,
    backing: str | None = None,
    zero_extents: list[tuple[int, int]] | tuple = (),
    backing_format: str | None = "raw",
) -> Qcow2Layout:
    """A qcow2 v3 image of a `virtual_size`-byte disk: clusters touched by `extents`
    [(offset, length)] are allocated and read from the disk (`Data` pieces); clusters
    entirely inside `zero_extents` (and not allocated) read as zeros without storage. In a
    delta, clusters only partly inside `zero_extents` are allocated too (the disk must read
    zeros there), so that the image reads exactly as the disk over its base.
    `backing` makes the image a delta over that file name (of format `backing_format`,
    "raw" by default: the base is another VDI exported raw). Refcounts are exact."""
    return Qcow2Layout(
        virtual_size,
        extents,
        cluster_size=cluster_size,
        backing=backing,
        zero_extents=zero_extents,
        backing_format=backing_format,
    )
