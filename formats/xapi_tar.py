"""XAPI's block tar format for one VDI (`/import_raw_vdi?format=tar`, `/export_raw_vdi?format=tar`).

What xen-api writes and reads (ocaml/xapi/stream_vdi.ml, export_raw_vdi.ml, import_raw_vdi.ml):

- The disk is cut into 1 MiB chunks; chunk N is a tar member `<prefix>/%08d` (prefix "vdi"
  for a single-VDI export, "Ref:..." inside an XVA) holding the chunk's bytes (the last chunk
  is shorter when the size is not a multiple of 1 MiB), immediately followed by a member
  `<prefix>/%08d.xxhash` whose content is the XXH64 (seed 0) of those bytes as `%016X`
  (older exports: `.checksum` with the SHA-1 as lowercase hex).
- All-zero chunks are left out, except chunk 0 and the last chunk, which are always sent.
- The archive ends with two zero blocks (no padding to a 10240-byte record).
- While scanning a long run of zeros the exporter sends a keep-alive: an *empty* member with
  the next chunk number (and its checksum member). It uses up that number without advancing
  the disk position, so the chunks after it carry numbers one higher than their offset says.
  XAPI's importer is therefore positional, not indexed: each member's data lands at the end
  of the previous one, plus 1 MiB (the first member's length) per chunk number skipped.
  `XapiTarDecoder` follows the importer, so a real export with keep-alives decodes right.
- The importer wants names strictly increasing, a checksum member right after every chunk,
  whose name is the chunk's plus the extension and whose content equals the recomputed hex.

`XapiTarDecoder` turns such an archive into Write events (sans-I/O, one chunk buffered until
its checksum is checked). `xapi_tar_layout` is the encoder: the exact bytes of an archive
for a disk, computed chunk by chunk on demand so a 2 TiB disk costs no memory up front.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import xxhash

from formats.errors import FormatError, OutOfBounds
from formats.events import Event, Header, Write
from formats.layout import Data, Derived, Literal, Piece, Zero, cut_pieces
from formats.tarstream import (
    BLOCK,
    ArchiveEnd,
    MemberData,
    MemberEnd,
    MemberStart,
    TarArchiveDecoder,
)

CHUNK_SIZE = 1 << 20
DEFAULT_PREFIX = "vdi"  # what XAPI's single-VDI tar export uses and its importer expects
XXHASH_SUFFIX = ".xxhash"
SHA1_SUFFIX = ".checksum"
_CHECKSUM_LENGTHS = {XXHASH_SUFFIX: 16, SHA1_SUFFIX: 40}
_ALGORITHMS = {XXHASH_SUFFIX: "XXH64", SHA1_SUFFIX: "SHA-1"}
_END_OF_ARCHIVE = 2 * BLOCK


def xxh64_hex(data: bytes) -> bytes:
    """The content of a `.xxhash` member: XXH64 (seed 0) as 16 uppercase hex digits."""
    return b"%016X" % xxhash.xxh64_intdigest(data)


def sha1_hex(data: bytes) -> bytes:
    """The content of a legacy `.checksum` member: SHA-1 as 40 lowercase hex digits."""
    return hashlib.sha1(data).hexdigest().encode()


_HASHES = {XXHASH_SUFFIX: xxh64_hex, SHA1_SUFFIX: sha1_hex}


@dataclass
class _Chunk:
    """A chunk member read but not yet written: it waits for its checksum member."""

    name: str
    index: int
    offset: int  # where on the disk its data goes
    data: bytearray
    filled: int = 0


class XapiTarDecoder(TarArchiveDecoder):
    """Sans-I/O decoder of XAPI's block tar: `feed(bytes)` and `finish()` return events.

    The disk size is not in the archive: after `finish()`, `disk_size` is the end of the last
    chunk, which XAPI always sends. With `virtual_size` a chunk beyond it raises OutOfBounds
    before anything of it is written."""

    def __init__(self, virtual_size: int | None = None):
        self.virtual_size = virtual_size
        self.disk_size: int | None = None  # known after finish()
        self.prefix: str | None = None
        self.chunks = 0  # chunk members written (keep-alive members not counted)
        super().__init__()
        self._header_sent = False
        self._position = 0  # disk offset right after the last chunk
        self._last_index = -1
        self._short_chunk: str | None = None  # a chunk shorter than 1 MiB: must be the last
        self._chunk: _Chunk | None = None  # reading its data, or waiting for its checksum
        self._checksum_member: str | None = None  # the checksum member being read
        self._checksum = bytearray()
        self._ended = False

    def _on_archive_end(self, events: list[Event]) -> None:
        if not self._ended:  # TarReader.finish raises first; kept as a guard
            raise FormatError("the XAPI tar stream ended before its end-of-archive marker")
        if not self._header_sent:  # an empty archive: XAPI's export of a 0-byte disk
            events.append(self._header())
        self.disk_size = self._position

    def _header(self) -> Header:
        self._header_sent = True
        return Header(virtual_size=self.virtual_size, whole_image=True)

    def _on_tar_event(self, event: object, events: list[Event]) -> None:
        if isinstance(event, MemberData):
            if self._checksum_member is not None:
                self._checksum += event.data
            else:
                chunk = self._chunk
                assert chunk is not None
                n = len(event.data)
                chunk.data[chunk.filled : chunk.filled + n] = event.data
                chunk.filled += n
        elif isinstance(event, MemberStart):
            if not event.is_file:
                raise FormatError(
                    f"the XAPI tar has a member {event.name!r} of tar type {event.type!r}: "
                    f"only chunk and checksum files are expected"
                )
            if self._chunk is None:
                self._start_chunk(event, events)
            else:
                self._start_checksum(event)
        elif isinstance(event, MemberEnd):
            if self._checksum_member is not None:
                self._end_checksum(events)
        elif isinstance(event, ArchiveEnd):
            if self._chunk is not None:
                raise FormatError(
                    f"the XAPI tar ends after chunk {self._chunk.name!r} without its "
                    f"checksum member"
                )
            self._ended = True

    def _start_chunk(self, member: MemberStart, events: list[Event]) -> None:
        name = member.name
        prefix, slash, leaf = name.rpartition("/")
        if not slash or not (leaf.isascii() and leaf.isdigit()):
            if leaf.endswith(tuple(_HASHES)):
                raise FormatError(f"the XAPI tar has a checksum member {name!r} with no chunk")
            raise FormatError(
                f"the XAPI tar has a member {name!r} that is not a chunk (expected "
                f"'<prefix>/<8-digit chunk number>')"
            )
        if self.prefix is None:
            self.prefix = prefix
        elif prefix != self.prefix:
            raise FormatError(
                f"the XAPI tar mixes disks: member {name!r} does not have the prefix "
                f"{self.prefix!r} of the members before it"
            )
        index = int(leaf)
        if index <= self._last_index:
            what = "repeats" if index == self._last_index else "comes after"
            raise FormatError(
                f"the XAPI tar has chunk {name!r} out of order: it {what} chunk "
                f"{self._last_index} (chunk numbers must increase)"
            )
        if self._short_chunk is not None:
            raise FormatError(
                f"the XAPI tar has chunk {name!r} after the short chunk {self._short_chunk!r}: "
                f"only the last chunk may be shorter than {CHUNK_SIZE} bytes"
            )
        if member.size > CHUNK_SIZE:
            raise FormatError(
                f"the XAPI tar chunk {name!r} has {member.size} bytes, more than the "
                f"{CHUNK_SIZE} of a chunk"
            )
        if 0 < member.size < CHUNK_SIZE:
            self._short_chunk = name
        # Chunks left out were all zeros; each took up one chunk number (see the docstring).
        offset = self._position + (index - self._last_index - 1) * CHUNK_SIZE
        end = offset + member.size
        if self.virtual_size is not None and end > self.virtual_size:
            raise OutOfBounds(
                f"the XAPI tar chunk {name!r} covers disk bytes {offset}-{end - 1}, beyond "
                f"the disk's {self.virtual_size} bytes",
                end,
                self.virtual_size,
            )
        if not self._header_sent:
            events.append(self._header())
        self._chunk = _Chunk(name, index, offset, bytearray(member.size))

    def _start_checksum(self, member: MemberStart) -> None:
        chunk = self._chunk
        assert chunk is not None
        suffix = member.name[len(chunk.name) :]
        if not member.name.startswith(chunk.name) or suffix not in _HASHES:
            raise FormatError(
                f"the XAPI tar chunk {chunk.name!r} is followed by {member.name!r} instead "
                f"of its checksum member ({chunk.name + XXHASH_SUFFIX!r} or "
                f"{chunk.name + SHA1_SUFFIX!r})"
            )
        if member.size != _CHECKSUM_LENGTHS[suffix]:
            raise FormatError(
                f"the XAPI tar checksum member {member.name!r} has {member.size} bytes, not "
                f"the {_CHECKSUM_LENGTHS[suffix]} of a {_ALGORITHMS[suffix]} checksum"
            )
        self._checksum_member = member.name
        self._checksum.clear()

    def _end_checksum(self, events: list[Event]) -> None:
        chunk, name = self._chunk, self._checksum_member
        assert chunk is not None and name is not None
        suffix = name[len(chunk.name) :]
        expected = _HASHES[suffix](chunk.data)
        if bytes(self._checksum).upper() != expected.upper():
            raise FormatError(
                f"the XAPI tar chunk {chunk.name!r} fails its {_ALGORITHMS[suffix]} checksum: the "
                f"archive says {bytes(self._checksum)!r}, the data hashes to {expected!r}"
            )
        if chunk.data:
            events.append(Write(chunk.offset, memoryview(chunk.data)))
            self.chunks += 1
        self._position = chunk.offset + len(chunk.data)
        self._last_index = chunk.index
        self._chunk = None
        self._checksum_member = None


# --- Encoder -------------------------------------------------------------------------------


def xapi_tar_layout(
    virtual_size: int, extents: Iterable[tuple[int, int]], *, prefix: str = DEFAULT_PREFIX
) -> XapiTarLayout:
    """The XAPI block tar of a disk of `virtual_size` bytes whose data is in `extents`
    [(offset, length)]: chunk 0, the last chunk and every chunk touching an extent."""
    return XapiTarLayout(virtual_size, extents, prefix=prefix)


# The fixed fields of our member headers, around the name (0:100), size (124:136) and
# checksum (148:156): mode 0644, uid/gid 0 (100:124); mtime 0 (136:148); type '0', no link,
# "ustar\0" "00", no owner names, devices 0, no prefix (156:512).
_MODE_UID_GID = b"0000644\0" + b"0000000\0" * 2
_MTIME = b"00000000000\0"
_AFTER_CHECKSUM = b"0" + bytes(100) + b"ustar\x0000" + bytes(64) + b"0000000\0" * 2 + bytes(167)
_FIXED_SUM = sum(_MODE_UID_GID) + sum(_MTIME) + sum(_AFTER_CHECKSUM) + 8 * ord(" ")


def tar_member_header(name: str, size: int) -> bytes:
    """A deterministic ustar header for a regular file: mode 0644, owner 0:0, mtime 0.
    (Built from precomputed parts: a 2 TiB export has four million of them.)"""
    encoded = name.encode("utf-8")
    if len(encoded) > 100 or b"\0" in encoded:
        raise ValueError(f"tar member name {name!r} does not fit a ustar header")
    if not 0 <= size < 8**11:
        raise ValueError(f"tar member size {size} does not fit a ustar header")
    size_field = b"%011o\0" % size
    checksum = _FIXED_SUM + sum(encoded) + sum(size_field)
    return b"".join(
        (
            encoded.ljust(100, b"\0"),
            _MODE_UID_GID,
            size_field,
            _MTIME,
            b"%06o\0 " % checksum,
            _AFTER_CHECKSUM,
        )
    )


def _padded(n: int) -> int:
    return n + (-n % BLOCK)


@dataclass(frozen=True)
class _Run:
    """Consecutive chunks [first, first + count) sent in the archive, starting at output
    offset `start`; `data` is False for chunks sent only because they are first or last
    (they hold no extent, so their bytes and checksum are known to be zeros)."""

    first: int
    count: int
    data: bool
    start: int


class XapiTarLayout:
    """The OutputLayout of an XAPI block tar, computed arithmetically.

    Only runs of chunks are stored (one per run of chunks touching extents, at most
    len(extents) + 2), so the layout of a 2 TiB disk with few extents is tiny; `slice()`
    builds the pieces of the chunks it covers on demand."""

    def __init__(
        self,
        virtual_size: int,
        extents: Iterable[tuple[int, int]],
        *,
        prefix: str = DEFAULT_PREFIX,
    ):
        if virtual_size < 0:
            raise ValueError(f"negative disk size {virtual_size}")
        if not prefix or prefix.endswith("/"):
            raise ValueError(f"tar prefix {prefix!r} must be non-empty, without a final '/'")
        self.virtual_size = virtual_size
        self.prefix = prefix
        self.chunk_count = -(-virtual_size // CHUNK_SIZE)
        last = self.chunk_count - 1
        self._last_chunk_size = virtual_size - last * CHUNK_SIZE if virtual_size else 0
        # The longest member name, so a bad prefix fails here rather than mid-download.
        if self.chunk_count:
            tar_member_header(self._name(last) + XXHASH_SUFFIX, 16)

        spans = _chunk_spans(virtual_size, extents)
        runs: list[tuple[int, int, bool]] = []  # (first, end, data)
        if self.chunk_count and (not spans or spans[0][0] > 0):
            runs.append((0, 1, False))
        for first, end in spans:
            runs.append((first, end, True))
        if self.chunk_count and runs[-1][1] < self.chunk_count:
            runs.append((last, last + 1, False))
        self._runs: list[_Run] = []
        pos = 0
        for first, end, data in runs:
            self._runs.append(_Run(first, end - first, data, pos))
            pos += (end - first) * self._full_record
            if end == self.chunk_count:
                pos += self._record_length(self._last_chunk_size) - self._full_record
        self._starts = [run.start for run in self._runs]
        self.length = pos + _END_OF_ARCHIVE
        # Chunks sent only for being first or last, with no extent: their checksum is known.
        self._zero_checksums = {
            size: xxh64_hex(bytes(size)) for size in {CHUNK_SIZE, self._last_chunk_size}
        }

    @property
    def _full_record(self) -> int:
        return self._record_length(CHUNK_SIZE)

    @staticmethod
    def _record_length(chunk_size: int) -> int:
        """A chunk's bytes in the archive: header, padded data, checksum header and data."""
        return BLOCK + _padded(chunk_size) + BLOCK + BLOCK

    @property
    def chunks(self) -> int:
        """How many chunk members the archive has."""
        return sum(run.count for run in self._runs)

    def _name(self, index: int) -> str:
        return f"{self.prefix}/{index:08d}"

    def _chunk_size(self, index: int) -> int:
        return self._last_chunk_size if index == self.chunk_count - 1 else CHUNK_SIZE

    def _chunk_pieces(self, index: int, data: bool) -> list[Piece]:
        offset, size = index * CHUNK_SIZE, self._chunk_size(index)
        name = self._name(index)
        if data:
            body: Piece = Data(offset, size)
            checksum: Piece = Derived(offset=offset, source_length=size, fn=xxh64_hex, length=16)
        else:
            body = Zero(size)
            checksum = Literal(self._zero_checksums[size])
        return [
            Literal(tar_member_header(name, size)),
            body,
            Zero(-size % BLOCK),
            Literal(tar_member_header(name + XXHASH_SUFFIX, 16)),
            checksum,
            Zero(BLOCK - 16),
        ]

    def slice(self, start: int, end: int) -> Iterator[Piece]:
        """The pieces covering output bytes [start, end), cut to fit exactly, in order."""
        if not 0 <= start <= end <= self.length:
            raise ValueError(f"range {start}-{end} outside 0-{self.length}")
        records_end = self.length - _END_OF_ARCHIVE
        i = bisect.bisect_right(self._starts, start) - 1
        full = self._full_record
        while start < end and 0 <= i < len(self._runs) and start < records_end:
            run = self._runs[i]
            j = min((start - run.start) // full, run.count - 1)
            while start < end and j < run.count:
                record_start = run.start + j * full
                index = run.first + j
                pieces = self._chunk_pieces(index, run.data)
                record_length = self._record_length(self._chunk_size(index))
                if start == record_start and end >= record_start + record_length:
                    yield from (piece for piece in pieces if piece.length)  # the whole record
                else:
                    yield from cut_pieces(
                        pieces, start - record_start, min(end - record_start, record_length)
                    )
                start = min(end, record_start + record_length)
                j += 1
            i += 1
        if start < end:
            yield Zero(end - start)  # the end-of-archive marker


def _chunk_spans(virtual_size: int, extents: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merged runs [first, end) of the chunks that the extents touch."""
    spans: list[tuple[int, int]] = []
    for offset, length in sorted(extents):
        if length <= 0:
            continue
        if offset < 0 or offset + length > virtual_size:
            raise ValueError(
                f"extent {offset}+{length} lies outside the disk's {virtual_size} bytes"
            )
        first, end = offset // CHUNK_SIZE, (offset + length - 1) // CHUNK_SIZE + 1
        if spans and first <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(end, spans[-1][1]))
        else:
            spans.append((first, end))
    return spans
