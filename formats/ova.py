"""Decoder of OVA archives: the disk inside is decoded as the archive streams by.

An OVA is a tar (ustar) of an .ovf descriptor, optionally a .mf manifest and certificate,
and the disk files. Nothing is buffered: the tar reader hands the first disk member's bytes
to the decoder for its kind, chosen by the member name's extension, and the events of that
decoder are passed through (its Header included). Other members -- the descriptor, manifest,
further disks, ISO images, NVRAM -- are skipped: a VDI import takes one disk.

Disk kinds: .vhd (VhdDecoder), .qcow2 (Qcow2Decoder), .raw/.img (the bytes are the disk),
.vmdk (streamOptimized, VmdkStreamDecoder). Other disk image kinds (.vdi, .vhdx, non-stream
VMDK...) raise `UnsupportedMember`, an `Unsupported` the service answers FORMAT_UNSUPPORTED.
A disk member compressed with gzip (OVF's ovf:compression="gzip", same file name) is
inflated on the fly, except raw ones (their size would only be known at the end).
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable
from typing import Any

from formats.errors import FormatError, Unsupported
from formats.events import Event, Header, Write
from formats.qcow2 import Qcow2Decoder
from formats.spill import Spill
from formats.tarstream import MemberData, MemberEnd, MemberStart, TarArchiveDecoder
from formats.vhd import VhdDecoder
from formats.vmdk import UnsupportedVariant, VmdkStreamDecoder

# extension -> the decoder of such a member (made with spill= and stream_length=); None is
# the raw member handled here.
DISK_DECODERS: dict[str, type | None] = {
    ".vhd": VhdDecoder,
    ".qcow2": Qcow2Decoder,
    ".vmdk": VmdkStreamDecoder,
    ".raw": None,
    ".img": None,
}
# Disk images we recognise but cannot decode: refused rather than silently skipped.
UNSUPPORTED_DISKS = (".vdi", ".vhdx", ".qcow", ".qed", ".hdd", ".parallels", ".dmg")
GZIP_MAGIC = b"\x1f\x8b\x08"  # gzip, deflate method
INFLATE_STEP = 4 << 20  # inflated bytes handed to the disk decoder at a time
LISTED_MEMBERS = 100  # member names kept for messages


class UnsupportedMember(Unsupported):
    """The OVA's disk is of a kind this service cannot import (FORMAT_UNSUPPORTED)."""


class _RawMember:
    """A raw disk member: its bytes are the disk's, from offset 0."""

    def __init__(self, size: int):
        self.size = size
        self.position = 0

    def feed(self, data: memoryview) -> list[Event]:
        events: list[Event] = []
        if self.position == 0:
            events.append(Header(virtual_size=self.size, whole_image=True))
        if data:
            events.append(Write(self.position, data))
            self.position += len(data)
        return events

    def finish(self) -> list[Event]:
        return [Header(virtual_size=0, whole_image=True)] if not self.size else []


class _DiskMember:
    """Feeds a disk member to its decoder, inflating it first when it is gzip-compressed.

    OVF's `ovf:compression="gzip"` keeps the file's name, so only the content tells: the
    first bytes are looked at before the decoder is made (a compressed member's inflated
    length is unknown, so its decoder gets no stream_length)."""

    def __init__(self, size: int, make_decoder: Callable[[int | None], Any], name: str):
        self.size = size
        self.name = name
        self.compressed = False
        self._make_decoder = make_decoder
        self._head = bytearray()
        self._decoder: Any = None
        self._inflater: Any = None
        self._inflated_all = False

    def feed(self, data: memoryview) -> list[Event]:
        if self._decoder is not None:
            return self._feed(data)
        need = len(GZIP_MAGIC) - len(self._head)
        self._head += data[:need]
        if len(self._head) < len(GZIP_MAGIC):
            return []
        return self._start() + self._feed(data[need:])

    def finish(self) -> list[Event]:
        events = self._start() if self._decoder is None else []
        if self._inflater is not None and not self._inflated_all:
            raise FormatError(f"the OVA's disk {self.name!r} ends inside its gzip compression")
        return events + list(self._decoder.finish())

    def _start(self) -> list[Event]:
        head = bytes(self._head)
        if head == GZIP_MAGIC:
            self.compressed = True
            self._inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
            self._decoder = self._make_decoder(None)
        else:
            self._decoder = self._make_decoder(self.size)
        return self._feed(memoryview(head))

    def _feed(self, data: memoryview | bytes) -> list[Event]:
        if not data:
            return []
        if self._inflater is None:
            return list(self._decoder.feed(data))
        events: list[Event] = []
        while data:
            if self._inflated_all:  # after a gzip stream: another one, or zero padding
                if not bytes(data).strip(b"\0"):
                    return events
                self._inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
                self._inflated_all = False
            try:
                out = self._inflater.decompress(data, INFLATE_STEP)
            except zlib.error as error:
                raise FormatError(
                    f"the OVA's disk {self.name!r} is not valid gzip data: {error}"
                ) from None
            if out:
                events.extend(self._decoder.feed(out))
            if self._inflater.eof:
                self._inflated_all = True
                data = self._inflater.unused_data
            else:
                data = self._inflater.unconsumed_tail
        return events


