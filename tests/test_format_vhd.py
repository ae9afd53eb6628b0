"""The VHD codec against independent oracles: qemu-img for dynamic and fixed images (qemu
writes them, reads ours, compares disks), libvhdi (pyvhdi under the system python) for
differencing images, and hand-built images (tests/vhd_builder.py) for everything else."""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import os
import random
import shutil
import subprocess
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from formats.errors import FormatError
from formats.events import Header, Write
from formats.layout import Data, Literal, OutputLayout
from formats.layout import Zero as ZeroPiece
from formats.spill import MemorySpill
from formats.vhd import (
    BLOCK_SIZE,
    MAX_VIRTUAL_SIZE,
    VhdDecoder,
    chs_geometry,
    vhd_layout,
    vhd_timestamp,
)
from tests.vhd_builder import Block, DynamicImage, dynamic_header, footer, with_checksum

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
SYSTEM_PYTHON = "/usr/bin/python3"
needs_qemu = pytest.mark.skipif(
    QEMU_IMG is None or QEMU_IO is None, reason="qemu-img and qemu-io are not installed"
)


def has_pyvhdi() -> bool:
    if not os.path.exists(SYSTEM_PYTHON):
        return False
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import pyvhdi"], capture_output=True)
    return probe.returncode == 0


# -- helpers ---------------------------------------------------------------------------------


def random_chunks(rng: random.Random, tiny: Sequence[tuple[int, int]] = ()) -> Callable[[int], int]:
    """Chunk sizes: 1-7 bytes inside the `tiny` (start, end) stream ranges, up to 1 MiB
    elsewhere, so that every structure gets cut at odd places."""

    def size(pos: int) -> int:
        for lo, hi in tiny:
            if lo <= pos < hi:
                return rng.randint(1, 7)
        return rng.choice((rng.randint(1, 4 * KiB), rng.randint(1, MiB)))

    return size


def decode(
    stream: bytes,
    chunk: Callable[[int], int] | int | None = None,
    *,
    spill: MemorySpill | None = None,
    stream_length: int | None = None,
    fill: int = 0,
) -> tuple[Header, bytearray, list[Write]]:
    """Feeds `stream` in pieces, applies the events to a disk full of `fill` bytes and checks
    the event contract: one Header, before any Write, and writes inside the disk."""
    decoder = VhdDecoder(spill=spill, stream_length=stream_length)
    header: Header | None = None
    disk = bytearray()
    writes: list[Write] = []

    def apply(events) -> None:
        nonlocal header, disk
        for event in events:
            if isinstance(event, Header):
                assert header is None, "a second Header"
                header = event
                disk = bytearray([fill]) * (event.virtual_size or 0)
                continue
            assert isinstance(event, Write), event
            assert header is not None, "a Write before the Header"
            end = event.offset + len(event.data)
            if header.virtual_size is not None:
                assert event.offset >= 0 and end <= header.virtual_size, event.offset
            elif end > len(disk):
                disk.extend(bytes(end - len(disk)))
            disk[event.offset : end] = event.data
            writes.append(Write(event.offset, bytes(event.data)))

    pos = 0
    view = memoryview(stream)
    while pos < len(stream):
        if chunk is None:
            n = len(stream)
        elif isinstance(chunk, int):
            n = chunk
        else:
            n = chunk(pos)
        apply(decoder.feed(view[pos : pos + n]))
        pos += n
    apply(decoder.finish())
    assert header is not None
    return header, disk, writes


def render(layout: OutputLayout, disk: bytes, start: int = 0, end: int | None = None) -> bytes:
    """The bytes of layout[start:end], Data pieces read from `disk`."""
    end = layout.length if end is None else end
    out = bytearray()
    for piece in layout.slice(start, end):
        if isinstance(piece, Literal):
            out += piece.data
        elif isinstance(piece, Data):
            assert piece.offset + piece.length <= len(disk)
            out += disk[piece.offset : piece.offset + piece.length]
        else:
            assert isinstance(piece, ZeroPiece)
            out += bytes(piece.length)
    assert len(out) == end - start
    return bytes(out)


