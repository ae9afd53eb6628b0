"""Coalescing, against real server processes: layers no VDI needs are merged away in the
background, so the nightly CBT loop keeps chains short and space bounded; and a SIGKILL at
any moment of the merges leaves every VDI reading the same bytes, passing `vdi verify` (and
`qemu-img check` for QCOW2 files)."""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ServerProcess
from tests.rawclient import api, curl_upload, export_to, frame

MiB = 1 << 20
BLOCK = 64 << 10


def write(url: str, vdi: str, tmp: Path, frames: list[tuple[int, bytes]]) -> None:
    body = tmp / "frames.bin"
    body.write_bytes(b"".join(frame(o, d) for o, d in frames) + bytes(12))
    status, _, err = curl_upload(f"{url}/import_raw_vdi?vdi={vdi}&chunked=true", "-T", str(body))
    assert status == 200, err


def chain_of(url: str, vdi: str) -> list[dict]:
    status, record = api(f"{url}/vdis/{vdi}")
    assert status == 200, record
    return record["backing_chain"]


def settle(url: str, vdi: str, depth: int, timeout: float = 20) -> list[dict]:
    """Wait for the background merges to bring the VDI's chain to `depth` layers."""
    deadline = time.monotonic() + timeout
    while (chain := chain_of(url, vdi)) and len(chain) > depth:
        assert time.monotonic() < deadline, f"chain still {len(chain)} deep: {chain}"
        time.sleep(0.2)
    return chain


