"""The qcow2 codec against qemu: images qemu-img and qemu-io make are decoded and compared
with qemu's own raw conversion; images the encoder makes must pass `qemu-img check` and
`qemu-img compare`; hostile images must be refused with a precise FormatError."""

from __future__ import annotations

import builtins
import os
import random
import struct
import zlib
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from formats.errors import FormatError
from formats.events import Header, Write, Zero
from formats.layout import Data, Literal
from formats.qcow2 import Qcow2Decoder, _SpillMap, qcow2_layout
from formats.spill import MemorySpill
from tests.qcow2_tools import (
    HAVE_QEMU,
    Tables,
    TrackingSpill,
    apply,
    decode,
    patched,
    qemu_io,
    render,
    run,
    to_raw,
)

MiB = 1 << 20
SIZE = 6 * MiB + 3 * 512  # a multiple of 512, not of 64 KiB nor 2 MiB
# Data across 4 KiB, 64 KiB and 2 MiB cluster boundaries, a compressible stretch, the tail.
DATA_EXTENTS = [
    (0, 5000),
    (65536 - 700, 1400),
    (2 * MiB - 3000, 70000),
    (3 * MiB + 123, 300_000),
    (4 * MiB, 200_000),
    (SIZE - 4096, 4096),
]
COPIED = 1 << 63
COMPRESSED = 1 << 62

needs_qemu = pytest.mark.skipif(not HAVE_QEMU, reason="needs qemu-img and qemu-io")


def make_disk(size: int, extents: list[tuple[int, int]], seed: int) -> bytearray:
    rng = random.Random(seed)
    disk = bytearray(size)
    for start, length in extents:
        disk[start : start + length] = rng.randbytes(length)
    return disk


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("qcow2")


@pytest.fixture(scope="module")
def reference(work: Path) -> Path:
    disk = make_disk(SIZE, DATA_EXTENTS, seed=1234)
    disk[4 * MiB : 4 * MiB + 200_000] = (b"compressible text " * 20000)[:200_000]
    disk[3 * MiB + 5000 : 3 * MiB + 70000] = bytes(65000)  # zeros inside a data extent
    path = work / "ref.raw"
    path.write_bytes(disk)
    return path


def convert(work: Path, reference: Path, name: str, *options: str) -> Path:
    out = work / f"{name}.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", *options, reference, out)
    return out


# -- decoding what qemu writes ------------------------------------------------------------

CONVERSIONS = {
    "v2": ["-o", "compat=0.10"],
    "v3": ["-o", "compat=1.1"],
    "v3-4k": ["-o", "cluster_size=4k"],
    "v3-2M": ["-o", "cluster_size=2M"],
    "v3-512": ["-o", "cluster_size=512"],
    "zlib": ["-c"],
    "zlib-v2": ["-c", "-o", "compat=0.10"],
    "zlib-4k": ["-c", "-o", "cluster_size=4k"],
    "zstd": ["-c", "-o", "compression_type=zstd"],
    "zstd-2M": ["-c", "-o", "compression_type=zstd,cluster_size=2M"],
    "extended-l2": ["-o", "extended_l2=on"],
    "extended-l2-16k": ["-o", "extended_l2=on,cluster_size=16k"],
    "out-of-order": ["-W", "-m", "8"],
}


@needs_qemu
@pytest.mark.parametrize("name", CONVERSIONS)
def test_decodes_qemu_img_convert(work: Path, reference: Path, name: str) -> None:
    image = convert(work, reference, name, *CONVERSIONS[name]).read_bytes()
    expected = reference.read_bytes()
    for seed, mode in ((1, "random"), (2, "whole")):
        disk, header, _ = decode(image, seed=seed, mode=mode)
        assert header == Header(virtual_size=SIZE, whole_image=True)
        assert disk == expected


@needs_qemu
@pytest.mark.parametrize("name", ["v3-4k", "zlib"])
def test_decodes_tiny_pieces(work: Path, reference: Path, name: str) -> None:
    image = convert(work, reference, f"tiny-{name}", *CONVERSIONS[name]).read_bytes()
    disk, _, _ = decode(image, seed=3, mode="tiny")
    assert disk == reference.read_bytes()


@needs_qemu
@pytest.mark.parametrize("name", ["v2", "v3", "v3-4k", "v3-2M", "extended-l2", "zlib"])
def test_metadata_first_images_need_no_spill(work: Path, reference: Path, name: str) -> None:
    image = convert(work, reference, f"nospill-{name}", *CONVERSIONS[name]).read_bytes()
    disk, _, decoder = decode(image, seed=4, spill=False)
    assert disk == reference.read_bytes()
    assert decoder.spill_peak == 0


