"""OVA archives: the first disk member decoded as it streams by; streamOptimized VMDK.

OVAs are built with Python's tarfile, disk images with qemu-img (an independent writer).
"""

from __future__ import annotations

import io
import random
import shutil
import subprocess
import tarfile
import zlib
from pathlib import Path

import pytest

from formats.errors import FormatError, Unsupported
from formats.events import Header, Write, Zero
from formats.ova import OvaDecoder, UnsupportedMember
from formats.spill import MemorySpill
from formats.vmdk import UnsupportedVariant, VmdkStreamDecoder

MiB = 1 << 20
OVF = b"<?xml version='1.0' encoding='UTF-8'?><Envelope><References/></Envelope>\n"

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")


def sample_disk(size: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    disk = bytearray(size)
    disk[0:512] = rng.randbytes(512)
    if size > 2 * MiB:
        disk[MiB + 4096 : MiB + 200_000] = rng.randbytes(200_000 - 4096)
    disk[size - 1000 : size - 10] = b"\x5a" * 990
    return bytes(disk)


def ova(members: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def decode(data: bytes, seed: int = 0, decoder=None) -> tuple[bytes, list, object]:
    """Feed in random pieces; apply the events to a disk sized by the Header."""
    decoder = decoder or OvaDecoder(spill=MemorySpill(), stream_length=len(data))
    rng = random.Random(seed)
    events, pos = [], 0
    while pos < len(data):
        n = rng.choice((1, 511, 4096, rng.randrange(1, 400_000)))
        events.extend(decoder.feed(data[pos : pos + n]))
        pos += n
    events.extend(decoder.finish())
    headers = [e for e in events if isinstance(e, Header)]
    assert len(headers) == 1 and events[0] is headers[0] and headers[0].whole_image
    disk = bytearray(headers[0].virtual_size)
    for event in events[1:]:
        if isinstance(event, Write):
            assert event.offset + len(event.data) <= len(disk)
            disk[event.offset : event.offset + len(event.data)] = event.data
        else:
            assert isinstance(event, Zero)
            disk[event.offset : event.offset + event.length] = bytes(event.length)
    return bytes(disk), events, decoder


def qemu_image(disk: bytes, tmp_path: Path, fmt: str, *options: str) -> bytes:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(disk)
    out = tmp_path / f"disk.{fmt}"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", fmt, *options, str(raw), str(out)],
        check=True,
        capture_output=True,
    )
    return out.read_bytes()


# --- raw members ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vm-disk1.raw", "VM-DISK1.IMG", "disks/vm.img"])
def test_raw_member_decodes_to_the_disk(name):
    disk = sample_disk(3 * MiB + 512)
    archive = ova([("vm.ovf", OVF), ("vm.mf", b"SHA256(vm.ovf)= 00\n"), (name, disk)])
    for seed in range(3):
        decoded, events, decoder = decode(archive, seed)
        assert decoded == disk
        assert events[0] == Header(virtual_size=len(disk), whole_image=True)
        assert decoder.disk_member == name
        assert decoder.members == ["vm.ovf", "vm.mf", name]


def test_only_the_first_disk_is_decoded():
    first, second = sample_disk(MiB, 1), sample_disk(2 * MiB, 2)
    archive = ova(
        [("vm.ovf", OVF), ("a.raw", first), ("cd.iso", b"iso" * 100), ("b.raw", second)],
        fmt=tarfile.PAX_FORMAT,
    )
    decoded, _, decoder = decode(archive)
    assert decoded == first
    assert decoder.disk_member == "a.raw"
    assert decoder.other_disks == ["b.raw"]


def test_empty_raw_member():
    decoded, events, _ = decode(ova([("vm.ovf", OVF), ("empty.raw", b"")]))
    assert decoded == b"" and events == [Header(virtual_size=0, whole_image=True)]


def test_ova_without_a_disk_is_invalid():
    with pytest.raises(FormatError, match=r"no disk member .* 'vm.ovf', 'notes.txt'"):
        decode(ova([("vm.ovf", OVF), ("notes.txt", b"hello")]))


@pytest.mark.parametrize("name", ["disk.vdi", "disk.VHDX", "disk.qed"])
def test_unsupported_disk_kinds_are_named(name):
    with pytest.raises(UnsupportedMember, match=name) as raised:
        decode(ova([("vm.ovf", OVF), (name, b"\0" * 4096)]))
    assert isinstance(raised.value, Unsupported)
    assert isinstance(raised.value, FormatError)


def test_truncated_ova_is_invalid():
    disk = sample_disk(MiB)
    archive = ova([("vm.ovf", OVF), ("vm.raw", disk)])
    for end in (100, 1536 + 1000, 1536 + MiB):  # a header, the disk data, the end marker
        with pytest.raises(FormatError):
            decode(archive[:end])


def test_garbage_is_not_an_ova():
    with pytest.raises(FormatError, match="not a tar"):
        decode(b"KDMV" + bytes(2000))


class RecordingDecoder:
    """Stands in for a disk codec: records what the OVA decoder hands it."""

    made: list[RecordingDecoder] = []

    def __init__(self, spill=None, stream_length=None):
        self.spill, self.stream_length = spill, stream_length
        self.received = bytearray()
        self.finished = False
        RecordingDecoder.made.append(self)

    def feed(self, data):
        first = not self.received
        self.received += data
        return [Header(virtual_size=4096, whole_image=True)] if first else []

    def finish(self):
        self.finished = True
        return [Write(0, bytes(self.received[:10]))]


def test_inner_decoder_gets_member_bytes_spill_and_length(monkeypatch):
    from formats import ova as ova_module

    monkeypatch.setitem(ova_module.DISK_DECODERS, ".qcow2", RecordingDecoder)
    RecordingDecoder.made.clear()
    image = random.randbytes(300_000)
    spill = MemorySpill()
    decoder = OvaDecoder(spill=spill)
    _, events, _ = decode(ova([("vm.ovf", OVF), ("vm.qcow2", image)]), decoder=decoder)
    (inner,) = RecordingDecoder.made
    assert inner.spill is spill and inner.stream_length == len(image)
    assert inner.received == image and inner.finished
    assert events == [Header(virtual_size=4096, whole_image=True), Write(0, image[:10])]


# --- members decoded by the VHD and QCOW2 codecs -------------------------------------------


@needs_qemu_img
def test_qcow2_member(tmp_path):
    pytest.importorskip("formats.qcow2")
    disk = sample_disk(3 * MiB)
    image = qemu_image(disk, tmp_path, "qcow2")
    decoded, _, decoder = decode(ova([("vm.ovf", OVF), ("vm-disk1.qcow2", image)]))
    assert decoded == disk
    assert decoder.disk_member == "vm-disk1.qcow2"


@needs_qemu_img
def test_vhd_member(tmp_path):
    pytest.importorskip("formats.vhd")
    disk = sample_disk(3 * MiB)
    image = qemu_image(disk, tmp_path, "vpc", "-o", "subformat=dynamic,force_size=on")
    decoded, _, decoder = decode(ova([("vm.ovf", OVF), ("Disk1.VHD", image)]))
    assert decoded == disk
    assert decoder.disk_member == "Disk1.VHD"


# --- streamOptimized VMDK ------------------------------------------------------------------


def decode_vmdk(image: bytes, seed: int = 0) -> bytes:
    decoder = VmdkStreamDecoder(stream_length=len(image))
    rng = random.Random(seed)
    events, pos = [], 0
    while pos < len(image):
        n = rng.choice((1, 13, 512, rng.randrange(1, 100_000)))
        events.extend(decoder.feed(image[pos : pos + n]))
        pos += n
    events.extend(decoder.finish())
    assert isinstance(events[0], Header)
    disk = bytearray(events[0].virtual_size)
    for event in events[1:]:
        disk[event.offset : event.offset + len(event.data)] = event.data
    return bytes(disk)


@needs_qemu_img
@pytest.mark.parametrize("size", [3 * MiB, 3 * MiB + 3 * 512])
def test_vmdk_member(tmp_path, size):
    disk = sample_disk(size)
    image = qemu_image(disk, tmp_path, "vmdk", "-o", "subformat=streamOptimized")
    for seed in range(2):
        assert decode_vmdk(image, seed) == disk
    decoded, _, decoder = decode(ova([("vm.ovf", OVF), ("vm-disk1.vmdk", image)]))
    assert decoded == disk
    assert decoder.disk_member == "vm-disk1.vmdk"


@needs_qemu_img
def test_vmdk_that_is_not_stream_optimized_is_unsupported(tmp_path):
    image = qemu_image(sample_disk(MiB), tmp_path, "vmdk", "-o", "subformat=monolithicSparse")
    with pytest.raises(UnsupportedMember, match=r"'vm\.vmdk'.*streamOptimized"):
        decode(ova([("vm.ovf", OVF), ("vm.vmdk", image)]))
    descriptor = b'# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\n'
    with pytest.raises(UnsupportedVariant, match="descriptor"):
        decode_vmdk(descriptor + bytes(512))


SECTOR = 512


def vmdk_stream(
    grains: list[tuple[int, bytes]],
    capacity: int = 2048,
    *,
    end_marker: bool = True,
    vmware_tail: bool = True,
) -> bytes:
    """A streamOptimized VMDK the way VMware lays it out: header, descriptor, grains, then
    grain tables, the grain directory and the footer behind markers, then end of stream."""
    import struct

    def header(gd_offset: int) -> bytes:
        fields = struct.pack(
            "<4sIIQQQQIQQQB4sH",
            b"KDMV",
            3,
            0x30001,
            capacity,
            128,
            1,
            1,
            512,
            0,
            gd_offset,
            2,
            0,
            b"\n \r\n",
            1,
        )
        return fields + bytes(SECTOR - len(fields))

    out = bytearray(header(0xFFFFFFFFFFFFFFFF))
    out += b'# Disk DescriptorFile\ncreateType="streamOptimized"\n'.ljust(SECTOR, b"\0")
    for lba, data in grains:
        compressed = zlib.compress(data)
        marker = struct.pack("<QI", lba, len(compressed)) + compressed
        out += marker + bytes(-len(marker) % SECTOR)
    if vmware_tail:
        for marker_type, sectors in ((1, 4), (2, 1)):  # a grain table, the grain directory
            out += struct.pack("<QII", sectors, 0, marker_type).ljust(SECTOR, b"\0")
            out += b"\xff" * (sectors * SECTOR)
        out += struct.pack("<QII", 1, 0, 3).ljust(SECTOR, b"\0") + header(12)  # footer
    if end_marker:
        out += bytes(SECTOR)
    return bytes(out)


def test_gzip_compressed_member_is_inflated_as_it_streams():
    """OVF's ovf:compression="gzip" compresses a file and keeps its name."""
    import gzip

    grain = random.Random(3).randbytes(64 * 1024)
    image = vmdk_stream([(128, grain)])
    member = gzip.compress(image[:5000]) + gzip.compress(image[5000:]) + bytes(100)
    decoded, _, decoder = decode(ova([("vm.ovf", OVF), ("vm-disk1.vmdk", member)]), seed=4)
    assert decoded[64 * 1024 : 128 * 1024] == grain
    assert decoder.disk_member == "vm-disk1.vmdk"
    with pytest.raises(FormatError, match="ends inside its gzip compression"):
        decode(ova([("vm.ovf", OVF), ("vm-disk1.vmdk", gzip.compress(image)[:-20])]))
    with pytest.raises(FormatError, match="not valid gzip"):
        decode(ova([("vm.ovf", OVF), ("vm-disk1.vmdk", gzip.compress(image) + b"junk")]))
    with pytest.raises(UnsupportedMember, match="gzip-compressed raw"):
        decode(ova([("vm.ovf", OVF), ("vm.raw", gzip.compress(bytes(4096)))]))


def test_vmdk_vmware_layout_with_metadata_markers():
    grain0, grain5 = random.randbytes(64 * 1024), b"\1" * (64 * 1024)
    image = vmdk_stream([(0, grain0), (5 * 128, grain5)])
    disk = decode_vmdk(image)
    assert len(disk) == 2048 * SECTOR
    assert disk[: 64 * 1024] == grain0
    assert disk[5 * 64 * 1024 : 6 * 64 * 1024] == grain5
    assert disk[64 * 1024 : 5 * 64 * 1024] == bytes(4 * 64 * 1024)


def test_vmdk_hostile_streams():
    grain = b"\2" * (64 * 1024)
    with pytest.raises(FormatError, match="before its end-of-stream marker"):
        decode_vmdk(vmdk_stream([(0, grain)], end_marker=False)[:-SECTOR])
    with pytest.raises(FormatError, match="beyond the capacity"):
        decode_vmdk(vmdk_stream([(2000, grain)]))
    oversized = vmdk_stream([(0, grain + b"\3")])  # inflates beyond a 64 KiB grain
    with pytest.raises(FormatError, match="inflates beyond"):
        decode_vmdk(oversized)
    corrupt = bytearray(vmdk_stream([(0, grain)]))
    corrupt[2 * SECTOR + 12 : 2 * SECTOR + 20] = b"garbage!"
    with pytest.raises(FormatError, match="not complete deflate data"):
        decode_vmdk(bytes(corrupt))
    with pytest.raises(FormatError, match="not a VMDK"):
        decode_vmdk(b"QFI\xfb" + bytes(1020))
    with pytest.raises(FormatError, match="shorter than its 512-byte header"):
        decode_vmdk(b"KDMV")
    with pytest.raises(FormatError, match=r"the OVA's disk 'vm\.vmdk'.*capacity"):
        decode(ova([("vm.ovf", OVF), ("vm.vmdk", vmdk_stream([(4096, grain)]))]))


def test_vmdk_without_end_marker_is_complete_when_its_length_is_known():
    grain = b"\4" * (64 * 1024)
    image = vmdk_stream([(0, grain)], end_marker=False, vmware_tail=False)
    assert decode_vmdk(image)[: len(grain)] == grain  # stream_length says it all arrived
    decoder = VmdkStreamDecoder()
    decoder.feed(image)
    with pytest.raises(FormatError, match="end-of-stream marker"):
        decoder.finish()
