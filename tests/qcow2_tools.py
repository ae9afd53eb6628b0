"""Helpers for the qcow2 tests: qemu as the oracle, applying decoder events, rendering
layouts, and a tiny independent table reader to find and patch structures in images."""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
from collections.abc import Iterable
from pathlib import Path

from formats.events import Event, Header, Write, Zero
from formats.layout import Data, Derived, Literal, OutputLayout
from formats.qcow2 import Qcow2Decoder

HAVE_QEMU = bool(shutil.which("qemu-img") and shutil.which("qemu-io"))
HEADER = struct.Struct(">4sIQIIQIIQQIIQ")


def run(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True)


def qemu_io(image: Path, *commands: str) -> None:
    args: list[str | Path] = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    run(*args, image)


def to_raw(image: Path, out: Path) -> bytes:
    run("qemu-img", "convert", "-O", "raw", image, out)
    return out.read_bytes()


def chunks(data: bytes, rng: random.Random, mode: str) -> Iterable[memoryview]:
    """The stream cut the way an upload might be: whole, random sizes, or tiny pieces."""
    view = memoryview(data)
    pos = 0
    while pos < len(data):
        if mode == "whole":
            n = len(data)
        elif mode == "tiny":
            n = rng.choice((1, 2, 7, 511, 512, 513))
        else:
            n = rng.choice((1, 100, 4096, 65535, 65536, 65537, 300_000, 1 << 20))
        yield view[pos : pos + n]
        pos += n


def apply(events: Iterable[Event], base: bytes | None = None) -> tuple[bytearray, Header]:
    """Play events onto a disk: the base for deltas, zeros for whole images."""
    disk: bytearray | None = None
    header: Header | None = None
    for event in events:
        if isinstance(event, Header):
            assert header is None and disk is None, "Header comes once, first"
            header = event
            size = event.virtual_size or 0
            if event.whole_image:
                disk = bytearray(size)
            else:
                assert base is not None, "a delta needs its base"
                disk = bytearray(base[:size]) + bytearray(max(0, size - len(base)))
            continue
        assert disk is not None and header is not None, "events before the Header"
        if isinstance(event, Write):
            data = bytes(event.data)
            assert event.offset >= 0 and event.offset + len(data) <= len(disk)
            disk[event.offset : event.offset + len(data)] = data
        else:
            assert isinstance(event, Zero)
            assert event.offset >= 0 and event.offset + event.length <= len(disk)
            disk[event.offset : event.offset + event.length] = bytes(event.length)
    assert disk is not None and header is not None
    return disk, header


class TrackingSpill:
    """A Spill that knows exactly which bytes it still holds (MemorySpill frees only whole
    chunks), to check that the decoder discards what it has taken back."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.live = bytearray()

    def write(self, offset: int, data: bytes | memoryview) -> None:
        end = offset + len(data)
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
            self.live.extend(bytes(end - len(self.live)))
        self.data[offset:end] = data
        self.live[offset:end] = b"\x01" * len(data)

    def read(self, offset: int, length: int) -> bytes:
        assert self.live[offset : offset + length] == b"\x01" * length, "read of unspilled bytes"
        return bytes(self.data[offset : offset + length])

    def discard(self, offset: int, length: int) -> None:
        self.live[offset : offset + length] = bytes(len(self.live[offset : offset + length]))

    @property
    def size(self) -> int:
        return self.live.count(1)


def decode(
    image: bytes,
    base: bytes | None = None,
    *,
    seed: int = 0,
    mode: str = "random",
    spill: bool = True,
    stream_length: bool = True,
    max_spill: int | None = None,
) -> tuple[bytearray, Header, Qcow2Decoder]:
    store = TrackingSpill() if spill else None
    decoder = Qcow2Decoder(
        store, stream_length=len(image) if stream_length else None, max_spill=max_spill
    )
    events: list[Event] = []
    for piece in chunks(image, random.Random(seed), mode):
        events.extend(decoder.feed(piece))
    events.extend(decoder.finish())
    disk, header = apply(events, base)
    if store is not None:
        decoder.spill_store = store  # type: ignore[attr-defined]
    return disk, header, decoder


def render(out: OutputLayout, disk: bytes, start: int = 0, end: int | None = None) -> bytes:
    """Materialise output bytes [start, end) of a layout over a disk's content."""
    end = out.length if end is None else end
    parts = []
    for piece in out.slice(start, end):
        if isinstance(piece, Literal):
            parts.append(piece.data)
        elif isinstance(piece, Data):
            chunk = disk[piece.offset : piece.offset + piece.length]
            assert len(chunk) == piece.length
            parts.append(chunk)
        elif isinstance(piece, Derived):
            parts.append(piece.render(disk[piece.offset : piece.offset + piece.source_length]))
        else:
            parts.append(bytes(piece.length))
    data = b"".join(parts)
    assert len(data) == end - start
    return data


class Tables:
    """Where an image keeps things, read with a few lines of struct (independent of the
    decoder under test), so tests can check layouts and craft broken images."""

    def __init__(self, image: bytes):
        fields = HEADER.unpack_from(image)
        self.version = fields[1]
        self.cluster_bits = fields[4]
        self.cluster_size = 1 << self.cluster_bits
        self.size = fields[5]
        self.l1_size = fields[7]
        self.l1_offset = fields[8]
        self.rt_offset = fields[9]
        extended = self.version == 3 and struct.unpack_from(">Q", image, 72)[0] & 16
        self.entry_size = 16 if extended else 8
        self.image = image
        self.l1 = [
            struct.unpack_from(">Q", image, self.l1_offset + 8 * i)[0] & 0x00FF_FFFF_FFFF_FE00
            for i in range(self.l1_size)
        ]

    def l2_entry_offset(self, guest_cluster: int) -> int:
        """Host offset of the L2 entry that maps a guest cluster (its bitmap follows it in
        extended L2 entries)."""
        per_table = self.cluster_size // self.entry_size
        table = self.l1[guest_cluster // per_table]
        assert table, "no L2 table there"
        return table + self.entry_size * (guest_cluster % per_table)

    def l2_entry(self, guest_cluster: int) -> int:
        return struct.unpack_from(">Q", self.image, self.l2_entry_offset(guest_cluster))[0]

    def data_offsets(self) -> list[int]:
        """Host offsets of the standard data clusters, in guest order."""
        out = []
        for table in self.l1:
            if table:
                entries = self.image[table : table + self.cluster_size]
                for entry, *_ in struct.iter_unpack(
                    ">Q" if self.entry_size == 8 else ">QQ", entries
                ):
                    if entry & 0x00FF_FFFF_FFFF_FE00 and not entry >> 62 & 1:
                        out.append(entry & 0x00FF_FFFF_FFFF_FE00)
        return out


def patched(image: bytes, offset: int, fmt: str, *values: int | bytes) -> bytes:
    out = bytearray(image)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)
