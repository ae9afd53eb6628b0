"""`make bench`, conversion part: ratios against qemu-img from one run (medians of three).

- import of a qcow2 (1 GiB, 50% data) with curl vs `qemu-img convert -O raw`, file to file
  (target: at most 1.5x). Our import is durable (fsync) before it answers, so qemu-img runs
  with `-t writeback`, which flushes at the end; its default (`unsafe`) does not;
- export as VHD of the same disk vs `qemu-img convert -O vpc`, file to file (target: 1.5x).
  qemu-img leaves zeros as holes in its output; so does our sink (`cp --sparse=always`, then
  `sync -d`), so both sides write, and flush, the same bytes. `curl -o` (every zero written) and
  `/dev/null` (the server's own cost) are printed beside it;
- export of a huge VDI (2040 GiB for VHD, 2 TiB for QCOW2) holding 1 GiB of data vs a 1 GiB
  VDI holding the same 1 GiB (target: about the same). The data is 512 islands of 2 MiB on
  block boundaries, so both outputs carry the same blocks.
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
from tests.rawclient import api, create_vdi

GiB, MiB = 1 << 30, 1 << 20
RUNS = 3
AUTH = f"admin:{ADMIN_PASSWORD}"


def timed(cmd: list[str]) -> float:
    """Seconds `cmd` takes, starting from a flushed page cache: writeback left over from an
    earlier run must not be charged to this one."""
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def median_of(make_cmd) -> float:
    return statistics.median(timed(make_cmd(i)) for i in range(RUNS))


def curl(*args: str) -> list[str]:
    return ["curl", "-sS", "-f", "-u", AUTH, *args]


def upload(url: str, path: Path) -> None:
    subprocess.run(curl("-T", str(path), "-o", os.devnull, url), check=True)


def main() -> int:
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", ".")) as tmp:
        work = Path(tmp)
        ref = work / "half.raw"
        with open(ref, "wb") as f:  # 1 GiB, every other MiB random
            for i in range(GiB // MiB):
                f.write(os.urandom(MiB) if i % 2 == 0 else bytes(MiB))
        qcow2 = work / "half.qcow2"
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(ref), str(qcow2)], check=True
        )
        q_import = median_of(
            lambda i: [
                "qemu-img",
                "convert",
                "-t",
                "writeback",
                "-f",
                "qcow2",
                "-O",
                "raw",
                str(qcow2),
                str(work / f"q{i}.raw"),
            ]
        )
        q_export = median_of(
            lambda i: [
                "qemu-img",
                "convert",
                "-t",
                "writeback",
                "-f",
                "raw",
                "-O",
                "vpc",
                "-o",
                "subformat=dynamic,force_size=on",
                str(ref),
                str(work / f"q{i}.vhd"),
            ]
        )

        srv = ServerProcess(work / "state").start()
        try:
            sr = api(f"{srv.url}/srs")[1][0]["uuid"]
            our_import = median_of(
                lambda i: curl(
                    "-T",
                    str(qcow2),
                    "-o",
                    os.devnull,
                    f"{srv.url}/import_raw_vdi?sr={sr}&format=qcow2",
                )
            )
            vdi = create_vdi(srv.url, GiB)
            upload(f"{srv.url}/import_raw_vdi?vdi={vdi['uuid']}", ref)
            url = f"{srv.url}/export_raw_vdi?vdi={vdi['uuid']}&format=vhd"
            sparse_file = median_of(
                lambda i: [
                    "sh",
                    "-c",
                    (
                        f"curl -sS -f -u {AUTH} '{url}' | cp --sparse=always /dev/stdin "
                        f"{work}/s{i}.vhd && sync -d {work}/s{i}.vhd"
                    ),
                ]
            )
            dense_file = median_of(lambda i: curl("-o", str(work / f"d{i}.vhd"), url))
            to_null = median_of(lambda i: curl("-o", os.devnull, url))

            islands = [os.urandom(2 * MiB) for _ in range(512)]

            def framed(step: int) -> Path:
                frames = work / "frames.bin"
                with open(frames, "wb") as f:
                    for i, block in enumerate(islands):
                        f.write(struct.pack("<QI", i * step, len(block)))
                        f.write(block)
                    f.write(bytes(12))
                return frames

            dense = create_vdi(srv.url, GiB)
            upload(f"{srv.url}/import_raw_vdi?vdi={dense['uuid']}&chunked=1", framed(2 * MiB))
            huge = {}
            for fmt, size in (("vhd", 2040 * GiB), ("qcow2", 2048 * GiB)):
                big = create_vdi(srv.url, size)
                step = size // 512 // (2 * MiB) * (2 * MiB)
                upload(f"{srv.url}/import_raw_vdi?vdi={big['uuid']}&chunked=1", framed(step))
                huge[fmt] = tuple(
                    median_of(
                        lambda i, v=v, f=fmt: curl(
                            "-o", os.devnull, f"{srv.url}/export_raw_vdi?vdi={v}&format={f}"
                        )
                    )
                    for v in (big["uuid"], dense["uuid"])
                )
        finally:
            srv.stop()

    rows = [
        ("qemu-img convert qcow2 -> raw, 1 GiB 50%", q_import, ""),
        (
            "curl import format=qcow2",
            our_import,
            f"{our_import / q_import:.2f}x qemu-img (target <= 1.5x)",
        ),
        ("qemu-img convert raw -> vpc, 1 GiB 50%", q_export, ""),
        (
            "curl export format=vhd | cp --sparse",
            sparse_file,
            f"{sparse_file / q_export:.2f}x qemu-img (target <= 1.5x)",
        ),
        ("  curl -o file (every zero written)", dense_file, f"{dense_file / q_export:.2f}x"),
        ("  curl -o /dev/null (the server's cost)", to_null, f"{to_null / q_export:.2f}x"),
    ]
    for fmt, (big, small) in huge.items():
        rows.append((f"export {fmt}, 1 GiB of data in a 1 GiB VDI", small, ""))
        rows.append(
            (
                f"export {fmt}, the same 1 GiB in a 2 TiB VDI",
                big,
                f"{big / small:.2f}x (target: about 1x)",
            )
        )
    print(f"{'measurement':45} {'seconds':>8}  ratio")
    for name, seconds, ratio in rows:
        print(f"{name:45} {seconds:8.3f}  {ratio}")
    ok = (
        our_import <= 1.5 * q_import
        and sparse_file <= 1.5 * q_export
        and all(big <= 1.5 * small for big, small in huge.values())
    )
    print("all targets met" if ok else "SOME TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
