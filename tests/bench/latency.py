"""`make bench`, latency part: uploads and downloads over a link with a round trip of RTT
(50 ms by default), with one connection and with several (`vdi-transfer upload|download
--connections N`), each upload into a NEW VDI, side by side with ovirt-imageio's own client
(`ovirt_imageio.client.upload|download(..., max_workers=N)`, raw) against its daemon, each
upload into a new file, over the same kind of link. Rounds interleaved, the order
alternating; medians of RUNS rounds.

This machine has no netem (its kernel lacks sch_netem), so the link is a proxy on loopback
that holds every byte for RTT/2 each way and lets a connection have at most WINDOW bytes
unacknowledged (a byte is acknowledged a whole RTT after it was sent): a TCP connection
whose window stays at WINDOW. 4 MiB is Linux's default ceiling for a socket's send buffer
(net.ipv4.tcp_wmem), so one connection moves at most WINDOW / RTT: 80 MiB/s at 50 ms.
That ceiling, not the server, is what several connections lift.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.versus_imageio import Imageio, install_imageio
from tests.conftest import ADMIN_PASSWORD, ServerProcess, free_port

GiB, MiB = 1 << 30, 1 << 20
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
RTT = float(os.environ.get("BENCH_RTT", "0.05"))
WINDOW = int(os.environ.get("BENCH_WINDOW", str(4 * MiB)))
SIZE = int(os.environ.get("BENCH_LATENCY_SIZE", str(GiB)))
CONNECTIONS = (1, 4, 8)


class DelayLink:
    """A TCP proxy: every byte arrives RTT/2 late, at most WINDOW in flight a direction."""

    def __init__(self, upstream_port: int):
        self.upstream = upstream_port
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()
        self._ready.wait(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            await asyncio.start_server(self._connection, "127.0.0.1", self.port)
            self._ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    async def _connection(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        await asyncio.gather(
            self._pump(reader, up_writer), self._pump(up_reader, writer), return_exceptions=True
        )
        for w in (writer, up_writer):
            w.close()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: collections.deque = collections.deque()
        in_flight = 0
        room = asyncio.Event()
        room.set()
        arrived = asyncio.Event()
        done = False

        def acked(n: int) -> None:
            nonlocal in_flight
            in_flight -= n
            if in_flight < WINDOW:
                room.set()

        async def deliver() -> None:
            while queue or not done:
                if not queue:
                    arrived.clear()
                    await arrived.wait()
                    continue
                due, data = queue.popleft()
                await asyncio.sleep(max(0.0, due - loop.time()))
                dst.write(data)
                await dst.drain()
            if dst.can_write_eof():
                dst.write_eof()

        delivering = asyncio.create_task(deliver())
        try:
            while True:
                await room.wait()
                data = await src.read(min(256 << 10, WINDOW))
                if not data:
                    break
                in_flight += len(data)
                if in_flight >= WINDOW:
                    room.clear()
                now = loop.time()
                queue.append((now + RTT / 2, data))
                arrived.set()
                loop.call_later(RTT, acked, len(data))
        finally:
            done = True
            arrived.set()
            await delivering


def cli(url: str, *args: str) -> dict:
    env = {**os.environ, "VDIT_URL": url, "VDIT_USER": "admin", "VDIT_PASSWORD": ADMIN_PASSWORD}
    result = subprocess.run(
        [sys.executable, "-m", "transfer", *args, "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    return json.loads(result.stdout) if result.stdout.strip() else {}


def timed(fn) -> float:
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def peer_client(python: str, call: str) -> None:
    """ovirt-imageio's client library, in its own venv's python."""
    subprocess.run(
        [python, "-c", f"from ovirt_imageio import client; client.{call}"],
        check=True,
        capture_output=True,
    )


def main() -> int:
    binary = install_imageio()
    python = str(binary.parent / "python")
    with tempfile.TemporaryDirectory(prefix="vdit-latency-") as tmp:
        where = Path(tmp)
        disk = where / "disk.raw"
        out = where / "out.raw"
        with disk.open("wb") as f:
            block = os.urandom(8 * MiB)
            for _ in range(SIZE // len(block)):
                f.write(block)
        srv = ServerProcess(where / "state").start()
        peer = Imageio(binary, where / "imageio", None)
        url = f"http://127.0.0.1:{DelayLink(srv.port).port}"
        peer_port = DelayLink(peer.port).port
        sr = cli(url, "sr", "list")[0]["uuid"]
        times: dict[tuple[str, str, int], list[float]] = collections.defaultdict(list)

        def ours(n: int) -> None:
            got: dict = {}
            each = ("--connections", str(n), "-q")

            def up() -> None:
                got.update(cli(url, "upload", str(disk), "--sr", sr, *each))

            def down() -> None:
                cli(url, "download", got["vdi"], "-o", str(out), *each)

            times["ours", "upload", n].append(timed(up))
            times["ours", "download", n].append(timed(down))
            if out.stat().st_size != SIZE:
                raise RuntimeError("the download is not the disk's size")
            out.unlink()
            cli(url, "vdi", "delete", got["vdi"])

        def imageio(n: int) -> None:
            target = peer.target(SIZE).replace(f":{peer.port}/", f":{peer_port}/")

            def up() -> None:
                peer_client(python, f"upload({str(disk)!r}, {target!r}, None, max_workers={n})")

            def down() -> None:
                args = f"{target!r}, {str(out)!r}, None, fmt='raw', max_workers={n}"
                peer_client(python, f"download({args})")

            times["imageio", "upload", n].append(timed(up))
            times["imageio", "download", n].append(timed(down))
            out.unlink()
            peer.forget()

        try:
            for r in range(RUNS):
                for n in CONNECTIONS if r % 2 == 0 else tuple(reversed(CONNECTIONS)):
                    for side in (ours, imageio) if r % 2 == 0 else (imageio, ours):
                        side(n)
        finally:
            srv.stop()
            peer.stop()
        print(
            f"\nlatency: {SIZE // MiB} MiB over a {RTT * 1000:.0f} ms round trip, "
            f"{WINDOW // MiB} MiB window per connection (medians of {RUNS})"
        )
        for what in ("upload", "download"):
            one = statistics.median(times["ours", what, 1])
            for n in CONNECTIONS:
                o = statistics.median(times["ours", what, n])
                p = statistics.median(times["imageio", what, n])
                print(
                    f"  {what:8} {n} connection(s): ours {o:6.2f} s ({SIZE / MiB / o:6.1f} "
                    f"MiB/s, {one / o:4.2f}x our one), imageio {p:6.2f} s, ours/imageio "
                    f"{o / p:4.2f}x"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
