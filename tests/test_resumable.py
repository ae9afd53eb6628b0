"""Resumable uploads (contract: Resumable uploads): curl -C continues an upload at its
durable offset, after a client disconnect or a SIGKILL of the server, for every format."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from tests.conftest import ServerProcess
from tests.rawclient import (
    AUTH,
    AUTH_HEADER,
    RawRequest,
    create_vdi,
    curl_upload,
    export_to,
    new_task,
    task,
)

MiB = 1 << 20
SIZE = 40 * MiB


@pytest.fixture
def srv(shared_server):
    return shared_server


@pytest.fixture(scope="module")
def disk(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("disk") / "disk.raw"
    data = bytearray(SIZE)
    for start in range(0, SIZE, 3 * MiB):
        n = min(2 * MiB, SIZE - start)
        data[start : start + n] = os.urandom(n)
    path.write_bytes(data)
    return path


def upload_offset(base: str, task_id: str) -> tuple[int, dict]:
    req = RawRequest(
        base, "HEAD", f"/import_raw_vdi?task_id={task_id}", {"Authorization": AUTH_HEADER}
    )
    status, headers, _ = req.read_response()
    req.close()
    return status, headers


def start_and_break(base: str, query: str, stream: bytes, send: int) -> RawRequest:
    """Send the first `send` bytes of the stream (in two halves with a pause between, as a
    slow link would, so checkpoints fall due while data flows); the caller then vanishes."""
    req = RawRequest(
        base,
        "PUT",
        f"/import_raw_vdi?{query}",
        {"Authorization": AUTH_HEADER, "Content-Length": str(len(stream))},
    )
    req.send(stream[: send // 2])
    time.sleep(1.2)
    req.send(stream[send // 2 : send])
    return req


def wait_offset(base: str, task_id: str, at_least: int = 1, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, headers = upload_offset(base, task_id)
        if status == 200 and int(headers["upload-offset"]) >= at_least:
            return int(headers["upload-offset"])
        time.sleep(0.1)
    raise AssertionError(f"no durable offset for task {task_id}")


def wait_suspended(base: str, task_id: str) -> dict:
    """The task once no connection is feeding its upload any more."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        row = task(base, task_id)
        if row["upload_active"] is False:
            return row
        time.sleep(0.05)
    raise AssertionError("the upload was not suspended")


def resume_with_curl(base: str, query: str, path: Path, offset: int):
    return curl_upload(f"{base}/import_raw_vdi?{query}", "-C", str(offset), "-T", str(path))


def vdi_bytes(srv, vdi_uuid: str, tmp_path) -> bytes:
    out = tmp_path / "out.raw"
    export_to(srv.url, vdi_uuid, out)
    return out.read_bytes()


def test_curl_resumes_after_a_disconnect(srv, disk, tmp_path):
    vdi = create_vdi(srv.url, SIZE)
    task_id = new_task(srv.url)
    query = f"vdi={vdi['uuid']}&task_id={task_id}"
    req = start_and_break(srv.url, query, disk.read_bytes(), 13 * MiB + 123)
    req.close()
    row = wait_suspended(srv.url, task_id)
    assert row["status"] == "pending" and row["error_info"] == []
    status, headers = upload_offset(srv.url, task_id)
    offset = int(headers["upload-offset"])
    assert status == 200 and headers["upload-complete"] == "?0"
    assert 0 < offset <= 13 * MiB + 123 and row["upload_offset"] == offset
    # Beyond the durable offset: refused, with the offset to use.
    status, body, err = resume_with_curl(srv.url, query, disk, offset + 512)
    assert status == 409 and body["error"] == "UPLOAD_OFFSET_MISMATCH", (body, err)
    # Below it: the overlap is skipped. Then the rest completes the upload.
    status, body, err = resume_with_curl(srv.url, query, disk, max(0, offset - 4096))
    assert status == 200, (body, err)
    assert task(srv.url, task_id)["status"] == "success"
    assert (
        hashlib.sha256(vdi_bytes(srv, vdi["uuid"], tmp_path)).digest()
        == hashlib.sha256(disk.read_bytes()).digest()
    )
    status, headers = upload_offset(srv.url, task_id)
    assert status == 200 and headers["upload-complete"] == "?1"


