"""`make bench`: raw transfer speed against the machine's own floor, as ratios from one run.

- upload: curl -T of a 1 GiB random file vs `dd bs=8M conv=fsync` of the same file
  (target: at most 1.5x), and the server's CPU seconds per GiB;
- download: curl of the same VDI (in page cache) vs `cat file >/dev/null` (target: 5x);
- sparse: chunk-framed export of a 64 GiB VDI holding 64 MiB of data (target: under 1 s).

Each timing is the median of three runs. Absolute times drift between runs on a shared
machine; compare the ratios.
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
from tests.rawclient import create_vdi

GiB = 1 << 30
MiB = 1 << 20
RUNS = 3
AUTH = f"admin:{ADMIN_PASSWORD}"


def timed(cmd: list[str], **kwargs) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, **kwargs)
    return time.perf_counter() - t0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def main() -> int:
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", ".")) as tmp:
        work = Path(tmp)
        src = work / "random.raw"
        with open(src, "wb") as f:
            for _ in range(GiB // (64 * MiB)):
                f.write(os.urandom(64 * MiB))
        copy = work / "copy.raw"
        dd = []
        for _ in range(RUNS):
            dd.append(
                timed(["dd", f"if={src}", f"of={copy}", "bs=8M", "conv=fsync", "status=none"])
            )
            copy.unlink()

        srv = ServerProcess(work / "state").start()
        try:
            vdi = create_vdi(srv.url, GiB)
            url = f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}"
            up, cpu = [], []
            for _ in range(RUNS):
                c0 = cpu_seconds(srv.proc.pid)
                up.append(
                    timed(["curl", "-sS", "-f", "-u", AUTH, "-T", str(src), "-o", os.devnull, url])
                )
                cpu.append(cpu_seconds(srv.proc.pid) - c0)

            cat, down, down_cpu = [], [], []
            export = f"{srv.url}/export_raw_vdi?vdi={vdi['uuid']}"
            for _ in range(RUNS):
                cat.append(timed(["cat", str(src)], stdout=subprocess.DEVNULL))
                c0 = cpu_seconds(srv.proc.pid)
                down.append(timed(["curl", "-sS", "-f", "-u", AUTH, "-o", os.devnull, export]))
                down_cpu.append(cpu_seconds(srv.proc.pid) - c0)

            big = create_vdi(srv.url, 64 * GiB)
            frames = work / "frames.bin"
            with open(frames, "wb") as f:
                for i in range(64):  # 64 x 1 MiB, one per GiB
                    f.write(struct.pack("<QI", i * GiB + 12345 * 512, MiB))
                    f.write(os.urandom(MiB))
                f.write(bytes(12))
            subprocess.run(
                [
                    "curl",
                    "-sS",
                    "-f",
                    "-u",
                    AUTH,
                    "-T",
                    str(frames),
                    "-o",
                    os.devnull,
                    f"{srv.url}/import_raw_vdi?vdi={big['uuid']}&chunked=true",
                ],
                check=True,
            )
            sparse = []
            for _ in range(RUNS):
                sparse.append(
                    timed(
                        [
                            "curl",
                            "-sS",
                            "-f",
                            "-u",
                            AUTH,
                            "-o",
                            os.devnull,
                            f"{srv.url}/export_raw_vdi?vdi={big['uuid']}&chunked=true",
                        ]
                    )
                )
        finally:
            srv.stop()

    rows = [
        ("dd bs=8M conv=fsync, 1 GiB", median(dd), ""),
        ("curl upload, 1 GiB", median(up), f"{median(up) / median(dd):.2f}x dd (target <= 1.5x)"),
        ("  server CPU per GiB uploaded", median(cpu), ""),
        ("cat 1 GiB (page cache)", median(cat), ""),
        (
            "curl download, 1 GiB",
            median(down),
            f"{median(down) / median(cat):.2f}x cat (target <= 5x)",
        ),
        ("  server CPU per GiB downloaded", median(down_cpu), ""),
        ("chunked export, 64 GiB VDI / 64 MiB data", median(sparse), "target < 1 s"),
    ]
    print(f"{'measurement':45} {'seconds':>8}  ratio")
    for name, seconds, ratio in rows:
        print(f"{name:45} {seconds:8.3f}  {ratio}")
    ok = median(up) <= 1.5 * median(dd) and median(down) <= 5 * median(cat) and median(sparse) < 1.0
    print("all targets met" if ok else "SOME TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
