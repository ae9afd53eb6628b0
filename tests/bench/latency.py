"""`make bench`, latency part: uploads and downloads over a link with a round trip of RTT
(50 ms by default), with one connection and with several (`vdi-transfer upload|download
--connections N`), each upload into a NEW VDI, rounds interleaved. Medians of RUNS rounds.

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


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="vdit-latency-") as tmp:
        where = Path(tmp)
        disk = where / "disk.raw"
        with disk.open("wb") as f:
            block = os.urandom(8 * MiB)
            for _ in range(SIZE // len(block)):
                f.write(block)
        srv = ServerProcess(where / "state").start()
        link = DelayLink(srv.port)
        url = f"http://127.0.0.1:{link.port}"
        sr = cli(url, "sr", "list")[0]["uuid"]
        up: dict[int, list[float]] = {n: [] for n in CONNECTIONS}
        down: dict[int, list[float]] = {n: [] for n in CONNECTIONS}
        try:
            for r in range(RUNS):
                order = CONNECTIONS if r % 2 == 0 else tuple(reversed(CONNECTIONS))
                for n in order:
                    t0 = time.perf_counter()
                    got = cli(url, "upload", str(disk), "--sr", sr, "--connections", str(n), "-q")
                    up[n].append(time.perf_counter() - t0)
                    out = where / "out.raw"
                    t0 = time.perf_counter()
                    cli(url, "download", got["vdi"], "-o", str(out), "--connections", str(n), "-q")
                    down[n].append(time.perf_counter() - t0)
                    if out.stat().st_size != SIZE:
                        raise RuntimeError("the download is not the disk's size")
                    out.unlink()
                    cli(url, "vdi", "delete", got["vdi"])
        finally:
            srv.stop()
        print(
            f"\nlatency: {SIZE // MiB} MiB over a {RTT * 1000:.0f} ms round trip, "
            f"{WINDOW // MiB} MiB window per connection (medians of {RUNS})"
        )
        one_up, one_down = statistics.median(up[1]), statistics.median(down[1])
        for n in CONNECTIONS:
            u, d = statistics.median(up[n]), statistics.median(down[n])
            print(
                f"  {n} connection(s): upload {u:6.2f} s ({SIZE / MiB / u:6.1f} MiB/s, "
                f"{one_up / u:4.2f}x one), download {d:6.2f} s ({SIZE / MiB / d:6.1f} MiB/s, "
                f"{one_down / d:4.2f}x one)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