def qemu(*args: str) -> str:
    done = subprocess.run([QEMU_IMG, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def sector_rounded(extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(o // 512 * 512, -(-(o + n) // 512) * 512) for o, n in extents]


# -- a corpus written by qemu-img ------------------------------------------------------------

REF_SIZE = 33 * MiB + 3 * 512  # a multiple of 512, not of the 2 MiB block
REF_EXTENTS = [
    (0, 4096),
    (2 * MiB - 1000, 5000),  # across a block boundary, unaligned
    (5 * MiB + 512, 3 * MiB),  # covers block 3 whole
    (20 * MiB + 7, 100),  # inside one sector
    (REF_SIZE - 1024, 1024),  # the last two sectors, in a partial last block
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    if QEMU_IMG is None or QEMU_IO is None:
        pytest.skip("qemu-img and qemu-io are not installed")
    root = tmp_path_factory.mktemp("vhd")
    rng = random.Random(20240501)
    ref = bytearray(REF_SIZE)
    for offset, length in REF_EXTENTS:
        ref[offset : offset + length] = rng.randbytes(length)
    paths = {"raw": root / "ref.raw"}
    paths["raw"].write_bytes(ref)
    for name, opts in (
        ("dynamic", ["-o", "subformat=dynamic,force_size=on"]),
        ("parallel", ["-W", "-o", "subformat=dynamic,force_size=on"]),  # any block order
        ("fixed", ["-o", "subformat=fixed,force_size=on"]),
    ):
        paths[name] = root / f"{name}.vhd"
        qemu("convert", "-f", "raw", "-O", "vpc", *opts, str(paths["raw"]), str(paths[name]))
    # Blocks stored in reverse disk order, for certain: qemu-io writes the data block by
    # block from the last, and qemu allocates blocks in the order they are first written.
    paths["reversed"] = root / "reversed.vhd"
    qemu("create", "-q", "-f", "vpc", "-o", "force_size=on", str(paths["reversed"]), str(REF_SIZE))
    commands = []
    for offset, length in REF_EXTENTS:
        lo, end = offset, offset + length
        while lo < end:
            hi = min(end, (lo // BLOCK_SIZE + 1) * BLOCK_SIZE)
            source = root / f"piece-{lo}"
            source.write_bytes(ref[lo:hi])
            commands.append((lo, ["-c", f"write -q -s {source} {lo} {hi - lo}"]))
            lo = hi
    args = [arg for _, command in sorted(commands, reverse=True) for arg in command]
    done = subprocess.run(
        [QEMU_IO, "-f", "vpc", *args, str(paths["reversed"])], capture_output=True, text=True
    )
    assert done.returncode == 0 and not done.stdout, done.stdout + done.stderr
    return paths


def bat_of(image: bytes) -> list[int]:
    entries = int.from_bytes(image[512 + 28 : 512 + 32], "big")
    table = int.from_bytes(image[512 + 16 : 512 + 24], "big")
    return [int.from_bytes(image[table + 4 * i : table + 4 * i + 4], "big") for i in range(entries)]


@needs_qemu
@pytest.mark.parametrize("name", ["dynamic", "parallel", "reversed"])
def test_decodes_qemu_dynamic_images(corpus, name):
    image = corpus[name].read_bytes()
    ref = corpus["raw"].read_bytes()
    bat = [s for s in bat_of(image) if s != 0xFFFFFFFF]
    if name == "reversed":
        assert bat == sorted(bat, reverse=True)
    tiny = [(0, 2600), (bat[0] * 512 - 10, bat[0] * 512 + 700), (len(image) - 600, len(image))]
    for seed in range(3):
        chunks = random_chunks(random.Random(seed), tiny)
        header, disk, _ = decode(image, chunks, stream_length=len(image) if seed else None)
        assert header == Header(virtual_size=REF_SIZE, whole_image=True)
        assert disk == ref


@needs_qemu
def test_full_bitmaps_make_one_write_per_block(corpus):
    image = corpus["dynamic"].read_bytes()
    allocated = sum(1 for s in bat_of(image) if s != 0xFFFFFFFF)
    _, disk, writes = decode(image)
    assert len(writes) == allocated
    assert disk == corpus["raw"].read_bytes()


@needs_qemu
def test_decodes_qemu_fixed_image(corpus):
    image = corpus["fixed"].read_bytes()
    ref = corpus["raw"].read_bytes()
    tiny = [(0, 1100), (len(image) - 1500, len(image))]
    header, disk, _ = decode(image, random_chunks(random.Random(7), tiny), stream_length=len(image))
    assert header == Header(virtual_size=REF_SIZE, whole_image=True)
    assert disk == ref
    header, disk, _ = decode(image, 300_001)
    assert header == Header(virtual_size=None, whole_image=True)
    assert disk == ref


# -- the encoder against qemu ----------------------------------------------------------------


@needs_qemu
def test_encoder_output_reads_back_in_qemu(corpus, tmp_path):
    ref = corpus["raw"].read_bytes()
    layout = vhd_layout(REF_SIZE, REF_EXTENTS, disk_uuid=b"\x42" * 16, timestamp=12345)
    out = tmp_path / "out.vhd"
    out.write_bytes(render(layout, ref))
    compared = qemu("compare", "-f", "vpc", "-F", "raw", str(out), str(corpus["raw"]))
    assert "identical" in compared
    info = json.loads(qemu("info", "--output=json", "-f", "vpc", str(out)))
    assert info["virtual-size"] == REF_SIZE
    # Only the touched blocks are stored, the last one partial.
    blocks = [i for i, s in enumerate(bat_of(out.read_bytes())) if s != 0xFFFFFFFF]
    assert blocks == [0, 1, 2, 3, 4, 10, 16]
    header, disk, _ = decode(out.read_bytes(), random_chunks(random.Random(3)))
    assert header == Header(virtual_size=REF_SIZE, whole_image=True)
    assert disk == ref


@needs_qemu
def test_encoder_empty_and_odd_sizes_in_qemu(tmp_path):
    for size in (0, 512, 5 * MiB + 100):
        disk = bytes(size)
        layout = vhd_layout(size, [], disk_uuid=bytes(16), timestamp=0)
        out = tmp_path / f"{size}.vhd"
        out.write_bytes(render(layout, disk))
        info = json.loads(qemu("info", "--output=json", "-f", "vpc", str(out)))
        assert info["virtual-size"] == -(-size // 512) * 512
        header, _, writes = decode(out.read_bytes())
        assert header.virtual_size == -(-size // 512) * 512 and not writes


def test_encoder_slices_match_the_whole():
    rng = random.Random(11)
    size = 9 * MiB + 1024
    disk = rng.randbytes(size)
    extents = [(100, 3000), (2 * MiB - 512, 4 * MiB + 700), (size - 5, 5)]
    layout = vhd_layout(size, extents, disk_uuid=b"\x01" * 16, timestamp=5)
    whole = render(layout, disk)
    stride = 512 + BLOCK_SIZE
    first_block = 1536 + 512  # footer copy, header, BAT of 5 entries padded to a sector
    boundaries = [0, 1, 511, 512, 1536, first_block, first_block + 512, layout.length - 512]
    boundaries += [first_block + k * stride for k in range(1, 5)]
    ranges = [(0, layout.length), (layout.length - 513, layout.length)]
    ranges += [(max(0, b - 3), min(layout.length, b + 5)) for b in boundaries]
    for _ in range(40):
        a = rng.randrange(layout.length)
        ranges.append((a, min(layout.length, a + rng.choice((1, 700, 3 * MiB)))))
    for a, b in ranges:
        assert render(layout, disk, a, b) == whole[a:b], (a, b)
    assert list(layout.slice(7, 7)) == []
    with pytest.raises(ValueError):
        list(layout.slice(0, layout.length + 1))


def test_encoder_is_deterministic_and_rounds_extents_to_sectors():
    rng = random.Random(12)
    size = 5 * MiB
    disk = rng.randbytes(size)  # bytes next to the extents are not zero
    extents = [(1000, 10), (700_000, 1)]

    def digest() -> str:
        layout = vhd_layout(size, extents, disk_uuid=b"\x07" * 16, timestamp=99)
        return hashlib.sha256(render(layout, disk)).hexdigest()

    assert digest() == digest()
    layout = vhd_layout(size, extents, disk_uuid=b"\x07" * 16, timestamp=99)
    data = [p for p in layout.slice(0, layout.length) if isinstance(p, Data)]
    assert [(p.offset, p.offset + p.length) for p in data] == sector_rounded(extents)
    _, decoded, writes = decode(render(layout, disk), fill=0)
    expected = bytearray(size)
    for lo, hi in sector_rounded(extents):
        expected[lo:hi] = disk[lo:hi]
    assert decoded == expected
    assert [(w.offset, w.offset + len(w.data)) for w in writes] == sector_rounded(extents)


def test_encoder_rejects_bad_arguments():
    uuid = bytes(16)
    with pytest.raises(ValueError, match="exceeds the VHD maximum of 2040 GiB"):
        vhd_layout(MAX_VIRTUAL_SIZE + 512, [], disk_uuid=uuid, timestamp=0)
    with pytest.raises(ValueError, match="sorted"):
        vhd_layout(10 * MiB, [(5 * MiB, 10), (0, 10)], disk_uuid=uuid, timestamp=0)
    with pytest.raises(ValueError, match="not within"):
        vhd_layout(10 * MiB, [(10 * MiB - 5, 10)], disk_uuid=uuid, timestamp=0)
    with pytest.raises(ValueError, match="16 bytes"):
        vhd_layout(MiB, [], disk_uuid=b"short", timestamp=0)
    with pytest.raises(ValueError, match="256"):
        vhd_layout(MiB, [], disk_uuid=uuid, timestamp=0, parent=(uuid, 0, "x" * 257))


def test_encoder_2040_gib_stays_small_and_fast():
    extents = [(0, 4096), (1000 * GiB + 3, 5 * MiB), (MAX_VIRTUAL_SIZE - 512, 512)]
    started = time.perf_counter()
    tracemalloc.start()
    try:
        layout = vhd_layout(MAX_VIRTUAL_SIZE, extents, disk_uuid=bytes(16), timestamp=0)
        list(layout.slice(0, layout.length))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 1
    assert peak < 16 * MiB, peak  # the 4 MiB BAT, a couple of times over
    entries = MAX_VIRTUAL_SIZE // BLOCK_SIZE
    blocks = 1 + 3 + 1  # 5 MiB from 3 bytes into a block touches 3 blocks
    assert layout.length == 1536 + 4 * entries + blocks * (512 + BLOCK_SIZE) + 512
    tail = list(layout.slice(layout.length - 1024, layout.length))
    assert isinstance(tail[-1], Literal) and tail[-1].data[:8] == b"conectix"
    assert Data(MAX_VIRTUAL_SIZE - 512, 512) in tail
    # The whole disk as one extent: a million blocks, described without a million objects.
    started = time.perf_counter()
    full = vhd_layout(MAX_VIRTUAL_SIZE, [(0, MAX_VIRTUAL_SIZE)], disk_uuid=bytes(16), timestamp=0)
    assert time.perf_counter() - started < 2
    middle = full.length // 2
    pieces = list(full.slice(middle, middle + 3 * BLOCK_SIZE))
    assert sum(p.length for p in pieces) == 3 * BLOCK_SIZE


def test_chs_geometry_follows_the_spec():
    assert chs_geometry(0) == (0, 4, 17)
    assert chs_geometry(67587) == (993, 4, 17)  # the test disk above
    assert chs_geometry(20 * GiB // 512) == (41610, 16, 63)
    assert chs_geometry(MAX_VIRTUAL_SIZE // 512) == (65535, 16, 255)
    assert chs_geometry(1 << 40) == (65535, 16, 255)


@needs_qemu
def test_chs_geometry_agrees_with_qemu(tmp_path):
    """qemu (without force_size) picks a CHS geometry by the same algorithm for disks below
    65535 * 16 * 63 sectors; our geometry of its size gives back its geometry."""
    for size in ("10M", "1G", "20G", "31G"):
        path = tmp_path / f"{size}.vhd"
        qemu("create", "-q", "-f", "vpc", str(path), size)
        raw = path.read_bytes()[:512]
        geometry = (int.from_bytes(raw[56:58], "big"), raw[58], raw[59])
        sectors = int.from_bytes(raw[48:56], "big") // 512
        assert chs_geometry(sectors) == geometry, size


# -- differencing, with libvhdi as the oracle ------------------------------------------------

PYVHDI_READ = """
import sys, pyvhdi
parent = pyvhdi.file(); parent.open(sys.argv[1])
child = pyvhdi.file(); child.open(sys.argv[2])
child.set_parent(parent)
data = child.read_buffer_at_offset(child.media_size, 0)
sys.stdout.write(f"{child.disk_type} {child.media_size} {child.parent_filename}\\n")
open(sys.argv[3], "wb").write(data)
"""


@pytest.mark.skipif(not has_pyvhdi(), reason="the system python has no pyvhdi")
def test_differencing_image_reads_in_libvhdi(tmp_path):
    rng = random.Random(21)
    size = 9 * MiB + 1536
    parent_disk = bytearray(size)
    parent_extents = [(0, 3 * MiB), (6 * MiB, 100_000)]
    for offset, length in parent_extents:
        parent_disk[offset : offset + length] = rng.randbytes(length)
    child_disk = rng.randbytes(size)
    # libvhdi 20210425 misreads a run of set bits that ends inside a bitmap byte (it takes
    # the rest of that byte as present), so the child's extents end on 4 KiB boundaries;
    # unaligned bitmaps are checked against the decoder and hand-built images below.
    child_extents = [(3 * 512, 4096 - 3 * 512), (2 * MiB - 512, 4608), (7 * MiB + 5, 8187)]
    parent_uuid, parent_time = rng.randbytes(16), vhd_timestamp(1_700_000_000)
    parent = vhd_layout(size, parent_extents, disk_uuid=parent_uuid, timestamp=parent_time)
    child = vhd_layout(
        size,
        child_extents,
        disk_uuid=rng.randbytes(16),
        timestamp=parent_time + 60,
        parent=(parent_uuid, parent_time, "parent.vhd"),
    )
    (tmp_path / "parent.vhd").write_bytes(render(parent, parent_disk))
    (tmp_path / "child.vhd").write_bytes(render(child, child_disk))
    done = subprocess.run(
        [SYSTEM_PYTHON, "-c", PYVHDI_READ]
        + [str(tmp_path / n) for n in ("parent.vhd", "child.vhd", "read.raw")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["4", str(size), "parent.vhd"]
    expected = bytearray(parent_disk)
    for lo, hi in sector_rounded(child_extents):
        expected[lo:hi] = child_disk[lo:hi]
    assert (tmp_path / "read.raw").read_bytes() == expected
    # Our decoder applies the same delta: only the child's sectors change.
    header, applied, _ = decode((tmp_path / "child.vhd").read_bytes(), 100_000, fill=0xAA)
    assert header == Header(virtual_size=size, whole_image=False)
    sentinel = bytearray([0xAA]) * size
    for lo, hi in sector_rounded(child_extents):
        sentinel[lo:hi] = child_disk[lo:hi]
    assert applied == sentinel


# -- hand-built images: bitmaps, layouts, spill ----------------------------------------------


def small_image(rng: random.Random, **knobs) -> DynamicImage:
    """4 KiB blocks (8 sectors, a 1-byte bitmap padded to a sector) with every bitmap shape."""
    image = DynamicImage(current_size=16 * 4096 - 1536, block_size=4096, **knobs)
    shapes = [range(8), range(0), {0}, {7}, {1, 2, 3}, {0, 2, 4, 6}, {5, 6, 7}, range(1, 8)]
    for index, shape in zip([0, 1, 3, 4, 6, 9, 12, 15], shapes, strict=True):
        image.blocks[index] = Block(shape, rng.randbytes(4096))
    return image


def test_partial_bitmaps_write_only_present_sectors_fed_byte_by_byte():
    rng = random.Random(31)
    image = small_image(rng, disk_type=4, order=[15, 3, 0, 12, 1, 9, 6, 4])
    stream = image.render()
    header, disk, writes = decode(stream, 1, fill=0xAA)
    assert header == Header(virtual_size=image.current_size, whole_image=False)
    assert disk == image.expected(fill=0xAA)
    # Each run of set bits is one write; block 15 is cut at the end of the disk (5 sectors).
    whole = decode(stream, fill=0xAA)[2]
    assert sorted((w.offset, len(w.data)) for w in whole) == [
        (0, 4096),
        (3 * 4096, 512),
        (4 * 4096 + 7 * 512, 512),
        (6 * 4096 + 512, 1536),
        (9 * 4096, 512),
        (9 * 4096 + 1024, 512),
        (9 * 4096 + 2048, 512),
        (9 * 4096 + 3072, 512),
        (12 * 4096 + 5 * 512, 1536),
        (15 * 4096 + 512, 4 * 512),
    ]
    assert b"".join(w.data for w in sorted(writes, key=lambda w: w.offset)) == b"".join(
        w.data for w in sorted(whole, key=lambda w: w.offset)
    )


def test_gaps_locators_and_a_bat_larger_than_the_disk_are_tolerated(monkeypatch):
    rng = random.Random(32)
    passwd = "/etc/passwd".encode("utf-16-be")
    image = small_image(
        rng,
        disk_type=4,
        gap_after_bat=1024,
        gap_between_blocks=512,
        entries=40,  # like vhd-util's BAT preallocated for a larger disk
        parent_uuid=b"\x22" * 16,
        parent_name="/etc/passwd",
        locators=((b"W2ku", 1, len(passwd), 2048 + 512), (b"MacX", 1, 11, 1536 + 512 * 20)),
    )
    image.placed[2048 + 512] = passwd
    opened = []
    monkeypatch.setattr(builtins, "open", lambda *a, **k: opened.append(a))
    monkeypatch.setattr(os, "open", lambda *a, **k: opened.append(a))
    decoder = VhdDecoder()
    events = decoder.feed(image.render()) + decoder.finish()
    assert not opened
    assert events[0] == Header(virtual_size=image.current_size, whole_image=False)
    assert decoder.header is not None and decoder.header.parent_name == "/etc/passwd"
    disk = image.expected(fill=0xAA)
    applied = bytearray([0xAA]) * len(disk)
    for event in events[1:]:
        applied[event.offset : event.offset + len(event.data)] = event.data
    assert applied == disk


def test_blocks_before_the_bat_go_through_the_spill():
    rng = random.Random(33)
    image = small_image(rng, blocks_before_bat=True, order=[9, 0, 15, 4, 1, 3, 12, 6])
    stream = image.render()
    spill = MemorySpill()
    tiny = [(1536, 1700), (len(stream) - 700, len(stream))]
    header, disk, _ = decode(stream, random_chunks(random.Random(1), tiny), spill=spill)
    assert header.whole_image and disk == image.expected()
    assert spill.size == 0  # all read back and discarded
    with pytest.raises(
        FormatError, match=r"before the BAT at \d+: decoding this layout needs a spill"
    ):
        decode(stream)


def test_decoder_is_fast_on_a_1_gib_half_allocated_image():
    """A 1 GiB disk, every other 2 MiB block full, fed in 64 KiB pieces that straddle the
    structures: the decoder's own time, not the test's, must stay far below a second."""
    size = GiB
    layout = vhd_layout(
        size, [(i, BLOCK_SIZE) for i in range(0, size, 2 * BLOCK_SIZE)], disk_uuid=bytes(16),
        timestamp=0,
    )  # fmt: skip
    pattern = memoryview(bytes(range(256)) * (BLOCK_SIZE // 256))
    decoder = VhdDecoder(stream_length=layout.length)
    spent, written, step = 0.0, 0, 64 * KiB + 7
    for start in range(0, layout.length, step):
        pieces = layout.slice(start, min(layout.length, start + step))
        chunk = b"".join(p.data if isinstance(p, Literal) else pattern[: p.length] for p in pieces)
        started = time.perf_counter()
        events = decoder.feed(chunk)
        spent += time.perf_counter() - started
        written += sum(len(e.data) for e in events if isinstance(e, Write))
    decoder.finish()
    assert written == size // 2
    assert spent < 0.5, spent


# -- hostile images --------------------------------------------------------------------------


def valid_image() -> tuple[DynamicImage, bytes]:
    image = small_image(random.Random(40))
    return image, image.render()


def expect_error(stream: bytes, match: str, **kwargs) -> None:
    with pytest.raises(FormatError, match=match):
        decode(stream, 1000, **kwargs)
    with pytest.raises(FormatError, match=match):  # the same error fed in one piece
        decode(stream, **kwargs)


def test_valid_hand_built_image_decodes():
    image, stream = valid_image()
    header, disk, _ = decode(stream, 1000, stream_length=len(stream))
    assert header == Header(virtual_size=image.current_size, whole_image=True)
    assert disk == image.expected()


@pytest.mark.parametrize(
    ("cut", "match"),
    [
        (300, "too short for a VHD footer"),
        (1000, "before the end of the dynamic header"),
        (1538, "before the end of the BAT"),
        (2048 + 100, r"block 0 at offset 2048-6656 is incomplete or missing \(0 of 8"),
        (2048 + 4608 + 600, r"block 1 .* \(1 of 8"),
        (-512, "the 512-byte footer at the end is missing"),
        (-100, "the 512-byte footer at the end is missing"),
    ],
)
def test_truncated(cut, match):
    _, stream = valid_image()
    expect_error(stream[:cut], match)


def test_truncated_with_a_known_length():
    _, stream = valid_image()
    expect_error(stream[:-700], "ended after .* of its declared", stream_length=len(stream))


def test_longer_than_declared():
    _, stream = valid_image()
    expect_error(stream + b"x", "longer than its declared", stream_length=len(stream))


def test_bad_footer_checksum():
    _, stream = valid_image()
    broken = bytearray(stream)
    broken[100] ^= 1  # reserved byte of the footer copy
    expect_error(bytes(broken), "footer copy at offset 0: bad footer checksum")


def test_bad_header_checksum():
    _, stream = valid_image()
    broken = bytearray(stream)
    broken[512 + 900] ^= 1
    expect_error(bytes(broken), "dynamic disk header at offset 512: bad header checksum")


def test_bad_header_cookie():
    _, stream = valid_image()
    broken = bytearray(stream)
    broken[512:520] = b"cxsparsf"
    broken[512:1536] = with_checksum(broken[512:1536], 36)
    expect_error(bytes(broken), "cookie b'cxsparsf'")


def test_footer_copy_differs_from_end_footer():
    image, stream = valid_image()
    end = footer(image.current_size, 3, uuid=b"\x99" * 16)
    expect_error(stream[:-512] + end, "differs from its copy at offset 0 in: checksum, uuid")


def test_bad_end_footer():
    _, stream = valid_image()
    expect_error(stream[:-512] + bytes(512), "the footer at the end .*: cookie")


def test_data_after_the_end_footer():
    image, _ = valid_image()
    image.trailing = b"junk" * 100
    expect_error(image.render(), "400 bytes follow the footer at offset")


def test_max_table_entries_mismatch():
    image, _ = valid_image()
    del image.blocks[15]
    image.entries = 13
    expect_error(image.render(), "the BAT has 13 entries .* needs 16 blocks of 4096")
    # Far more than any disk needs: refused before the BAT is read, not allocated.
    huge = footer(image.current_size, 3) + dynamic_header(1536, 1 << 30, 4096) + bytes(5000)
    expect_error(huge, "declares 1073741824 entries .* at most 4194304 are accepted")


@pytest.mark.parametrize("block_size", [512, 3 * MiB, 512 * MiB])
def test_absurd_block_size(block_size):
    image = DynamicImage(current_size=4 * MiB, block_size=block_size, entries=4)
    expect_error(image.render()[:4096], f"block size {block_size} is not a power of two")


def test_bat_entry_pointing_into_the_bat():
    image, _ = valid_image()
    image.bat_overrides[5] = 3  # sector 3: the BAT at 1536
    expect_error(image.render(), r"BAT entry 5 points to offset 1536, inside the BAT \(1536-2048\)")


def test_bat_entry_pointing_into_the_header():
    image, _ = valid_image()
    image.bat_overrides[2] = 1
    expect_error(image.render(), "BAT entry 2 points to offset 512, inside the dynamic header")


def test_two_bat_entries_pointing_to_the_same_block():
    image, _ = valid_image()
    image.bat_overrides[7] = 2048 // 512  # where block 0 is
    expect_error(image.render(), "BAT entries 0 and 7 both point to offset 2048")


def test_overlapping_blocks():
    image, _ = valid_image()
    image.bat_overrides[7] = 2048 // 512 + 1
    expect_error(image.render(), r"blocks 0 \(offset 2048\) and 7 \(offset 2560\) overlap")


def test_block_beyond_a_known_stream_length():
    image, _ = valid_image()
    image.bat_overrides[7] = 1000
    stream = image.render()
    expect_error(
        stream, "block 7 ends at offset .* beyond the end footer", stream_length=len(stream)
    )
    expect_error(stream, r"block 7 at offset 512000-516608 is incomplete or missing")


def test_header_and_table_offsets_must_be_in_order():
    _, stream = valid_image()
    broken = bytearray(stream)
    broken[16:24] = (0).to_bytes(8, "big")  # header offset inside the footer copy
    broken[0:512] = with_checksum(broken[0:512], 64)
    expect_error(bytes(broken), "dynamic header offset 0 is not after the footer copy")
    broken = bytearray(stream)
    broken[512 + 16 : 512 + 24] = (1024).to_bytes(8, "big")  # BAT inside the header
    broken[512:1536] = with_checksum(broken[512:1536], 36)
    expect_error(bytes(broken), "BAT offset 1024 is not after the dynamic header at 512-1536")


def test_disk_larger_than_the_vhd_maximum():
    too_big = footer(MAX_VIRTUAL_SIZE + 512, 3) + bytes(600)
    expect_error(too_big, "exceeds the VHD maximum of 2040 GiB")


def test_fixed_image_checks():
    data = random.Random(50).randbytes(3 * 4096)
    good = data + footer(len(data), 2, data_offset=0xFFFFFFFFFFFFFFFF)
    header, disk, _ = decode(good, 999, stream_length=len(good))
    assert header == Header(virtual_size=len(data), whole_image=True) and disk == data
    expect_error(
        data + footer(len(data) - 512, 2), "the fixed disk is 11776 bytes .* carries 12288"
    )
    expect_error(data + bytes(512), "not a VHD")
    expect_error(data + footer(len(data), 3), "that of a dynamic disk")
    bad = bytearray(footer(len(data), 2))
    bad[200] = 1
    expect_error(data + bytes(bad), "the footer at the end .*: bad footer checksum")
    # A lone footer is a valid empty fixed disk.
    assert decode(footer(0, 2))[0] == Header(virtual_size=None, whole_image=True)


def test_feed_after_finish_is_a_bug():
    _, stream = valid_image()
    decoder = VhdDecoder()
    decoder.feed(stream)
    decoder.finish()
    with pytest.raises(RuntimeError):
        decoder.feed(b"x")


@settings(max_examples=150, deadline=None)
@given(
    flips=st.lists(st.tuples(st.integers(0, 39_000), st.integers(0, 255)), max_size=4),
    cut=st.integers(0, 40_000),
    chunk=st.integers(1, 5000),
    known_length=st.booleans(),
)
def test_corrupted_images_fail_only_with_format_errors(flips, cut, chunk, known_length):
    """Whatever the damage (in the metadata, mostly: flips are aimed at the first sectors
    half of the time), the decoder either decodes or raises FormatError, nothing else."""
    _, stream = valid_image()
    broken = bytearray(stream[:cut])
    for at, value in flips:
        at = at % 2100 if value % 2 else at
        if at < len(broken):
            broken[at] = value
    with contextlib.suppress(FormatError):
        decode(bytes(broken), chunk, stream_length=len(broken) if known_length else None)


# -- property: any sparse disk survives encode -> decode -------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.integers(1, 3 * BLOCK_SIZE + 5000),
    cuts=st.lists(st.floats(0, 1), max_size=10),
    seed=st.integers(0, 2**32),
    differencing=st.booleans(),
)
def test_random_sparse_disks_round_trip(size, cuts, seed, differencing):
    rng = random.Random(seed)
    points = sorted({int(c * size) for c in cuts})
    extents = [(a, b - a) for a, b in zip(points[::2], points[1::2], strict=False) if b > a]
    disk = rng.randbytes(size)  # also outside the extents: only their sectors may travel
    parent = (b"\x05" * 16, 1, "p.vhd") if differencing else None
    layout = vhd_layout(size, extents, disk_uuid=b"\x06" * 16, timestamp=2, parent=parent)
    stream = render(layout, disk)
    fill = 0xAA if differencing else 0
    header, decoded, _ = decode(stream, random_chunks(rng), fill=fill)
    rounded = -(-size // 512) * 512
    assert header == Header(virtual_size=rounded, whole_image=not differencing)
    expected = bytearray([fill]) * rounded
    for lo, hi in sector_rounded(extents):
        expected[lo:hi] = disk[lo:hi].ljust(hi - lo, b"\0")
    assert decoded == expected