def test_second_connection_on_an_upload_in_flight(srv, disk):
    vdi = create_vdi(srv.url, SIZE)
    task_id = new_task(srv.url)
    query = f"vdi={vdi['uuid']}&task_id={task_id}"
    req = start_and_break(srv.url, query, disk.read_bytes(), 5 * MiB)
    wait_offset(srv.url, task_id)
    status, body, _ = resume_with_curl(srv.url, query, disk, 0)
    req.close()
    assert status == 409 and body["error"] == "VDI_IN_USE"


def test_segments_with_upload_complete(srv, disk, tmp_path):
    vdi = create_vdi(srv.url, SIZE)
    task_id = new_task(srv.url)
    data = disk.read_bytes()
    first = tmp_path / "first"
    first.write_bytes(data[: 10 * MiB])
    status, body, err = curl_upload(
        f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}&task_id={task_id}",
        "-T",
        str(first),
        "-H",
        "Upload-Complete: ?0",
    )
    assert status == 204, (body, err)
    assert task(srv.url, task_id)["status"] == "pending"
    assert wait_offset(srv.url, task_id) == 10 * MiB
    status, body, err = resume_with_curl(
        srv.url, f"vdi={vdi['uuid']}&task_id={task_id}", disk, 10 * MiB
    )
    assert status == 200, (body, err)
    assert vdi_bytes(srv, vdi["uuid"], tmp_path) == data


def stream_for(fmt: str, disk: Path, tmp: Path) -> Path:
    if fmt == "raw":
        return disk
    if fmt == "chunked":
        import struct

        data = disk.read_bytes()
        out = tmp / "frames.bin"
        with open(out, "wb") as f:
            for off in range(0, SIZE, 2 * MiB):
                f.write(struct.pack("<QI", off, 2 * MiB) + data[off : off + 2 * MiB])
            f.write(bytes(12))
        return out
    if fmt in ("vhd", "qcow2"):
        out = tmp / f"disk.{fmt}"
        qfmt = "vpc" if fmt == "vhd" else fmt
        opts = ["-o", "subformat=dynamic,force_size=on"] if fmt == "vhd" else []
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", qfmt, *opts, str(disk), str(out)], check=True
        )
        return out
    if fmt == "tar":  # exported by a server, as XAPI tar
        raise AssertionError("built by the test itself")
    if fmt == "ova":
        qcow = stream_for("qcow2", disk, tmp)
        out = tmp / "vm.ova"
        ovf = tmp / "vm.ovf"
        ovf.write_text("<Envelope/>")
        with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as archive:
            archive.add(ovf, arcname="vm.ovf")
            archive.add(qcow, arcname="disk.qcow2")
        return out
    raise AssertionError(fmt)