@needs_qemu
@pytest.mark.parametrize("name", ["zlib-4k", "zstd", "extended-l2"])
def test_a_reused_read_buffer(work: Path, reference: Path, name: str) -> None:
    """An importer that reads into one buffer, feeds it and applies the events before the
    next read: nothing the decoder keeps between feeds may point into that buffer."""
    image = convert(work, reference, f"reuse-{name}", *CONVERSIONS[name]).read_bytes()
    decoder = Qcow2Decoder(TrackingSpill(), stream_length=len(image))
    buffer = bytearray(70_001)
    rng = random.Random(26)
    events: list = []
    pos = 0
    while pos < len(image):
        n = min(rng.randint(1, len(buffer)), len(image) - pos)
        buffer[:n] = image[pos : pos + n]
        for event in decoder.feed(memoryview(buffer)[:n]):
            events.append(
                Write(event.offset, bytes(event.data)) if isinstance(event, Write) else event
            )
        buffer[:] = b"\xee" * len(buffer)  # the next read overwrites it
        pos += n
    events.extend(decoder.finish())
    assert apply(events)[0] == reference.read_bytes()


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([9, 12]),
    st.lists(
        st.tuples(st.sampled_from(["add", "remove"]), st.integers(0, 20_000), st.integers(1, 9000))
    ),
)
@example(
    cluster_bits=9,
    operations=[("add", 0, 4097), ("add", 0, 4608), ("remove", 0, 4608), ("remove", 4096, 1)],
)
@example(
    cluster_bits=9,
    operations=[("add", 0, 1025), ("add", 0, 1536), ("remove", 0, 1536), ("add", 3072, 1)],
)
def test_spill_map_matches_a_model(cluster_bits: int, operations: list) -> None:
    """The record of spilled bytes (bitmap of whole clusters, intervals for the rest)
    against a byte-per-byte model."""
    spilled = _SpillMap(cluster_bits)
    model = bytearray(30_000)
    for operation, start, length in operations:
        end = start + length
        if operation == "add":
            spilled.add(start, end)
            model[start:end] = b"\x01" * length
        elif spilled.covers(start, end):
            assert model[start:end] == b"\x01" * length
            spilled.remove(start, end)
            model[start:end] = bytes(length)
        else:
            assert b"\x00" in model[start:end]
        probe_start, probe_end = start // 3, start // 3 + length // 2 + 1
        covered = model[probe_start:probe_end] == b"\x01" * (probe_end - probe_start)
        assert spilled.covers(probe_start, probe_end) == covered


@needs_qemu
def test_l1_table_at_the_end_after_resize(work: Path, reference: Path) -> None:
    """qemu-img resize moves the L1 table behind all the data: everything is spilled, then
    claimed when the L1 arrives, and comes out in bounded Writes."""
    image_path = work / "grown.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", image_path, "6M")
    qemu_io(image_path, "write -P 7 0 1M", "write -P 8 3M 100k", "write -z 2M 64k")
    run("qemu-img", "resize", "-q", image_path, str(64 * MiB + 512))
    image = image_path.read_bytes()
    tables = Tables(image)
    assert tables.l1_offset > max(tables.data_offsets()), "the L1 table should come last"
    expected = to_raw(image_path, work / "grown.raw")

    disk, header, decoder = decode(image, seed=5)
    assert header.virtual_size == 64 * MiB + 512
    assert disk == expected
    assert decoder.spill_peak > MiB
    assert decoder.spill_store.size <= 8 * 4096  # type: ignore[attr-defined]  # all claimed, freed

    with pytest.raises(FormatError, match="needs a spill store"):
        decode(image, seed=5, spill=False)
    with pytest.raises(FormatError, match="arrived before the tables that map them"):
        decode(image, seed=5, max_spill=512 * 1024)


@needs_qemu
def test_spilled_output_comes_lazily_in_bounded_writes(work: Path) -> None:
    image_path = work / "grown-big.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", image_path, "24M")
    qemu_io(image_path, "write -P 9 0 20M")
    run("qemu-img", "resize", "-q", image_path, "3G")
    image = image_path.read_bytes()
    l1_offset = Tables(image).l1_offset
    assert l1_offset > max(Tables(image).data_offsets())
    spill = TrackingSpill()
    decoder = Qcow2Decoder(spill, stream_length=len(image))
    assert [type(e) for e in decoder.feed(image[:l1_offset])] == [Header]  # all spilled
    events = decoder.feed(image[l1_offset:])  # the L1 table: everything is claimed
    assert spill.size >= 20 * MiB, "nothing is read back before the events are iterated"
    sizes = []
    for event in events:
        assert isinstance(event, Write)
        sizes.append(len(event.data))
        assert spill.size <= 20 * MiB - sum(sizes) + 4 * MiB + 4 * 65536  # freed as it goes
    assert sum(sizes) == 20 * MiB
    assert max(sizes) <= 4 * MiB
    assert list(decoder.finish()) == []


