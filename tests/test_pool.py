"""A pool of three real hosts on 127.0.0.2/3/4 sharing one real PostgreSQL database,
driven the way users drive it: curl -L (and wget) with Basic auth, a session cookie or a
session in the query, through whichever host they happen to reach."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.conftest import ADMIN_PASSWORD, PG_SERVER, ServerProcess, _pg
from tests.rawclient import AUTH, AUTH_HEADER, RawRequest, api

MiB = 1 << 20
ADDRESSES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
HEARTBEAT = 1  # seconds; a host is offline after 3 missed heartbeats


class Pool:
    def __init__(self, root: Path, database_url: str):
        self.root = root
        self.database_url = database_url
        env = {"VDIT_DATABASE_URL": database_url, "VDIT_HEARTBEAT_INTERVAL": str(HEARTBEAT)}
        for i in range(len(ADDRESSES)):
            (root / f"host{i}").mkdir()
        self.hosts = [
            ServerProcess(root / f"host{i}" / "state", env=env, host=address)
            for i, address in enumerate(ADDRESSES)
        ]

    def others(self, host: ServerProcess) -> list[ServerProcess]:
        return [h for h in self.hosts if h is not host]

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "transfer",
                *args,
                "--state-dir",
                str(self.hosts[0].state_dir),
                "--database-url",
                self.database_url,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )


@pytest.fixture(scope="module")
def pool(tmp_path_factory, pg_database):
    schema = f"pool_{os.urandom(6).hex()}"
    _pg(f"CREATE SCHEMA {schema}", pg_database)
    the_pool = Pool(
        tmp_path_factory.mktemp("pool"), f"{PG_SERVER}/{pg_database}?search_path={schema}"
    )
    try:
        for host in the_pool.hosts:
            host.start()
        yield the_pool
    finally:
        for host in the_pool.hosts:
            if host.proc and host.proc.poll() is None:
                host.stop()
        _pg(f"DROP SCHEMA {schema} CASCADE", pg_database)


def curl(*args: str, timeout: float = 60) -> tuple[int, bytes, int, str]:
    """Real curl; returns (final status, body, redirects followed, final URL)."""
    result = subprocess.run(
        ["curl", "-sS", "-w", "\n%{http_code} %{num_redirects} %{url_effective}", *args],
        capture_output=True,
        timeout=timeout,
    )
    body, _, tail = result.stdout.rpartition(b"\n")
    status, redirects, url = tail.decode().split(" ", 2)
    return int(status), body, int(redirects), url


def login(host: ServerProcess) -> str:
    status, body = api(
        f"{host.url}/session", "POST", {"username": "admin", "password": ADMIN_PASSWORD}
    )
    assert status == 200, body
    return body["session_id"]


def new_vdi(host: ServerProcess, size: int = 4 * MiB, **extra) -> dict:
    status, vdi = api(
        f"{host.url}/vdis", "POST", {"virtual_size": size, "name_label": "p", **extra}
    )
    assert status == 201, vdi
    return vdi


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_every_host_lists_the_pool(pool):
    for host in pool.hosts:
        status, hosts = api(f"{host.url}/hosts")
        assert status == 200
        assert {h["address"] for h in hosts} == {h.url for h in pool.hosts}
        assert all(h["live"] for h in hosts)
        assert [h["address"] for h in hosts if h["this_host"]] == [host.url]
    listed = pool.cli("host", "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.count("\tTrue\t") == 3


@pytest.mark.parametrize("auth", ["basic", "cookie", "session-query"])
def test_local_vdis_through_every_other_host(pool, tmp_path, auth):
    """Each host's local VDI, uploaded and downloaded with curl -L through each of the other
    hosts: one redirect, to the owner, and the bytes arrive intact."""
    for owner in pool.hosts:
        vdi = new_vdi(owner)
        for entry in pool.others(owner):
            src = random_file(tmp_path / "src", 3 * MiB + 512)
            query = f"vdi={vdi['uuid']}"
            if auth == "basic":
                creds = ["-u", AUTH]
            elif auth == "cookie":
                jar = tmp_path / "jar"
                jar.unlink(missing_ok=True)
                status, _, _, _ = curl(
                    "-u", AUTH, "-c", str(jar), "-X", "POST", f"{entry.url}/session"
                )
                assert status == 200
                creds = ["-b", str(jar)]
            else:
                creds = []
                query += f"&session_id={login(entry)}"
            status, body, redirects, url = curl(
                "-L", *creds, "-T", str(src), f"{entry.url}/import_raw_vdi?{query}"
            )
            assert status == 200, body
            assert redirects == 1 and url.startswith(owner.url + "/import_raw_vdi?"), url
            assert json.loads(body)["vdi"] == vdi["uuid"]
            out = tmp_path / "out"
            status, _, redirects, url = curl(
                "-L", *creds, "-o", str(out), f"{entry.url}/export_raw_vdi?{query}"
            )
            assert status == 200 and redirects == 1 and url.startswith(owner.url)
            data = out.read_bytes()
            assert len(data) == 4 * MiB
            assert sha(data[: src.stat().st_size]) == sha(src.read_bytes())
            assert data[src.stat().st_size :] == bytes(4 * MiB - src.stat().st_size)


def test_wget_follows_the_redirect(pool, tmp_path):
    owner, entry = pool.hosts[0], pool.hosts[2]
    vdi = new_vdi(owner, 1 * MiB)
    src = random_file(tmp_path / "src", 1 * MiB)
    assert (
        curl("-u", AUTH, "-T", str(src), f"{owner.url}/import_raw_vdi?vdi={vdi['uuid']}")[0] == 200
    )
    out = tmp_path / "out"
    result = subprocess.run(
        [
            "wget",
            "-q",
            "--auth-no-challenge",
            "--user=admin",
            f"--password={ADMIN_PASSWORD}",
            "-O",
            str(out),
            f"{entry.url}/export_raw_vdi?vdi={vdi['uuid']}",
        ],
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == src.read_bytes()


def test_the_redirect_and_its_ticket(pool, tmp_path):
    """302 to the owner's advertise URL with the same path and full query plus a ticket;
    the ticket opens that operation on that VDI for about a minute, and nothing else."""
    owner, entry = pool.hosts[1], pool.hosts[0]
    vdi, other = new_vdi(owner), new_vdi(owner)
    query = f"vdi={vdi['ref']}&format=VHD&x-note=a%20b"
    status, headers, _ = raw(entry, "GET", f"/export_raw_vdi/disk.vhd?{query}")
    assert status == 302
    location = urlsplit(headers["location"])
    assert f"{location.scheme}://{location.netloc}" == owner.url
    assert location.path == "/export_raw_vdi/disk.vhd"
    params = parse_qs(location.query)
    assert params["vdi"] == [vdi["ref"]] and params["format"] == ["VHD"]
    assert params["x-note"] == ["a b"]
    ticket = params["ticket"][0]
    # Parameters sent as cookies travel in the redirect's query (cookies stay behind);
    # the session cookie never does.
    request = RawRequest(
        entry.url,
        "GET",
        "/export_raw_vdi",
        {
            "Authorization": AUTH_HEADER,
            "Cookie": f"vdi={vdi['uuid']}; format=qcow2; session_id=abc",
            "Connection": "close",
        },
    )
    status, headers, _ = request.read_response()
    request.close()
    assert status == 302
    carried = parse_qs(urlsplit(headers["location"]).query)
    assert carried["vdi"] == [vdi["uuid"]] and carried["format"] == ["qcow2"]
    assert "session_id" not in carried
    # A small upload (curl sends it at once, without waiting for 100 Continue) is sent
    # again to the owner after the redirect.
    small = random_file(tmp_path / "small", 64 * 1024)
    status, body, redirects, _ = curl(
        "-L", "-u", AUTH, "-T", str(small), f"{entry.url}/import_raw_vdi?vdi={other['uuid']}"
    )
    assert status == 200 and redirects == 1, body
    # The ticket is the credential at the owner: no Authorization needed.
    status, _, _ = raw(owner, "HEAD", location.path + "?" + location.query, auth=False)
    assert status == 200
    # ... but only for what it was issued for.
    for target, method in [
        (f"/export_raw_vdi?vdi={other['uuid']}&ticket={ticket}", "GET"),  # another VDI
        (f"/vdis/{vdi['uuid']}/extents?ticket={ticket}", "GET"),  # another operation
        (f"/vdis?ticket={ticket}", "GET"),  # a handler that takes no ticket
        (f"/export_raw_vdi?vdi={vdi['uuid']}&ticket={ticket[:-2]}xx", "GET"),  # forged
    ]:
        status, headers, body = raw(owner, method, target, auth=False)
        assert status == 401 and json.loads(body)["error"] == "SESSION_INVALID", (target, body)
    # Not even the same host may be asked to hand it on for another VDI.
    status, _, body = raw(
        entry, "GET", f"/export_raw_vdi?vdi={other['uuid']}&ticket={ticket}", auth=False
    )
    assert status == 401, body
    # An expired ticket, and one whose session was logged out.
    secret = pool_secret(pool)
    import jwt

    now = int(time.time())
    expired = jwt.encode(
        {
            "typ": "ticket",
            "sub": "admin",
            "op": "export",
            "obj": vdi["uuid"],
            "jti": "x",
            "iat": now - 120,
            "exp": now - 60,
        },
        secret,
        algorithm="HS256",
    )
    status, _, body = raw(
        owner, "GET", f"/export_raw_vdi?vdi={vdi['uuid']}&ticket={expired}", auth=False
    )
    assert status == 401 and b"expired" in body
    # A ticket presented to a host that does not own the VDI is redirected with a ticket
    # that expires no later than it: one ticket cannot be stretched by bouncing it.
    soon = now + 5
    short = jwt.encode(
        {"typ": "ticket", "sub": "admin", "op": "export", "obj": vdi["uuid"], "jti": "y",
         "iat": now, "exp": soon},
        secret,
        algorithm="HS256",
    )  # fmt: skip
    status, headers, _ = raw(
        entry, "GET", f"/export_raw_vdi?vdi={vdi['uuid']}&ticket={short}", auth=False
    )
    assert status == 302
    handed_on = parse_qs(urlsplit(headers["location"]).query)["ticket"][0]
    claims = jwt.decode(handed_on, secret, algorithms=["HS256"], options={"verify_exp": False})
    assert claims["exp"] <= soon, claims
    fresh = jwt.decode(ticket, secret, algorithms=["HS256"])
    assert fresh["exp"] - fresh["iat"] == 60  # a first redirect still gets the full minute
    sid = login(entry)
    status, headers, _ = raw(
        entry, "GET", f"/export_raw_vdi?vdi={vdi['uuid']}&session_id={sid}", auth=False
    )
    assert status == 302
    assert raw(entry, "DELETE", f"/session?session_id={sid}", auth=False)[0] == 204
    revoked = urlsplit(headers["location"])
    status, _, body = raw(owner, "HEAD", f"{revoked.path}?{revoked.query}", auth=False)
    assert status == 401


def test_records_snapshot_clone_create_and_delete_through_another_host(pool, tmp_path):
    owner, entry = pool.hosts[2], pool.hosts[1]
    src = random_file(tmp_path / "src", 2 * MiB)
    owner_uuid = api(f"{owner.url}/health")[1]["host"]
    local = next(sr for sr in api(f"{owner.url}/srs")[1] if sr["host"] == owner_uuid)
    # A POST is redirected with 302 too, as the contract says.
    status, _, body = raw(
        entry,
        "POST",
        "/vdis",
        body=json.dumps(
            {"sr": local["uuid"], "virtual_size": 4 * MiB, "image_format": "qcow2"}
        ).encode(),
    )
    assert status == 302, body
    status, body, redirects, _ = curl(
        "-L",
        "--post302",  # else curl turns the POST into a GET on a 302, as browsers do
        "-u",
        AUTH,
        "--json",
        json.dumps({"sr": local["uuid"], "virtual_size": 4 * MiB, "image_format": "qcow2"}),
        f"{entry.url}/vdis",
    )
    assert status == 201 and redirects == 1, body
    vdi = json.loads(body)
    assert vdi["sr"] == local["uuid"] and vdi["image_format"] == "qcow2"
    status, body, _, _ = curl(
        "-L", "-u", AUTH, "-T", str(src), f"{entry.url}/import_raw_vdi?vdi={vdi['uuid']}"
    )
    assert status == 200, body
    status, body, redirects, _ = curl(
        "-L",
        "-X",
        "POST",  # with -X, curl keeps the method across any redirect
        "-u",
        AUTH,
        "--json",
        '{"name_label": "snap"}',
        f"{entry.url}/vdis/{vdi['uuid']}/snapshot",
    )
    assert status == 201 and redirects == 1, body
    snap = json.loads(body)
    assert snap["is_a_snapshot"] and snap["snapshot_of"] == vdi["uuid"]
    status, body, _, _ = curl(
        "-L", "-u", AUTH, "-X", "POST", f"{entry.url}/vdis/{snap['uuid']}/clone"
    )
    assert status == 201, body
    clone = json.loads(body)
    status, body, redirects, _ = curl("-L", "-u", AUTH, f"{entry.url}/vdis/{clone['uuid']}/extents")
    assert status == 200 and redirects == 1
    extents = json.loads(body)
    assert sum(e["length"] for e in extents if not e["zero"]) >= 2 * MiB
    # The owner recorded the VDI's usage for the hosts that cannot see its file.
    status, seen = api(f"{entry.url}/vdis/{vdi['uuid']}")
    assert status == 200 and seen["physical_utilisation"] > 0
    status, body, redirects, _ = curl(
        "-L", "-u", AUTH, "-X", "DELETE", f"{entry.url}/vdis/{clone['uuid']}"
    )
    assert status == 204 and redirects == 1
    assert api(f"{owner.url}/vdis/{clone['uuid']}")[0] == 404


def test_shared_sr_is_served_by_every_host(pool, tmp_path):
    shared_dir = tmp_path / "nfs"
    shared_dir.mkdir()
    made = pool.cli("sr", "create", "--shared", str(shared_dir), "--name-label", "NFS")
    assert made.returncode == 0, made.stderr
    sr_uuid = made.stdout.split("\t")[0]
    for host in pool.hosts:
        status, sr = api(f"{host.url}/srs/{sr_uuid}")
        assert status == 200 and sr["shared"] and sr["host"] is None
    a, b, c = pool.hosts
    vdi = new_vdi(a, 4 * MiB, sr=sr_uuid, image_format="vhd")
    src = random_file(tmp_path / "src", 4 * MiB)
    status, body, redirects, _ = curl(
        "-L", "-u", AUTH, "-T", str(src), f"{b.url}/import_raw_vdi?vdi={vdi['uuid']}"
    )
    assert status == 200 and redirects == 0, body
    status, body, redirects, _ = curl(
        "-L", "-u", AUTH, "-X", "POST", f"{c.url}/vdis/{vdi['uuid']}/snapshot"
    )
    assert status == 201 and redirects == 0
    snap = json.loads(body)
    for host in pool.hosts:
        out = tmp_path / "out"
        status, _, redirects, _ = curl(
            "-u", AUTH, "-o", str(out), f"{host.url}/export_raw_vdi?vdi={snap['uuid']}"
        )
        assert status == 200 and redirects == 0
        assert out.read_bytes() == src.read_bytes()


def test_one_writer_and_no_writer_under_an_export_across_hosts(pool, tmp_path):
    """The write lock and the exports' read leases live in the database: a VDI on a shared
    SR written through one host cannot be written or deleted through another, nor written
    while another host exports it; a cancel asked of one host stops the transfer on
    another, and its progress shows everywhere."""
    shared_dir = tmp_path / "nfs"
    shared_dir.mkdir()
    made = pool.cli("sr", "create", "--shared", str(shared_dir))
    assert made.returncode == 0, made.stderr
    sr_uuid = made.stdout.split("\t")[0]
    a, b, c = pool.hosts
    vdi = new_vdi(a, 64 * MiB, sr=sr_uuid)
    upload = RawRequest(
        a.url,
        "PUT",
        f"/import_raw_vdi?vdi={vdi['uuid']}",
        {"Authorization": AUTH_HEADER, "Content-Length": str(64 * MiB)},
    )
    try:
        upload.send(os.urandom(4 * MiB))
        task_ref = wait_for(lambda: writer_task(c, vdi["uuid"]))
        src = random_file(tmp_path / "src", MiB)
        status, body, _, _ = curl(
            "-u", AUTH, "-T", str(src), f"{b.url}/import_raw_vdi?vdi={vdi['uuid']}"
        )
        assert status == 409 and json.loads(body)["error"] == "VDI_IN_USE"
        status, body, _, _ = curl("-u", AUTH, "-X", "DELETE", f"{c.url}/vdis/{vdi['uuid']}")
        assert status == 409 and json.loads(body)["error"] == "VDI_IN_USE"
        # Progress of the upload on host a, seen from host c (written once a second).
        seen = wait_for(
            lambda: (t := api(f"{c.url}/tasks/{task_ref}")[1])["bytes_transferred"] > 0 and t
        )
        assert seen["status"] == "pending"
        # Cancel through host b: the upload on host a stops.
        status, _ = api(f"{b.url}/tasks/{task_ref}/cancel", "POST")
        assert status == 200
        done = wait_for(
            lambda: (t := api(f"{c.url}/tasks/{task_ref}")[1])["status"] == "cancelled" and t, 10
        )
        assert done["error_info"] == ["CANCELLED"]
        assert upload.closed_by_peer(5)
    finally:
        upload.close()
    # An export on host a holds a read lease: a write through host b waits, then gives up.
    assert (
        curl(
            "-u",
            AUTH,
            "-T",
            str(random_file(tmp_path / "full", 64 * MiB)),
            f"{a.url}/import_raw_vdi?vdi={vdi['uuid']}",
        )[0]
        == 200
    )
    reader = RawRequest(
        a.url, "GET", f"/export_raw_vdi?vdi={vdi['uuid']}", {"Authorization": AUTH_HEADER}
    )
    try:
        reader.sock.recv(1)  # the export is under way (and stalls: we do not read on)
        started = time.monotonic()
        status, body, _, _ = curl(
            "-u", AUTH, "-T", str(src), f"{b.url}/import_raw_vdi?vdi={vdi['uuid']}"
        )
        assert status == 409 and b"exported" in body
        assert time.monotonic() - started >= 4  # it gave the export its grace period
    finally:
        reader.close()
    status, body, _, _ = curl(
        "-u", AUTH, "-T", str(src), f"{b.url}/import_raw_vdi?vdi={vdi['uuid']}"
    )
    assert status == 200, body


def test_a_stopped_host_is_offline_and_recovers_its_tasks_when_back(pool, tmp_path):
    a, b, c = pool.hosts
    vdi = new_vdi(c, 16 * MiB)
    # An upload that may be resumed (it reports into a task given by the client), and one
    # that may not, both running on host c when it dies.
    _, resumable = api(f"{a.url}/tasks", "POST", {"name_label": "resumable"})
    src = random_file(tmp_path / "src", 16 * MiB)
    first = RawRequest(
        c.url,
        "PUT",
        f"/import_raw_vdi?vdi={vdi['uuid']}&task_id={resumable['uuid']}",
        {"Authorization": AUTH_HEADER, "Content-Length": str(16 * MiB)},
    )
    # Upload-Offset advances at least every second while data flows: two sends a second
    # and a bit apart make the first 5 MiB durable.
    first.send(src.read_bytes()[: 5 * MiB])
    time.sleep(1.2)
    first.send(src.read_bytes()[5 * MiB : 9 * MiB])
    wait_for(lambda: api(f"{a.url}/tasks/{resumable['uuid']}")[1]["upload_offset"] > 0, 15)
    other = new_vdi(c, 4 * MiB)
    second = RawRequest(
        c.url,
        "PUT",
        f"/import_raw_vdi?vdi={other['uuid']}",
        {"Authorization": AUTH_HEADER, "Content-Length": str(4 * MiB)},
    )
    second.send(b"x" * MiB)
    plain_task = wait_for(lambda: writer_task(a, other["uuid"]))
    c.stop(signal.SIGKILL)
    first.close()
    second.close()
    try:
        hosts = wait_for(
            lambda: (
                (h := api(f"{a.url}/hosts")[1])
                and not next(x for x in h if x["address"] == c.url)["live"]
                and h
            ),
            10 * HEARTBEAT,
        )
        assert hosts
        status, body, redirects, _ = curl(
            "-L", "-u", AUTH, "-D", "-", f"{b.url}/export_raw_vdi?vdi={vdi['uuid']}"
        )
        assert status == 503 and redirects == 0
        head, _, payload = body.partition(b"\r\n\r\n")
        assert b"retry-after:" in head.lower()
        assert json.loads(payload)["error"] == "HOST_OFFLINE"
        # Its tasks stay as they were while it is away.
        assert api(f"{a.url}/tasks/{plain_task}")[1]["status"] == "pending"
    finally:
        c.start()
    # Back: the plain upload failed; the resumable one waits at its durable offset and
    # continues through another host (redirected to c, where its checkpoint is).
    failed = api(f"{a.url}/tasks/{plain_task}")[1]
    assert failed["status"] == "failure" and failed["error_info"][0] == "INTERNAL_ERROR"
    pending = api(f"{b.url}/tasks/{resumable['uuid']}")[1]
    assert pending["status"] == "pending" and 0 < pending["upload_offset"] <= 9 * MiB
    status, body, redirects, _ = curl(
        "-L",
        "-u",
        AUTH,
        "-C",
        "-",
        "-T",
        str(src),
        f"{a.url}/import_raw_vdi?vdi={vdi['uuid']}&task_id={resumable['uuid']}",
    )
    # curl -C - asks the server where to go on: a HEAD, then the PUT from that offset.
    assert status == 200, body
    out = tmp_path / "out"
    assert (
        curl("-L", "-u", AUTH, "-o", str(out), f"{b.url}/export_raw_vdi?vdi={vdi['uuid']}")[0]
        == 200
    )
    assert sha(out.read_bytes()) == sha(src.read_bytes())


def test_logout_on_one_host_is_seen_by_all(pool):
    sid = login(pool.hosts[0])
    for host in pool.hosts:
        assert raw(host, "GET", f"/vdis?session_id={sid}", auth=False)[0] == 200
    assert raw(pool.hosts[2], "DELETE", f"/session?session_id={sid}", auth=False)[0] == 204
    for host in pool.hosts:
        assert raw(host, "GET", f"/vdis?session_id={sid}", auth=False)[0] == 401


def test_event_from_wakes_for_a_task_a_transfer_on_another_host_updates(pool):
    """A XAPI client waits on the host it talks to; the transfer runs on the host that owns
    the disk. The task's end reaches the waiter through the shared database."""
    import threading

    import XenAPI

    here, there = pool.hosts[0], pool.hosts[1]
    xen = XenAPI.Session(here.url)
    xen.xenapi.login_with_password("admin", ADMIN_PASSWORD)
    task = xen.xenapi.task.create("import on another host", "")
    token = xen.xenapi.event_from([f"task/{task}"], "", 0)["token"]
    vdi = new_vdi(there)
    seen: list[tuple[str, float]] = []

    def watch() -> None:
        nonlocal token
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            answer = xen.xenapi.event_from([f"task/{task}"], token, 30.0)
            token = answer["token"]
            for ev in answer["events"]:
                seen.append((ev["snapshot"]["status"], time.monotonic()))
            if seen and seen[-1][0] == "success":
                return

    waiter = threading.Thread(target=watch)
    waiter.start()
    time.sleep(0.5)  # the waiter is inside event.from on `here`
    status, _, _ = raw(
        there,
        "PUT",
        f"/import_raw_vdi?session_id={xen._session}&task_id={task}&vdi={vdi['ref']}",
        auth=False,
        body=os.urandom(MiB),
    )
    finished = time.monotonic()
    assert status == 200
    waiter.join(35)
    assert seen and seen[-1][0] == "success"
    assert seen[-1][1] - finished < 2.0  # woken by the change, not by its 30 s timeout
    assert xen.xenapi.task.get_result(task) == f"<value>{vdi['ref']}</value>"
    xen.xenapi.session.logout()


