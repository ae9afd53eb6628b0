"""The limits an operator sets, against the real server process: transfers at once per
host and per user (refused before 100 Continue), clients that stall in their headers or
their body, too slow a reader, oversized headers and JSON bodies."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from tests.conftest import ServerProcess
from tests.rawclient import (
    AUTH_HEADER,
    RawRequest,
    api,
    create_vdi,
    curl_upload,
    filled_vdi,
    new_task,
    task,
)

MiB = 1 << 20


def start(tmp_path, **env: str) -> ServerProcess:
    return ServerProcess(tmp_path / "state", env={f"VDIT_{k.upper()}": v for k, v in env.items()})


@pytest.fixture
def stopper():
    servers: list[ServerProcess] = []
    yield servers.append
    for srv in servers:
        if srv.proc and srv.proc.poll() is None:
            srv.stop()


def stalled_export(url: str, vdi: str, auth: str = AUTH_HEADER) -> RawRequest:
    """An export whose client reads the status line and then nothing more."""
    req = RawRequest(url, "GET", f"/export_raw_vdi?vdi={vdi}", {"Authorization": auth})
    req.sock.settimeout(10)
    head = req.sock.recv(200)
    assert head.startswith(b"HTTP/1.1 200"), head
    return req


def wait_status(url: str, task_id: str, timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while (row := task(url, task_id))["status"] in ("pending", "cancelling"):
        assert time.monotonic() < deadline, row
        time.sleep(0.1)
    return row


def last_task(url: str, prefix: str) -> dict:
    return [t for t in api(f"{url}/tasks")[1] if t["name_label"].startswith(prefix)][-1]


def drained_to_the_end(req: RawRequest, timeout: float = 10) -> bool:
    """The server closed: what it had queued arrives, then the end."""
    req.sock.settimeout(timeout)
    try:
        while req.sock.recv(1 << 20):
            pass
    except ConnectionError:
        pass
    return True


def test_a_third_transfer_is_refused_before_100_continue(tmp_path, stopper):
    srv = start(tmp_path, max_transfers="2").start()
    stopper(srv)
    url = srv.url
    vdi = filled_vdi(url, tmp_path)
    held = [stalled_export(url, vdi), stalled_export(url, vdi)]
    target = create_vdi(url, MiB)["uuid"]
    given = new_task(url)
    put = RawRequest(
        url,
        "PUT",
        f"/import_raw_vdi?vdi={target}&task_id={given}",
        {"Authorization": AUTH_HEADER, "Content-Length": str(MiB), "Expect": "100-continue"},
    )
    status, headers, body = put.read_response()  # no body byte sent: the answer comes anyway
    assert status == 503, (status, body)
    assert json.loads(body)["error"] == "TOO_MANY_TRANSFERS"
    assert int(headers["retry-after"]) > 0
    assert task(url, given)["status"] == "failure"  # the client's task does not hang
    status, body = api(f"{url}/vdis/{vdi}")  # records are not transfers
    assert status == 200
    for req in held:
        req.close()
    deadline = time.monotonic() + 10
    while True:  # the slots come back when the held exports end
        body_file = tmp_path / "one.raw"
        body_file.write_bytes(os.urandom(MiB))
        status, answer, _ = curl_upload(f"{url}/import_raw_vdi?vdi={target}", "-T", str(body_file))
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status == 200, answer


def test_per_user_transfers(tmp_path, stopper):
    srv = start(tmp_path, max_user_transfers="1").start()
    stopper(srv)
    url = srv.url
    vdi = filled_vdi(url, tmp_path)
    assert (
        api(
            f"{url}/users",
            "POST",
            {"username": "bob", "password": "bob-password-1", "role": "reader"},
        )[0]
        == 201
    )
    held = stalled_export(url, vdi)
    status, answer = api(f"{url}/export_raw_vdi?vdi={vdi}")
    assert status == 429 and answer["error"] == "TOO_MANY_TRANSFERS", answer
    import base64

    bob = "Basic " + base64.b64encode(b"bob:bob-password-1").decode()
    other = stalled_export(url, vdi, bob)  # another user is not held back
    other.close()
    held.close()


@pytest.mark.parametrize("resumable", [False, True])
def test_an_upload_that_goes_silent_is_cut(tmp_path, stopper, resumable):
    """5 KB of 4 MiB, then silence: the connection is cut after the idle timeout; the task
    fails (or, resumable, is suspended at what arrived) and the VDI is free for writers."""
    srv = start(tmp_path, idle_timeout="2").start()
    stopper(srv)
    url = srv.url
    vdi = create_vdi(url, 4 * MiB)["uuid"]
    query = f"vdi={vdi}" + (f"&task_id={new_task(url)}" if resumable else "")
    put = RawRequest(
        url,
        "PUT",
        f"/import_raw_vdi?{query}",
        {"Authorization": AUTH_HEADER, "Content-Length": str(4 * MiB)},
    )
    put.send(os.urandom(5000))
    started = time.monotonic()
    assert put.closed_by_peer(timeout=10)
    assert 1.5 < time.monotonic() - started < 6
    if resumable:
        row = task(url, query.rsplit("=", 1)[1])
        deadline = time.monotonic() + 10
        while row["upload_active"] is not False:
            assert time.monotonic() < deadline, row
            row = task(url, row["uuid"])
        assert row["status"] == "pending" and row["upload_offset"] <= 5000, row
    else:
        row = wait_status(url, last_task(url, "import_raw_vdi")["uuid"])
        assert row["status"] == "failure" and "no byte for 2 s" in row["error_info"][1], row
        body = tmp_path / "after.raw"
        body.write_bytes(os.urandom(4 * MiB))
        status, answer, _ = curl_upload(f"{url}/import_raw_vdi?vdi={vdi}", "-T", str(body))
        assert status == 200, answer  # the VDI is not locked any more
    lines = srv.log_path.read_text()
    assert "bytes_in=5000" in lines


def cut_reader(tmp_path, stopper, **limits: str) -> tuple[str, str, RawRequest, dict]:
    """A server with `limits`, and an export whose reader takes nothing, cut within 1.5 to
    8 s: the server's URL, the VDI, the reader, and the export's task once it ended."""
    srv = start(tmp_path, **limits).start()
    stopper(srv)
    url = srv.url
    vdi = filled_vdi(url, tmp_path)
    held = stalled_export(url, vdi)
    started = time.monotonic()
    export = wait_status(url, last_task(url, "export_raw_vdi")["uuid"])
    assert 1.5 < time.monotonic() - started < 8
    return url, vdi, held, export


def test_a_reader_that_takes_nothing_is_cut_and_writers_go_ahead(tmp_path, stopper):
    url, vdi, held, export = cut_reader(tmp_path, stopper, idle_timeout="2")
    assert export["status"] == "failure" and "no byte for 2 s" in export["error_info"][1], export
    body = tmp_path / "w.raw"
    body.write_bytes(os.urandom(MiB))
    assert curl_upload(f"{url}/import_raw_vdi?vdi={vdi}", "-T", str(body))[0] == 200
    assert drained_to_the_end(held)


def test_slow_readers_do_not_hold_up_the_server(tmp_path, stopper):
    """Twelve readers that take nothing (a slow WAN, with the default limits: none cut yet)
    each hold a sending thread; an upload and the other requests go on meanwhile."""
    srv = start(tmp_path).start()
    stopper(srv)
    url = srv.url
    vdi = filled_vdi(url, tmp_path)
    held = [stalled_export(url, vdi) for _ in range(12)]
    other = create_vdi(url, 8 * MiB)["uuid"]
    body = tmp_path / "w.raw"
    body.write_bytes(os.urandom(8 * MiB))
    started = time.monotonic()
    status, _, err = curl_upload(
        f"{url}/import_raw_vdi?vdi={other}", "-T", str(body), "--max-time", "20"
    )
    assert status == 200, err
    assert time.monotonic() - started < 10
    assert api(f"{url}/vdis/{other}/checksum")[0] == 200  # file work off the loop, too
    for req in held:
        req.close()


def test_a_reader_below_the_minimum_rate_is_cut(tmp_path, stopper):
    _, _, held, export = cut_reader(tmp_path, stopper, min_rate="64M", rate_window="2")
    assert "under the minimum of 67108864" in export["error_info"][1], export
    assert drained_to_the_end(held)


def test_headers_that_never_end_get_408(tmp_path, stopper):
    srv = start(tmp_path, header_timeout="2").start()
    stopper(srv)
    host, port = srv.url.removeprefix("http://").split(":")
    slow = socket.create_connection((host, int(port)), timeout=10)
    slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    silent = socket.create_connection((host, int(port)), timeout=10)  # sends nothing at all
    started = time.monotonic()
    answer = slow.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"REQUEST_TIMEOUT" in answer
    first = silent.recv(4096)
    assert first.startswith(b"HTTP/1.1 408") and silent.recv(10) == b"", first
    assert time.monotonic() - started < 8
    slow.close()
    silent.close()
    # A client that sends its request in time is served, on a connection kept alive.
    assert api(f"{srv.url}/health")[0] == 200


def test_oversized_headers_and_json_bodies(tmp_path, stopper):
    srv = start(tmp_path, max_header_size="4096", max_json_body="8K").start()
    stopper(srv)
    req = RawRequest(srv.url, "GET", "/health", {"X-Big": "a" * 6000})
    status, _, body = req.read_response()
    assert status == 431 and json.loads(body)["error"] == "HEADERS_TOO_LARGE", body
    status, answer = api(f"{srv.url}/vdis", "POST", {"virtual_size": MiB, "name_label": "x" * 9000})
    assert status == 413 and "max_json_body" in answer["message"], answer
    assert api(f"{srv.url}/vdis", "POST", {"virtual_size": MiB, "name_label": "fits"})[0] == 201