@needs_qemu
def test_l1_table_in_the_middle(work: Path) -> None:
    image_path = work / "grown-then-written.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", image_path, "6M")
    qemu_io(image_path, "write -P 7 0 300k")
    run("qemu-img", "resize", "-q", image_path, "64M")
    qemu_io(image_path, "write -P 9 40M 64k", "write -P 10 100k 8k")
    image = image_path.read_bytes()
    assert Tables(image).l1_offset < max(Tables(image).data_offsets())
    disk, _, _ = decode(image, seed=6)
    assert disk == to_raw(image_path, work / "grown-then-written.raw")


@needs_qemu
def test_zero_clusters_in_a_whole_image(work: Path) -> None:
    image_path = work / "zeros.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", image_path, str(SIZE))
    qemu_io(
        image_path,
        "write -P 1 0 256k",
        "write -z 64k 64k",  # preallocated zero cluster: its host cluster stays
        "write -z -u 128k 64k",  # zero cluster without host cluster
        "write -z 1M 128k",
        "write -P 2 5M 70k",
    )
    image = image_path.read_bytes()
    disk, header, _ = decode(image, seed=7)
    assert header.whole_image
    assert disk == to_raw(image_path, work / "zeros.raw")


@needs_qemu
@pytest.mark.parametrize("extended", [False, True])
def test_delta_over_a_backing_file(work: Path, extended: bool) -> None:
    base_path = work / f"base-{extended}.raw"
    base = random.Random(8).randbytes(SIZE)
    base_path.write_bytes(base)
    image_path = work / f"delta-{extended}.qcow2"
    options = ["-o", "extended_l2=on"] if extended else []
    run("qemu-img", "create", "-q", "-f", "qcow2", *options, "-b", base_path, "-F", "raw",
        image_path)  # fmt: skip
    qemu_io(
        image_path,
        "write -P 3 4k 4k",  # a subcluster (extended) or a COW'd cluster
        "write -z 12k 8k",
        "write -P 4 128k 64k",
        "write -z 256k 64k",
        "write -z -u 384k 64k",
        "discard 448k 64k",
        "write -c -P 5 1M 64k",
        "write -P 6 2044k 8k",  # across a 2 MiB boundary
        f"write -P 7 {SIZE - 1024} 1024",
    )
    image = image_path.read_bytes()
    expected = to_raw(image_path, work / f"delta-{extended}.raw")
    assert expected != base
    disk, header, decoder = decode(image, base, seed=9)
    assert header == Header(virtual_size=SIZE, whole_image=False)
    assert decoder.backing_file == str(base_path)
    assert decoder.backing_format == "raw"
    assert disk == expected

    decoder = Qcow2Decoder(MemorySpill())
    events = [*decoder.feed(image), *decoder.finish()]
    zeros = {(e.offset, e.length) for e in events if isinstance(e, Zero)}
    assert any(offset <= 256 * 1024 < offset + length for offset, length in zeros)


@needs_qemu
def test_extended_l2_with_the_l1_table_at_the_end(work: Path) -> None:
    """Partly allocated subclusters come back from the spill; the file ends inside the
    last cluster, after its last allocated subcluster."""
    image_path = work / "extended-grown.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=16k",
        image_path, "6M")  # fmt: skip
    qemu_io(
        image_path,
        "write -P 1 0 4k",
        "write -P 2 10k 6k",
        "write -z 20k 4k",
        "write -P 3 64k 64k",
        "write -P 4 200k 2k",
        "write -P 5 1M 2k",
    )
    run("qemu-img", "resize", "-q", image_path, "40M")
    image = image_path.read_bytes()
    tables = Tables(image)
    assert tables.l1_offset > max(tables.data_offsets())
    expected = to_raw(image_path, work / "extended-grown.raw")
    for mode in ("random", "whole"):
        disk, _, _ = decode(image, seed=22, mode=mode)
        assert disk == expected
    qemu_io(image_path, "write -P 6 6M 2k")  # the data cluster is now the last thing
    image = image_path.read_bytes()
    assert len(image) % 16384
    disk, _, _ = decode(image, seed=23)
    assert disk == to_raw(image_path, work / "extended-grown.raw")


