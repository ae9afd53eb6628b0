"""`vdi-transfer upload`, `download` and the remote commands, run as a user runs them
against the real server process: sparse raw uploads send only data, formats are found
from content, downloads are sparse, progress shows when not on a terminal, a server killed
mid-upload is waited for, and Ctrl-C leaves the upload's task cancelled."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ADMIN_PASSWORD, ServerProcess
from tests.rawclient import api, export_to

MiB = 1 << 20


def env_for(srv: ServerProcess, tmp_path: Path, **more: str) -> dict[str, str]:
    return {
        **os.environ,
        "VDIT_URL": srv.url,
        "VDIT_USER": "admin",
        "VDIT_PASSWORD": ADMIN_PASSWORD,
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        **more,
    }


def cli(env: dict[str, str], *args: str, timeout: float = 300, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "transfer", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def sha(path: Path) -> bytes:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(8 * MiB):
            h.update(block)
    return h.digest()


def local_sr(url: str) -> str:
    return api(f"{url}/srs")[1][0]["uuid"]


def big_file(path: Path) -> Path:
    """768 MiB of data (one random MiB, rotated): long enough to interrupt an upload in
    the middle, quick to write."""
    with path.open("wb") as f:
        block = os.urandom(MiB)
        for i in range(768):
            f.write(block[i % 7 :] + block[: i % 7])
    return path


def sparse_file(path: Path, size: int, data: list[tuple[int, bytes]]) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
        for offset, chunk in data:
            f.seek(offset)
            f.write(chunk)
    return path


def test_a_sparse_raw_upload_sends_its_data_only_and_a_download_stays_sparse(server, tmp_path):
    env = env_for(server, tmp_path)
    size = 1 << 30
    disk = sparse_file(
        tmp_path / "disk.raw",
        size,
        [(100 * MiB, os.urandom(12 * MiB)), (900 * MiB, os.urandom(4 * MiB))],
    )
    done = cli(env, "upload", str(disk), "--sr", local_sr(server.url), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert 16 * MiB <= result["bytes_sent"] < 17 * MiB, result  # not 1 GiB
    assert set(result) == {"vdi", "task", "bytes_sent", "seconds"}
    assert api(f"{server.url}/tasks/{result['task']}")[1]["status"] == "success"
    # Progress lines on stderr, since this is no terminal.
    assert "upload disk.raw:" in done.stderr and "(100%)" in done.stderr, done.stderr
    out = tmp_path / "out.raw"
    got = cli(env, "download", result["vdi"], "-o", str(out), "--json")
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["bytes_received"] == 16 * MiB
    assert out.stat().st_size == size and sha(out) == sha(disk)
    assert out.stat().st_blocks * 512 < 32 * MiB  # holes, not zeros


def test_an_overwrite_zeroes_what_the_file_does_not_hold(server, tmp_path):
    """Uploading a sparse file into a VDI that holds data elsewhere: the VDI ends up with
    the file's bytes, old data included where the file has holes (zeroed)."""
    env = env_for(server, tmp_path)
    size = 64 * MiB
    old = sparse_file(
        tmp_path / "old.raw", size, [(0, os.urandom(8 * MiB)), (40 * MiB, os.urandom(MiB))]
    )
    first = json.loads(cli(env, "upload", str(old), "--sr", local_sr(server.url), "--json").stdout)
    new = sparse_file(tmp_path / "new.raw", size, [(20 * MiB, os.urandom(MiB))])
    done = cli(env, "upload", str(new), "--vdi", first["vdi"], "-q")
    assert done.returncode == 0, done.stderr
    assert sha(export_to(server.url, first["vdi"], tmp_path / "got.raw")) == sha(new)


