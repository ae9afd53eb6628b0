"""Uploads in parts (README: "Uploads over several connections"): disjoint chunk-framed
parts of one VDI sent at once under one task, against the real server."""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time

import pytest

from tests.conftest import ServerProcess
from tests.rawclient import (
    AUTH_HEADER,
    RawRequest,
    api,
    create_vdi,
    export_to,
    frame,
    new_task,
    task,
)

MiB = 1 << 20
SIZE = 32 * MiB
PIECE = 1 * MiB
END = bytes(12)


@pytest.fixture
def srv(shared_server):
    return shared_server


def disk_bytes() -> bytes:
    """Data in 1 MiB pieces with holes between some of them."""
    data = bytearray(SIZE)
    for start in range(0, SIZE, 3 * PIECE):
        data[start : start + 2 * PIECE] = os.urandom(2 * PIECE)
    return bytes(data)


def part_streams(data: bytes, n: int) -> list[bytes]:
    """The disk's non-zero pieces, dealt round robin into n chunk-framed streams."""
    pieces: list[list[bytes]] = [[] for _ in range(n)]
    offsets = [o for o in range(0, len(data), PIECE) if any(data[o : o + PIECE])]
    for i, offset in enumerate(offsets):
        pieces[i % n].append(frame(offset, data[offset : offset + PIECE]))
    return [b"".join(p) + END for p in pieces]


def target(vdi: str, task_id: str, n: int, i: int) -> str:
    return f"/import_raw_vdi?vdi={vdi}&task_id={task_id}&chunked=true&parts={n}&part={i}"


def put(base: str, path: str, body: bytes) -> tuple[int, dict, bytes]:
    req = RawRequest(
        base, "PUT", path, {"Authorization": AUTH_HEADER, "Content-Length": str(len(body))}
    )
    req.send(body)
    try:
        return req.read_response(timeout=30)
    finally:
        req.close()


def start(base: str, path: str, body: bytes, send: int) -> RawRequest:
    """A part that sends `send` bytes of its body and then waits."""
    req = RawRequest(
        base, "PUT", path, {"Authorization": AUTH_HEADER, "Content-Length": str(len(body))}
    )
    req.send(body[:send])
    return req