@needs_qemu
@pytest.mark.parametrize(
    ("bitmap", "host", "message"),
    [
        (1 | 1 << 32, None, "both allocated and zero"),
        (1, 0, "allocated subclusters without a host cluster"),
    ],
)
def test_hostile_extended_l2_entries(work: Path, bitmap: int, host: int | None, message: str):
    image_path = work / "extended-hostile.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", image_path, "1M")
    qemu_io(image_path, "write -P 1 0 4k")
    image = image_path.read_bytes()
    tables = Tables(image)
    entry = tables.l2_entry(0) if host is None else host
    image = patched(image, tables.l2_entry_offset(0), ">QQ", entry, bitmap)
    with pytest.raises(FormatError, match=message):
        decode(image)


@needs_qemu
def test_metadata_preallocation(work: Path, reference: Path) -> None:
    image = convert(work, reference, "prealloc", "-o", "preallocation=metadata").read_bytes()
    disk, _, _ = decode(image, seed=24)
    assert disk == reference.read_bytes()


@needs_qemu
def test_internal_snapshots_are_ignored(work: Path) -> None:
    image_path = work / "snapshots.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", image_path, "4M")
    qemu_io(image_path, "write -P 1 0 1M")
    run("qemu-img", "snapshot", "-c", "before", image_path)
    qemu_io(image_path, "write -P 2 512k 1M", "write -z 0 64k")
    image = image_path.read_bytes()
    disk, _, decoder = decode(image, seed=10)
    assert decoder.nb_snapshots == 1
    assert disk == to_raw(image_path, work / "snapshots.raw")


@needs_qemu
def test_backing_file_is_never_opened(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image_path = work / "passwd.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw",
        image_path, "1M")  # fmt: skip
    qemu_io(image_path, "write -P 1 64k 4k")
    image = image_path.read_bytes()

    def refuse(*args, **kwargs):
        raise AssertionError(f"the decoder opened {args[0]!r}")

    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(os, "open", refuse)
    decoder = Qcow2Decoder(MemorySpill(), stream_length=len(image))
    events = [*decoder.feed(image), *decoder.finish()]
    monkeypatch.undo()
    assert events[0] == Header(virtual_size=MiB, whole_image=False)
    assert decoder.backing_file == "/etc/passwd"
    writes = [e for e in events if isinstance(e, Write)]
    assert [(w.offset, len(w.data)) for w in writes] == [(65536, 65536)]
    assert bytes(writes[0].data)[:4096] == b"\x01" * 4096


def test_writes_are_coalesced_views_of_the_fed_bytes() -> None:
    size = 4 * MiB
    disk = make_disk(size, [(0, 3 * MiB)], seed=11)
    image = render(qcow2_layout(size, [(0, 3 * MiB)]), disk)
    decoder = Qcow2Decoder()
    events = [*decoder.feed(image), *decoder.finish()]
    writes = [e for e in events if isinstance(e, Write)]
    assert len(writes) == 1
    assert isinstance(writes[0].data, memoryview)
    assert (writes[0].offset, bytes(writes[0].data)) == (0, bytes(disk[: 3 * MiB]))


# -- encoding, checked by qemu ------------------------------------------------------------


def qemu_check(path: Path) -> None:
    result = run("qemu-img", "check", "-f", "qcow2", path)
    assert "No errors were found" in result.stdout, result.stdout
    assert "leak" not in result.stdout, result.stdout


@needs_qemu
@pytest.mark.parametrize("cluster_size", [512, 4096, 65536, 2 * MiB])
def test_encoded_images_pass_qemu_check_and_compare(
    work: Path, reference: Path, cluster_size: int
) -> None:
    disk = reference.read_bytes()
    out = qcow2_layout(SIZE, DATA_EXTENTS, cluster_size=cluster_size)
    image = render(out, disk)
    path = work / f"encoded-{cluster_size}.qcow2"
    path.write_bytes(image)
    qemu_check(path)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", path, reference)
    assert decode(image, seed=12, spill=False)[0] == disk
    tables = Tables(image)
    assert tables.version == 3 and tables.cluster_size == cluster_size
    data = tables.data_offsets()
    assert data == sorted(data), "data clusters come in guest order"
    assert len(image) == out.length


