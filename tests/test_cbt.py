"""Changed block tracking, against the real server: exactly the 64 KiB blocks an import
touched, between any two versions of a disk, in XAPI's bitmap encoding; refused (409) where
tracking did not cover the way between them; and logged ahead of the data, so a SIGKILL in
the middle of an import never leaves a changed block out."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ServerProcess
from tests.rawclient import AUTH, api, curl_upload, export_to, frame

MiB = 1 << 20
BLOCK = 64 << 10
SIZE = 16 * MiB


def blocks_of(answer: dict) -> set[int]:
    """The block numbers set in a changed_blocks answer, decoded from its description."""
    assert answer["block_size"] == BLOCK
    bitmap = base64.b64decode(answer["bitmap"])
    assert len(bitmap) == -(-SIZE // BLOCK) // 8
    return {i for i in range(len(bitmap) * 8) if bitmap[i // 8] & (0x80 >> (i % 8))}


def changed(base_url: str, to: str, base: str) -> tuple[int, dict]:
    return api(f"{base_url}/vdis/{to}/changed_blocks?base={base}")


def write_frames(base_url: str, vdi: str, tmp: Path, frames: list[tuple[int, bytes]]) -> None:
    body = tmp / "frames.bin"
    body.write_bytes(b"".join(frame(o, d) for o, d in frames) + bytes(12))
    status, _, err = curl_upload(
        f"{base_url}/import_raw_vdi?vdi={vdi}&chunked=true", "-T", str(body)
    )
    assert status == 200, err


def touched(frames: list[tuple[int, bytes]]) -> set[int]:
    return {b for o, d in frames for b in range(o // BLOCK, (o + len(d) - 1) // BLOCK + 1)}


@pytest.mark.parametrize("fmt", ["raw", "vhd", "qcow2"])
def test_the_blocks_written_between_versions(shared_server, tmp_path, fmt):
    url = shared_server.url
    status, vdi = api(f"{url}/vdis", "POST", {"virtual_size": SIZE, "image_format": fmt})
    assert status == 201 and vdi["cbt_enabled"] is False
    status, vdi = api(f"{url}/vdis/{vdi['uuid']}", "PATCH", {"cbt_enabled": True})
    assert status == 200 and vdi["cbt_enabled"] is True
    full = tmp_path / "full.raw"
    full.write_bytes(os.urandom(SIZE))
    assert curl_upload(f"{url}/import_raw_vdi?vdi={vdi['uuid']}", "-T", str(full))[0] == 200
    status, a = api(f"{url}/vdis/{vdi['uuid']}/snapshot", "POST", {})
    assert status == 201 and a["cbt_enabled"] is True

    first = [
        (70000, os.urandom(100)),  # inside block 1
        (5 * MiB - 10, os.urandom(200 * 1024)),  # across blocks 79..83
        (10 * MiB, bytes(BLOCK)),  # zeroes block 160
    ]
    write_frames(url, vdi["uuid"], tmp_path, first)
    status, answer = changed(url, vdi["uuid"], a["uuid"])
    assert status == 200 and blocks_of(answer) == touched(first) == {1, *range(79, 84), 160}
    status, answer = changed(url, a["uuid"], vdi["uuid"])  # either order
    assert blocks_of(answer) == touched(first)

    status, b = api(f"{url}/vdis/{vdi['uuid']}/snapshot", "POST", {})
    assert blocks_of(changed(url, b["uuid"], a["uuid"])[1]) == touched(first)
    assert blocks_of(changed(url, vdi["uuid"], b["uuid"])[1]) == set()
    second = [(SIZE - 1, b"\1"), (MiB, os.urandom(BLOCK))]
    write_frames(url, vdi["uuid"], tmp_path, second)
    status, c = api(f"{url}/vdis/{vdi['uuid']}/snapshot", "POST", {})
    assert blocks_of(changed(url, c["uuid"], b["uuid"])[1]) == touched(second)
    assert blocks_of(changed(url, c["uuid"], a["uuid"])[1]) == touched(first) | touched(second)
    # The snapshot in between goes; its epoch joins the next one.
    assert api(f"{url}/vdis/{b['uuid']}", "DELETE")[0] == 204
    assert blocks_of(changed(url, c["uuid"], a["uuid"])[1]) == touched(first) | touched(second)

    # A clone is tracked from the snapshot it starts at.
    status, clone = api(f"{url}/vdis/{c['uuid']}/clone", "POST", {})
    assert status == 201 and clone["cbt_enabled"] is True
    third = [(2 * MiB, os.urandom(4096))]
    write_frames(url, clone["uuid"], tmp_path, third)
    assert blocks_of(changed(url, clone["uuid"], c["uuid"])[1]) == touched(third)
    assert blocks_of(changed(url, clone["uuid"], a["uuid"])[1]) == (
        touched(first) | touched(second) | touched(third)
    )

    # Off discards the VDI's log: its way back is no longer covered.
    status, off = api(f"{url}/vdis/{vdi['uuid']}", "PATCH", {"cbt_enabled": False})
    assert status == 200 and off["cbt_enabled"] is False
    status, answer = changed(url, vdi["uuid"], a["uuid"])
    assert status == 409 and answer["error"] == "VDI_NO_CBT_METADATA"
    assert blocks_of(changed(url, c["uuid"], a["uuid"])[1]) == touched(first) | touched(second)


def test_refusals(shared_server):
    url = shared_server.url
    status, plain = api(f"{url}/vdis", "POST", {"virtual_size": SIZE})
    status, other = api(f"{url}/vdis", "POST", {"virtual_size": SIZE})
    status, answer = changed(url, plain["uuid"], other["uuid"])
    assert status == 409 and answer["error"] == "VDI_NO_CBT_METADATA"
    status, answer = api(f"{url}/vdis/{plain['uuid']}/changed_blocks")
    assert status == 400
    status, snap = api(f"{url}/vdis/{plain['uuid']}/snapshot", "POST", {})
    status, answer = api(f"{url}/vdis/{snap['uuid']}", "PATCH", {"cbt_enabled": True})
    assert status == 409 and answer["error"] == "VDI_READ_ONLY"
    status, answer = api(f"{url}/vdis/{plain['uuid']}", "PATCH", {"name_label": "x"})
    assert status == 400
    status, answer = api(f"{url}/vdis/{plain['uuid']}", "PATCH", {"cbt_enabled": "yes"})
    assert status == 400
    # Tracking turned on after writes: the epoch it began in is not covered.
    status, _ = api(f"{url}/vdis/{snap['uuid']}/clone", "POST", {})
    api(f"{url}/vdis/{plain['uuid']}", "PATCH", {"cbt_enabled": True})
    status, answer = changed(url, plain["uuid"], snap["uuid"])
    assert status == 409 and answer["error"] == "VDI_NO_CBT_METADATA"


@pytest.mark.parametrize("fmt", ["raw", "vhd"])
def test_sigkill_in_an_import_leaves_no_changed_block_out(tmp_path, fmt):
    """Kill the server in the middle of an import of frames spread over the disk: after the
    restart, every block that differs from the snapshot is in the log."""
    server = ServerProcess(tmp_path / "state").start()
    try:
        url = server.url
        status, vdi = api(f"{url}/vdis", "POST", {"virtual_size": SIZE, "image_format": fmt})
        api(f"{url}/vdis/{vdi['uuid']}", "PATCH", {"cbt_enabled": True})
        status, snap = api(f"{url}/vdis/{vdi['uuid']}/snapshot", "POST", {})
        frames = [(i * 3 * BLOCK + 512, os.urandom(BLOCK)) for i in range(SIZE // (3 * BLOCK))]
        body = tmp_path / "frames.bin"
        body.write_bytes(b"".join(frame(o, d) for o, d in frames) + bytes(12))
        target = f"{url}/import_raw_vdi?vdi={vdi['uuid']}&chunked=true"
        upload = subprocess.Popen(
            ["curl", "-sS", "-u", AUTH, "-T", str(body), "--limit-rate", "1M", target],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.5)  # some frames are written, most are not
        server.stop(signal.SIGKILL)
        upload.wait(30)
        server = ServerProcess(tmp_path / "state")
        server.port, server.url = int(url.rsplit(":", 1)[1]), url
        server.start()
        now = export_to(url, vdi["uuid"], tmp_path / "now.raw").read_bytes()
        before = export_to(url, snap["uuid"], tmp_path / "before.raw").read_bytes()
        differ = {
            i
            for i in range(SIZE // BLOCK)
            if now[i * BLOCK : (i + 1) * BLOCK] != before[i * BLOCK : (i + 1) * BLOCK]
        }
        if fmt == "raw":  # a layered image may lose unflushed writes with the process
            assert differ, "the kill came before any write: nothing was tested"
        assert len(differ) < len(touched(frames)), "the kill came after the import ended"
        status, answer = changed(url, vdi["uuid"], snap["uuid"])
        assert status == 200
        logged = blocks_of(answer)
        assert differ <= logged <= touched(frames)
    finally:
        if server.proc and server.proc.poll() is None:
            server.stop()
