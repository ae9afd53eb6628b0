"""The loop a backup tool runs every night, end to end with curl (issue: incremental exports).

Full export of S1; write; snapshot S2; export base=S1; write; snapshot S3; export base=S2.
Restore: import the full export into a new VDI, clone it, import each delta in order: the
result must equal S3 byte for byte. For VHD and QCOW2 exports, and raw, VHD and QCOW2 VDIs.
"""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

from tests.rawclient import AUTH, api, curl_upload

MiB = 1 << 20
SIZE = 24 * MiB + 512 * 3


@pytest.fixture
def srv(shared_server):
    return shared_server


def write(srv, vdi: str, tmp_path, frames: list[tuple[int, bytes]]) -> None:
    """Change some of the disk through chunk framing: data, and a zeroed range."""
    import struct

    body = b"".join(struct.pack("<QI", off, len(d)) + d for off, d in frames) + bytes(12)
    path = tmp_path / "frames"
    path.write_bytes(body)
    status, result, err = curl_upload(
        f"{srv.url}/import_raw_vdi?vdi={vdi}&chunked=1", "-T", str(path)
    )
    assert status == 200, (result, err)


def export(srv, vdi: str, fmt: str, dest, base: str | None = None):
    query = f"vdi={vdi}&format={fmt}" + (f"&base={base}" if base else "")
    subprocess.run(
        ["curl", "-sS", "-f", "-u", AUTH, "-o", str(dest), f"{srv.url}/export_raw_vdi?{query}"],
        check=True,
        capture_output=True,
    )
    return dest


def sha_of(srv, vdi: str, tmp_path) -> str:
    out = export(srv, vdi, "raw", tmp_path / f"{vdi}.raw")
    return hashlib.sha256(out.read_bytes()).hexdigest()


def snapshot(srv, vdi: str) -> str:
    status, snap = api(f"{srv.url}/vdis/{vdi}/snapshot", "POST")
    assert status == 201, snap
    return snap["uuid"]


@pytest.mark.parametrize("runtime", ["raw", "vhd", "qcow2"])
@pytest.mark.parametrize("fmt", ["vhd", "qcow2"])
def test_nightly_backup_and_restore(srv, tmp_path, runtime, fmt):
    if runtime != "raw":
        pytest.importorskip(f"formats.{runtime}_image")
    status, vdi = api(
        f"{srv.url}/vdis",
        "POST",
        {"virtual_size": SIZE, "image_format": runtime, "name_label": "disk"},
    )
    assert status == 201, vdi
    v = vdi["uuid"]
    write(
        srv,
        v,
        tmp_path,
        [
            (0, os.urandom(3 * MiB)),
            (10 * MiB, os.urandom(2 * MiB)),
            (SIZE - 4096, os.urandom(4096)),
        ],
    )
    s1 = snapshot(srv, v)
    full = export(srv, s1, fmt, tmp_path / f"full.{fmt}")

    write(
        srv,
        v,
        tmp_path,
        [(MiB, os.urandom(MiB + 512)), (10 * MiB, bytes(MiB)), (20 * MiB, os.urandom(4096))],
    )
    s2 = snapshot(srv, v)
    delta1 = export(srv, s2, fmt, tmp_path / f"d1.{fmt}", base=s1)

    write(srv, v, tmp_path, [(0, bytes(512)), (15 * MiB, os.urandom(3 * MiB))])
    s3 = snapshot(srv, v)
    delta2 = export(srv, s3, fmt, tmp_path / f"d2.{fmt}", base=s2)
    # A delta carries the change, not the disk.
    assert delta2.stat().st_size < full.stat().st_size

    sr = api(f"{srv.url}/srs")[1][0]["uuid"]
    status, restored, err = curl_upload(
        f"{srv.url}/import_raw_vdi?sr={sr}&format={fmt}", "-T", str(full)
    )
    assert status == 200, (restored, err)
    status, work = api(f"{srv.url}/vdis/{restored['vdi']}/clone", "POST")
    assert status == 201, work
    for delta in (delta1, delta2):
        status, result, err = curl_upload(
            f"{srv.url}/import_raw_vdi?vdi={work['uuid']}&format={fmt}", "-T", str(delta)
        )
        assert status == 200, (result, err)
    assert sha_of(srv, work["uuid"], tmp_path) == sha_of(srv, s3, tmp_path)
    assert sha_of(srv, s1, tmp_path) != sha_of(srv, s3, tmp_path)


def test_extents_against_a_base(srv, tmp_path):
    status, vdi = api(f"{srv.url}/vdis", "POST", {"virtual_size": 8 * MiB})
    v = vdi["uuid"]
    write(srv, v, tmp_path, [(0, os.urandom(2 * MiB))])
    s1 = snapshot(srv, v)
    write(srv, v, tmp_path, [(4 * MiB, os.urandom(MiB)), (0, bytes(MiB))])
    status, changed = api(f"{srv.url}/vdis/{v}/extents?base={s1}")
    assert status == 200
    assert changed == [
        {"start": 0, "length": MiB, "zero": True},
        {"start": 4 * MiB, "length": MiB, "zero": False},
    ]


