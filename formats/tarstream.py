"""A streaming tar reader: archive bytes in, member events out, nothing buffered but headers.

XAPI's block tar and OVA archives are both tar files that arrive over HTTP and can be many
GiB, so members are never held whole: `TarReader.feed(bytes)` returns the events those bytes
complete, in order:

- `MemberStart(name, size, type)`: a member's header (ustar, GNU or pax) was read; `size`
  data bytes follow (0 for links, directories and devices, which carry none).
- `MemberData(data)`: the next bytes of the current member's data, a slice of the fed
  buffer (no copy): valid as long as the caller keeps that buffer unchanged.
- `MemberEnd(name)`: the member's data is complete.
- `ArchiveEnd()`: the end-of-archive marker (two zero blocks) was read.

`finish()` is called at the end of the stream and raises `FormatError` unless the archive
ended properly. The reader is strict where leniency would hide corruption: header checksums
are verified, and an archive that stops without its end marker is rejected because a
transfer cut exactly at a member boundary would otherwise go unnoticed. One lone zero block
at the end is accepted (GNU tar does too): every member arrived whole. Bytes after the end
marker must be zeros (the padding tar writers add to fill a record).

Supported headers: ustar (name prefix), GNU ("ustar  " magic, 'L' long names, base-256
sizes) and pax ('x' per-member records: path and size; 'g' global records are read and
ignored). Pax and GNU long-name headers are bounded (MAX_METADATA) so a hostile archive
cannot make the reader buffer without limit. GNU sparse members are refused: their data is
not the file's bytes.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from formats.errors import FormatError
from formats.events import Event

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
MAX_METADATA = 1 << 20  # pax extended headers and GNU long names, bytes

REGULAR = "0"  # '\0' (pre-POSIX) and '7' (contiguous) are reported as regular files too
_REGULAR_FLAGS = {b"\0": REGULAR, b"0": REGULAR, b"7": REGULAR}
_NO_DATA_TYPES = frozenset("123456")  # links, devices, directories, fifos: size is not data
_METADATA_TYPES = frozenset("xgLK")
_UNSUPPORTED_TYPES = {
    "S": "a GNU sparse file",
    "M": "a GNU multi-volume continuation",
}
_OCTAL = re.compile(rb"[0-7]*")
_SIGNED_SUM = struct.Struct("148b8x356b")


@dataclass(frozen=True, slots=True)
class MemberStart:
    """A member's header was read; `size` data bytes follow (0 where the type carries none)."""

    name: str
    size: int
    type: str  # the tar typeflag: REGULAR ("0") for files, "5" directories, "2" symlinks...

    @property
    def is_file(self) -> bool:
        return self.type == REGULAR


@dataclass(frozen=True, slots=True)
class MemberData:
    """The next bytes of the current member's data: a slice of the fed buffer, not a copy."""

    data: memoryview


@dataclass(frozen=True, slots=True)
class MemberEnd:
    """The member's data is complete."""

    name: str


@dataclass(frozen=True, slots=True)
class ArchiveEnd:
    """The end-of-archive marker (two zero blocks) was read."""

    pass


TarEvent = MemberStart | MemberData | MemberEnd | ArchiveEnd

# Reader states
_HEADER = "header"  # expecting a header block (or the first zero block of the end marker)
_DATA = "data"  # inside a member's data
_METADATA = "metadata"  # inside a pax or GNU long-name header's data
_PADDING = "padding"  # skipping the zeros that round a member's data up to a block
_SECOND_ZERO = "second zero block"  # one zero block seen: the end marker's second is due
_ENDED = "ended"  # the end marker was read: only zero padding may follow
_FINISHED = "finished"  # finish() was called


