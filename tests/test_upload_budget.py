"""One memory budget for all uploads: with room for less than one batch, many uploads at
once (raw, chunk-framed, qcow2) still complete, each VDI byte-identical to its source."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import threading
import time

from formats.raw import RawDecoder
from tests.conftest import ServerProcess
from tests.rawclient import END, api, curl_upload, export_to, frame
from transfer import pipeline
from transfer.pipeline import Applier, Budget

MiB = 1 << 20


def test_many_uploads_share_a_small_budget(tmp_path):
    srv = ServerProcess(tmp_path / "state", env={"VDIT_UPLOAD_MEMORY": "2M"}).start()
    try:
        sr = api(f"{srv.url}/srs")[1][0]["uuid"]
        sources = []
        for i in range(8):
            data = bytearray(os.urandom(12 * MiB))
            data[MiB : 3 * MiB] = bytes(2 * MiB)  # a hole, too
            raw = tmp_path / f"disk{i}.raw"
            raw.write_bytes(data)
            if i % 3 == 0:
                body = tmp_path / f"disk{i}.frames"
                body.write_bytes(
                    frame(0, bytes(data[: 6 * MiB])) + frame(6 * MiB, bytes(data[6 * MiB :])) + END
                )
                query = f"sr={sr}&chunked=true&virtual_size={12 * MiB}"
            elif i % 3 == 1:
                body = tmp_path / f"disk{i}.qcow2"
                subprocess.run(
                    ["qemu-img", "convert", "-O", "qcow2", str(raw), str(body)],
                    check=True,
                    capture_output=True,
                )
                query = f"sr={sr}&format=qcow2"
            else:
                body, query = raw, f"sr={sr}"
            sources.append((raw, body, query))

        results: list = [None] * len(sources)

        def upload(i: int) -> None:
            _, body, query = sources[i]
            results[i] = curl_upload(f"{srv.url}/import_raw_vdi?{query}", "-T", str(body))

        threads = [threading.Thread(target=upload, args=(i,)) for i in range(len(sources))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        for i, (raw, _, _) in enumerate(sources):
            status, body, err = results[i]
            assert status == 200, (i, body, err)
            out = export_to(srv.url, body["vdi"], tmp_path / f"out{i}.raw")
            digest = hashlib.sha256(out.read_bytes()).hexdigest()
            assert digest == hashlib.sha256(raw.read_bytes()).hexdigest(), i
    finally:
        srv.stop()


class ChunkedBody:
    """A body that arrives in 256 000-byte chunks, as uvloop hands them over."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    async def readany(self) -> bytes:
        await asyncio.sleep(0)
        chunk = self.data[self.pos : self.pos + 256_000]
        self.pos += len(chunk)
        return chunk


class SlowTarget:
    """A disk that takes its time: uploads pile up behind it unless the budget holds them."""

    def __init__(self, size: int):
        self.disk = bytearray(size)

    def write_run(self, offset: int, parts: list, punch: bool) -> int:
        time.sleep(0.01)
        data = b"".join(bytes(p) for p in parts)
        self.disk[offset : offset + len(data)] = data
        return len(data)

    def zero(self, offset: int, length: int) -> None:
        self.disk[offset : offset + length] = bytes(length)

    def flush(self) -> None: ...

    def close(self) -> None: ...


async def test_the_budget_bounds_what_pipelines_hold_together():
    budget = Budget(1 * MiB)
    uploads = [os.urandom(6 * MiB) for _ in range(4)]
    targets = [SlowTarget(len(data)) for data in uploads]

    async def one(data: bytes, target: SlowTarget) -> None:
        applier = Applier()

        async def on_header(header) -> None:
            applier.target, applier.size = target, len(data)

        async def nothing(*args) -> None:
            pass

        await pipeline.run(
            RawDecoder(len(data)), ChunkedBody(data), applier, on_header, nothing, nothing, budget
        )
        await asyncio.get_running_loop().run_in_executor(None, applier.flush)

    await asyncio.gather(*(one(d, t) for d, t in zip(uploads, targets, strict=True)))
    assert [bytes(t.disk) for t in targets] == uploads
    assert budget.used == 0
    # Each pipeline may read one chunk past the limit before it sees the budget spent.
    assert MiB <= budget.peak <= MiB + len(uploads) * 256_000
