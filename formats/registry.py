"""Every disk format the service speaks, each described once: how an upload in it is
decoded, how a VDI stored in it is opened and created, how an export in it is laid out.

The service asks this module, never a format's name, what to do: `FORMATS["vhd"].decoder`,
`.driver`, `.layout`. A format the service cannot do something with has None there (OVA is
never exported; tar never stores a VDI). XAPI's chunk framing is the wire form of raw data
(`chunked=true`), not a `format=` of its own: `CHUNKED`, picked by `wire`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from formats.chunked import ChunkDecoder, frames_layout
from formats.driver import DATA, ImageDriver
from formats.events import Decoder
from formats.layout import OutputLayout, raw_layout
from formats.ova import OvaDecoder
from formats.qcow2 import Qcow2Decoder, qcow2_layout
from formats.qcow2_image import Qcow2Image
from formats.raw import RawDecoder
from formats.raw_image import RawImage
from formats.spill import Spill
from formats.vhd import VhdDecoder, vhd_layout, vhd_timestamp
from formats.vhd_image import VhdImage, read_disk_uuid, set_disk_uuid
from formats.xapi_tar import XapiTarDecoder, xapi_tar_layout

Extents = list[tuple[int, int]]  # (offset, length) runs of the disk
Changes = list[tuple[int, int, str]]  # (offset, length, DATA or ZERO): what a delta carries


@dataclass(frozen=True)
class Identity:
    """Who a disk is, as image headers record it: the VDI's uuid and creation time, so the
    same content always exports as the same bytes."""

    uuid: uuid.UUID
    created: float


# Factories with one signature for every format, so the service never branches on a name.
MakeDecoder = Callable[[int | None, Spill | None, int | None], Decoder]  # (size, spill, length)
MakeImage = Callable[[Path, int, Identity, Path | None], ImageDriver]  # (path, size, who, parent)
ParentMismatch = Callable[[Any, Path | None], str | None]  # (open driver, parent's file)
Lay = Callable[[int, Extents, Identity], OutputLayout]
LayDelta = Callable[[int, Changes, Identity, Identity], OutputLayout]


@dataclass(frozen=True)
class Format:
    """One format, and what the service can do with it: None where it cannot do that."""

    name: str
    # -- upload --------------------------------------------------------------------------
    decoder: MakeDecoder | None = None
    spills: bool = False  # its decoder may meet bytes before their meaning: give it a Spill
    states_size: bool = False  # the image's header says how big the disk is
    length_is_size: bool = False  # the stream's length is the disk's size (raw bytes)
    overlaps: bool = False  # it may write the same bytes twice: its zeros are always written
    # -- runtime format: how a VDI is stored ----------------------------------------------
    driver: type | None = None  # `open(path, writable=)` gives an ImageDriver
    create: MakeImage | None = None  # a new empty image file, a child layer of `parent`
    layered: bool = False  # snapshots and clones are new child layers (else file copies)
    parent_mismatch: ParentMismatch | None = None  # how a file names its parent, checked
    # The disk uuid a file carries, which child layers name it by (None: named by file name);
    # a file that replaces a layer must carry the same.
    disk_uuid: Callable[[Path], uuid.UUID | None] = lambda path: None
    # Give a closed file another disk uuid (None: the format has none to give).
    set_disk_uuid: Callable[[Path, uuid.UUID], None] | None = None
    # -- export --------------------------------------------------------------------------
    content_type: str | None = None
    layout: Lay | None = None  # the whole disk in this format
    delta_layout: LayDelta | None = None  # only what changed since a base (None: whole disk)


# -- decoders ----------------------------------------------------------------------------


def _raw_decoder(size: int | None, spill: Spill | None, length: int | None) -> Decoder:
    assert size is not None, "a raw upload is written into a disk of known size"
    return RawDecoder(size)


def _chunk_decoder(size: int | None, spill: Spill | None, length: int | None) -> Decoder:
    assert size is not None, "a framed upload is written into a disk of known size"
    return ChunkDecoder(size)


def _tar_decoder(size: int | None, spill: Spill | None, length: int | None) -> Decoder:
    return XapiTarDecoder(virtual_size=size)


def _image_decoder(cls: type) -> MakeDecoder:
    def make(size: int | None, spill: Spill | None, length: int | None) -> Decoder:
        return cls(spill=spill, stream_length=length)

    return make


# -- image files ---------------------------------------------------------------------------


def _create_raw(path: Path, size: int, who: Identity, parent: Path | None) -> ImageDriver:
    if parent is not None:
        raise ValueError("a raw file cannot be a child layer")
    return RawImage.create(path, size)


def _create_vhd(path: Path, size: int, who: Identity, parent: Path | None) -> ImageDriver:
    """A child names its parent by the disk uuid in the parent's footer (the VDI it was
    created as, which a snapshot does not change), its timestamp and its file name."""
    named = None
    if parent is not None:
        named = (read_disk_uuid(parent), vhd_timestamp(int(os.stat(parent).st_mtime)), parent.name)
    return VhdImage.create(
        path,
        size,
        disk_uuid=who.uuid.bytes,
        timestamp=vhd_timestamp(int(who.created)),
        parent=named,
    )


def _create_qcow2(path: Path, size: int, who: Identity, parent: Path | None) -> ImageDriver:
    """A child names its parent's file name (for qemu-img; never opened by us)."""
    if parent is None:
        return Qcow2Image.create(path, size)
    return Qcow2Image.create(path, size, backing=parent.name, backing_format="qcow2")