class TarReader:
    """Sans-I/O tar parser: feed it the archive in pieces of any size."""

    def __init__(self) -> None:
        self.position = 0  # archive bytes consumed so far (for error messages)
        self.members = 0  # members reported (MemberStart) so far
        self._state = _HEADER
        self._block = bytearray()  # a header block being assembled across feeds
        self._block_start = 0  # archive offset of that header block
        self._remaining = 0  # data (or padding) bytes still due in the current state
        self._padding = 0  # padding after the current member's data
        self._name = ""  # the current member (for MemberEnd and messages)
        self._metadata = bytearray()
        self._metadata_type = ""
        self._pax: dict[str, str] = {}  # pending 'x' records for the next member
        self._long_name: str | None = None  # pending GNU 'L' name for the next member

    def feed(self, data: bytes | bytearray | memoryview) -> list[TarEvent]:
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        events: list[TarEvent] = []
        pos, end = 0, len(view)
        while pos < end:
            state = self._state
            if state == _DATA:
                take = min(self._remaining, end - pos)
                events.append(MemberData(view[pos : pos + take]))
                pos = self._advance(pos, take)
                if not self._remaining:
                    events.append(MemberEnd(self._name))
                    self._start_padding()
            elif state == _PADDING:
                take = min(self._remaining, end - pos)
                pos = self._advance(pos, take)
                if not self._remaining:
                    self._state = _HEADER
            elif state == _METADATA:
                take = min(self._remaining, end - pos)
                self._metadata += view[pos : pos + take]
                pos = self._advance(pos, take)
                if not self._remaining:
                    self._end_metadata()
            elif state in (_HEADER, _SECOND_ZERO):
                if not self._block and end - pos >= BLOCK:
                    block = view[pos : pos + BLOCK].tobytes()
                    self._block_start = self.position
                    pos = self._advance(pos, BLOCK)
                else:
                    if not self._block:
                        self._block_start = self.position
                    take = min(BLOCK - len(self._block), end - pos)
                    self._block += view[pos : pos + take]
                    pos = self._advance(pos, take)
                    if len(self._block) < BLOCK:
                        continue
                    block = bytes(self._block)
                    self._block.clear()
                self._header_block(block, events)
            elif state == _ENDED:
                trailing = view[pos:end].tobytes()
                if trailing.strip(b"\0"):
                    first = self.position + len(trailing) - len(trailing.lstrip(b"\0"))
                    raise FormatError(
                        f"the tar archive has data after its end-of-archive marker "
                        f"(non-zero byte at offset {first})"
                    )
                pos = self._advance(pos, end - pos)
            else:
                raise FormatError("the tar archive was fed after it was finished")
        return events

    def finish(self) -> list[TarEvent]:
        """The stream ended: the archive must have ended with it."""
        state, self._state = self._state, _FINISHED
        if state == _ENDED:
            return []
        if state == _SECOND_ZERO and not self._block.strip(b"\0"):
            return [ArchiveEnd()]  # a lone (or cut) zero block: every member arrived whole
        if state == _HEADER and not self._block and not self._pax and self._long_name is None:
            raise FormatError(
                f"the tar archive stops after {self.members} members without its "
                f"end-of-archive marker (two zero blocks): it was probably cut short"
            )
        if state == _DATA:
            where = f"in the data of member {self._name!r} ({self._remaining} bytes missing)"
        elif state == _PADDING:
            where = f"in the padding after member {self._name!r}"
        elif state == _METADATA:
            where = f"in an extended header ({self._remaining} bytes missing)"
        elif self._block:
            where = f"in a header block ({len(self._block)} of {BLOCK} bytes)"
        else:
            where = "after an extended header, before the header it applies to"
        raise FormatError(f"the tar archive is truncated {where}, at offset {self.position}")

    def _advance(self, pos: int, n: int) -> int:
        self.position += n
        if self._state in (_DATA, _PADDING, _METADATA):
            self._remaining -= n
        return pos + n

    def _start_padding(self) -> None:
        self._remaining = self._padding
        self._state = _PADDING if self._padding else _HEADER

    def _header_block(self, block: bytes, events: list[TarEvent]) -> None:
        at = self._block_start
        if block == ZERO_BLOCK:
            if self._pax or self._long_name is not None:
                raise FormatError(
                    f"the tar archive ends (zero block at offset {at}) right after an "
                    f"extended header, before the member it describes"
                )
            if self._state == _SECOND_ZERO:
                self._state = _ENDED
                events.append(ArchiveEnd())
            else:
                self._state = _SECOND_ZERO
            return
        if self._state == _SECOND_ZERO:
            raise FormatError(
                f"the tar archive has a lone zero block at offset {at - BLOCK} followed by a "
                f"header: the archive is corrupt"
            )
        _check_header_checksum(block, at)
        flag = block[156:157]
        type_ = _REGULAR_FLAGS.get(flag) or flag.decode("latin-1")
        size = _number(block[124:136], "size", at)
        if type_ in _UNSUPPORTED_TYPES:
            raise FormatError(
                f"the tar member at offset {at} is {_UNSUPPORTED_TYPES[type_]}, which is not "
                f"supported"
            )
        padding = -size % BLOCK
        if type_ in _METADATA_TYPES:
            if size > MAX_METADATA:
                raise FormatError(
                    f"the tar extended header at offset {at} is {size} bytes, more than the "
                    f"{MAX_METADATA} allowed"
                )
            self._metadata_type = type_
            self._metadata.clear()
            self._padding = padding
            self._remaining = size
            self._state = _METADATA
            if not size:
                self._end_metadata()
            return
        name = self._member_name(block)
        if "size" in self._pax:
            size = _pax_number(self._pax["size"], "size", at)
            padding = -size % BLOCK
        self._pax.clear()
        self._long_name = None
        if type_ in _NO_DATA_TYPES:
            size = padding = 0
        self._name = name
        self._padding = padding
        self.members += 1
        events.append(MemberStart(name, size, type_))
        if size:
            self._remaining = size
            self._state = _DATA
        else:
            events.append(MemberEnd(name))
            self._start_padding()

    def _member_name(self, block: bytes) -> str:
        if "path" in self._pax:
            return self._pax["path"]
        if self._long_name is not None:
            return self._long_name
        name = _string(block[0:100])
        if block[257:263] == b"ustar\0":  # POSIX: a prefix field (GNU uses that space otherwise)
            prefix = _string(block[345:500])
            if prefix:
                name = f"{prefix}/{name}"
        return name

    def _end_metadata(self) -> None:
        data = bytes(self._metadata)
        self._metadata.clear()
        at = self.position - len(data)
        if self._metadata_type == "x":
            self._pax.update(_pax_records(data, at))
        elif self._metadata_type == "g":
            _pax_records(data, at)  # checked for sparse-file records, otherwise unused
        elif self._metadata_type == "L":
            self._long_name = _string(data)
        # 'K' (GNU long link target): links carry no data, the target is not needed
        self._start_padding()


