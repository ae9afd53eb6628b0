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