@pytest.fixture
def changed_pair(srv, tmp_path):
    """A QCOW2 VDI, its snapshot S1, then changes (data and a zeroed range) and snapshot S2."""
    pytest.importorskip("formats.qcow2_image")
    status, vdi = api(f"{srv.url}/vdis", "POST", {"virtual_size": SIZE, "image_format": "qcow2"})
    assert status == 201, vdi
    v = vdi["uuid"]
    write(srv, v, tmp_path, [(0, os.urandom(4 * MiB)), (12 * MiB, os.urandom(3 * MiB))])
    s1 = snapshot(srv, v)
    write(
        srv,
        v,
        tmp_path,
        [(MiB, os.urandom(2 * MiB)), (12 * MiB, bytes(2 * MiB)), (20 * MiB, os.urandom(65536))],
    )
    return s1, snapshot(srv, v)


def test_qcow2_delta_rebased_onto_its_base_by_qemu_img(srv, tmp_path, changed_pair):
    s1, s2 = changed_pair
    base = export(srv, s1, "qcow2", tmp_path / f"{s1}.qcow2")
    delta = export(srv, s2, "qcow2", tmp_path / "delta.qcow2", base=s1)
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", str(delta)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f'"backing-filename": "{s1}.qcow2"' in info
    subprocess.run(["qemu-img", "check", str(delta)], check=True, capture_output=True)
    # Safe-mode rebase onto a fresh copy of the base must change nothing visible.
    copy = tmp_path / "base-copy.qcow2"
    copy.write_bytes(base.read_bytes())
    subprocess.run(
        ["qemu-img", "rebase", "-f", "qcow2", "-b", str(copy), "-F", "qcow2", str(delta)],
        check=True,
        capture_output=True,
    )
    expected = export(srv, s2, "raw", tmp_path / "s2.raw")
    subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(delta), str(expected)],
        check=True,
        capture_output=True,
    )


def test_vhd_delta_read_by_libvhdi_over_its_base(srv, tmp_path, changed_pair):
    s1, s2 = changed_pair
    parent = export(srv, s1, "vhd", tmp_path / f"{s1}.vhd")
    child = export(srv, s2, "vhd", tmp_path / "delta.vhd", base=s1)
    expected = export(srv, s2, "raw", tmp_path / "s2.raw")
    script = (
        "import sys, pyvhdi\n"
        "child, parent = pyvhdi.file(), pyvhdi.file()\n"
        "parent.open(sys.argv[2]); child.open(sys.argv[1]); child.set_parent(parent)\n"
        "sys.stdout.buffer.write(child.read_buffer_at_offset(child.get_media_size(), 0))\n"
    )
    out = subprocess.run(
        ["/usr/bin/python3", "-c", script, str(child), str(parent)], capture_output=True, check=True
    ).stdout
    assert hashlib.sha256(out).hexdigest() == hashlib.sha256(expected.read_bytes()).hexdigest()


@pytest.mark.parametrize("fmt", ["vhd", "qcow2"])
def test_delta_against_a_base_on_another_branch(srv, tmp_path, fmt):
    """Base and VDI share only an ancestor: V -> S1; branch A = V (write, snapshot SA);
    branch B = clone of S1 (write, snapshot SB). A delta of SB against SA, applied onto a
    clone of SA, must give SB."""
    pytest.importorskip(f"formats.{fmt}_image")
    status, vdi = api(f"{srv.url}/vdis", "POST", {"virtual_size": SIZE, "image_format": fmt})
    assert status == 201, vdi
    v = vdi["uuid"]
    write(srv, v, tmp_path, [(0, os.urandom(4 * MiB)), (16 * MiB, os.urandom(2 * MiB))])
    s1 = snapshot(srv, v)
    write(srv, v, tmp_path, [(MiB, os.urandom(MiB)), (16 * MiB, bytes(MiB))])
    sa = snapshot(srv, v)
    status, branch = api(f"{srv.url}/vdis/{s1}/clone", "POST")
    assert status == 201, branch
    write(srv, branch["uuid"], tmp_path, [(8 * MiB, os.urandom(MiB)), (0, bytes(4096))])
    sb = snapshot(srv, branch["uuid"])
    delta = export(srv, sb, fmt, tmp_path / f"sibling.{fmt}", base=sa)
    status, target = api(f"{srv.url}/vdis/{sa}/clone", "POST")
    assert status == 201
    status, result, err = curl_upload(
        f"{srv.url}/import_raw_vdi?vdi={target['uuid']}&format={fmt}", "-T", str(delta)
    )
    assert status == 200, (result, err)
    assert sha_of(srv, target["uuid"], tmp_path) == sha_of(srv, sb, tmp_path)
