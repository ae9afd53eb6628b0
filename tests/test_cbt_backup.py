"""Incremental forever, as Xen Orchestra's CBT backups run it every night: snapshot, export
the delta against last night's snapshot (whose data was destroyed: only its change log is
left), destroy the new snapshot's data, delete last night's. Each delta is applied to a
restore copy by an independent tool (qemu-img commit for QCOW2 deltas; for VHD deltas, an
import into a restore VDI), and the copy must equal the disk, byte for byte, every night."""

from __future__ import annotations

import base64
import hashlib
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.rawclient import api, curl_upload, export_to, frame

MiB = 1 << 20
BLOCK = 64 << 10
SIZE = 12 * MiB
ROUNDS = 8


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write(url: str, vdi: str, tmp: Path, frames: list[tuple[int, bytes]]) -> None:
    body = tmp / "frames.bin"
    body.write_bytes(b"".join(frame(o, d) for o, d in frames) + bytes(12))
    status, _, err = curl_upload(f"{url}/import_raw_vdi?vdi={vdi}&chunked=true", "-T", str(body))
    assert status == 200, err


def touched(frames: list[tuple[int, bytes]]) -> set[int]:
    return {b for o, d in frames for b in range(o // BLOCK, (o + len(d) - 1) // BLOCK + 1)}


def changed(url: str, to: str, base: str) -> set[int]:
    status, answer = api(f"{url}/vdis/{to}/changed_blocks?base={base}")
    assert status == 200, answer
    bitmap = base64.b64decode(answer["bitmap"])
    return {i for i in range(len(bitmap) * 8) if bitmap[i // 8] & (0x80 >> (i % 8))}


def snapshot(url: str, vdi: str) -> str:
    status, snap = api(f"{url}/vdis/{vdi}/snapshot", "POST", {})
    assert status == 201, snap
    return snap["uuid"]


def data_destroy(url: str, snap: str) -> None:
    status, record = api(f"{url}/vdis/{snap}/data_destroy", "POST", {})
    assert status == 200 and record["type"] == "cbt_metadata", record


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.mark.parametrize(
    ("runtime", "fmt"),
    [("raw", "qcow2"), ("vhd", "qcow2"), ("qcow2", "qcow2"), ("vhd", "vhd"), ("qcow2", "vhd")],
)
def test_nightly_cbt_backup(shared_server, tmp_path, runtime, fmt):
    url = shared_server.url
    rng = random.Random(f"{runtime}-{fmt}")
    status, vdi = api(f"{url}/vdis", "POST", {"virtual_size": SIZE, "image_format": runtime})
    assert status == 201
    v = vdi["uuid"]
    assert api(f"{url}/vdis/{v}", "PATCH", {"cbt_enabled": True})[0] == 200
    write(url, v, tmp_path, [(0, os.urandom(4 * MiB)), (8 * MiB, os.urandom(MiB))])

    # Night 0: a full backup, then only the snapshot's change log is kept.
    prev = snapshot(url, v)
    restore = export_to(url, prev, tmp_path / "restore.raw")
    if fmt == "vhd":  # VHD deltas are applied by importing them into a restore VDI
        sr = api(f"{url}/srs")[1][0]["uuid"]
        status, restored, err = curl_upload(
            f"{url}/import_raw_vdi?sr={sr}&virtual_size={SIZE}", "-T", str(restore)
        )
        assert status == 200, err
        restore_vdi = restored["vdi"]
    data_destroy(url, prev)
    status, refused = api(f"{url}/export_raw_vdi?vdi={prev}")
    assert status == 409 and refused["error"] == "VDI_INCOMPATIBLE_TYPE"
    status, refused = api(f"{url}/vdis/{prev}/clone", "POST", {})
    assert status == 409 and refused["error"] == "VDI_INCOMPATIBLE_TYPE"

    for night in range(1, ROUNDS + 1):
        frames = []
        for _ in range(3):
            offset = rng.randrange(0, SIZE - MiB) // 512 * 512
            data = bytes(rng.randrange(1, 3 * BLOCK)) if rng.random() < 0.25 else None
            frames.append((offset, data or os.urandom(rng.randrange(1, 3 * BLOCK))))
        write(url, v, tmp_path, frames)
        snap = snapshot(url, v)
        assert changed(url, snap, prev) == touched(frames), f"night {night}"

        delta = tmp_path / f"night{night}.{fmt}"
        export_to(url, snap, delta, f"&format={fmt}&base={prev}")
        if fmt == "qcow2":
            qemu_img("rebase", "-u", "-f", "qcow2", "-b", str(restore), "-F", "raw", str(delta))
            qemu_img("check", str(delta))
            qemu_img("commit", "-f", "qcow2", str(delta))
            restored_sha = sha(restore)
        else:
            status, _, err = curl_upload(
                f"{url}/import_raw_vdi?vdi={restore_vdi}&format=vhd", "-T", str(delta)
            )
            assert status == 200, err
            restored_sha = sha(export_to(url, restore_vdi, tmp_path / "restored.raw"))
        assert restored_sha == sha(export_to(url, snap, tmp_path / "snap.raw")), f"night {night}"

        data_destroy(url, snap)
        assert api(f"{url}/vdis/{prev}", "DELETE")[0] == 204
        prev = snap

    # The offline check still agrees with every layer, and with the cbt_metadata snapshot.
    for vdi_uuid in (v, prev):
        checked = subprocess.run(
            [
                sys.executable, "-m", "transfer", "vdi", "verify", vdi_uuid,
                "--state-dir", str(shared_server.state_dir),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
        assert checked.returncode == 0, checked.stdout + checked.stderr