@pytest.mark.parametrize("fmt", ["raw", "chunked", "vhd", "qcow2", "tar", "ova"])
def test_resume_after_sigkill(tmp_path, disk, fmt):
    srv = ServerProcess(tmp_path / "state").start()
    try:
        vdi = create_vdi(srv.url, SIZE)
        if fmt == "tar":
            stream = tmp_path / "disk.tar"
            full = create_vdi(srv.url, SIZE)
            assert (
                curl_upload(f"{srv.url}/import_raw_vdi?vdi={full['uuid']}", "-T", str(disk))[0]
                == 200
            )
            export_to(srv.url, full["uuid"], stream, "&format=tar")
        else:
            stream = stream_for(fmt, disk, tmp_path)
        query_fmt = "format=raw&chunked=true" if fmt == "chunked" else f"format={fmt}"
        task_id = new_task(srv.url)
        query = f"vdi={vdi['uuid']}&task_id={task_id}&{query_fmt}"
        data = stream.read_bytes()
        req = start_and_break(srv.url, query, data, len(data) * 2 // 3)
        offset = wait_offset(srv.url, task_id, at_least=4 * MiB)
        srv.stop(signal.SIGKILL)  # mid-upload: the process has no chance to clean up
        req.close()
        srv.start()
        row = task(srv.url, task_id)
        assert row["status"] == "pending", row  # survived the crash, not failed
        status, headers = upload_offset(srv.url, task_id)
        durable = int(headers["upload-offset"])
        assert status == 200 and durable >= offset
        status, body, err = resume_with_curl(srv.url, query, stream, durable)
        assert status == 200, (body, err)
        assert task(srv.url, task_id)["status"] == "success"
        assert vdi_bytes(srv, vdi["uuid"], tmp_path) == disk.read_bytes()
        leftovers = list((srv.state_dir / "uploads").glob("*")) + list(
            (srv.state_dir / "srs").rglob(".spill-*")
        )
        assert leftovers == []
    finally:
        srv.stop()


def test_an_upload_nobody_resumes_expires(tmp_path, disk):
    srv = ServerProcess(
        tmp_path / "state", env={"VDIT_UPLOAD_TTL": "1", "VDIT_TASK_GC_INTERVAL": "1"}
    ).start()
    try:
        vdi = create_vdi(srv.url, SIZE)
        task_id = new_task(srv.url)
        req = start_and_break(
            srv.url, f"vdi={vdi['uuid']}&task_id={task_id}", disk.read_bytes(), 4 * MiB
        )
        wait_offset(srv.url, task_id)
        req.close()
        wait_suspended(srv.url, task_id)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and task(srv.url, task_id)["status"] == "pending":
            time.sleep(0.2)
        row = task(srv.url, task_id)
        assert row["status"] == "failure" and row["error_info"][0] == "UPLOAD_EXPIRED"
        assert upload_offset(srv.url, task_id)[0] == 410
        assert list((srv.state_dir / "uploads").glob("*")) == []
    finally:
        srv.stop()


def test_resumed_download_never_splices_two_versions(srv, tmp_path):
    """curl -C - with the ETag as If-Range: unchanged VDI -> the rest (206); changed VDI ->
    the server sends the whole new disk (200) and curl refuses to append it to the old part
    instead of splicing two versions."""
    vdi = create_vdi(srv.url, 4 * MiB)
    first = tmp_path / "v1"
    first.write_bytes(os.urandom(4 * MiB))
    assert curl_upload(f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}", "-T", str(first))[0] == 200
    url = f"{srv.url}/export_raw_vdi?vdi={vdi['uuid']}"
    head = subprocess.run(
        ["curl", "-sS", "-I", "-u", AUTH, url], capture_output=True, text=True, check=True
    ).stdout
    etag = next(
        line.split(":", 1)[1].strip()
        for line in head.splitlines()
        if line.lower().startswith("etag:")
    )
    partial = tmp_path / "download"
    partial.write_bytes(first.read_bytes()[:MiB])
    ok = subprocess.run(
        ["curl", "-sS", "-u", AUTH, "-C", "-", "-H", f"If-Range: {etag}", "-o", str(partial), url],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and partial.read_bytes() == first.read_bytes()

    partial.write_bytes(first.read_bytes()[:MiB])
    second = tmp_path / "v2"
    second.write_bytes(os.urandom(4 * MiB))
    assert curl_upload(f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}", "-T", str(second))[0] == 200
    stale = subprocess.run(
        ["curl", "-sS", "-u", AUTH, "-C", "-", "-H", f"If-Range: {etag}", "-o", str(partial), url],
        capture_output=True,
        text=True,
    )
    assert stale.returncode == 33, stale.stderr  # "server does not support byte ranges"
    assert partial.read_bytes() == first.read_bytes()[:MiB]  # nothing spliced onto it


def test_a_stalled_upload_is_checkpointed_without_more_data(tmp_path):
    """40 MiB arrive in one go, the client stalls, the server dies: what arrived is durable
    (checkpoints used to be taken only when more data came)."""
    srv = ServerProcess(tmp_path / "state").start()
    try:
        size = 64 * MiB
        vdi = create_vdi(srv.url, size)
        task_id = new_task(srv.url)
        data = os.urandom(40 * MiB)
        req = RawRequest(
            srv.url,
            "PUT",
            f"/import_raw_vdi?vdi={vdi['uuid']}&task_id={task_id}",
            {"Authorization": AUTH_HEADER, "Content-Length": str(size)},
        )
        req.send(data)
        time.sleep(3)  # the stall: no byte for three seconds, the connection still open
        srv.stop(signal.SIGKILL)
        req.close()
        srv.start()
        status, headers = upload_offset(srv.url, task_id)
        assert status == 200 and int(headers["upload-offset"]) == len(data), headers
        exported = vdi_bytes(srv, vdi["uuid"], tmp_path)
        assert exported[: len(data)] == data
    finally:
        srv.stop()
