"""`make bench`, transfers part: vdi-transfer side by side with ovirt-imageio 2.5.1 (oVirt's
image transfer daemon), in the same run, interleaved, with curl, every write into a NEW target
unless the case is an overwrite. Medians of RUNS rounds; the order of the two alternates.

ovirt-imageio is installed from PyPI into a venv of its own (.bench/imageio-venv, not a
project dependency) and run as two daemons, plain and TLS ([tls] enable = true), each given a
file ticket over its control socket for every target. Both flush before answering an upload.

Cases (1 GiB of random data unless said):
- upload into a new VDI / a new sparse file; `dd bs=8M conv=fsync` into a new file beside it;
- overwrite of the same VDI / file;
- download;
- 8 uploads of 128 MiB at once, each into a new VDI / file;
- 16 downloads of a 128 MiB VDI at once (aggregate throughput);
- upload into a new VDI and download over TLS;
- under 16 uploads and 16 downloads at once (128 MiB each): the server's peak RSS, and the
  99th percentile of `GET /health` times.

Targets (issue 12): upload new <= 0.75x imageio and <= 1.3x dd; overwrite <= 0.75x; 8 uploads
<= 0.75x; 16 downloads >= 2x imageio's throughput; TLS upload <= 0.8x, download <= 0.5x;
RSS < 400 MiB and /health p99 < 50 ms under load.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.conftest import ADMIN_PASSWORD, ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
GiB, MiB = 1 << 30, 1 << 20
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
AUTH = f"admin:{ADMIN_PASSWORD}"
IMAGEIO = "ovirt-imageio==2.5.1"
VENV = ROOT / ".bench" / "imageio-venv"


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, **kwargs)


def timed(fn: Callable[[], None]) -> float:
    """Seconds `fn` takes, starting from clean page-cache writeback."""
    run(["sync"])
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def together(fns: list[Callable[[], None]]) -> None:
    threads = [threading.Thread(target=fn) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def install_imageio() -> Path:
    binary = VENV / "bin" / "ovirt-imageio"
    if not binary.exists():
        print(f"installing {IMAGEIO} into {VENV} ...", flush=True)
        run([sys.executable, "-m", "venv", str(VENV)])
        run([str(VENV / "bin" / "pip"), "install", "--quiet", IMAGEIO])
    return binary


def self_signed(where: Path) -> tuple[Path, Path]:
    cert, key = where / "cert.pem", where / "key.pem"
    run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-addext",
         "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)]
    )  # fmt: skip
    return cert, key


class Imageio:
    """One ovirt-imageio daemon: files in `data`, tickets over its control socket."""

    def __init__(self, binary: Path, where: Path, tls: tuple[Path, Path] | None):
        self.where = where
        self.port = free_port()
        self.scheme = "https" if tls else "http"
        run_dir = where / "run"
        run_dir.mkdir(parents=True)
        (where / "conf" / "conf.d").mkdir(parents=True)
        tls_conf = (
            f"enable = true\nkey_file = {tls[1]}\ncert_file = {tls[0]}\n"
            if tls
            else "enable = false\n"
        )
        (where / "conf" / "conf.d" / "daemon.conf").write_text(
            f"[daemon]\nrun_dir = {run_dir}\ndrop_privileges = false\nsystemd_enable = false\n"
            f"[tls]\n{tls_conf}"
            f"[remote]\nhost = 127.0.0.1\nport = {self.port}\n"
            f"[local]\nenable = false\n"
            f"[control]\ntransport = unix\nsocket = {run_dir}/sock\n"
            f"[profile]\nfilename = {run_dir}/profile\n"
            f"[handlers]\nkeys = stderr\n[logger_root]\nlevel = WARNING\nhandlers = stderr\n"
        )
        self.sock = run_dir / "sock"
        with open(where / "daemon.log", "wb") as log:  # the daemon keeps its own copy
            self.proc = subprocess.Popen(
                [str(binary), "-c", str(where / "conf")], stdout=log, stderr=subprocess.STDOUT
            )
        for _ in range(200):
            if self.sock.exists():
                break
            time.sleep(0.05)
        else:
            raise RuntimeError(f"ovirt-imageio did not start: {(where / 'daemon.log').read_text()}")
        self.count = 0
        self.made: list[str] = []

    def target(self, size: int, keep: bool = False) -> str:
        """A new sparse file and a ticket for it; the URL to PUT or GET."""
        self.count += 1
        name = f"t{self.count}"
        path = self.where / f"{name}.raw"
        with open(path, "wb") as f:
            f.truncate(size)
        ticket = {
            "uuid": name, "size": size, "url": f"file://{path}", "timeout": 3600,
            "ops": ["read", "write"],
        }  # fmt: skip
        run(["curl", "-sS", "-f", "--unix-socket", str(self.sock), "-X", "PUT",
             "--data-binary", json.dumps(ticket), f"http://localhost/tickets/{name}"])  # fmt: skip
        if not keep:
            self.made.append(name)
        return f"{self.scheme}://127.0.0.1:{self.port}/images/{name}"

    def forget(self) -> None:
        """Remove the tickets and files of the new targets (not the kept ones)."""
        for name in self.made:
            run(["curl", "-sS", "-f", "--unix-socket", str(self.sock), "-X", "DELETE",
                 f"http://localhost/tickets/{name}"])  # fmt: skip
            (self.where / f"{name}.raw").unlink()
        self.made.clear()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


class Ours:
    def __init__(self, where: Path, tls: tuple[Path, Path] | None):
        env = {"VDIT_TLS_CERT": str(tls[0]), "VDIT_TLS_KEY": str(tls[1])} if tls else {}
        where.mkdir(parents=True)
        self.srv = ServerProcess(where / "state", env, cafile=tls[0] if tls else None).start()
        self.url = self.srv.url
        self.curl = ["curl", "-sS", "-f", "-u", AUTH] + (["--cacert", str(tls[0])] if tls else [])
        self.sr = json.loads(self.call("/srs"))[0]["uuid"]

    def call(self, path: str, *args: str) -> bytes:
        return run([*self.curl, *args, self.url + path]).stdout

    def vdi(self, size: int) -> str:
        return json.loads(self.call("/vdis", "--json", json.dumps({"virtual_size": size})))["uuid"]

    def upload(self, path: Path, vdi: str | None = None) -> Callable[[], None]:
        """Into `vdi`, or into a new VDI."""
        query = f"vdi={vdi}" if vdi else f"sr={self.sr}"
        return lambda: self.call(f"/import_raw_vdi?{query}", "-T", str(path), "-o", os.devnull)

    def download(self, vdi: str) -> Callable[[], None]:
        return lambda: self.call(f"/export_raw_vdi?vdi={vdi}", "-o", os.devnull)

    def forget(self, keep: set[str]) -> None:
        """Delete the VDIs made since (not those in `keep`)."""
        for vdi in json.loads(self.call("/vdis")):
            if vdi["uuid"] not in keep:
                self.call(f"/vdis/{vdi['uuid']}", "-X", "DELETE")


def peer_upload(url: str, path: Path, cacert: list[str]) -> Callable[[], None]:
    return lambda: run(["curl", "-sS", "-f", *cacert, "-T", str(path), "-o", os.devnull, url])


def peer_download(url: str, cacert: list[str]) -> Callable[[], None]:
    return lambda: run(["curl", "-sS", "-f", *cacert, "-o", os.devnull, url])


def rss_and_health(srv: ServerProcess, load: Callable[[], None]) -> tuple[int, float]:
    """Peak RSS (bytes) of the server, and the p99 of GET /health (s), while `load` runs."""
    peak, times, done = 0, [], threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            for line in Path(f"/proc/{srv.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
            t0 = time.perf_counter()
            with urllib.request.urlopen(srv.url + "/health", timeout=10) as resp:
                resp.read()
            times.append(time.perf_counter() - t0)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        load()
    finally:
        done.set()
        sampler.join()
    return peak, statistics.quantiles(times, n=100)[98]


def main() -> int:
    binary = install_imageio()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", ROOT)) as tmp:
        work = Path(tmp)
        big, small = work / "1g.raw", work / "128m.raw"
        with open(big, "wb") as f:
            for _ in range(16):
                f.write(os.urandom(64 * MiB))
        small.write_bytes(big.read_bytes()[: 128 * MiB])
        tls = self_signed(work)
        ours, ours_tls = Ours(work / "ours", None), Ours(work / "ours-tls", tls)
        peer, peer_tls = (
            Imageio(binary, work / "imageio", None),
            Imageio(binary, work / "imageio-tls", tls),
        )
        times: dict[str, dict[str, list[float]]] = {}

        def measure(case: str, who: str, fn: Callable[[], None]) -> None:
            times.setdefault(case, {}).setdefault(who, []).append(timed(fn))

        try:
            fixed, fixed_small = ours.vdi(GiB), ours.vdi(128 * MiB)
            ours.upload(big, fixed)()
            ours.upload(small, fixed_small)()
            tls_fixed = ours_tls.vdi(GiB)
            ours_tls.upload(big, tls_fixed)()
            peer_fixed, peer_small = peer.target(GiB, keep=True), peer.target(128 * MiB, keep=True)
            peer_upload(peer_fixed, big, [])()
            peer_upload(peer_small, small, [])()
            peer_tls_fixed = peer_tls.target(GiB, keep=True)
            cacert = ["--cacert", str(tls[0])]
            peer_upload(peer_tls_fixed, big, cacert)()
            for round_ in range(RUNS):
                out = work / "dd.raw"
                dd = ["dd", f"if={big}", f"of={out}", "bs=8M", "conv=fsync", "status=none"]
                measure("dd", "dd", lambda cmd=dd: run(cmd))
                out.unlink()
                for who in ["ours", "imageio"] if round_ % 2 == 0 else ["imageio", "ours"]:
                    if who == "ours":
                        measure("upload new", who, ours.upload(big))
                        measure("overwrite", who, ours.upload(big, fixed))
                        measure("download", who, ours.download(fixed))
                        eight = [ours.upload(small) for _ in range(8)]
                        measure("8 uploads new", who, lambda fns=eight: together(fns))
                        sixteen = [ours.download(fixed_small) for _ in range(16)]
                        measure("16 downloads", who, lambda fns=sixteen: together(fns))
                        measure("TLS upload new", who, ours_tls.upload(big))
                        measure("TLS download", who, ours_tls.download(tls_fixed))
                    else:
                        measure("upload new", who, peer_upload(peer.target(GiB), big, []))
                        measure("overwrite", who, peer_upload(peer_fixed, big, []))
                        measure("download", who, peer_download(peer_fixed, []))
                        eight = [peer_upload(peer.target(128 * MiB), small, []) for _ in range(8)]
                        measure("8 uploads new", who, lambda fns=eight: together(fns))
                        sixteen = [peer_download(peer_small, []) for _ in range(16)]
                        measure("16 downloads", who, lambda fns=sixteen: together(fns))
                        target = peer_tls.target(GiB)
                        measure("TLS upload new", who, peer_upload(target, big, cacert))
                        measure("TLS download", who, peer_download(peer_tls_fixed, cacert))
                ours.forget({fixed, fixed_small})
                ours_tls.forget({tls_fixed})
                peer.forget()
                peer_tls.forget()
            load = [ours.upload(small) for _ in range(16)]
            load += [ours.download(fixed_small) for _ in range(16)]
            rss, health_p99 = rss_and_health(ours.srv, lambda: together(load))
        finally:
            for server in (ours.srv, ours_tls.srv):
                server.stop()
            peer.stop()
            peer_tls.stop()

    med = {case: {who: statistics.median(v) for who, v in d.items()} for case, d in times.items()}
    rows, ok = [], True

    def row(case: str, limit: float | None, how: str = "time") -> None:
        nonlocal ok
        a, b = med[case]["ours"], med[case]["imageio"]
        ratio = a / b if how == "time" else b / a  # "throughput": imageio's time / ours
        met = limit is None or (ratio <= limit if how == "time" else ratio >= limit)
        ok &= met
        target = "" if limit is None else f"{'<=' if how == 'time' else '>='} {limit}x"
        rows.append((case, a, b, f"{ratio:.2f}x", target, "" if met else "MISSED"))

    row("upload new", 0.75)
    row("overwrite", 0.75)
    row("download", None)
    row("8 uploads new", 0.75)
    row("16 downloads", 2.0, "throughput")
    row("TLS upload new", 0.8)
    row("TLS download", 0.5)
    dd = med["dd"]["dd"]
    up_dd = med["upload new"]["ours"] / dd
    dd_met = up_dd <= 1.3
    ok &= dd_met and rss < 400 * MiB and health_p99 < 0.05
    print(f"{'case (1 GiB unless said)':26} {'ours s':>8} {'imageio s':>10}  ratio   target")
    for case, a, b, ratio, target, flag in rows:
        print(f"{case:26} {a:8.3f} {b:10.3f}  {ratio:6}  {target:8} {flag}")
    print(
        f"{'dd conv=fsync, new file':26} {dd:8.3f}   upload new / dd = {up_dd:.2f}x "
        f"(target <= 1.3x) {'' if dd_met else 'MISSED'}"
    )
    print(
        f"under 16 uploads + 16 downloads: peak RSS {rss / MiB:.0f} MiB (target < 400), "
        f"/health p99 {health_p99 * 1000:.1f} ms (target < 50)"
    )
    print(f"({RUNS} rounds; '16 downloads' ratio is imageio's time / ours: throughput)")
    print("all targets met" if ok else "SOME TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
