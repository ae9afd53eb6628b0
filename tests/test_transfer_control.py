"""What happens around a transfer: checks before 100 Continue, the VDI lock, progress,
cancel, client disconnects, and the server stopping (SIGTERM) or dying (SIGKILL)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
import urllib.request

import pytest

from tests.conftest import ServerProcess
from tests.rawclient import AUTH_HEADER, RawRequest, api, create_vdi, curl_upload, task

MiB = 1 << 20


@pytest.fixture
def srv(shared_server):
    return shared_server


def start_upload(base: str, vdi: dict, length: int, expect: bool = False, **extra_headers):
    headers = {"Authorization": AUTH_HEADER, "Content-Length": str(length), **extra_headers}
    if expect:
        headers["Expect"] = "100-continue"
    return RawRequest(base, "PUT", f"/import_raw_vdi?vdi={vdi['uuid']}", headers)


def running_task(base: str, vdi: dict, timeout: float = 5) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tasks = [
            t
            for t in api(f"{base}/tasks")[1]
            if t["vdi"] == vdi["uuid"] and t["status"] == "pending"
        ]
        if tasks:
            return tasks[0]
        time.sleep(0.02)
    raise AssertionError("no running task")


def wait_status(base: str, ident: str, timeout: float = 5) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t = task(base, ident)
        if t["status"] not in ("pending", "cancelling"):
            return t
        time.sleep(0.02)
    raise AssertionError(f"task {ident} still {t['status']}")


@pytest.mark.parametrize(
    "case, status, code",
    [
        ("no-auth", 401, "SESSION_INVALID"),
        ("bad-vdi", 404, "VDI_NOT_FOUND"),
        ("too-big", 413, "VDI_TOO_SMALL"),
        ("format", 415, "FORMAT_UNSUPPORTED"),
    ],
)
def test_rejected_before_100_continue(srv, case, status, code):
    vdi = create_vdi(srv.url, MiB)
    headers = {"Authorization": AUTH_HEADER, "Content-Length": str(MiB), "Expect": "100-continue"}
    target = f"/import_raw_vdi?vdi={vdi['uuid']}"
    if case == "no-auth":
        del headers["Authorization"]
    elif case == "bad-vdi":
        target = "/import_raw_vdi?vdi=nope"
    elif case == "too-big":
        headers["Content-Length"] = str(MiB + 1)
    elif case == "format":
        target += "&format=vmdk"
    req = RawRequest(srv.url, "PUT", target, headers)
    got, _, body = req.read_response()
    req.close()
    assert got == status  # the final status, not 100: the client never sends the body
    assert json.loads(body)["error"] == code


def test_100_continue_after_checks_then_upload(srv):
    vdi = create_vdi(srv.url, MiB)
    req = start_upload(srv.url, vdi, MiB, expect=True)
    status, _, _ = req.read_response()
    assert status == 100
    data = os.urandom(MiB)
    req.send(data)
    status, headers, body = req.read_response()
    req.close()
    assert status == 200 and json.loads(body)["bytes"] == MiB
    assert headers["task-id"].startswith("OpaqueRef:")


def test_vdi_in_use_progress_and_release(srv, tmp_path):
    vdi = create_vdi(srv.url, 8 * MiB)
    req = start_upload(srv.url, vdi, 8 * MiB)
    req.send(os.urandom(3 * MiB))
    t = running_task(srv.url, vdi)
    # A second writer, an export, and a delete are all refused while the upload runs.
    src = tmp_path / "src"
    src.write_bytes(os.urandom(4096))
    status, body, _ = curl_upload(f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}", "-T", str(src))
    assert status == 409 and body["error"] == "VDI_IN_USE"
    second = RawRequest(
        srv.url, "GET", f"/export_raw_vdi?vdi={vdi['uuid']}", {"Authorization": AUTH_HEADER}
    )
    status, _, body = second.read_response()
    second.close()
    assert status == 409 and json.loads(body)["error"] == "VDI_IN_USE"
    assert api(f"{srv.url}/vdis/{vdi['uuid']}", "DELETE")[0] == 409
    # Progress is visible while the body flows (written through at least once a second).
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        t = task(srv.url, t["uuid"])
        if t["bytes_transferred"] >= 3 * MiB:
            break
        time.sleep(0.1)
    assert t["bytes_transferred"] == 3 * MiB and 0.3 < t["progress"] < 0.5
    req.send(os.urandom(5 * MiB))
    status, _, _ = req.read_response()
    req.close()
    assert status == 200
    status, body, _ = curl_upload(f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}", "-T", str(src))
    assert status == 200


def test_cancel_stops_the_upload_within_a_second(srv):
    vdi = create_vdi(srv.url, 8 * MiB)
    req = start_upload(srv.url, vdi, 8 * MiB)
    req.send(os.urandom(MiB))
    t = running_task(srv.url, vdi)
    t0 = time.monotonic()
    status, body = api(f"{srv.url}/tasks/{t['uuid']}/cancel", "POST")
    assert status == 200 and body["status"] in ("cancelling", "cancelled")
    assert req.closed_by_peer(1.0), "the connection stayed open"
    final = wait_status(srv.url, t["uuid"])
    assert time.monotonic() - t0 < 1.5
    req.close()
    assert final["status"] == "cancelled" and final["error_info"] == ["CANCELLED"]
    # The VDI is free for the next writer.
    req = start_upload(srv.url, vdi, 512)
    req.send(bytes(512))
    assert req.read_response()[0] == 200
    req.close()


@pytest.mark.parametrize("expect", [False, True], ids=["sent-at-once", "after-100-continue"])
def test_client_disconnect_fails_the_task(srv, expect):
    """After 100 Continue the server reads the body straight from the socket (nothing of it
    reached aiohttp): a client that vanishes is noticed there as well as on aiohttp's path."""
    vdi = create_vdi(srv.url, 8 * MiB)
    req = start_upload(srv.url, vdi, 8 * MiB, expect=expect)
    if expect:
        assert req.read_response()[0] == 100
    req.send(os.urandom(2 * MiB))
    t = running_task(srv.url, vdi)
    req.close()
    final = wait_status(srv.url, t["uuid"])
    assert final["status"] == "failure"
    assert final["error_info"][0] == "BAD_REQUEST"
    assert "closed the connection" in final["error_info"][1]
    assert "of 8388608" in final["error_info"][1]
    req = start_upload(srv.url, vdi, 512)
    req.send(bytes(512))
    assert req.read_response()[0] == 200
    req.close()