# -- helpers -------------------------------------------------------------------------------


def raw(
    host: ServerProcess, method: str, target: str, *, auth: bool = True, body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    headers = {"Content-Length": str(len(body)), "Connection": "close"}
    if body:
        headers["Content-Type"] = "application/json"  # the bodies sent here are JSON
    if auth:
        headers["Authorization"] = AUTH_HEADER
    request = RawRequest(host.url, method, target, headers)
    try:
        if body:
            request.send(body)
        status, headers, payload = request.read_response()
        return status, headers, b"" if method == "HEAD" else payload
    finally:
        request.close()


def writer_task(host: ServerProcess, vdi_uuid: str) -> str | None:
    _, tasks = api(f"{host.url}/tasks")
    running = [t for t in tasks if t["vdi"] == vdi_uuid and t["status"] == "pending"]
    return running[-1]["uuid"] if running else None


def wait_for(probe, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


def pool_secret(pool: Pool) -> bytes:
    import asyncpg

    async def read() -> bytes:
        conn = await asyncpg.connect(pool.database_url.split("?")[0])
        try:
            schema = pool.database_url.split("search_path=")[1]
            value = await conn.fetchval(
                f"SELECT value FROM {schema}.pool_settings WHERE name = 'session_secret'"
            )
            return bytes.fromhex(value)
        finally:
            await conn.close()

    return asyncio.run(read())


def test_sr_create_refuses_what_it_cannot_serve(pool, tmp_path):
    missing = pool.cli("sr", "create", "--shared", str(tmp_path / "not-mounted"))
    assert missing.returncode == 1 and "mount it on every host" in missing.stderr
    relative = pool.cli("sr", "create", "relative/dir")
    assert relative.returncode == 1 and "absolute" in relative.stderr
    formats = pool.cli("sr", "create", str(tmp_path / "x"), "--image-formats", "vmdk")
    assert formats.returncode == 1 and "image formats" in formats.stderr
    twice = tmp_path / "twice"
    twice.mkdir()
    assert pool.cli("sr", "create", "--shared", str(twice)).returncode == 0
    again = pool.cli("sr", "create", "--shared", str(twice))
    assert again.returncode == 1 and "already" in again.stderr


def test_the_client_follows_redirects_to_the_owner(pool, tmp_path):
    """`vdi-transfer upload` and `download` against a host that does not own the VDI: the
    upload is redirected before its body (100 Continue), sent once, to the owner; the
    sparse download's extents and ranges are redirected too."""
    owner, entry = pool.hosts[0], pool.hosts[1]
    vdi = new_vdi(owner, size=32 * MiB)
    src = tmp_path / "src.raw"
    with src.open("wb") as f:
        f.truncate(32 * MiB)
        f.seek(5 * MiB)
        f.write(os.urandom(3 * MiB))
    env = {
        **os.environ,
        "VDIT_URL": entry.url,
        "VDIT_USER": "admin",
        "VDIT_PASSWORD": ADMIN_PASSWORD,
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
    }

    def client(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "transfer", *args], env=env, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip

    sent = client("upload", str(src), "--vdi", vdi["uuid"], "--json", "-q")
    assert sent.returncode == 0, sent.stderr
    assert json.loads(sent.stdout)["bytes_sent"] < 4 * MiB  # once, and only the data
    out = tmp_path / "out.raw"
    got = client("download", vdi["uuid"], "-o", str(out), "-q", "--connections", "2")
    assert got.returncode == 0, got.stderr
    assert out.read_bytes() == src.read_bytes()
    # in parts: every part is redirected to the owner, and runs there under one task
    with src.open("r+b") as f:
        f.seek(20 * MiB)
        f.write(os.urandom(5 * MiB))
    sent = client("upload", str(src), "--vdi", vdi["uuid"], "--json", "-q", "--connections", "3")
    assert sent.returncode == 0, sent.stderr
    task_id = json.loads(sent.stdout)["task"]
    _, row = api(f"{owner.url}/tasks/{task_id}")
    assert row["upload_parts_done"] == [0, 1, 2] and row["status"] == "success"
    got = client("download", vdi["uuid"], "-o", str(out), "-q")
    assert got.returncode == 0, got.stderr
    assert out.read_bytes() == src.read_bytes()
