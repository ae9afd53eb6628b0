"""The real server process, driven with real curl, as a user follows the README."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

from tests.conftest import ADMIN_PASSWORD, ServerProcess, curl, curl_json

AUTH = f"admin:{ADMIN_PASSWORD}"


def cli(state_dir, *args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "transfer", *args, "--state-dir", str(state_dir)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_readme_tour_with_curl(server, tmp_path):
    jar = str(tmp_path / "cookies")
    status, body = curl_json("-u", AUTH, "-X", "POST", "-c", jar, f"{server.url}/session")
    assert status == 200 and body["session_id"]
    status, vdi = curl_json(
        "-b",
        jar,
        "-H",
        "Content-Type: application/json",
        "--json",
        '{"name_label": "my disk", "virtual_size": "10G"}',
        f"{server.url}/vdis",
    )
    assert status == 201 and vdi["virtual_size"] == 10 * 2**30
    status, vdis = curl_json("-b", jar, f"{server.url}/vdis")
    assert status == 200 and [v["uuid"] for v in vdis] == [vdi["uuid"]]
    status, task = curl_json(
        "-b", jar, "--json", '{"name_label": "nightly"}', f"{server.url}/tasks"
    )
    assert status == 201
    status, tasks = curl_json(f"{server.url}/tasks?session_id={body['session_id']}")
    assert status == 200 and [t["uuid"] for t in tasks] == [task["uuid"]]
    status, _ = curl_json("-b", jar, "-X", "DELETE", f"{server.url}/session")
    assert status == 204
    status, err = curl_json("-b", jar, f"{server.url}/vdis")
    assert status == 401 and err["error"] == "SESSION_INVALID"
    result = curl("-i", f"{server.url}/vdis")
    assert 'WWW-Authenticate: Basic realm="vdi-transfer"' in result.stdout


def test_sigterm_stops_cleanly_and_logs_no_credentials(server):
    _status, body = curl_json("-u", AUTH, "-X", "POST", f"{server.url}/session")
    sid = body["session_id"]
    curl_json(f"{server.url}/vdis?session_id={sid}")
    curl_json("-H", f"Authorization: Bearer {sid}", f"{server.url}/vdis")
    curl_json("-u", "admin:wrong-password", f"{server.url}/vdis")
    assert server.stop(signal.SIGTERM) == 0
    logs = server.logs()
    assert "event=server.stopped" in logs
    assert ADMIN_PASSWORD not in logs and "wrong-password" not in logs
    assert sid not in logs and sid.split(".")[2] not in logs
    # One structured line per request, with the user.
    lines = [
        line
        for line in logs.splitlines()
        if "event=http.request" in line and "path=/health" not in line
    ]
    assert len(lines) == 4
    assert all("user=admin" in line for line in lines[:3])
    assert "error=SESSION_AUTHENTICATION_FAILED" in lines[3]


def test_generated_admin_password_is_logged_once(tmp_path):
    srv = ServerProcess(tmp_path / "state", env={"VDIT_ADMIN_PASSWORD": ""})
    srv.start()
    try:
        match = re.search(r"event=admin.created user=admin password=(\S+)", srv.logs())
        assert match, srv.logs()
        password = match.group(1)
        status, _ = curl_json("-u", f"admin:{password}", f"{srv.url}/vdis")
        assert status == 200
    finally:
        srv.stop()
    srv.start()  # a second start of the same state dir creates no admin again
    try:
        assert srv.logs().count("event=admin.created") == 1
        status, _ = curl_json("-u", f"admin:{password}", f"{srv.url}/vdis")
        assert status == 200
    finally:
        srv.stop()


def test_state_survives_restart(server):
    status, vdi = curl_json("-u", AUTH, "--json", '{"virtual_size": 4096}', f"{server.url}/vdis")
    status, body = curl_json("-u", AUTH, "-X", "POST", f"{server.url}/session")
    server.stop()
    server.start()
    status, again = curl_json(f"{server.url}/vdis/{vdi['uuid']}?session_id={body['session_id']}")
    assert status == 200 and again["uuid"] == vdi["uuid"]
    secret = server.state_dir / "pool-secret"
    assert oct(os.stat(secret).st_mode & 0o777) == "0o600"


def test_user_cli_works_beside_the_running_server(server):
    state = server.state_dir
    result = cli(
        state,
        "user",
        "add",
        "ops",
        "--role",
        "operator",
        "--password-stdin",
        stdin="ops-password\n",
    )
    assert result.returncode == 0, result.stderr
    status, _ = curl_json(
        "-u", "ops:ops-password", "--json", '{"virtual_size": 512}', f"{server.url}/vdis"
    )
    assert status == 201
    listed = cli(state, "user", "list")
    assert listed.stdout.splitlines() == ["admin\tadmin", "ops\toperator"]
    assert cli(state, "user", "passwd", "ops", stdin="ops-new-password\n").returncode == 0
    assert curl_json("-u", "ops:ops-password", f"{server.url}/vdis")[0] == 401
    assert curl_json("-u", "ops:ops-new-password", f"{server.url}/vdis")[0] == 200
    assert cli(state, "user", "remove", "ops").returncode == 0
    assert curl_json("-u", "ops:ops-new-password", f"{server.url}/vdis")[0] == 401
    # Errors are clear, and exit non-zero.
    result = cli(state, "user", "remove", "ops")
    assert result.returncode == 1 and "USER_NOT_FOUND" in result.stderr
    result = cli(state, "user", "add", "x", "--password-stdin", stdin="short\n")
    assert result.returncode == 1 and "at least 8" in result.stderr


def test_bad_configuration_is_a_clear_error(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("port = 8080\nbogus = 1\n")
    result = subprocess.run(
        [sys.executable, "-m", "transfer", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "unknown key 'bogus'" in result.stderr


def test_health_is_liveness_and_ready_says_what_is_missing(server):
    """/health answers without touching the database or the SRs; /ready checks them."""
    status, ready = curl_json(f"{server.url}/ready")
    assert status == 200 and ready["status"] == "ready", ready
    srs = list((server.state_dir / "srs").iterdir())
    assert len(srs) == 1 and (srs[0] / ".vdi-transfer-sr").read_text().strip() == srs[0].name
    srs[0].rename(srs[0].with_name("moved"))  # as if its filesystem were not mounted
    try:
        status, ready = curl_json(f"{server.url}/ready")
        assert status == 503 and ready["status"] == "unavailable", ready
        assert ready["reasons"] == [f"SR {srs[0].name} is not mounted at {srs[0]}"], ready
        status, health = curl_json(f"{server.url}/health")
        assert status == 200 and health["status"] == "ok", health
    finally:
        srs[0].with_name("moved").rename(srs[0])
    assert curl_json(f"{server.url}/ready")[0] == 200