def verify(state_dir: Path, vdi: str) -> None:
    checked = subprocess.run(
        [sys.executable, "-m", "transfer", "vdi", "verify", vdi, "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def merging(url: str, timeout: float = 10) -> bool:
    """Wait for a merge to run (its task pending); False if none comes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, tasks = api(f"{url}/tasks")
        if any(t["name_label"].startswith("coalesce ") and t["status"] == "pending" for t in tasks):
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("fmt", ["vhd", "qcow2"])
def test_the_nightly_loop_keeps_chains_short_and_space_bounded(server, tmp_path, fmt):
    url, size = server.url, 32 * MiB
    rng = random.Random(fmt)
    _, vdi = api(f"{url}/vdis", "POST", {"virtual_size": size, "image_format": fmt})
    v = vdi["uuid"]
    api(f"{url}/vdis/{v}", "PATCH", {"cbt_enabled": True})
    disk = bytearray(size)
    first = [(0, os.urandom(8 * MiB))]
    write(url, v, tmp_path, first)
    disk[: 8 * MiB] = first[0][1]
    prev = api(f"{url}/vdis/{v}/snapshot", "POST", {})[1]["uuid"]
    api(f"{url}/vdis/{prev}/data_destroy", "POST", {})
    for night in range(8):
        # Each night rewrites the same 2 MiB, and a little elsewhere.
        frames = [(2 * MiB, os.urandom(2 * MiB)), (rng.randrange(size - BLOCK), os.urandom(512))]
        write(url, v, tmp_path, frames)
        for offset, data in frames:
            disk[offset : offset + len(data)] = data
        snap = api(f"{url}/vdis/{v}/snapshot", "POST", {})[1]["uuid"]
        assert export_to(url, snap, tmp_path / "d", f"&format={fmt}&base={prev}").stat().st_size
        api(f"{url}/vdis/{snap}/data_destroy", "POST", {})
        assert api(f"{url}/vdis/{prev}", "DELETE")[0] == 204
        prev = snap
        # No live snapshot: the VDI's layer over the cbt_metadata snapshot's at most (which
        # is merged into the VDI's own when no write comes first).
        assert len(settle(url, v, 2)) <= 2, f"night {night}"
        now = export_to(url, v, tmp_path / "now.raw").read_bytes()
        assert hashlib.sha256(now).digest() == hashlib.sha256(disk).digest(), f"night {night}"
    sr = api(f"{url}/srs")[1][0]
    # 8 MiB written, then 8 nights of 2 MiB: without merges they pile up (24+ MiB).
    assert sr["physical_utilisation"] <= 16 * MiB, sr
    verify(server.state_dir, v)
    _, tasks = api(f"{url}/tasks")
    merges = [t for t in tasks if t["name_label"].startswith("coalesce ")]
    # A merge into the live VDI gives way to the next night's write (cancelled), and runs
    # again after it.
    assert merges and all(t["status"] in ("success", "cancelled") for t in merges), merges
    assert any(t["status"] == "success" for t in merges)


@pytest.mark.parametrize("fmt", ["vhd", "qcow2"])
def test_sigkill_during_merges_changes_no_byte(tmp_path, fmt):
    """Big layers, so merges take a while; the server is killed at random moments of them
    (four times), and restarted; then every VDI reads as before, and files agree."""
    state = tmp_path / "state"
    server = ServerProcess(state).start()
    url = server.url
    size = 192 * MiB
    try:
        _, vdi = api(f"{url}/vdis", "POST", {"virtual_size": size, "image_format": fmt})
        v = vdi["uuid"]
        snaps = []
        for i in range(4):
            write(url, v, tmp_path, [(i * 16 * MiB, os.urandom(48 * MiB))])
            snaps.append(api(f"{url}/vdis/{v}/snapshot", "POST", {})[1]["uuid"])
        keep = [v, snaps[-1]]
        before = {u: hashlib.sha256(export_to(url, u, tmp_path / "x").read_bytes()).digest()
                  for u in keep}  # fmt: skip
        for snap in snaps[:-1]:  # three layers nobody needs: merged from the bottom up
            assert api(f"{url}/vdis/{snap}", "DELETE")[0] == 204
        rng = random.Random(fmt)
        kills = 0
        for _ in range(4):  # kill while a merge runs: at a random moment of it
            if not merging(url):
                break
            time.sleep(rng.uniform(0.0, 0.3))
            server.stop(signal.SIGKILL)
            kills += 1
            server = ServerProcess(state)
            server.port, server.url = int(url.rsplit(":", 1)[1]), url
            server.start()
        assert kills, "no merge ran: nothing was tested"
        settle(url, v, 2, timeout=60)  # the VDI over its snapshot, which holds all below
        for u in keep:
            after = hashlib.sha256(export_to(url, u, tmp_path / "x").read_bytes()).digest()
            assert after == before[u], u
        server.stop()
        for u in keep:
            verify(state, u)
        images = list(state.rglob(f"*.{fmt}"))
        assert not list(state.rglob("*.merge"))
        if fmt == "qcow2":
            for image in images:
                subprocess.run(
                    ["qemu-img", "check", "-U", str(image)], check=True, capture_output=True
                )
    finally:
        if server.proc and server.proc.poll() is None:
            server.stop()


@pytest.mark.parametrize("fmt", ["vhd", "qcow2"])
def test_a_small_layer_under_a_big_one(server, tmp_path, fmt):
    """The layer is smaller than its child: both go into a new file that replaces the
    child's (the other way of merging); the VDI and the snapshot read as before."""
    url = server.url
    _, vdi = api(f"{url}/vdis", "POST", {"virtual_size": 64 * MiB, "image_format": fmt})
    v = vdi["uuid"]
    write(url, v, tmp_path, [(0, os.urandom(MiB))])
    small = api(f"{url}/vdis/{v}/snapshot", "POST", {})[1]["uuid"]
    write(url, v, tmp_path, [(8 * MiB, os.urandom(24 * MiB))])
    big = api(f"{url}/vdis/{v}/snapshot", "POST", {})[1]["uuid"]
    before = {u: export_to(url, u, tmp_path / f"{u}.raw").read_bytes() for u in (v, big)}
    assert api(f"{url}/vdis/{small}", "DELETE")[0] == 204
    assert len(settle(url, v, 2)) == 2
    for u, data in before.items():
        assert export_to(url, u, tmp_path / "after.raw").read_bytes() == data, u
    server.stop()
    for u in before:
        verify(server.state_dir, u)
    assert "in_place=false" in server.logs()


def qemu_check(state: Path, fmt: str) -> None:
    if fmt == "qcow2":
        for image in state.rglob("*.qcow2"):
            subprocess.run(["qemu-img", "check", "-U", str(image)], check=True, capture_output=True)


@pytest.mark.parametrize("fmt", ["vhd", "qcow2"])
def test_a_clone_base_merges_into_the_live_vdi(server, tmp_path, fmt):
    """A clone's hidden base whose other child is deleted is merged with the live VDI: one
    layer left, the same bytes, and the space the VDI's writes hid comes back."""
    url, size = server.url, 64 * MiB
    _, vdi = api(f"{url}/vdis", "POST", {"virtual_size": size, "image_format": fmt})
    v = vdi["uuid"]
    write(url, v, tmp_path, [(0, os.urandom(16 * MiB))])
    clone = api(f"{url}/vdis/{v}/clone", "POST", {})[1]["uuid"]
    assert len(chain_of(url, v)) == 2
    write(url, v, tmp_path, [(0, os.urandom(12 * MiB)), (40 * MiB, os.urandom(MiB))])
    before = export_to(url, v, tmp_path / "before.raw").read_bytes()
    assert api(f"{url}/vdis/{clone}", "DELETE")[0] == 204
    chain = settle(url, v, 1)
    assert [layer["uuid"] for layer in chain] == [v]
    assert export_to(url, v, tmp_path / "after.raw").read_bytes() == before
    _, record = api(f"{url}/vdis/{v}")
    assert record["parent"] in (None, ""), record
    deadline = time.monotonic() + 60  # the old files go after a grace period
    while (sr := api(f"{url}/srs")[1][0])["physical_utilisation"] > 18 * MiB:
        assert time.monotonic() < deadline, sr
        time.sleep(0.5)
    # And the VDI goes on: written, snapshotted, exported.
    write(url, v, tmp_path, [(MiB, b"after the merge")])
    snap = api(f"{url}/vdis/{v}/snapshot", "POST", {})[1]["uuid"]
    got = export_to(url, snap, tmp_path / "snap.raw").read_bytes()
    assert got[MiB : MiB + 15] == b"after the merge" and got[2 * MiB :] == before[2 * MiB :]
    server.stop()
    verify(server.state_dir, v)
    qemu_check(server.state_dir, fmt)


@pytest.fixture
def slow_merges(tmp_path):
    """A server whose merges copy 64 MiB/s (coalesce_rate): a 256 MiB merge takes 4 s, so a
    write is sure to come in the middle of one."""
    srv = ServerProcess(tmp_path / "state", env={"VDIT_COALESCE_RATE": "64M"}).start()
    yield srv
    if srv.proc and srv.proc.poll() is None:
        srv.stop()


@pytest.mark.parametrize("fmt", ["vhd", "qcow2"])
def test_a_write_stops_a_merge_into_the_live_vdi(slow_merges, tmp_path, fmt):
    """A merge into the live VDI holds it, but gives way: an import that comes meanwhile
    succeeds at once (the merge ends cancelled, and runs again later), and an export reads
    through it. The bytes are the import's over what was there."""
    server = slow_merges
    url, size = server.url, 512 * MiB
    _, vdi = api(f"{url}/vdis", "POST", {"virtual_size": size, "image_format": fmt})
    v = vdi["uuid"]
    base = os.urandom(MiB) * 256
    write(url, v, tmp_path, [(0, base)])
    snap = api(f"{url}/vdis/{v}/snapshot", "POST", {})[1]["uuid"]
    top = os.urandom(MiB) * 256
    write(url, v, tmp_path, [(192 * MiB, top)])
    disk = bytearray(size)
    disk[: len(base)] = base
    disk[192 * MiB : 192 * MiB + len(top)] = top
    assert api(f"{url}/vdis/{snap}", "DELETE")[0] == 204  # hidden: the VDI reads it
    assert merging(url), "no merge into the live VDI started"
    started = time.monotonic()
    write(url, v, tmp_path, [(4 * MiB, b"written during the merge")])
    disk[4 * MiB : 4 * MiB + 24] = b"written during the merge"
    assert time.monotonic() - started < 10
    # It runs again once the VDI is idle: seen running, or (on a busy machine) already over.
    assert merging(url, timeout=30) or any(
        t["name_label"].startswith("coalesce ") and t["status"] == "success"
        for t in api(f"{url}/tasks")[1]
    ), "the merge did not start again"
    exported = export_to(url, v, tmp_path / "during.raw").read_bytes()
    assert hashlib.sha256(exported).digest() == hashlib.sha256(disk).digest()
    settle(url, v, 1, timeout=120)
    after = export_to(url, v, tmp_path / "after.raw").read_bytes()
    assert hashlib.sha256(after).digest() == hashlib.sha256(disk).digest()
    _, tasks = api(f"{url}/tasks")
    merges = [t["status"] for t in tasks if t["name_label"].startswith("coalesce ")]
    assert merges.count("success") == 1 and set(merges) == {"success", "cancelled"}, merges
    server.stop()
    assert "vdi.coalesce_gave_way" in server.logs()
    # the merge that ran to its end kept to coalesce_rate: 64 MiB/s
    done = [ln for ln in server.logs().splitlines() if "event=vdi.coalesced" in ln]
    copied, took = (
        float(re.search(rf"{k}=([0-9.]+)", done[-1]).group(1)) for k in ("bytes", "duration")
    )
    assert copied / took <= 64 * MiB * 1.1, done[-1]
    verify(server.state_dir, v)
    qemu_check(server.state_dir, fmt)