def test_the_format_comes_from_the_content_not_the_name(server, tmp_path):
    env = env_for(server, tmp_path)
    raw = sparse_file(tmp_path / "src.raw", 32 * MiB, [(MiB, os.urandom(3 * MiB))])
    image = tmp_path / "disk.img"  # a qcow2, named like a raw image
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(image)], check=True)
    _, vdi = api(f"{server.url}/vdis", "POST", {"virtual_size": 32 * MiB})
    refused = cli(env, "upload", str(image), "--vdi", vdi["uuid"], "--format", "raw")
    assert refused.returncode == 1 and "is a QCOW2 image, not raw" in refused.stderr
    done = cli(env, "upload", str(image), "--vdi", vdi["uuid"], "-q", "--json")
    assert done.returncode == 0, done.stderr
    assert sha(export_to(server.url, vdi["uuid"], tmp_path / "got.raw")) == sha(raw)
    vmdk = tmp_path / "disk.bin"
    subprocess.run(["qemu-img", "convert", "-O", "vmdk", str(raw), str(vmdk)], check=True)
    unsupported = cli(env, "upload", str(vmdk), "--vdi", vdi["uuid"])
    assert unsupported.returncode == 1 and "VMDK" in unsupported.stderr
    # And a download in an image format is that format (qemu-img says so).
    out = tmp_path / "back.vhd"
    assert (
        cli(env, "download", vdi["uuid"], "-o", str(out), "--format", "vhd", "-q").returncode == 0
    )
    compared = subprocess.run(
        ["qemu-img", "compare", "-f", "vpc", str(out), str(raw)], capture_output=True
    )
    assert compared.returncode == 0, compared.stdout


