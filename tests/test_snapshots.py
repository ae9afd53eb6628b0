"""Snapshots, clones and deletion with dependents (contract: Records; issue: chains)."""

from __future__ import annotations

import os

import pytest

from tests.rawclient import api, create_vdi, curl_upload, export_to

MiB = 1 << 20


@pytest.fixture
def srv(shared_server):
    return shared_server


def vdi_file(srv, vdi: dict):
    return srv.state_dir / "srs" / vdi["sr"] / f"{vdi['uuid']}.{vdi['image_format']}"


def upload(srv, vdi, data: bytes, tmp_path, *, query: str = ""):
    path = tmp_path / "data"
    path.write_bytes(data)
    status, body, _err = curl_upload(
        f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}{query}", "-T", str(path)
    )
    return status, body


def download(srv, vdi, tmp_path) -> bytes:

    out = tmp_path / "out"
    export_to(srv.url, vdi["uuid"], out)
    return out.read_bytes()


def test_raw_snapshot_is_a_frozen_copy(srv, tmp_path):
    vdi = create_vdi(srv.url, 4 * MiB)
    first = os.urandom(2 * MiB)
    assert upload(srv, vdi, first, tmp_path)[0] == 200
    status, snap = api(f"{srv.url}/vdis/{vdi['uuid']}/snapshot", "POST", {"name_label": "s1"})
    assert status == 201, snap
    assert snap["is_a_snapshot"] and snap["read_only"] and snap["snapshot_of"] == vdi["uuid"]
    assert snap["name_label"] == "s1" and snap["virtual_size"] == 4 * MiB
    assert snap["backing_chain"] == [{"uuid": snap["uuid"], "image_format": "raw"}]
    # Holes stayed holes in the copy.
    assert os.stat(vdi_file(srv, snap)).st_blocks * 512 <= 2 * MiB + 65536
    second = os.urandom(MiB)
    assert upload(srv, vdi, second, tmp_path)[0] == 200
    assert download(srv, snap, tmp_path)[: 2 * MiB] == first
    assert download(srv, vdi, tmp_path)[:MiB] == second
    # Snapshots are read-only.
    status, body = upload(srv, snap, second, tmp_path)
    assert status == 409 and body["error"] == "VDI_READ_ONLY"
    # A clone of the snapshot is writable and starts from its content.
    status, clone = api(f"{srv.url}/vdis/{snap['uuid']}/clone", "POST")
    assert status == 201 and not clone["read_only"] and not clone["is_a_snapshot"]
    assert download(srv, clone, tmp_path)[: 2 * MiB] == first
    assert upload(srv, clone, second, tmp_path)[0] == 200
    assert download(srv, snap, tmp_path)[: 2 * MiB] == first
    for v in (clone, snap, vdi):
        assert api(f"{srv.url}/vdis/{v['uuid']}", "DELETE")[0] == 204
        assert not vdi_file(srv, v).exists()


def test_snapshot_of_missing_vdi(srv):
    status, body = api(f"{srv.url}/vdis/nope/snapshot", "POST")
    assert status == 404 and body["error"] == "VDI_NOT_FOUND"


def test_cli_sr_list_and_vdi_verify(srv, tmp_path):
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "transfer", *args, "--state-dir", str(srv.state_dir)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    listed = cli("sr", "list")
    assert listed.returncode == 0, listed.stderr
    assert "Local storage\tlocal\tFalse\traw,vhd,qcow2\traw" in listed.stdout
    vdi = create_vdi(srv.url, 4 * MiB)
    ok = cli("vdi", "verify", vdi["uuid"])
    assert ok.returncode == 0 and "files and records agree" in ok.stdout, ok.stdout + ok.stderr
    os.truncate(vdi_file(srv, vdi), 3 * MiB)  # damage the file behind the record's back
    bad = cli("vdi", "verify", vdi["ref"])
    assert bad.returncode == 1
    assert f"the file holds {3 * MiB} bytes, the record says {4 * MiB}" in bad.stdout
    os.remove(vdi_file(srv, vdi))
    assert "the file is missing" in cli("vdi", "verify", vdi["uuid"]).stdout
    missing = cli("vdi", "verify", "nope")
    assert missing.returncode == 1 and "VDI_NOT_FOUND" in missing.stderr