def disk_kind(name: str) -> str | None:
    """The disk extension of a member name (lowercase), or None for a non-disk member."""
    base = name.rsplit("/", 1)[-1].lower()
    dot = base.rfind(".")
    extension = base[dot:] if dot > 0 else ""
    if extension in DISK_DECODERS or extension in UNSUPPORTED_DISKS:
        return extension
    return None


class OvaDecoder(TarArchiveDecoder):
    """Sans-I/O decoder of an OVA: `feed(bytes)`/`finish()` return the disk's events.

    `spill` and the member's size are handed to the inner decoder (its stream offsets are
    relative to the member). `disk_member` names the member decoded, once it is known;
    `other_disks` lists further disk members, skipped."""

    def __init__(self, spill: Spill | None = None, stream_length: int | None = None):
        super().__init__()
        self.spill = spill
        self.stream_length = stream_length
        self.disk_member: str | None = None
        self.other_disks: list[str] = []
        self.members: list[str] = []  # the first LISTED_MEMBERS names, for messages
        self.member_count = 0
        self._inner: Any = None  # the disk's decoder while its member streams by

    def _on_archive_end(self, events: list[Event]) -> None:
        if self.disk_member is None:
            listed = ", ".join(repr(m) for m in self.members) or "none"
            if self.member_count > len(self.members):
                listed += f" and {self.member_count - len(self.members)} more"
            raise FormatError(
                f"the OVA has no disk member (.vhd, .qcow2, .vmdk, .raw or .img); its "
                f"members: {listed}"
            )

    def _on_tar_event(self, event: object, events: list[Event]) -> None:
        if isinstance(event, MemberData):
            if self._inner is not None:
                events.extend(self._call(self._inner.feed, event.data))
        elif isinstance(event, MemberStart):
            self.member_count += 1
            if len(self.members) < LISTED_MEMBERS:
                self.members.append(event.name)
            kind = disk_kind(event.name) if event.is_file else None
            if kind is None:
                return
            if self.disk_member is not None:
                self.other_disks.append(event.name)
                return
            self.disk_member = event.name
            self._inner = self._decoder_for(kind, event)
        elif isinstance(event, MemberEnd) and self._inner is not None:
            inner, self._inner = self._inner, None
            events.extend(self._call(inner.finish))

    def _decoder_for(self, kind: str, member: MemberStart) -> Any:
        if kind in UNSUPPORTED_DISKS:
            raise UnsupportedMember(
                f"the OVA's disk {member.name!r} is a {kind[1:]} image, which cannot be "
                f"imported (supported: .vhd, .qcow2, streamOptimized .vmdk, .raw, .img)"
            )
        decoder = DISK_DECODERS[kind]
        if decoder is None:
            return _DiskMember(
                member.size, functools.partial(_raw_member, member.name), member.name
            )
        # A partial of a module-level function, not a closure: a resumable upload pickles
        # the decoder's state with its checkpoints.
        maker = functools.partial(_inner_decoder, decoder, self.spill)
        return _DiskMember(member.size, maker, member.name)

    def _call(self, method: Any, *args: Any) -> list[Event]:
        """Run the inner decoder, naming the member in what it refuses."""
        try:
            return list(method(*args))
        except UnsupportedVariant as error:
            raise UnsupportedMember(
                f"the OVA's disk {self.disk_member!r} cannot be imported: {error}"
            ) from error
        except FormatError as error:
            if type(error) is not FormatError:  # a subclass the service may map specially
                raise
            raise FormatError(f"the OVA's disk {self.disk_member!r}: {error}") from error


def _raw_member(name: str, stream_length: int | None) -> _RawMember:
    if stream_length is None:
        raise UnsupportedMember(
            f"the OVA's disk {name!r} is a gzip-compressed raw image, whose size is not "
            f"known before the end: not supported"
        )
    return _RawMember(stream_length)


def _inner_decoder(decoder_class: Any, spill: Any, stream_length: int | None) -> Any:
    return decoder_class(spill=spill, stream_length=stream_length)
