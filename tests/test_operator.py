"""What an operator sees of a running server: /metrics that move by exactly the bytes
transferred and never name a VDI or a user, and access-log lines that say what crossed the
connection. Against the real server process, with curl."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ServerProcess
from tests.rawclient import AUTH, AUTH_HEADER, api, curl_upload, export_to, filled_vdi

MiB = 1 << 20


def scrape(url: str) -> tuple[str, dict[tuple[str, tuple], float]]:
    """GET /metrics with no credentials: (the text, {(sample name, labels): value})."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return text, samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def access_lines(server: ServerProcess, path: str) -> list[str]:
    return [
        line
        for line in server.log_path.read_text().splitlines()
        if "event=http.request" in line and f"path={path} " in line
    ]


def test_metrics_count_exactly_the_bytes_moved_and_name_nobody(server, tmp_path):
    url = server.url
    _, before = scrape(url)
    status, vdi = api(f"{url}/vdis", "POST", {"virtual_size": 8 * MiB, "name_label": "secret"})
    assert status == 201
    v = vdi["uuid"]
    body = tmp_path / "disk.raw"
    body.write_bytes(os.urandom(3 * MiB) + bytes(5 * MiB))
    status, _, err = curl_upload(f"{url}/import_raw_vdi?vdi={v}", "-T", str(body))
    assert status == 200, err
    export_to(url, v, tmp_path / "out.raw")  # raw over plain TCP: sendfile
    vhd = export_to(url, v, tmp_path / "out.vhd", "&format=vhd").stat().st_size
    assert api(f"{url}/vdis/nonesuch")[0] == 404
    text, after = scrape(url)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("vdit_transfer_bytes_total", direction="import", format="raw") == 8 * MiB
    assert grew("vdit_transfer_bytes_total", direction="export", format="raw") == 8 * MiB
    assert grew("vdit_transfer_bytes_total", direction="export", format="vhd") == vhd
    assert grew("vdit_tasks_total", operation="import", status="success") == 1
    assert grew("vdit_tasks_total", operation="export", status="success") == 2
    assert grew("vdit_errors_total", code="VDI_NOT_FOUND") == 1
    # The gauges come back to 0 once the handlers are over; a handler may still be ending
    # when the client has the last byte (curl exits before the server's handler returns).
    deadline = time.monotonic() + 5
    while any(
        value(scrape(url)[1], "vdit_transfers_in_flight", direction=d) for d in ("import", "export")
    ):
        assert time.monotonic() < deadline, "transfers still in flight"
        time.sleep(0.05)
    route = {"route": "/vdis/{uuid}", "method": "GET", "status": "404"}
    assert grew("vdit_request_duration_seconds_count", **route) == 1
    deadline = time.monotonic() + 5
    while not value(scrape(url)[1], "vdit_event_loop_lag_seconds_count"):
        assert time.monotonic() < deadline, "no event-loop lag measured"
        time.sleep(0.1)
    assert value(after, "vdit_upload_buffer_bytes") == 0
    assert value(after, "vdit_upload_buffer_limit_bytes") >= MiB
    assert value(after, "vdit_pool_hosts", state="live") == 1
    # Bounded labels only: no VDI, no user, no client's words.
    for secret in (v, "admin", "secret", "nonesuch"):
        assert secret not in text


def test_in_flight_and_bytes_move_during_a_transfer(server, tmp_path):
    """While an export is being read slowly, it is in flight, and the counter already holds
    what went out; when it ends, the gauge drops back."""
    url = server.url
    v = filled_vdi(url, tmp_path)
    request = urllib.request.Request(
        f"{url}/export_raw_vdi?vdi={v}", headers={"Authorization": AUTH_HEADER}
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        resp.read(MiB)
        deadline = time.monotonic() + 10
        while True:
            _, during = scrape(url)
            moved = value(during, "vdit_transfer_bytes_total", direction="export", format="raw")
            if moved > 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert value(during, "vdit_transfers_in_flight", direction="export") == 1
        assert 0 < moved < 64 * MiB
        resp.read()
    deadline = time.monotonic() + 10
    while value(scrape(url)[1], "vdit_transfers_in_flight", direction="export"):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_the_access_log_says_what_crossed_the_connection(tmp_path):
    server = ServerProcess(tmp_path / "state", env={"VDIT_LOG_FORMAT": "json"}).start()
    try:
        url = server.url
        v = filled_vdi(url, tmp_path)
        export_to(url, v, tmp_path / "out.raw")
        ranged = ["curl", "-sSf", "-u", AUTH, "-r", "0-999", "-o", str(tmp_path / "part.raw")]
        subprocess.run([*ranged, f"{url}/export_raw_vdi?vdi={v}"], check=True)
    finally:
        server.stop()
    lines = [json.loads(line) for line in server.log_path.read_text().splitlines()]
    requests = [line for line in lines if line.get("event") == "http.request"]
    put = next(r for r in requests if r["path"] == "/import_raw_vdi")
    gets = [r for r in requests if r["path"] == "/export_raw_vdi"]
    assert put["bytes_in"] == 64 * MiB and put["bytes"] >= 64 * MiB
    assert put["status"] == 200 and put["vdi"] == v and put["task"]
    whole, part = gets
    assert whole["bytes_out"] == whole["bytes"] == 64 * MiB and whole["status"] == 200
    assert part["bytes_out"] == 1000 and part["status"] == 206
    for line in (put, whole, part):
        assert line["remote"] == "127.0.0.1" and line["duration"] > 0
        assert line["user"] == "admin"
