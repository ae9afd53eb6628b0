"""The real server with its state in PostgreSQL (the pool backend), driven with curl."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess

from tests.conftest import PG_SERVER, ServerProcess, _pg
from tests.rawclient import AUTH, api, curl_upload, export_to, task

MiB = 1 << 20


def test_server_on_postgresql(tmp_path, pg_database):
    schema = f"s_{os.urandom(6).hex()}"
    _pg(f"CREATE SCHEMA {schema}", pg_database)
    url = f"{PG_SERVER}/{pg_database}?search_path={schema}"
    srv = ServerProcess(tmp_path / "state", env={"VDIT_DATABASE_URL": url}).start()
    try:
        status, vdi = api(
            f"{srv.url}/vdis", "POST", {"virtual_size": 8 * MiB, "image_format": "qcow2"}
        )
        assert status == 201, vdi
        src = tmp_path / "src"
        src.write_bytes(os.urandom(3 * MiB))
        status, body, err = curl_upload(
            f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}", "-T", str(src)
        )
        assert status == 200, (body, err)
        status, snap = api(f"{srv.url}/vdis/{vdi['uuid']}/snapshot", "POST")
        assert status == 201 and snap["is_a_snapshot"]
        out = tmp_path / "out"
        export_to(srv.url, snap["uuid"], out)
        assert (
            hashlib.sha256(out.read_bytes()[: 3 * MiB]).digest()
            == hashlib.sha256(src.read_bytes()).digest()
        )
        # Sessions and tasks live in the database: they survive a crash of the process.
        _, session = api(
            f"{srv.url}/session", "POST", {"username": "admin", "password": AUTH.split(":", 1)[1]}
        )
        _, pending = api(f"{srv.url}/tasks", "POST", {"name_label": "later"})
        srv.stop(signal.SIGKILL)
        srv.start()
        assert task(srv.url, pending["uuid"])["status"] == "pending"
        assert api(f"{srv.url}/vdis/{snap['uuid']}")[0] == 200
        check = subprocess.run(
            [
                "curl",
                "-sS",
                "-o",
                os.devnull,
                "-w",
                "%{http_code}",
                f"{srv.url}/vdis?session_id={session['session_id']}",
            ],
            capture_output=True,
            text=True,
        )
        assert check.stdout == "200"
    finally:
        srv.stop()
        _pg(f"DROP SCHEMA {schema} CASCADE", pg_database)


def test_two_hosts_share_sessions_and_see_each_other(tmp_path, pg_database):
    """Two hosts on one PostgreSQL database: a session from one works on the other, a logout
    on either ends it on both, and each lists both hosts as live."""
    import sys

    schema = f"s_{os.urandom(6).hex()}"
    _pg(f"CREATE SCHEMA {schema}", pg_database)
    env = {"VDIT_DATABASE_URL": f"{PG_SERVER}/{pg_database}?search_path={schema}"}
    first = ServerProcess(tmp_path / "a", env=env).start()
    second = ServerProcess(tmp_path / "b", env=env).start()
    try:
        _, session = api(
            f"{first.url}/session", "POST", {"username": "admin", "password": AUTH.split(":", 1)[1]}
        )
        sid = session["session_id"]

        def status_on(srv) -> str:
            return subprocess.run(
                [
                    "curl",
                    "-sS",
                    "-o",
                    os.devnull,
                    "-w",
                    "%{http_code}",
                    f"{srv.url}/vdis?session_id={sid}",
                ],
                capture_output=True,
                text=True,
            ).stdout

        assert status_on(first) == "200" and status_on(second) == "200"
        _, hosts = api(f"{first.url}/hosts")
        assert len(hosts) == 2 and all(h["live"] for h in hosts)
        assert sorted(h["this_host"] for h in hosts) == [False, True]
        assert {h["address"] for h in hosts} == {first.url, second.url}
        _, srs = api(f"{second.url}/srs")
        assert len(srs) == 2  # each host has its own local SR
        listed = subprocess.run(
            [
                sys.executable,
                "-m",
                "transfer",
                "host",
                "list",
                "--state-dir",
                str(first.state_dir),
                "--database-url",
                env["VDIT_DATABASE_URL"],
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.count("\tTrue\t") >= 2
        logout = subprocess.run(
            [
                "curl",
                "-sS",
                "-o",
                os.devnull,
                "-w",
                "%{http_code}",
                "-X",
                "DELETE",
                f"{second.url}/session?session_id={sid}",
            ],
            capture_output=True,
            text=True,
        ).stdout
        assert logout == "204"
        assert status_on(first) == "401" and status_on(second) == "401"
    finally:
        first.stop()
        second.stop()
        _pg(f"DROP SCHEMA {schema} CASCADE", pg_database)