def wait_for(check, timeout: float = 10.0, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def changed_blocks(base: str, vdi: str, snapshot: str) -> set[int]:
    status, body = api(f"{base}/vdis/{vdi}/changed_blocks?base={snapshot}")
    assert status == 200, body
    bitmap = base64.b64decode(body["bitmap"])
    return {i for i in range(len(bitmap) * 8) if bitmap[i // 8] & (0x80 >> (i % 8))}


@pytest.mark.parametrize("image_format", ["raw", "qcow2", "vhd"])
def test_parts_sent_at_once_make_one_upload(srv, tmp_path, image_format):
    """Four connections at once; the task succeeds with the last part, the bytes are the
    disk's, and changed block tracking saw every block exactly once across the parts."""
    status, vdi = api(
        f"{srv.url}/vdis", "POST", {"virtual_size": SIZE, "image_format": image_format}
    )
    assert status == 201, vdi
    assert api(f"{srv.url}/vdis/{vdi['uuid']}", "PATCH", {"cbt_enabled": True})[0] == 200
    status, snap = api(f"{srv.url}/vdis/{vdi['uuid']}/snapshot", "POST", {})
    assert status in (200, 201), snap
    data = disk_bytes()
    streams = part_streams(data, 4)
    task_id = new_task(srv.url, "parts")
    answers: dict[int, tuple[int, dict, bytes]] = {}

    def send(i: int) -> None:
        answers[i] = put(srv.url, target(vdi["uuid"], task_id, 4, i), streams[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    bodies = [json.loads(answers[i][2]) for i in range(4)]
    assert [answers[i][0] for i in range(4)] == [200] * 4, bodies
    assert sum(b["complete"] for b in bodies) == 1  # the last part to arrive completes it
    assert all(b["task"] == task_id and b["parts"] == 4 for b in bodies)
    row = task(srv.url, task_id)
    assert row["status"] == "success" and row["result"] == vdi["uuid"]
    assert row["upload_parts"] == 4 and row["upload_parts_done"] == [0, 1, 2, 3]
    assert export_to(srv.url, vdi["uuid"], tmp_path / "out.raw").read_bytes() == data
    written = {o // (64 << 10) for o in range(0, SIZE, 64 << 10) if any(data[o : o + (64 << 10)])}
    assert changed_blocks(srv.url, vdi["uuid"], snap["uuid"]) == written


def test_a_broken_part_is_sent_again_whole(srv, tmp_path):
    """A part cut off is not done; with no part in flight the task waits (pending, the VDI
    free for others); the part sent again completes the upload."""
    vdi = create_vdi(srv.url, SIZE)["uuid"]
    data = disk_bytes()
    streams = part_streams(data, 2)
    task_id = new_task(srv.url, "parts")
    status, _, body = put(srv.url, target(vdi, task_id, 2, 0), streams[0])
    assert status == 200 and b'"complete": false' in body
    # part 0 is durable, nothing runs: the task waits and the VDI is free
    row = task(srv.url, task_id)
    assert row["status"] == "pending" and row["upload_parts_done"] == [0]
    assert row["upload_active"] is False
    req = start(srv.url, target(vdi, task_id, 2, 1), streams[1], 3 * MiB + 7)
    wait_for(lambda: task(srv.url, task_id)["upload_active"], what="part 1 running")
    # the same part on a second connection while the first one runs
    status, _, body = put(srv.url, target(vdi, task_id, 2, 1), streams[1])
    assert status == 409 and b"OTHER_OPERATION_IN_PROGRESS" in body
    req.close()  # part 1 breaks off
    row = wait_for(
        lambda: (r := task(srv.url, task_id))["upload_active"] is False and r,
        what="the upload to wait",
    )
    assert row["status"] == "pending" and row["upload_parts_done"] == [0]
    snap = api(f"{srv.url}/vdis/{vdi}/snapshot", "POST", {})  # the VDI is free meanwhile
    assert snap[0] in (200, 201), snap
    status, _, body = put(srv.url, target(vdi, task_id, 2, 1), streams[1])
    assert status == 200 and b'"complete": true' in body, body
    assert task(srv.url, task_id)["status"] == "success"
    assert export_to(srv.url, vdi, tmp_path / "out.raw").read_bytes() == data


def test_a_bad_part_fails_the_upload_and_stops_the_others(srv):
    vdi = create_vdi(srv.url, SIZE)["uuid"]
    streams = part_streams(disk_bytes(), 2)
    task_id = new_task(srv.url, "parts")
    slow = start(srv.url, target(vdi, task_id, 2, 0), streams[0], 2 * MiB)
    wait_for(lambda: task(srv.url, task_id)["upload_active"], what="part 0 running")
    beyond = frame(SIZE - 512, os.urandom(4096)) + END
    status, _, body = put(srv.url, target(vdi, task_id, 2, 1), beyond)
    assert status == 413 and b"VDI_TOO_SMALL" in body, body
    row = task(srv.url, task_id)
    assert row["status"] == "failure" and row["error_info"][0] == "VDI_TOO_SMALL"
    assert slow.closed_by_peer(10), "the other part went on"
    slow.close()
    # the VDI is free again
    assert api(f"{srv.url}/vdis/{vdi}/snapshot", "POST", {})[0] in (200, 201)


def test_a_cancel_stops_every_part(srv):
    vdi = create_vdi(srv.url, SIZE)["uuid"]
    streams = part_streams(disk_bytes(), 3)
    task_id = new_task(srv.url, "parts")
    reqs = [start(srv.url, target(vdi, task_id, 3, i), streams[i], MiB) for i in range(3)]
    wait_for(lambda: task(srv.url, task_id)["upload_active"], what="the parts running")
    time.sleep(0.3)
    status, _ = api(f"{srv.url}/tasks/{task_id}/cancel", "POST")
    assert status == 200
    for req in reqs:
        assert req.closed_by_peer(10)
        req.close()
    row = wait_for(
        lambda: (r := task(srv.url, task_id))["status"] == "cancelled" and r, what="cancelled"
    )
    assert row["error_info"] == ["CANCELLED"]
    assert api(f"{srv.url}/vdis/{vdi}/snapshot", "POST", {})[0] in (200, 201)


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("chunked=true&parts=0&part=0", "BAD_REQUEST"),
        ("chunked=true&parts=17&part=0", "BAD_REQUEST"),
        ("chunked=true&parts=2&part=2", "BAD_REQUEST"),
        ("chunked=true&parts=2", "BAD_REQUEST"),
        ("chunked=true&parts=x&part=0", "BAD_REQUEST"),
        ("parts=2&part=0", "BAD_REQUEST"),  # not chunk framing
        ("format=vhd&parts=2&part=0", "BAD_REQUEST"),
        ("chunked=true&parts=2&part=0&notask", "BAD_REQUEST"),
        ("chunked=true&parts=2&part=0&sr", "BAD_REQUEST"),
    ],
)
def test_what_a_part_must_be(srv, query, code):
    vdi = create_vdi(srv.url, SIZE)["uuid"]
    task_id = new_task(srv.url, "parts")
    where = f"vdi={vdi}"
    if query.endswith("&sr"):
        sr = api(f"{srv.url}/srs")[1][0]["uuid"]
        where, query = f"sr={sr}&virtual_size={SIZE}", query.removesuffix("&sr")
    if query.endswith("&notask"):
        query = query.removesuffix("&notask")
    else:
        query += f"&task_id={task_id}"
    status, _, body = put(srv.url, f"/import_raw_vdi?{where}&{query}", END)
    assert status == 400 and code.encode() in body, body


def test_a_part_belongs_to_its_upload(srv):
    """The same number of parts, the same VDI; a one-stream upload's task takes no parts,
    and a parted upload is not continued at an offset."""
    vdi = create_vdi(srv.url, SIZE)["uuid"]
    other = create_vdi(srv.url, SIZE)["uuid"]
    task_id = new_task(srv.url, "parts")
    assert put(srv.url, target(vdi, task_id, 2, 0), END)[0] == 200
    status, _, body = put(srv.url, target(vdi, task_id, 3, 1), END)
    assert status == 400 and b"has 2 parts, not 3" in body
    status, _, body = put(srv.url, target(other, task_id, 2, 1), END)
    assert status == 400 and f"not {other}".encode() in body
    headers = {
        "Upload-Offset": "0",
        "Upload-Complete": "?1",
        "Content-Type": "application/partial-upload",
    }
    req = RawRequest(
        srv.url,
        "PATCH",
        f"/uploads/{task_id}",
        {"Authorization": AUTH_HEADER, "Content-Length": "12", **headers},
    )
    req.send(END)
    status, _, body = req.read_response()
    req.close()
    assert status == 400 and b"parts" in body
    single = new_task(srv.url, "one stream")
    req = RawRequest(
        srv.url,
        "PUT",
        f"/import_raw_vdi?vdi={vdi}&task_id={single}",
        {"Authorization": AUTH_HEADER, "Content-Length": str(2 * MiB)},
    )
    req.send(os.urandom(MiB))
    req.close()  # a resumable one-stream upload, suspended
    wait_for(lambda: task(srv.url, single)["upload_active"] is False, what="suspended")
    status, _, body = put(srv.url, target(vdi, single, 2, 0), END)
    assert status == 400 and b"one stream" in body
    # the parted upload still completes
    assert b'"complete": true' in put(srv.url, target(vdi, task_id, 2, 1), END)[2]


def test_parts_survive_a_server_killed_midway(tmp_path):
    """SIGKILL with one part done and one in flight: after the restart the task waits with
    the done part recorded, and the missing part, sent again, completes the upload."""
    srv = ServerProcess(tmp_path / "state").start()
    try:
        vdi = create_vdi(srv.url, SIZE)["uuid"]
        data = disk_bytes()
        streams = part_streams(data, 2)
        task_id = new_task(srv.url, "parts")
        assert put(srv.url, target(vdi, task_id, 2, 0), streams[0])[0] == 200
        req = start(srv.url, target(vdi, task_id, 2, 1), streams[1], 5 * MiB)
        wait_for(lambda: task(srv.url, task_id)["upload_active"], what="part 1 running")
        srv.stop(signal.SIGKILL)
        req.close()
        srv.start()
        row = task(srv.url, task_id)
        assert row["status"] == "pending" and row["upload_parts_done"] == [0]
        assert row["upload_active"] is False
        status, _, body = put(srv.url, target(vdi, task_id, 2, 1), streams[1])
        assert status == 200 and b'"complete": true' in body, body
        assert export_to(srv.url, vdi, tmp_path / "out.raw").read_bytes() == data
    finally:
        if srv.proc and srv.proc.poll() is None:
            srv.stop()