@pytest.mark.parametrize("connections", [1, 3])
def test_the_upload_waits_for_a_server_killed_midway(tmp_path, connections):
    """One stream goes on at the durable offset; parts that broke off are sent again."""
    state = tmp_path / "state"
    srv = ServerProcess(state).start()
    try:
        env = env_for(srv, tmp_path)
        disk = big_file(tmp_path / "big.raw")
        client = subprocess.Popen(
            [sys.executable, "-m", "transfer", "upload", str(disk), "--sr", local_sr(srv.url),
             "--json", "--connections", str(connections)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:  # kill once the upload is well under way
            tasks = api(f"{srv.url}/tasks")[1]
            ups = [t for t in tasks if t["name_label"].startswith("upload ")]
            if ups and ups[0]["bytes_transferred"] > 32 * MiB:
                break
            assert time.monotonic() < deadline and client.poll() is None, "no upload seen"
            time.sleep(0.02)
        srv.stop(signal.SIGKILL)
        time.sleep(2)
        srv.start()  # the same state dir and port
        out, err = client.communicate(timeout=300)
        assert client.returncode == 0, err
        assert ("trying again" if connections == 1 else "sending it again") in err
        result = json.loads(out)
        assert sha(export_to(srv.url, result["vdi"], tmp_path / "got.raw")) == sha(disk)
        assert api(f"{srv.url}/tasks/{result['task']}")[1]["status"] == "success"
    finally:
        if srv.proc and srv.proc.poll() is None:
            srv.stop()


def test_ctrl_c_cancels_the_upload_task(server, tmp_path):
    env = env_for(server, tmp_path)
    _, vdi = api(f"{server.url}/vdis", "POST", {"virtual_size": 64 * MiB})
    client = subprocess.Popen(
        [sys.executable, "-m", "transfer", "upload", "-", "--vdi", vdi["uuid"], "--format",
         "raw"],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert client.stdin is not None
    client.stdin.write(os.urandom(8 * MiB))  # and then nothing: a slow producer
    client.stdin.flush()
    row = interrupt_once_sending(server, client, "upload stdin")
    assert row["error_info"][0] == "CANCELLED"


def interrupt_once_sending(server, client: subprocess.Popen, name: str) -> dict:
    """Ctrl-C once the upload's task has bytes; the client exits 130; the task once it
    has ended cancelled."""
    deadline = time.monotonic() + 30
    while True:
        ups = [t for t in api(f"{server.url}/tasks")[1] if t["name_label"] == name]
        if ups and ups[0]["bytes_transferred"] > 0:
            break
        assert time.monotonic() < deadline and client.poll() is None, "the upload did not start"
        time.sleep(0.02)
    client.send_signal(signal.SIGINT)
    _, err = client.communicate(timeout=60)
    assert client.returncode == 130, err
    deadline = time.monotonic() + 10
    while (row := api(f"{server.url}/tasks/{ups[0]['uuid']}")[1])["status"] != "cancelled":
        assert time.monotonic() < deadline, row
        time.sleep(0.1)
    return row


def test_ctrl_c_cancels_an_upload_in_parts(server, tmp_path):
    """Every part stops, the task ends cancelled (not left cancelling, nor pending), and the
    VDI the client made for the upload goes."""
    env = env_for(server, tmp_path)
    disk = big_file(tmp_path / "big.raw")
    before = {v["uuid"] for v in api(f"{server.url}/vdis")[1]}
    client = subprocess.Popen(
        [sys.executable, "-m", "transfer", "upload", str(disk), "--sr", local_sr(server.url),
         "--connections", "3"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    row = interrupt_once_sending(server, client, "upload big.raw")
    assert row["error_info"] == ["CANCELLED"] and row["upload_parts"] == 3
    assert {v["uuid"] for v in api(f"{server.url}/vdis")[1]} == before


def test_remote_records_and_login(server, tmp_path):
    env = env_for(server, tmp_path)
    made = cli(env, "vdi", "create", "--size", "16M", "--name-label", "remote", "--json")
    assert made.returncode == 0, made.stderr
    vdi = json.loads(made.stdout)
    assert vdi["virtual_size"] == 16 * MiB and vdi["name_label"] == "remote"
    snap = json.loads(cli(env, "vdi", "snapshot", vdi["uuid"], "--json").stdout)
    assert snap["is_a_snapshot"] and snap["snapshot_of"] == vdi["uuid"]
    listed = cli(env, "vdi", "list")
    assert listed.returncode == 0 and vdi["uuid"] in listed.stdout and "\t" in listed.stdout
    assert cli(env, "vdi", "delete", snap["uuid"]).returncode == 0
    assert json.loads(cli(env, "sr", "list", "--json").stdout)[0]["type"] == "local"
    task = api(f"{server.url}/tasks", "POST", {"name_label": "watched"})[1]
    shown = json.loads(cli(env, "task", "show", task["uuid"], "--json").stdout)
    assert shown["status"] == "pending"
    cancelled = cli(env, "task", "cancel", task["uuid"], "--json")
    assert json.loads(cancelled.stdout)["status"] == "cancelled"
    assert cli(env, "task", "watch", task["uuid"]).returncode == 1  # it did not succeed
    # login saves a session (0600) that later commands use without a password.
    assert cli(env, "login").returncode == 0
    saved = tmp_path / "config" / "vdi-transfer" / "sessions.json"
    assert saved.stat().st_mode & 0o777 == 0o600
    bare = {k: v for k, v in env.items() if k not in ("VDIT_USER", "VDIT_PASSWORD")}
    assert cli(bare, "vdi", "show", vdi["uuid"]).returncode == 0
    session = next(iter(json.loads(saved.read_text()).values()))
    assert cli(bare, "logout").returncode == 0
    status, _ = api_with_bearer(server.url, session)
    assert status == 401  # revoked on the server, not only forgotten here
    refused = cli(bare, "vdi", "list")
    assert refused.returncode == 1 and "NO_CREDENTIALS" in refused.stderr
    # Without --url, `sr list` is still the offline command on a state dir.
    offline = cli({**bare, "VDIT_URL": ""}, "sr", "list", "--state-dir", str(server.state_dir))
    assert offline.returncode == 0 and "Local storage" in offline.stdout


def api_with_bearer(url: str, session: str):
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"{url}/vdis", headers={"Authorization": f"Bearer {session}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, None
    except urllib.error.HTTPError as err:
        return err.code, None


def test_several_connections_give_the_same_bytes(server, tmp_path):
    env = env_for(server, tmp_path)
    size = 256 * MiB
    chunks = [(i * 24 * MiB + 4096 * i, os.urandom(10 * MiB + 513)) for i in range(10)]
    disk = sparse_file(tmp_path / "disk.raw", size, chunks)
    result = json.loads(cli(env, "upload", str(disk), "--sr", local_sr(server.url), "--json",
                            "--connections", "4").stdout)  # fmt: skip
    # the upload went as four parts at once, under one task
    upload = api(f"{server.url}/tasks/{result['task']}")[1]
    assert upload["upload_parts"] == 4 and upload["upload_parts_done"] == [0, 1, 2, 3]
    assert upload["status"] == "success" and result["bytes_sent"] < 120 * MiB
    out = tmp_path / "four.raw"
    got = cli(env, "download", result["vdi"], "-o", str(out), "--connections", "4", "--json")
    assert got.returncode == 0, got.stderr
    assert sha(out) == sha(disk) and json.loads(got.stdout)["bytes_received"] < size
    vhd = tmp_path / "four.vhd"
    one = tmp_path / "one.vhd"
    assert cli(env, "download", result["vdi"], "-o", str(vhd), "--format", "vhd",
               "--connections", "4", "-q").returncode == 0  # fmt: skip
    assert (
        cli(env, "download", result["vdi"], "-o", str(one), "--format", "vhd", "-q").returncode == 0
    )
    assert sha(vhd) == sha(one)
    tasks = [
        t for t in api(f"{server.url}/tasks")[1] if t["name_label"].startswith("export_raw_vdi")
    ]
    assert len(tasks) > 8  # the ranges went over several requests
    _, options = api_options(server.url, "/export_raw_vdi")
    assert options["max_readers"] >= 4 and "vhd" in options["formats"]
    _, options = api_options(server.url, "/import_raw_vdi")
    assert options["max_writers"] >= 4 and "qcow2" in options["formats"]
    assert "parts" in options["features"]
    # over an existing VDI in parts: where the new file has holes, the old data goes
    other = sparse_file(tmp_path / "other.raw", size, [(50 * MiB, os.urandom(3 * MiB + 1))])
    again = cli(env, "upload", str(other), "--vdi", result["vdi"], "--connections", "3", "-q")
    assert again.returncode == 0, again.stderr
    assert sha(export_to(server.url, result["vdi"], tmp_path / "again.raw")) == sha(other)


def api_options(url: str, path: str):
    import urllib.request

    from tests.rawclient import AUTH_HEADER

    req = urllib.request.Request(
        f"{url}{path}", method="OPTIONS", headers={"Authorization": AUTH_HEADER}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, json.loads(resp.read())


def test_a_raw_download_against_a_base_updates_yesterdays_copy(server, tmp_path):
    """The nightly restore copy: the first night's snapshot whole, then each later one as
    the blocks that changed, written into the same file (zeroed blocks punched)."""
    env = env_for(server, tmp_path)
    size = 64 * MiB
    first = sparse_file(tmp_path / "first.raw", size, [(0, os.urandom(16 * MiB))])
    vdi = json.loads(cli(env, "upload", str(first), "--sr", local_sr(server.url), "--json").stdout)[
        "vdi"
    ]
    api(f"{server.url}/vdis/{vdi}", "PATCH", {"cbt_enabled": True})
    old = api(f"{server.url}/vdis/{vdi}/snapshot", "POST", {})[1]["uuid"]
    second = sparse_file(
        tmp_path / "second.raw", size, [(4 * MiB, os.urandom(MiB)), (40 * MiB, os.urandom(MiB))]
    )
    assert cli(env, "upload", str(second), "--vdi", vdi, "-q").returncode == 0  # zeroes the rest
    new = api(f"{server.url}/vdis/{vdi}/snapshot", "POST", {})[1]["uuid"]
    copy = tmp_path / "copy.raw"
    assert cli(env, "download", old, "-o", str(copy), "-q").returncode == 0
    assert sha(copy) == sha(first)
    missing = cli(env, "download", new, "--base", old, "-o", str(tmp_path / "nothing.raw"))
    assert missing.returncode == 1 and "older version" in missing.stderr
    delta = cli(env, "download", new, "--base", old, "-o", str(copy), "--json")
    assert delta.returncode == 0, delta.stderr
    assert json.loads(delta.stdout)["bytes_received"] <= 2 * MiB
    assert sha(copy) == sha(second)
