"""`make bench`, chains part (medians of eleven runs):

- snapshot of a 100 GiB VHD / QCOW2 VDI holding 256 MiB of data, over HTTP (target: < 50 ms);
- export of 64 MiB of changes on that 100 GiB disk (base= the previous snapshot: the VDI is
  then three layers deep, as after one night of a backup loop) vs the export of a 64 MiB VDI
  holding the same 64 MiB (target: at most 1.5x). Every further layer of a chain costs the
  time to open it (~3 ms for a 100 GiB VHD, whose BAT is checked on open);
- the same export against the base after its data was destroyed (changed block tracking
  lists the blocks; target: at most 1.5x the 64 MiB export too);
- coalescing, timed from the DELETE of a snapshot until its layer is merged away (the merge
  starts within 2 s: the coalescer looks every 2 s): 1 MiB copied into a 1 GiB layer in
  place, and a 1 MiB layer merged with a 1 GiB one into a new file.
"""

from __future__ import annotations

import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.conftest import ADMIN_PASSWORD, ServerProcess
from tests.rawclient import api

GiB, MiB = 1 << 30, 1 << 20
RUNS = 11
AUTH = f"admin:{ADMIN_PASSWORD}"


def curl(*args: str) -> list[str]:
    return ["curl", "-sS", "-f", "-u", AUTH, *args]


def frames(path: Path, pieces: list[tuple[int, bytes]]) -> Path:
    with open(path, "wb") as f:
        for offset, data in pieces:
            f.write(struct.pack("<QI", offset, len(data)))
            f.write(data)
        f.write(bytes(12))
    return path


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def coalesce_1gib(
    srv: ServerProcess, work: Path, fmt: str, big_below: bool
) -> tuple[str, float, str]:
    """1 GiB of data in one of two stacked snapshot layers, the lower one's snapshot
    deleted: the time from the DELETE until its layer is merged away (the chain one layer
    shorter). `big_below`: the 1 GiB is in the deleted layer and 1 MiB over it is copied
    into it, in place; else the deleted layer holds 1 MiB under the 1 GiB, and both go into
    a new file."""
    _, vdi = api(f"{srv.url}/vdis", "POST", {"virtual_size": 2 * GiB, "image_format": fmt})
    url = f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}&chunked=1"
    big = [(i * 64 * MiB, os.urandom(64 * MiB)) for i in range(16)]
    small = [(0, os.urandom(MiB))]
    first, second = (big, small) if big_below else (small, big)
    subprocess.run(curl("-T", str(frames(work / "f", first)), "-o", os.devnull, url), check=True)
    _, old = api(f"{srv.url}/vdis/{vdi['uuid']}/snapshot", "POST")
    subprocess.run(curl("-T", str(frames(work / "f", second)), "-o", os.devnull, url), check=True)
    api(f"{srv.url}/vdis/{vdi['uuid']}/snapshot", "POST")
    depth = len(api(f"{srv.url}/vdis/{vdi['uuid']}")[1]["backing_chain"])
    t0 = time.perf_counter()
    assert api(f"{srv.url}/vdis/{old['uuid']}", "DELETE")[0] == 204
    while len(api(f"{srv.url}/vdis/{vdi['uuid']}")[1]["backing_chain"]) >= depth:
        time.sleep(0.01)
    seconds = time.perf_counter() - t0
    how = "1 MiB into a 1 GiB layer" if big_below else "1 GiB layer + 1 MiB, new file"
    return (f"coalesce {fmt}: {how}", seconds, "from DELETE (polls every 2 s)")