@needs_qemu
def test_encoded_zero_clusters_in_a_whole_image(work: Path) -> None:
    size = 4 * MiB + 512
    extents = [(100, 70000), (3 * MiB, 1000)]
    disk = make_disk(size, extents, seed=13)
    zero_extents = [(MiB, MiB), (size - 512, 512)]
    image = render(qcow2_layout(size, extents, zero_extents=zero_extents), disk)
    path = work / "encoded-zeros.qcow2"
    path.write_bytes(image)
    (work / "encoded-zeros.raw").write_bytes(disk)
    qemu_check(path)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", path, work / "encoded-zeros.raw")
    assert Tables(image).l2_entry(16) == 1  # guest 1 MiB: a zero cluster, nothing stored
    assert Tables(image).l2_entry(size // 65536) == 1  # the partial last cluster


@needs_qemu
def test_encoded_delta(work: Path) -> None:
    """An export of the changes since a base: writes and discards, named by uuid; the
    receiver points it at its copy of the base with `qemu-img rebase -u`."""
    size = SIZE
    base = random.Random(14).randbytes(size)
    (work / "enc-base.raw").write_bytes(base)
    new = bytearray(base)
    extents = [(10_000, 5000), (2 * MiB - 100, 200), (size - 300, 300)]
    rng = random.Random(15)
    for start, length in extents:
        new[start : start + length] = rng.randbytes(length)
    zero_extents = [(MiB, 3 * 65536), (4 * MiB + 1000, 2000)]  # the second one partial
    for start, length in zero_extents:
        new[start : start + length] = bytes(length)
    (work / "enc-new.raw").write_bytes(new)
    out = qcow2_layout(size, extents, backing="9d7ae4a2-uuid", zero_extents=zero_extents)
    image = render(out, new)
    path = work / "enc-delta.qcow2"
    path.write_bytes(image)
    info = run("qemu-img", "info", "--output=json", path).stdout
    assert '"backing-filename": "9d7ae4a2-uuid"' in info
    assert '"backing-filename-format": "raw"' in info
    run("qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "enc-base.raw", "-F", "raw", path)
    qemu_check(path)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", path, work / "enc-new.raw")

    disk, header, decoder = decode(image, base, seed=16)
    assert not header.whole_image and decoder.backing_file == "9d7ae4a2-uuid"
    assert disk == new


def test_slices_are_cut_exactly() -> None:
    size = 3 * MiB + 1536
    extents = [(0, 100), (70000, 200_000), (size - 1000, 1000)]
    disk = make_disk(size, extents, seed=17)
    for cluster_size in (512, 65536):
        out = qcow2_layout(
            size, extents, cluster_size=cluster_size, backing="base", zero_extents=[(MiB, MiB)]
        )
        full = render(out, disk)
        rng = random.Random(18)
        for _ in range(300):
            start = rng.randrange(out.length + 1)
            end = rng.randrange(
                start, min(out.length, start + rng.choice((1, 600, 70000, MiB))) + 1
            )
            pieces = list(out.slice(start, end))
            assert all(p.length > 0 for p in pieces)
            assert render(out, disk, start, end) == full[start:end]
        with pytest.raises(ValueError):
            list(out.slice(0, out.length + 1))


class SparseDisk:
    """A disk too big to hold: zeros except a few extents."""

    def __init__(self, extents: dict[int, bytes]):
        self.extents = extents

    def __getitem__(self, item: slice) -> bytes:
        out = bytearray(item.stop - item.start)
        for offset, data in self.extents.items():
            lo, hi = max(offset, item.start), min(offset + len(data), item.stop)
            if lo < hi:
                out[lo - item.start : hi - item.start] = data[lo - offset : hi - offset]
        return bytes(out)


@needs_qemu
def test_huge_sparse_disk_stays_small(work: Path) -> None:
    size = 2 << 40  # 2 TiB
    content = {0: b"boot" * 1000, size // 2 + 12345: b"middle" * 10, size - 4096: b"e" * 4096}
    extents = [(offset, len(data)) for offset, data in content.items()]
    out = qcow2_layout(size, extents)
    assert out.length < 2 * MiB
    image = render(out, SparseDisk(content))  # type: ignore[arg-type]
    path = work / "huge.qcow2"
    path.write_bytes(image)
    qemu_check(path)
    decoder = Qcow2Decoder()
    events = [*decoder.feed(image), *decoder.finish()]
    assert events[0] == Header(virtual_size=size, whole_image=True)
    for event in events[1:]:
        assert isinstance(event, Write)
        expected = SparseDisk(content)[event.offset : event.offset + len(event.data)]
        assert bytes(event.data) == expected
    written = sum(len(e.data) for e in events[1:])  # type: ignore[union-attr]
    assert written == 3 * 65536


def test_encoder_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="multiple of 512"):
        qcow2_layout(1000, [])
    with pytest.raises(ValueError, match="outside"):
        qcow2_layout(MiB, [(MiB - 10, 20)])
    with pytest.raises(ValueError, match="power of two"):
        qcow2_layout(MiB, [], cluster_size=3000)
    with pytest.raises(ValueError, match="backing file name"):
        qcow2_layout(MiB, [], backing="x" * 1024)


@st.composite
def disks(draw: st.DrawFn) -> tuple:
    cluster_size = draw(st.sampled_from([512, 4096, 65536]))
    size = draw(st.integers(0, 700)) * 512

    def extent_list(count: int) -> list[tuple[int, int]]:
        out = []
        for _ in range(count):
            if size == 0:
                break
            start = draw(st.integers(0, size - 1))
            out.append((start, draw(st.integers(1, min(size - start, 150_000)))))
        return out

    extents = extent_list(draw(st.integers(0, 5)))
    zero_extents = extent_list(draw(st.integers(0, 3)))
    delta = draw(st.booleans())
    seed = draw(st.integers(0, 1 << 30))
    return cluster_size, size, extents, zero_extents, delta, seed


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(disks())
def test_roundtrip(case: tuple) -> None:
    """encode -> bytes -> decode gives the disk back, whole or as a delta over its base."""
    cluster_size, size, extents, zero_extents, delta, seed = case
    rng = random.Random(seed)
    base = rng.randbytes(size) if delta else bytes(size)
    disk = bytearray(base)
    for start, length in extents:
        disk[start : start + length] = rng.randbytes(length)
    for start, length in zero_extents:
        disk[start : start + length] = bytes(length)
    if not delta:  # a whole image holds only its extents; zero_extents are holes already
        holes = bytearray(size)
        for start, length in extents:
            holes[start : start + length] = disk[start : start + length]
        disk = holes
    out = qcow2_layout(
        size,
        extents,
        cluster_size=cluster_size,
        backing="base" if delta else None,
        zero_extents=zero_extents,
    )
    image = render(out, disk)
    decoded, header, decoder = decode(
        image, base if delta else None, seed=seed, spill=rng.random() < 0.5
    )
    assert header == Header(virtual_size=size, whole_image=not delta)
    assert decoded == disk
    assert decoder.spill_peak == 0  # metadata first: nothing waits


# -- hostile images -----------------------------------------------------------------------

SMALL = 4 * 65536 + 1536
SMALL_EXTENTS = [(0, 65536), (65536, 1000), (3 * 65536 + 10, 100)]


def small_disk() -> bytearray:
    disk = make_disk(SMALL, SMALL_EXTENTS, 19)
    disk[:65536] = (b"a compressible first cluster " * 3000)[:65536]
    return disk


def small_image(**kwargs) -> bytes:
    return render(qcow2_layout(SMALL, SMALL_EXTENTS, **kwargs), small_disk())


def compressed_entry(host: int, length: int, cluster_bits: int = 16) -> int:
    sectors = (host % 512 + length - 1) // 512
    return COMPRESSED | sectors << (62 - (cluster_bits - 8)) | host


def with_compressed_cluster(image: bytes, payload: bytes) -> bytes:
    """Guest cluster 0 re-pointed at `payload`, stored where its data cluster was."""
    tables = Tables(image)
    host = tables.l2_entry(0) & 0x00FF_FFFF_FFFF_FE00
    out = bytearray(image)
    out[host : host + len(payload)] = payload
    return patched(
        bytes(out), tables.l2_entry_offset(0), ">Q", compressed_entry(host, len(payload))
    )


def deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -12)
    return compressor.compress(data) + compressor.flush()


def zstd_header(image: bytes) -> bytes:
    return patched(patched(image, 72, ">Q", 8), 104, ">B", 1)


def l2_patch(guest_cluster: int, entry) -> object:
    def mutate(image: bytes) -> bytes:
        tables = Tables(image)
        value = entry(tables) if callable(entry) else entry
        return patched(image, tables.l2_entry_offset(guest_cluster), ">Q", value)

    return mutate


HOSTILE = {
    "bad magic": (lambda i: patched(i, 0, ">4s", b"QFI\x00"), "bad magic"),
    "version 4": (lambda i: patched(i, 4, ">I", 4), "unsupported version 4"),
    "cluster_bits 8": (lambda i: patched(i, 20, ">I", 8), "cluster_bits 8 is outside"),
    "cluster_bits 22": (lambda i: patched(i, 20, ">I", 22), "cluster_bits 22 is outside"),
    "encrypted": (lambda i: patched(i, 32, ">I", 2), "encrypted images are not supported"),
    "corrupt bit": (lambda i: patched(i, 72, ">Q", 2), "marked corrupt"),
    "external data file": (lambda i: patched(i, 72, ">Q", 4), "external data file"),
    "unknown incompatible": (lambda i: patched(i, 72, ">Q", 1 << 5), "unknown incompatible"),
    "compression bit, zlib": (lambda i: patched(i, 72, ">Q", 8), "contradicts"),
    "compression type 2": (
        lambda i: patched(patched(i, 72, ">Q", 8), 104, ">B", 2),
        "unknown compression_type 2",
    ),
    "header_length": (lambda i: patched(i, 100, ">I", 100), "header_length 100"),
    "L1 bomb": (lambda i: patched(i, 36, ">I", 0x7FFF_FFFF), "exceeds the 32 MiB limit"),
    "L1 too small": (lambda i: patched(i, 36, ">I", 0), "too small for the virtual size"),
    "refcount table bomb": (lambda i: patched(i, 56, ">I", 1 << 20), "exceeds the 8 MiB limit"),
    "absurd size": (lambda i: patched(i, 24, ">Q", 1 << 60), "is absurd"),
    "extension overrun": (lambda i: patched(i, 112, ">II", 0x1234, 1 << 20), "runs past"),
    "backing name outside": (
        lambda i: patched(i, 8, ">QI", 65536 - 4, 100),
        "outside the first cluster",
    ),
    "L2 into the header": (l2_patch(0, compressed_entry(200, 300)), "points into the header"),
    "L2 into the L1": (l2_patch(1, lambda t: t.l1_offset | COPIED), "points into the L1 table"),
    "L2 into the refcount table": (
        l2_patch(1, lambda t: t.rt_offset | COPIED),
        "points into the refcount table",
    ),
    "L2 onto itself": (l2_patch(1, lambda t: t.l1[0] | COPIED), "used twice"),
    "same cluster twice": (l2_patch(1, lambda t: t.l2_entry(0)), "used twice"),
    "unaligned": (l2_patch(1, lambda t: t.l2_entry(1) + 512), "not cluster-aligned"),
    "reserved bits": (l2_patch(1, lambda t: t.l2_entry(1) | 2), "reserved bits"),
    "beyond the stream": (l2_patch(1, (1 << 40) | COPIED), "beyond the end of the image"),
    "compressed beyond the stream": (
        l2_patch(1, compressed_entry(1 << 40, 100)),
        "beyond the end of the image",
    ),
    "zlib bomb": (
        lambda i: with_compressed_cluster(i, deflate(bytes(64 * 65536))),
        "decompresses to more than a cluster",
    ),
    "zlib short": (
        lambda i: with_compressed_cluster(i, deflate(bytes(1000))),
        "decompresses to 1000 bytes, not a cluster",
    ),
    "zlib garbage": (
        lambda i: with_compressed_cluster(i, b"\xff" * 600),
        "does not decompress",
    ),
    "zstd bomb": (
        lambda i: with_compressed_cluster(
            zstd_header(i), zstandard.ZstdCompressor().compress(bytes(64 * 65536))
        ),
        "decompresses to more than a cluster",
    ),
    "compressed twice": (
        lambda i: l2_patch(1, lambda t: t.l2_entry(0))(
            with_compressed_cluster(i, deflate(bytes(small_disk()[:65536])))
        ),
        "used twice",
    ),
    "zstd garbage": (
        lambda i: with_compressed_cluster(zstd_header(i), b"\x28\xb5\x2f\xfd" + b"\xff" * 50),
        "does not decompress",
    ),
}


@pytest.mark.parametrize("name", HOSTILE)
@pytest.mark.parametrize("stream_length", [True, False])
def test_hostile_images_are_refused(name: str, stream_length: bool) -> None:
    mutate, message = HOSTILE[name]
    image = mutate(small_image())
    with pytest.raises(FormatError, match=message):
        decode(image, seed=20, stream_length=stream_length)


def test_sanity_of_the_hostile_base() -> None:
    image = small_image()
    disk, _, _ = decode(image)
    assert disk == small_disk()
    zstd = with_compressed_cluster(
        zstd_header(image), zstandard.ZstdCompressor().compress(bytes(disk[:65536]))
    )
    assert decode(zstd)[0] == disk
    zlib_image = with_compressed_cluster(image, deflate(bytes(disk[:65536])))
    assert decode(zlib_image)[0] == disk


def test_extended_l2_needs_big_clusters() -> None:
    image = patched(small_image(cluster_size=4096), 72, ">Q", 16)
    with pytest.raises(FormatError, match="extended L2 entries need clusters of at least"):
        decode(image)


@pytest.mark.parametrize(
    ("cut", "message"),
    [
        (10, "truncated in its header"),
        (65536 - 1, "truncated in its header"),
        (65536 + 100, "the L1 table at host offset 0x30000 is beyond the end"),
        (-65536 - 100, "ends beyond the end of the image"),
        (-65536, "is beyond the end of the image"),
    ],
)
def test_truncated_images(cut: int, message: str) -> None:
    image = small_image()
    with pytest.raises(FormatError, match=message):
        decode(image[:cut], stream_length=False)
    decoder = Qcow2Decoder(MemorySpill(), stream_length=len(image))
    list(decoder.feed(image[:cut]))
    with pytest.raises(FormatError, match="truncated"):
        list(decoder.finish())


def test_more_clusters_mapped_than_the_stream_can_hold() -> None:
    """Entries aimed at one cluster still to come are caught only when it arrives; until
    then they are pending claims. When the stream's length is known, more of them than the
    rest of the stream can hold is refused at once (without it, memory stays bounded by
    24 bytes a table entry received)."""
    image = small_image()
    tables = Tables(image)
    last_cluster = (len(image) - 1) // 65536 * 65536
    for guest_cluster in range(8, 2000):  # beyond the disk: owned clusters, never read
        image = patched(image, tables.l2_entry_offset(guest_cluster), ">Q", last_cluster | COPIED)
    with pytest.raises(FormatError, match="clusters still to come"):
        decode(image)
    with pytest.raises(FormatError, match="used twice"):
        decode(image, stream_length=False)


def test_more_than_announced() -> None:
    image = small_image()
    decoder = Qcow2Decoder(stream_length=len(image) - 1)
    with pytest.raises(FormatError, match="more than the announced"):
        list(decoder.feed(image))


@needs_qemu
def test_same_cluster_twice_behind_the_stream(work: Path) -> None:
    """Both entries point into spilled bytes (the L1 table comes last): still refused."""
    image_path = work / "twice.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", image_path, "1M")
    qemu_io(image_path, "write -P 1 0 128k")
    run("qemu-img", "resize", "-q", image_path, "3G")
    image = image_path.read_bytes()
    tables = Tables(image)
    assert tables.l1_offset > max(tables.data_offsets())
    image = patched(image, tables.l2_entry_offset(1), ">Q", tables.l2_entry(0))
    with pytest.raises(FormatError, match="used twice"):
        decode(image)


