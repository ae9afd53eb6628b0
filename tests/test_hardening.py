"""Issue 13: what an attacker or an unlucky network does to the real server."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import threading
import time

import pytest

from tests.conftest import ServerProcess, curl, curl_json
from tests.rawclient import (
    AUTH,
    AUTH_HEADER,
    RawRequest,
    api,
    create_vdi,
    curl_upload,
    export_to,
    new_task,
)

MiB = 1 << 20


@pytest.fixture
def srv(shared_server):
    return shared_server


def test_json_body_in_two_tcp_segments_is_read_whole(srv):
    """`POST /vdis` whose body arrives in two pieces with a pause between them: the server
    waits for all of Content-Length instead of parsing what arrived first."""
    body = json.dumps({"virtual_size": 4096, "name_label": "split"}).encode()
    headers = {
        "Authorization": AUTH_HEADER,
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        "Connection": "close",
    }
    req = RawRequest(srv.url, "POST", "/vdis", headers)
    req.send(body[:10])
    time.sleep(0.3)
    req.send(body[10:])
    status, _, answer = req.read_response()
    req.close()
    assert status == 201, answer
    assert json.loads(answer)["name_label"] == "split"


def _login_cookie(srv, tmp_path) -> tuple[str, str]:
    """A cookie jar holding a session of the admin, and the session id."""
    jar = str(tmp_path / "jar")
    status, body = curl_json("-c", jar, "-u", AUTH, "-X", "POST", f"{srv.url}/session")
    assert status == 200, body
    return jar, body["session_id"]


def _users(srv) -> set[str]:
    return {u["username"] for u in api(f"{srv.url}/users")[1]}


@pytest.mark.parametrize(
    "headers",
    [
        ["-H", "Origin: http://evil.example"],
        ["-H", "Sec-Fetch-Site: cross-site"],
        ["-H", "Origin: null"],
        ["-H", "Origin: http://127.0.0.1:1"],  # this host, another port: SameSite misses it
    ],
    ids=["other-site", "fetch-site", "null", "other-port"],
)
def test_cross_site_write_with_the_cookie_is_refused(srv, tmp_path, headers):
    jar, _ = _login_cookie(srv, tmp_path)
    before = _users(srv)
    new_admin = '{"username": "mallory", "password": "mallory-password", "role": "admin"}'
    for ctype in ["application/json", "text/plain"]:
        status, body = curl_json(
            "-b", jar, *headers, "-H", f"Content-Type: {ctype}", "-d", new_admin,
            f"{srv.url}/users",
        )  # fmt: skip
        assert status == 403 and body["error"] == "PERMISSION_DENIED", body
        assert "cross-site" in body["params"], body
    assert _users(srv) == before
    # Reading is not a write: the same cookie and Origin may GET.
    assert curl_json("-b", jar, *headers, f"{srv.url}/users")[0] == 200


def test_same_origin_and_non_cookie_writes_still_work(srv, tmp_path):
    jar, session = _login_cookie(srv, tmp_path)
    own = ["-H", f"Origin: {srv.url}", "-H", "Sec-Fetch-Site: same-origin"]
    status, body = curl_json("-b", jar, *own, "--json", '{"virtual_size": 512}', f"{srv.url}/vdis")
    assert status == 201, body
    # A non-browser client's credential is not ambient: another Origin does not matter.
    evil = ["-H", "Origin: http://evil.example"]
    bearer = ["-H", f"Authorization: Bearer {session}"]
    status, body = curl_json(*bearer, *evil, "--json", '{"virtual_size": 512}', f"{srv.url}/vdis")
    assert status == 201, body
    status, body = curl_json("-u", AUTH, *evil, "-X", "DELETE", f"{srv.url}/vdis/{body['uuid']}")
    assert status == 204, body


def test_compressed_import_is_refused_before_a_byte_is_written(srv, tmp_path):
    """aiohttp would inflate a gzip body without bound (1 MB became 1 GiB): refused with
    415 before 100 Continue, and the VDI keeps what it had."""
    vdi = create_vdi(srv.url, 4 * MiB)
    packed = tmp_path / "disk.gz"
    packed.write_bytes(gzip.compress(b"\xab" * (4 * MiB)))
    status, body, _ = curl_upload(
        f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}",
        "-T", str(packed), "-H", "Content-Encoding: gzip",
    )  # fmt: skip
    assert status == 415, body
    assert body["error"] == "UNSUPPORTED_MEDIA_TYPE"
    exported = tmp_path / "out"
    export_to(srv.url, vdi["uuid"], exported)
    assert exported.read_bytes() == bytes(4 * MiB)


def test_transfer_coding_other_than_chunked_is_not_implemented(srv):
    vdi = create_vdi(srv.url, 1 * MiB)
    headers = {"Authorization": AUTH_HEADER, "Transfer-Encoding": "gzip, chunked"}
    req = RawRequest(srv.url, "PUT", f"/import_raw_vdi?vdi={vdi['uuid']}", headers)
    status, _, body = req.read_response()
    req.close()
    assert status == 501, body
    assert json.loads(body)["error"] == "NOT_IMPLEMENTED"


def _user(srv, name: str, role: str) -> str:
    """A user of that role (made once per server); its `user:password` for curl -u."""
    password = f"{name}-password"
    status, body = api(
        f"{srv.url}/users", "POST", {"username": name, "password": password, "role": role}
    )
    assert status in (201, 409), body
    return f"{name}:{password}"


def test_tasks_belong_to_their_owner(srv, tmp_path):
    """Another operator can neither cancel nor delete a task, nor transfer under it; its
    owner and an admin can."""
    owner, other = _user(srv, "ops-one", "operator"), _user(srv, "ops-two", "operator")
    vdi = create_vdi(srv.url, 1 * MiB)
    data = tmp_path / "data"
    data.write_bytes(b"\x5a" * MiB)

    def task_of(who: str) -> dict:
        status, task = curl_json("-u", who, "--json", '{"name_label": "mine"}', f"{srv.url}/tasks")
        assert status == 201, task
        return task

    task = task_of(owner)
    for args in (
        ["-X", "POST", f"{srv.url}/tasks/{task['uuid']}/cancel"],
        ["-X", "DELETE", f"{srv.url}/tasks/{task['uuid']}"],
        ["-T", str(data), f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}&task_id={task['uuid']}"],
    ):
        status, body = curl_json("-u", other, *args)
        assert status == 403 and body["error"] == "PERMISSION_DENIED", (args, body)
        assert "ops-one" in body["message"]
    assert api(f"{srv.url}/tasks/{task['uuid']}")[1]["status"] == "pending"
    exported = tmp_path / "out"
    export_to(srv.url, vdi["uuid"], exported)
    assert exported.read_bytes() == bytes(MiB)  # the refused import wrote nothing
    # The owner imports under it; an admin cancels and deletes another's task.
    status, body = curl_json(
        "-u", owner, "-T", str(data),
        f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}&task_id={task['uuid']}",
    )  # fmt: skip
    assert status == 200, body
    second = task_of(owner)
    status, body = curl_json("-u", AUTH, "-X", "POST", f"{srv.url}/tasks/{second['uuid']}/cancel")
    assert status == 200 and body["status"] == "cancelled", body
    assert curl_json("-u", AUTH, "-X", "DELETE", f"{srv.url}/tasks/{second['uuid']}")[0] == 204


def _basic_status(url: str, user: str, password: str) -> tuple[int, dict]:
    result = curl("-u", f"{user}:{password}", "-D", "-", "-o", "/dev/null", f"{url}/session")
    head = result.stdout
    status = int(head.rsplit("\n", 1)[1])
    headers = {
        k.strip().lower(): v.strip()
        for k, _, v in (ln.partition(":") for ln in head.splitlines()[1:])
        if v
    }
    return status, headers


def test_wrong_passwords_are_throttled_without_locking_the_owner_out_for_long(server):
    api(
        f"{server.url}/users",
        "POST",
        {"username": "victim", "password": "victim-password", "role": "reader"},
    )
    # The owner's credentials, verified once, are remembered: they keep working throughout.
    assert _basic_status(server.url, "victim", "victim-password")[0] == 200
    statuses = [_basic_status(server.url, "victim", f"guess-{i}")[0] for i in range(6)]
    assert statuses == [401] * 6  # five free failures, the sixth locks the name for 1 s
    status, headers = _basic_status(server.url, "victim", "guess-6")
    assert status == 429 and int(headers["retry-after"]) >= 1, headers
    assert _basic_status(server.url, "victim", "victim-password")[0] == 200  # remembered
    # Another client with the right password but nothing remembered waits out the lock,
    # and then gets in (the lock is short and the success clears the count).
    status, headers = _basic_status(server.url, "victim", "victim-password ")  # wrong: space
    assert status == 429, headers
    time.sleep(int(headers["retry-after"]) + 0.2)
    assert _basic_status(server.url, "victim", "victim-password ")[0] == 401
    assert "event=auth.throttled" in server.logs() and "user=victim" in server.logs()


def test_a_login_flood_does_not_stall_transfers(server, tmp_path):
    """96 wrong logins from 16 clients at once used to queue scrypt in the thread pool that
    moves disk bytes (a 4 MiB upload took 5.7 s); now hashing has a thread of its own and
    the flood is throttled."""
    vdi = create_vdi(server.url, 4 * MiB)  # the admin's credentials are verified and kept
    data = tmp_path / "data"
    data.write_bytes(os.urandom(4 * MiB))
    codes: list[int] = []

    def flood(n: int) -> None:
        for i in range(6):
            codes.append(_basic_status(server.url, f"nobody{n}", f"wrong-{i}")[0])

    threads = [threading.Thread(target=flood, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    status, body, _ = curl_upload(f"{server.url}/import_raw_vdi?vdi={vdi['uuid']}", "-T", str(data))
    took = time.monotonic() - t0
    for t in threads:
        t.join()
    assert status == 200, body
    assert took < 3, f"the upload took {took:.1f} s during the flood"
    assert 429 in codes and set(codes) <= {401, 429}, codes


@pytest.fixture
def small_disk(tmp_path):
    """A 48 MiB filesystem (tmpfs) for the state dir and its SR: a disk that fills up."""
    where = tmp_path / "small"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(where)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_fails_the_import_and_keeps_serving(small_disk, tmp_path):
    """ENOSPC used to answer 500, leave the task pending and the VDI locked until a restart
    (SQLite could not commit either). Now: 507 SR_FULL naming the SR and the bytes written,
    the task failed, the VDI released (or removed, if the import made it), and the
    database writable."""
    srv = ServerProcess(small_disk / "state").start()
    try:
        sr = api(f"{srv.url}/srs")[1][0]["uuid"]
        big = tmp_path / "big"
        big.write_bytes(os.urandom(64 * MiB))
        before = {v["uuid"] for v in api(f"{srv.url}/vdis")[1]}
        task_id = new_task(srv.url, "fills the disk")
        status, body, _ = curl_upload(
            f"{srv.url}/import_raw_vdi?sr={sr}&task_id={task_id}", "-T", str(big)
        )
        assert status == 507 and body["error"] == "SR_FULL", body
        assert sr in body["message"] and body["params"][0] == sr
        assert int(body["params"][1]) > 0  # the bytes written before the disk filled
        assert {v["uuid"] for v in api(f"{srv.url}/vdis")[1]} == before  # its VDI is gone
        failed = [t for t in api(f"{srv.url}/tasks")[1] if t["status"] == "failure"]
        assert failed and failed[-1]["error_info"][0] == "SR_FULL", failed
        assert not [t for t in api(f"{srv.url}/tasks")[1] if t["status"] == "pending"]
        # Into an existing (sparse) VDI: the same, and the VDI is free again afterwards.
        vdi = create_vdi(srv.url, 64 * MiB)
        status, body, _ = curl_upload(f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}", "-T", str(big))
        assert status == 507 and body["error"] == "SR_FULL", body
        tasks = api(f"{srv.url}/tasks")[1]
        assert not [t for t in tasks if t["status"] in ("pending", "cancelling")], tasks
        status, body = api(f"{srv.url}/vdis/{vdi['uuid']}", "DELETE")
        assert status == 204, body  # not VDI_IN_USE: the lock was released
        assert create_vdi(srv.url, MiB)["uuid"]  # the database still takes writes
        assert "event=import.sr_full" in srv.logs()
    finally:
        srv.stop()
