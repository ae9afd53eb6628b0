"""What a disk image file is, from its magic bytes, never its name (a qcow2 named disk.img
is a qcow2). Sans I/O: the caller hands over the file's first and last bytes."""

from __future__ import annotations

from dataclasses import dataclass

HEAD = 4096  # bytes of the start the caller reads (covers the tar header's magic at 257)
TAIL = 512  # bytes of the end (a fixed VHD's footer)


@dataclass(frozen=True)
class Detected:
    """`kind` names what the bytes are; `upload_format` is the server's name for it, or
    None for images the server does not take (say which, rather than storing them as raw)."""

    kind: str
    upload_format: str | None

    @property
    def description(self) -> str:
        return DESCRIPTIONS.get(self.kind, self.kind)


DESCRIPTIONS = {
    "raw": "a raw disk image (no known image header)",
    "qcow2": "a QCOW2 image",
    "vhd": "a VHD image",
    "tar": "a tar archive (XAPI's block tar)",
    "ova": "an OVA (a tar archive with an OVF descriptor)",
    "vmdk": "a VMDK image",
    "vhdx": "a VHDX image",
    "vdi": "a VirtualBox VDI image",
}
UNSUPPORTED_HINT = "convert it first: qemu-img convert -O qcow2 FILE disk.qcow2"


def detect(head: bytes, tail: bytes = b"") -> Detected:
    """The image the bytes belong to. `head` is the file's start (HEAD bytes, or all of a
    smaller file), `tail` its last TAIL bytes (empty when unknown, as for a pipe: a fixed
    VHD, whose only header is its footer, then reads as raw)."""
    if head.startswith(b"QFI\xfb"):
        return Detected("qcow2", "qcow2")
    if head.startswith(b"conectix") or tail[-512:].startswith(b"conectix"):
        return Detected("vhd", "vhd")
    if len(tail) >= 511 and tail[-511:].startswith(b"conectix"):  # pre-2004 511-byte footer
        return Detected("vhd", "vhd")
    if head.startswith(b"KDMV") or head.startswith(b"# Disk DescriptorFile"):
        return Detected("vmdk", None)
    if head.startswith(b"vhdxfile"):
        return Detected("vhdx", None)
    if head.startswith(b"<<< ") and head[64:68] == b"\x7f\x10\xda\xbe":
        return Detected("vdi", None)
    if head[257:262] == b"ustar":
        name = head[:100].split(b"\0", 1)[0]
        if name.lower().endswith(b".ovf"):
            return Detected("ova", "ova")
        return Detected("tar", "tar")
    return Detected("raw", "raw")