def _string(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _number(field: bytes, what: str, at: int) -> int:
    """A header number: octal text, or GNU base-256 when the high bit of the first byte is
    set (sizes of 8 GiB and more)."""
    if field[0] & 0x80:
        if field[0] & 0x40:
            raise FormatError(f"the tar header at offset {at} has a negative {what}")
        return int.from_bytes(bytes([field[0] & 0x3F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not _OCTAL.fullmatch(text):
        raise FormatError(
            f"the tar header at offset {at} has an invalid {what} field {field!r} "
            f"(expected octal digits)"
        )
    return int(text or b"0", 8)


def _check_header_checksum(block: bytes, at: int) -> None:
    try:
        stored = _number(block[148:156], "checksum", at)
    except FormatError:
        raise FormatError(
            f"the block at offset {at} is not a tar header (its checksum field is "
            f"{block[148:156]!r}): not a tar archive, or a corrupt one"
        ) from None
    unsigned = sum(block) - sum(block[148:156]) + 8 * 32
    if stored != unsigned and stored != sum(_SIGNED_SUM.unpack(block)) + 8 * 32:
        raise FormatError(
            f"the tar header at offset {at} has a bad checksum (stored {stored}, computed "
            f"{unsigned}): not a tar archive, or a corrupt one"
        )


def _pax_records(data: bytes, at: int) -> dict[str, str]:
    """Pax records: "<length> <key>=<value>\\n", the length counting the whole record."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # some writers pad the record block with NULs
            if data[pos:].strip(b"\0"):
                break
            return records
        space = data.find(b" ", pos, pos + 21)
        length_text = data[pos:space] if space > 0 else b""
        if not length_text.isdigit() or int(length_text) <= space - pos + 1:
            break
        record_end = pos + int(length_text)
        record = data[space + 1 : record_end]
        if record_end > len(data) or not record.endswith(b"\n") or b"=" not in record:
            break
        key, _, value = record[:-1].partition(b"=")
        key_text = key.decode("utf-8", "surrogateescape")
        if key_text.startswith("GNU.sparse."):
            raise FormatError(
                f"the tar member described at offset {at} is a GNU sparse file, which is "
                f"not supported"
            )
        if value:
            records[key_text] = value.decode("utf-8", "surrogateescape")
        else:
            records.pop(key_text, None)  # an empty value deletes the keyword
        pos = record_end
    else:
        return records
    raise FormatError(f"the tar pax header at offset {at} has a malformed record at byte {pos}")


def _pax_number(text: str, what: str, at: int) -> int:
    if not text.isascii() or not text.isdigit():
        raise FormatError(f"the tar pax header before offset {at} has an invalid {what} {text!r}")
    return int(text)


class TarArchiveDecoder:
    """The part every decoder of a tar-based upload format shares (XAPI's block tar, OVA):
    archive bytes go through a `TarReader`, and the subclass turns its member events into
    disk events (`_on_tar_event`), then checks what the end of the stream completes
    (`_on_archive_end`). `feed`/`finish` keep the formats.events.Decoder contract."""

    def __init__(self) -> None:
        self._tar = TarReader()

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        events: list[Event] = []
        for tar_event in self._tar.feed(data):
            self._on_tar_event(tar_event, events)
        return events

    def finish(self) -> list[Event]:
        events: list[Event] = []
        for tar_event in self._tar.finish():
            self._on_tar_event(tar_event, events)
        self._on_archive_end(events)
        return events

    def _on_tar_event(self, event: TarEvent, events: list[Event]) -> None:
        raise NotImplementedError

    def _on_archive_end(self, events: list[Event]) -> None:
        """The stream ended and the tar reader accepted its end: append what that completes
        to `events`, or raise FormatError."""