def test_encoder_layout_is_deterministic() -> None:
    first = qcow2_layout(SMALL, SMALL_EXTENTS, backing="b", zero_extents=[(2 * 65536, 65536)])
    second = qcow2_layout(SMALL, SMALL_EXTENTS, backing="b", zero_extents=[(2 * 65536, 65536)])
    disk = make_disk(SMALL, SMALL_EXTENTS, 21)
    assert render(first, disk) == render(second, disk)
    pieces = list(first.slice(0, first.length))
    assert isinstance(pieces[0], Literal) and pieces[0].data.startswith(b"QFI\xfb")
    assert sum(p.length for p in pieces if isinstance(p, Data)) == 3 * 65536


def test_header_fields_of_encoded_image() -> None:
    image = small_image(backing="parent-uuid")
    magic, version, backing_offset, backing_size, cluster_bits = struct.unpack_from(
        ">4sIQII", image
    )
    assert (magic, version, cluster_bits) == (b"QFI\xfb", 3, 16)
    assert image[backing_offset : backing_offset + backing_size] == b"parent-uuid"
    features = struct.unpack_from(">QQQII", image, 72)  # incompatible .. header_length
    assert features == (0, 0, 0, 4, 112)
    assert image[104] == 0  # zlib


def test_a_gigabyte_decodes_in_few_large_writes() -> None:
    """1 GiB disk, half of it data, fed in 1 MiB pieces: the Writes are views of the fed
    pieces, about one per piece, so the Python work does not grow with the cluster count."""
    size = 1 << 30
    extents = [(offset + 4096 * (offset >> 21 & 7), MiB) for offset in range(0, size, 2 * MiB)]
    out = qcow2_layout(size, extents)
    pattern = random.Random(25).randbytes(3 * MiB)

    class PatternDisk:
        def __getitem__(self, item: slice) -> bytes:
            start = item.start % MiB
            return pattern[start : start + item.stop - item.start]

    def stream():
        for pos in range(0, out.length, MiB):
            yield render(out, PatternDisk(), pos, min(out.length, pos + MiB))  # type: ignore[arg-type]

    decoder = Qcow2Decoder(stream_length=out.length)
    writes = 0
    written = 0
    for piece in stream():
        for event in decoder.feed(piece):
            if isinstance(event, Write):
                writes += 1
                written += len(event.data)
                if writes % 97 == 0:
                    start = event.offset % MiB
                    assert bytes(event.data[:100]) == pattern[start : start + 100]
    assert list(decoder.finish()) == []
    clusters = sum(
        (offset + length - 1) // 65536 - offset // 65536 + 1 for offset, length in extents
    )
    assert written == clusters * 65536  # whole clusters, about 53% of the disk
    assert writes <= out.length // MiB + len(extents) + 1