def main() -> int:
    rows, ok = [], True
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", ".")) as tmp:
        work = Path(tmp)
        srv = ServerProcess(work / "state").start()
        try:
            for fmt in ("vhd", "qcow2"):
                status, vdi = api(
                    f"{srv.url}/vdis", "POST", {"virtual_size": 100 * GiB, "image_format": fmt}
                )
                assert status == 201, vdi
                # Tracked from the start, so the base's data can be destroyed below.
                api(f"{srv.url}/vdis/{vdi['uuid']}", "PATCH", {"cbt_enabled": True})
                url = f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}&chunked=1"
                base = [(i * 400 * MiB, os.urandom(4 * MiB)) for i in range(64)]
                subprocess.run(
                    curl("-T", str(frames(work / "f", base)), "-o", os.devnull, url), check=True
                )
                status, first = api(f"{srv.url}/vdis/{vdi['uuid']}/snapshot", "POST")
                base_snap = first["uuid"]
                # 32 changes of 2 MiB on block boundaries: the same blocks as the packed disk.
                changes = [(i * 3200 * MiB + 8 * MiB, os.urandom(2 * MiB)) for i in range(32)]
                subprocess.run(
                    curl("-T", str(frames(work / "f", changes)), "-o", os.devnull, url), check=True
                )
                status, after = api(f"{srv.url}/vdis/{vdi['uuid']}/snapshot", "POST")
                delta = statistics.median(
                    timed(
                        curl(
                            "-o",
                            os.devnull,
                            f"{srv.url}/export_raw_vdi?vdi={after['uuid']}"
                            f"&base={base_snap}&format={fmt}",
                        )
                    )
                    for _ in range(RUNS)
                )
                # The same export against the base with its data destroyed (only its change
                # log is left): the blocks changed block tracking lists.
                status, _ = api(f"{srv.url}/vdis/{base_snap}/data_destroy", "POST")
                assert status == 200
                # Its layer is then merged away in the background: measure after that.
                depth = len(api(f"{srv.url}/vdis/{after['uuid']}")[1]["backing_chain"])
                deadline = time.monotonic() + 60
                while (
                    len(api(f"{srv.url}/vdis/{after['uuid']}")[1]["backing_chain"]) >= depth
                    and time.monotonic() < deadline
                ):
                    time.sleep(0.05)
                delta_cbt = statistics.median(
                    timed(
                        curl(
                            "-o",
                            os.devnull,
                            f"{srv.url}/export_raw_vdi?vdi={after['uuid']}"
                            f"&base={base_snap}&format={fmt}",
                        )
                    )
                    for _ in range(RUNS)
                )
                status, alone = api(
                    f"{srv.url}/vdis", "POST", {"virtual_size": 64 * MiB, "image_format": fmt}
                )
                packed = [(i * 2 * MiB, data) for i, (_, data) in enumerate(changes)]
                subprocess.run(
                    curl(
                        "-T",
                        str(frames(work / "f", packed)),
                        "-o",
                        os.devnull,
                        f"{srv.url}/import_raw_vdi?vdi={alone['uuid']}&chunked=1",
                    ),
                    check=True,
                )
                single = statistics.median(
                    timed(
                        curl(
                            "-o",
                            os.devnull,
                            f"{srv.url}/export_raw_vdi?vdi={alone['uuid']}&format={fmt}",
                        )
                    )
                    for _ in range(RUNS)
                )
                snaps = []  # after the delta, so the exported chain is what one night adds
                for _ in range(RUNS):
                    t0 = time.perf_counter()
                    status, snap = api(f"{srv.url}/vdis/{vdi['uuid']}/snapshot", "POST")
                    snaps.append(time.perf_counter() - t0)
                    assert status == 201, snap
                snapshot = statistics.median(snaps)
                rows += [
                    (f"snapshot of a 100 GiB {fmt} VDI (HTTP)", snapshot, "target < 0.050 s"),
                    (f"export {fmt} of 64 MiB alone", single, ""),
                    (
                        f"export {fmt} base=, 64 MiB changed of 100 GiB",
                        delta,
                        f"{delta / single:.2f}x (target <= 1.5x)",
                    ),
                    (
                        f"export {fmt} base=data-destroyed, 64 MiB of 100 GiB",
                        delta_cbt,
                        f"{delta_cbt / single:.2f}x (target <= 1.5x)",
                    ),
                ]
                ok = ok and snapshot < 0.05 and max(delta, delta_cbt) <= 1.5 * single
            for fmt in ("vhd", "qcow2"):
                for big_below in (True, False):
                    rows.append(coalesce_1gib(srv, work, fmt, big_below))
        finally:
            srv.stop()
    print(f"{'measurement':50} {'seconds':>8}  ratio")
    for name, seconds, ratio in rows:
        print(f"{name:50} {seconds:8.3f}  {ratio}")
    print("all targets met" if ok else "SOME TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