@pytest.mark.parametrize("fmt", ["vhd", "qcow2"])
def test_image_snapshot_chain_and_verify(srv, tmp_path, fmt):
    """A VHD/QCOW2 VDI's snapshot is O(1): a new child layer; reads resolve through the
    chain, and verify finds the files and records in agreement."""
    pytest.importorskip(f"formats.{fmt}_image")
    import subprocess
    import sys

    status, vdi = api(f"{srv.url}/vdis", "POST", {"virtual_size": 8 * MiB, "image_format": fmt})
    assert status == 201, vdi
    first = os.urandom(3 * MiB)
    assert upload(srv, vdi, first, tmp_path)[0] == 200
    status, snap = api(f"{srv.url}/vdis/{vdi['uuid']}/snapshot", "POST")
    assert status == 201
    _, now = api(f"{srv.url}/vdis/{vdi['uuid']}")
    assert [layer["uuid"] for layer in now["backing_chain"]] == [vdi["uuid"], snap["uuid"]]
    assert now["parent"] == snap["uuid"] and now["physical_utilisation"] < MiB
    second = os.urandom(MiB)
    assert upload(srv, vdi, second, tmp_path)[0] == 200
    assert download(srv, vdi, tmp_path)[: 3 * MiB] == second + first[MiB:]
    assert download(srv, snap, tmp_path)[: 3 * MiB] == first
    verified = subprocess.run(
        [
            sys.executable,
            "-m",
            "transfer",
            "vdi",
            "verify",
            vdi["uuid"],
            "--state-dir",
            str(srv.state_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    # Deleting the snapshot keeps its file: the VDI still reads through it.
    assert api(f"{srv.url}/vdis/{snap['uuid']}", "DELETE")[0] == 204
    assert api(f"{srv.url}/vdis/{snap['uuid']}")[0] == 404
    assert download(srv, vdi, tmp_path)[: 3 * MiB] == second + first[MiB:]
    assert api(f"{srv.url}/vdis/{vdi['uuid']}", "DELETE")[0] == 204
    leftovers = list((srv.state_dir / "srs" / vdi["sr"]).glob(f"*.{fmt}"))
    assert leftovers == []


def test_a_lock_left_by_a_snapshot_cut_short_is_released_at_start(tmp_path):
    """SIGKILL between a snapshot's lock and unlock left the VDI locked for ever (every
    write: VDI_IN_USE). The lock names its host: the host's next start releases it, and
    leaves another host's alone."""
    import signal
    import sqlite3

    from tests.conftest import ServerProcess

    state = tmp_path / "state"
    srv = ServerProcess(state).start()
    try:
        _, one = api(f"{srv.url}/vdis", "POST", {"virtual_size": MiB})
        _, two = api(f"{srv.url}/vdis", "POST", {"virtual_size": MiB})
        srv.stop(signal.SIGKILL)
        host = (state / "host-uuid").read_text().strip()
        with sqlite3.connect(state / "state.db") as db:
            for lock, vdi in ((f"snapshot-{host}-x", one), ("snapshot-other-y", two)):
                db.execute("UPDATE vdis SET locked_by = ? WHERE uuid = ?", (lock, vdi["uuid"]))
        srv.start()
        assert api(f"{srv.url}/vdis/{one['uuid']}/snapshot", "POST", {})[0] == 201
        status, body = api(f"{srv.url}/vdis/{two['uuid']}/snapshot", "POST", {})
        assert status == 409 and body["error"] == "VDI_IN_USE"
        assert "vdi.locks_released" in srv.log_path.read_text()
    finally:
        if srv.proc and srv.proc.poll() is None:
            srv.stop()