def _vhd_parent_mismatch(image: VhdImage, parent: Path | None) -> str | None:
    if parent is None:
        if image.parent is not None:
            return "the file is a differencing disk but the record has no parent"
        return None
    if image.parent is None:
        return "the file is not a differencing disk but the record has a parent"
    expected = read_disk_uuid(parent)
    if image.parent[0] != expected:
        return (
            f"the file names parent {uuid.UUID(bytes=image.parent[0])}, the parent layer's "
            f"disk is {uuid.UUID(bytes=expected)}"
        )
    return None


def _qcow2_parent_mismatch(image: Qcow2Image, parent: Path | None) -> str | None:
    named = image.backing_file or None
    expected = parent.name if parent is not None else None
    if named != expected:
        return f"the file names backing {named!r}, the records say {expected!r}"
    return None


# -- export layouts --------------------------------------------------------------------------


def _raw_layout(size: int, extents: Extents, who: Identity) -> OutputLayout:
    return raw_layout(size, extents)


def _frames_layout(size: int, extents: Extents, who: Identity) -> OutputLayout:
    return frames_layout(extents)


def _frames_delta(size: int, changed: Changes, who: Identity, base: Identity) -> OutputLayout:
    """The changed runs as frames (removed data as frames of zeros)."""
    return frames_layout([(start, n) for start, n, _ in changed])


def _vhd_identity(who: Identity) -> dict[str, Any]:
    return {"disk_uuid": who.uuid.bytes, "timestamp": vhd_timestamp(int(who.created))}


def _vhd_layout(size: int, extents: Extents, who: Identity) -> OutputLayout:
    return vhd_layout(size, extents, **_vhd_identity(who))


def _vhd_delta(size: int, changed: Changes, who: Identity, base: Identity) -> OutputLayout:
    """A differencing VHD whose parent is the base's own VHD export (VHD has no zero flag:
    removed data goes as sectors of zeros)."""
    parent = (base.uuid.bytes, vhd_timestamp(int(base.created)), f"{base.uuid}.vhd")
    spans = [(start, n) for start, n, _ in changed]
    return vhd_layout(size, spans, parent=parent, **_vhd_identity(who))


def _qcow2_layout(size: int, extents: Extents, who: Identity) -> OutputLayout:
    return qcow2_layout(size, extents)


def _qcow2_delta(size: int, changed: Changes, who: Identity, base: Identity) -> OutputLayout:
    """An image backed by the base's own QCOW2 export, with zero clusters where data went."""
    return qcow2_layout(
        size,
        [(start, n) for start, n, kind in changed if kind == DATA],
        backing=f"{base.uuid}.qcow2",
        backing_format="qcow2",
        zero_extents=[(start, n) for start, n, kind in changed if kind != DATA],
    )


def _tar_layout(size: int, extents: Extents, who: Identity) -> OutputLayout:
    return xapi_tar_layout(size, extents)


def _tar_delta(size: int, changed: Changes, who: Identity, base: Identity) -> OutputLayout:
    """The chunks that changed, as XAPI sends them."""
    return xapi_tar_layout(size, [(start, n) for start, n, _ in changed])


# -- the formats ---------------------------------------------------------------------------

RAW = Format(
    "raw",
    decoder=_raw_decoder,
    length_is_size=True,
    driver=RawImage,
    create=_create_raw,
    content_type="application/octet-stream",
    layout=_raw_layout,  # a raw export against a base is the whole disk
)
CHUNKED = Format(
    "chunked",
    decoder=_chunk_decoder,
    overlaps=True,  # frames may come in any order and cover each other
    content_type="application/octet-stream",
    layout=_frames_layout,
    delta_layout=_frames_delta,
)
VHD = Format(
    "vhd",
    decoder=_image_decoder(VhdDecoder),
    spills=True,
    states_size=True,
    driver=VhdImage,
    create=_create_vhd,
    layered=True,
    parent_mismatch=_vhd_parent_mismatch,
    disk_uuid=lambda path: uuid.UUID(bytes=read_disk_uuid(path)),
    set_disk_uuid=lambda path, disk: set_disk_uuid(path, disk.bytes),
    content_type="application/vhd",
    layout=_vhd_layout,
    delta_layout=_vhd_delta,
)
QCOW2 = Format(
    "qcow2",
    decoder=_image_decoder(Qcow2Decoder),
    spills=True,
    states_size=True,
    driver=Qcow2Image,
    create=_create_qcow2,
    layered=True,
    parent_mismatch=_qcow2_parent_mismatch,
    content_type="application/x-qemu-disk",
    layout=_qcow2_layout,
    delta_layout=_qcow2_delta,
)
TAR = Format(
    "tar",
    decoder=_tar_decoder,  # the archive does not say the disk's size
    content_type="application/x-tar",
    layout=_tar_layout,
    delta_layout=_tar_delta,
)
OVA = Format("ova", decoder=_image_decoder(OvaDecoder), spills=True, states_size=True)

# What `format=` may name, in the order messages list them.
FORMATS: dict[str, Format] = {f.name: f for f in (RAW, VHD, QCOW2, TAR, OVA)}


# What `format=` may name on an import, on an export, and how a VDI may be stored.
UPLOAD_FORMATS = tuple(name for name, f in FORMATS.items() if f.decoder is not None)
EXPORT_FORMATS = tuple(name for name, f in FORMATS.items() if f.layout is not None)
RUNTIME_FORMATS = tuple(name for name, f in FORMATS.items() if f.driver is not None)


def wire(name: str, chunked: bool) -> Format:
    """What travels: the format, or XAPI's chunk framing of raw data."""
    if chunked:
        if name != RAW.name:
            raise ValueError(f"chunk framing carries raw data, not {name}")
        return CHUNKED
    return FORMATS[name]