def test_chunked_encoding_cut_short_fails_the_task(srv):
    vdi = create_vdi(srv.url, 8 * MiB)
    req = RawRequest(
        srv.url,
        "PUT",
        f"/import_raw_vdi?vdi={vdi['uuid']}",
        {"Authorization": AUTH_HEADER, "Transfer-Encoding": "chunked"},
    )
    req.send(b"%x\r\n" % MiB + os.urandom(MiB) + b"\r\n")
    t = running_task(srv.url, vdi)
    req.close()
    final = wait_status(srv.url, t["uuid"])
    assert final["status"] == "failure" and final["error_info"][0] == "BAD_REQUEST"


def test_sigkill_mid_upload_then_restart(tmp_path):
    srv = ServerProcess(tmp_path / "state").start()
    try:
        vdi = create_vdi(srv.url, 8 * MiB)
        _, idle = api(f"{srv.url}/tasks", "POST", {"name_label": "idle"})
        req = start_upload(srv.url, vdi, 8 * MiB)
        req.send(os.urandom(MiB))
        t = running_task(srv.url, vdi)
        srv.stop(signal.SIGKILL)
        req.close()
        srv.start()
        final = task(srv.url, t["uuid"])
        assert final["status"] == "failure"
        assert final["error_info"] == ["INTERNAL_ERROR", "server restarted"]
        assert task(srv.url, idle["uuid"])["status"] == "pending"
        req = start_upload(srv.url, vdi, 512)  # the VDI was released
        req.send(bytes(512))
        assert req.read_response()[0] == 200
        req.close()
    finally:
        srv.stop()


def test_sigterm_mid_upload_fails_the_task(tmp_path):
    srv = ServerProcess(tmp_path / "state", env={"VDIT_SHUTDOWN_TIMEOUT": "0.5"}).start()
    try:
        vdi = create_vdi(srv.url, 8 * MiB)
        req = start_upload(srv.url, vdi, 8 * MiB)
        req.send(os.urandom(MiB))
        t = running_task(srv.url, vdi)
        assert srv.stop(signal.SIGTERM) == 0
        req.close()
        srv.start()
        final = task(srv.url, t["uuid"])
        assert final["status"] == "failure"
        assert final["error_info"] == ["INTERNAL_ERROR", "server shutting down"]
    finally:
        srv.stop()


def test_cancel_stops_an_export(srv, tmp_path):
    vdi = create_vdi(srv.url, "2G")
    src = tmp_path / "src"
    src.write_bytes(os.urandom(64 * MiB))
    # Make it a full-data disk quickly: 64 MiB of data, the rest holes sent as zeros.
    assert curl_upload(f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}", "-T", str(src))[0] == 200
    # A client that reads nothing: the server fills the socket buffers and waits.
    req = RawRequest(
        srv.url, "GET", f"/export_raw_vdi?vdi={vdi['uuid']}", {"Authorization": AUTH_HEADER}
    )
    t = running_task(srv.url, vdi)
    api(f"{srv.url}/tasks/{t['uuid']}/cancel", "POST")
    final = wait_status(srv.url, t["uuid"])
    req.close()
    assert final["status"] == "cancelled" and final["error_info"] == ["CANCELLED"]
    assert final["bytes_transferred"] < 2 << 30


