"""GET /vdis/{id}/checksum: one value for the same bytes, whatever the runtime format, the
chain under the VDI, or which zeros are holes; checked against the construction computed
here, over the raw bytes an export downloads, with no knowledge of holes."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import pytest

from tests.rawclient import api, curl_upload, export_to, frame

MiB = 1 << 20
SIZE = 9 * MiB + 512  # a last block shorter than the others, for every block size below


def expected(data: bytes, algorithm: str, block_size: int) -> str:
    """ovirt-imageio's block hash, from its description: the hash of the block digests."""
    if algorithm == "sha256":
        new = hashlib.sha256
    else:
        new = functools.partial(hashlib.blake2b, digest_size=32)
    outer = new()
    for start in range(0, len(data), block_size):
        outer.update(new(data[start : start + block_size]).digest())
    return outer.hexdigest()


def checksum(base: str, vdi: str, query: str = "") -> tuple[int, dict]:
    return api(f"{base}/vdis/{vdi}/checksum{query}")


def content() -> bytes:
    """Data, a long run of zeros (a hole once stored), data again, and a data tail."""
    data = bytearray(SIZE)
    data[: 2 * MiB] = os.urandom(2 * MiB)
    data[5 * MiB : 6 * MiB + 4096] = os.urandom(MiB + 4096)
    data[SIZE - 4096 :] = os.urandom(4096)
    return bytes(data)


@pytest.fixture(scope="module")
def disks(shared_server, tmp_path_factory):
    """The same content in a raw, a VHD and a QCOW2 VDI."""
    base = shared_server.url
    data = content()
    source = tmp_path_factory.mktemp("checksum") / "disk.raw"
    source.write_bytes(data)
    vdis = {}
    for fmt in ("raw", "vhd", "qcow2"):
        status, vdi = api(
            f"{base}/vdis", "POST", {"virtual_size": SIZE, "image_format": fmt, "name_label": fmt}
        )
        assert status == 201, vdi
        status, body, err = curl_upload(
            f"{base}/import_raw_vdi?vdi={vdi['uuid']}", "-T", str(source)
        )
        assert status == 200, (body, err)
        vdis[fmt] = vdi["uuid"]
    return base, data, vdis


@pytest.mark.parametrize("algorithm", ["sha256", "blake2b"])
@pytest.mark.parametrize("block_size", [("4MiB", 4 * MiB), ("65536", 64 * 1024)])
def test_same_bytes_same_checksum_in_every_format(disks, algorithm, block_size):
    base, data, vdis = disks
    text, size = block_size
    want = expected(data, algorithm, size)
    for vdi in vdis.values():
        status, body = checksum(base, vdi, f"?algorithm={algorithm}&block_size={text}")
        assert status == 200, body
        assert body == {"algorithm": algorithm, "block_size": size, "checksum": want}


def test_defaults_and_refusals(disks):
    base, data, vdis = disks
    status, body = checksum(base, vdis["raw"])
    assert status == 200 and body["algorithm"] == "blake2b" and body["block_size"] == 4 * MiB
    assert body["checksum"] == expected(data, "blake2b", 4 * MiB)
    for query in ("?algorithm=md5", "?block_size=1000", "?block_size=128MiB", "?block_size=x"):
        status, body = checksum(base, vdis["raw"], query)
        assert status == 400 and body["error"] == "BAD_REQUEST", (query, body)
    status, body = checksum(base, "no-such-vdi")
    assert status == 404 and body["error"] == "VDI_NOT_FOUND"


@pytest.mark.parametrize("fmt", ["raw", "vhd", "qcow2"])
def test_snapshots_and_chains_against_their_raw_export(shared_server, tmp_path: Path, fmt):
    """After a snapshot and overwrites (a chain for VHD and QCOW2), the checksum of the
    VDI and of its snapshot is the one of its raw export."""
    base = shared_server.url
    status, vdi = api(f"{base}/vdis", "POST", {"virtual_size": 6 * MiB, "image_format": fmt})
    assert status == 201
    first = tmp_path / "first.raw"
    first.write_bytes(os.urandom(6 * MiB))
    assert curl_upload(f"{base}/import_raw_vdi?vdi={vdi['uuid']}", "-T", str(first))[0] == 200
    status, snap = api(f"{base}/vdis/{vdi['uuid']}/snapshot", "POST", {})
    assert status == 201
    changes = tmp_path / "changes.bin"
    changes.write_bytes(frame(MiB, os.urandom(4096)) + frame(3 * MiB, bytes(MiB)) + bytes(12))
    status, _, err = curl_upload(
        f"{base}/import_raw_vdi?vdi={vdi['uuid']}&chunked=true", "-T", str(changes)
    )
    assert status == 200, err
    for uuid in (vdi["uuid"], snap["uuid"]):
        raw = export_to(base, uuid, tmp_path / f"{uuid}.raw")
        status, body = checksum(base, uuid, "?algorithm=sha256&block_size=1MiB")
        assert status == 200
        assert body["checksum"] == expected(raw.read_bytes(), "sha256", MiB)
    status, mine = checksum(base, vdi["uuid"])
    status, theirs = checksum(base, snap["uuid"])
    assert mine["checksum"] != theirs["checksum"]  # the writes show
