"""The IETF "Resumable Uploads for HTTP" draft, spoken by a client written from the draft:
creation with a 104 (Upload Resumption Supported), offset retrieval by HEAD, append by PATCH
with application/partial-upload, cancellation by DELETE."""

from __future__ import annotations

import os
import time

import pytest

from tests.rawclient import AUTH_HEADER, RawRequest, create_vdi, task

MiB = 1 << 20


@pytest.fixture
def srv(shared_server):
    return shared_server


class DraftClient:
    def __init__(self, base: str):
        self.base = base

    def create(self, target: str, body: bytes, send: int, version: str = "9"):
        """Start an upload that declares itself complete (the body follows)."""
        req = RawRequest(
            self.base,
            "PUT",
            target,
            {
                "Authorization": AUTH_HEADER,
                "Content-Length": str(len(body)),
                "Upload-Complete": "?1",
                "Upload-Draft-Interop-Version": version,
                "Upload-Length": str(len(body)),
            },
        )
        return req

    def head(self, location: str) -> tuple[int, dict]:
        req = RawRequest(self.base, "HEAD", location, {"Authorization": AUTH_HEADER})
        status, headers, _ = req.read_response()
        req.close()
        return status, headers

    def append(self, location: str, offset: int, data: bytes, complete: bool):
        req = RawRequest(
            self.base,
            "PATCH",
            location,
            {
                "Authorization": AUTH_HEADER,
                "Content-Type": "application/partial-upload",
                "Upload-Offset": str(offset),
                "Upload-Complete": "?1" if complete else "?0",
                "Content-Length": str(len(data)),
            },
        )
        req.send(data)
        status, headers, body = req.read_response()
        req.close()
        return status, headers, body

    def delete(self, location: str) -> int:
        req = RawRequest(self.base, "DELETE", location, {"Authorization": AUTH_HEADER})
        status, _, _ = req.read_response()
        req.close()
        return status


def test_create_interrupt_head_and_append(srv, tmp_path):
    client = DraftClient(srv.url)
    vdi = create_vdi(srv.url, 16 * MiB)
    data = os.urandom(16 * MiB)
    req = client.create(f"/import_raw_vdi?vdi={vdi['uuid']}", data, 0)
    status, headers, _ = req.read_response()
    assert status == 104, status  # before any body byte: the upload resource is known
    location = headers["location"]
    assert location.startswith("/uploads/") and headers["upload-draft-interop-version"] == "9"
    task_id = location.rsplit("/", 1)[1]
    req.send(data[: 5 * MiB])
    time.sleep(1.2)
    req.send(data[5 * MiB : 6 * MiB])
    req.close()  # the link drops
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and task(srv.url, task_id)["upload_active"]:
        time.sleep(0.05)
    status, headers = client.head(location)
    assert status == 204 and headers["upload-complete"] == "?0"
    assert headers["cache-control"] == "no-store"
    offset = int(headers["upload-offset"])
    assert 0 < offset <= 6 * MiB and headers["upload-length"] == str(len(data))
    # An append at the wrong offset is refused with the right one.
    status, headers, _ = client.append(location, offset + 512, data[offset + 512 :], True)
    assert status == 409 and headers["upload-offset"] == str(offset)
    assert headers["upload-complete"] == "?0"
    # A partial append, then the completing one.
    middle = offset + MiB
    status, headers, _ = client.append(location, offset, data[offset:middle], False)
    assert status == 204 and headers["upload-offset"] == str(middle)
    status, headers, _ = client.append(location, middle, data[middle:], True)
    assert status == 200 and headers["upload-complete"] == "?1"
    assert task(srv.url, task_id)["status"] == "success"
    status, headers = client.head(location)
    assert status == 204 and headers["upload-complete"] == "?1"
    out = srv.state_dir / "srs" / vdi["sr"] / f"{vdi['uuid']}.raw"
    assert out.read_bytes() == data


def test_no_104_without_a_known_interop_version(srv):
    client = DraftClient(srv.url)
    vdi = create_vdi(srv.url, MiB)
    req = client.create(f"/import_raw_vdi?vdi={vdi['uuid']}", bytes(MiB), 0, version="1")
    req.send(os.urandom(MiB))
    status, headers, _ = req.read_response()
    req.close()
    assert status == 200  # straight to the final response, which still names the resource
    assert headers["location"].startswith("/uploads/")


def test_delete_cancels_the_upload(srv):
    client = DraftClient(srv.url)
    vdi = create_vdi(srv.url, 8 * MiB)
    req = client.create(f"/import_raw_vdi?vdi={vdi['uuid']}", bytes(8 * MiB), 0)
    status, headers, _ = req.read_response()
    assert status == 104
    location = headers["location"]
    req.send(os.urandom(MiB))
    assert client.delete(location) == 204
    assert req.closed_by_peer(2.0)  # the connection feeding it is closed
    req.close()
    task_id = location.rsplit("/", 1)[1]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and task(srv.url, task_id)["status"] != "cancelled":
        time.sleep(0.05)
    assert task(srv.url, task_id)["status"] == "cancelled"
    assert client.head(location)[0] == 410