def test_progress_without_content_length(srv):
    """Transfer-Encoding: chunked has no length: progress follows how far into the disk the
    data has reached."""
    vdi = create_vdi(srv.url, 8 * MiB)
    req = RawRequest(
        srv.url,
        "PUT",
        f"/import_raw_vdi?vdi={vdi['uuid']}",
        {"Authorization": AUTH_HEADER, "Transfer-Encoding": "chunked"},
    )
    req.send(b"%x\r\n" % (2 * MiB) + os.urandom(2 * MiB) + b"\r\n")
    t = running_task(srv.url, vdi)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and task(srv.url, t["uuid"])["bytes_transferred"] < 2 * MiB:
        time.sleep(0.1)
    t = task(srv.url, t["uuid"])
    assert t["bytes_transferred"] == 2 * MiB and 0.2 < t["progress"] < 0.3
    req.send(b"0\r\n\r\n")
    status, _, body = req.read_response()
    req.close()
    assert status == 200 and json.loads(body)["bytes"] == 2 * MiB
    assert task(srv.url, t["uuid"])["progress"] == 1.0


def test_import_reports_into_the_clients_task(srv, tmp_path):
    vdi = create_vdi(srv.url, MiB)
    _, created = api(f"{srv.url}/tasks", "POST", {"name_label": "my import"})
    src = tmp_path / "src"
    src.write_bytes(os.urandom(MiB))
    status, body, _ = curl_upload(
        f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}&task_id={created['ref']}", "-T", str(src)
    )
    assert status == 200 and body["task"] == created["uuid"]
    done = task(srv.url, created["uuid"])
    assert done["status"] == "success" and done["result"] == vdi["uuid"]
    assert done["name_label"] == "my import"
    # A finished task cannot be reused.
    status, body, _ = curl_upload(
        f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}&task_id={created['uuid']}", "-T", str(src)
    )
    assert status == 400 and "already success" in body["message"]
    status, body, _ = curl_upload(
        f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}&task_id=nope", "-T", str(src)
    )
    assert status == 404 and body["error"] == "TASK_NOT_FOUND"


def test_client_leaving_a_download_fails_the_task(srv, tmp_path):
    vdi = create_vdi(srv.url, "1G")
    src = tmp_path / "src"
    src.write_bytes(os.urandom(32 * MiB))
    assert curl_upload(f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}", "-T", str(src))[0] == 200
    req = RawRequest(
        srv.url, "GET", f"/export_raw_vdi?vdi={vdi['uuid']}", {"Authorization": AUTH_HEADER}
    )
    got = b""
    while len(got) < MiB:  # headers and a good part of the body
        got += req.sock.recv(MiB)
    t = running_task(srv.url, vdi)
    req.sock.setsockopt(
        __import__("socket").SOL_SOCKET,
        __import__("socket").SO_LINGER,
        __import__("struct").pack("ii", 1, 0),
    )
    req.close()  # reset, not a polite close
    final = wait_status(srv.url, t["uuid"])
    assert final["status"] == "failure"
    assert final["error_info"][0] == "BAD_REQUEST"
    assert "closed the connection" in final["error_info"][1]
    assert 0 < final["bytes_transferred"] < 1 << 30
    assert "Traceback" not in srv.logs()


def test_body_after_100_continue_arrives_whole_in_pieces_and_the_connection_closes(srv):
    """The direct path: a body sent in uneven pieces with pauses between them (the pipeline
    hands over what it holds at each pause) lands byte for byte; the answer closes the
    connection, whose HTTP parser never saw the body."""
    vdi = create_vdi(srv.url, 8 * MiB)
    data = os.urandom(8 * MiB)
    req = start_upload(srv.url, vdi, len(data), expect=True)
    assert req.read_response()[0] == 100
    cuts = [0, 1, 4097, 3 * MiB + 5, 3 * MiB + 6, 7 * MiB, len(data)]
    for start, end in itertools.pairwise(cuts):
        req.send(data[start:end])
        time.sleep(0.25)  # longer than the pipeline's IDLE
    status, headers, body = req.read_response()
    assert status == 200, body
    assert headers.get("connection", "").lower() == "close"
    assert req.closed_by_peer(5)
    req.close()
    assert json.loads(body)["bytes"] == len(data)
    exported = urllib.request.urlopen(
        urllib.request.Request(
            f"{srv.url}/export_raw_vdi?vdi={vdi['uuid']}", headers={"Authorization": AUTH_HEADER}
        ),
        timeout=30,
    ).read()
    assert exported == data
