"""`vdi-transfer download`: a VDI into a file, resumable.

A raw download into a file is sparse: the VDI's extents say where its data is, only those
ranges are asked for (Range), and the rest stays holes. Other formats come as one stream.
Every request after the first carries If-Range with the first answer's ETag: should the
VDI change meanwhile, the server sends the whole thing instead of the range, and the
download stops rather than splice two versions. A dropped connection is followed by a
request for the rest (Range from where it stopped), with backoff, for --retry-for."""

from __future__ import annotations

import concurrent.futures
import http.client
import os
import threading
import time
import urllib.parse
from dataclasses import dataclass

from transfer.client.http import BACKOFF_MAX, RETRYABLE, Api, ClientError, error_of
from transfer.client.progress import Progress

PIECE = 64 << 20  # bytes one connection asks for at a time, when there are several


@dataclass
class Result:
    """What the --json output says of a download."""

    vdi: str
    task: str | None
    bytes_received: int
    seconds: float

    def to_json(self) -> dict:
        return {
            "vdi": self.vdi,
            "task": self.task,
            "bytes_received": self.bytes_received,
            "seconds": round(self.seconds, 3),
        }


class Download:
    """One download of `vdi` in `fmt` (against `base`, if given) into `out` ("-": stdout)."""

    def __init__(self, api: Api, vdi: str, out: str, fmt: str, base: str | None,
                 progress: Progress, retry_for: float, connections: int = 1):  # fmt: skip
        self.api, self.vdi, self.out, self.fmt, self.base = api, vdi, out, fmt, base
        self.progress, self.retry_for = progress, retry_for
        self.connections = max(1, connections)
        self._lock = threading.Lock()  # progress and counts, from several connections
        self.received = 0
        self.etag: str | None = None
        self.task: str | None = None

    def _query(self) -> str:
        query = {"vdi": self.vdi, "format": self.fmt}
        if self.base:
            query["base"] = self.base
        return "/export_raw_vdi?" + urllib.parse.urlencode(query)

    def run(self) -> Result:
        started = time.monotonic()
        record = self.api.call("GET", f"/vdis/{urllib.parse.quote(self.vdi)}")
        self.vdi = record["uuid"]
        if self.fmt == "raw" and self.out != "-":
            self._sparse(record["virtual_size"])
        else:
            self._stream()
        self.progress.close()
        if self.task:  # the task-id header is XAPI's OpaqueRef: say the uuid, as uploads do
            self.task = self.api.call("GET", f"/tasks/{urllib.parse.quote(self.task)}")["uuid"]
        return Result(self.vdi, self.task, self.received, time.monotonic() - started)

    def _sparse(self, size: int) -> None:
        """Data ranges only, each written at its offset; holes stay holes. With --base the
        file must be the older version: only what changed is written (zeroed ranges are
        punched out)."""
        raw = "/export_raw_vdi?" + urllib.parse.urlencode({"vdi": self.vdi, "format": "raw"})
        # The version whose extents are read: every range asked later must be of it (the
        # ranges come from the whole disk's raw export; with --base, the extents say which).
        self._pin(raw)
        query = f"?base={urllib.parse.quote(self.base)}" if self.base else ""
        extents = self.api.call("GET", f"/vdis/{self.vdi}/extents{query}")
        flags = os.O_WRONLY | (0 if self.base else os.O_CREAT | os.O_TRUNC)
        try:
            fd = os.open(self.out, flags, 0o644)
        except FileNotFoundError:
            raise ClientError(
                "BAD_FILE", f"{self.out}: with --base, -o names the older version to update"
            ) from None
        try:
            os.ftruncate(fd, size)
            wanted = [(e["start"], e["length"]) for e in extents if not e["zero"]]
            if self.base:
                for e in extents:
                    if e["zero"]:
                        _zero(fd, e["start"], e["length"])
            self.progress.total = sum(n for _, n in wanted)
            self._fetch_all(raw, fd, [(s, s + n) for s, n in wanted])
            os.fsync(fd)
        finally:
            os.close(fd)

    def _stream(self) -> None:
        """The whole export, in order, to a file (or stdout); resumed with Range."""
        if self.out == "-":
            fd = os.dup(1)
        else:
            fd = os.open(self.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if self.connections > 1 and self.out != "-":
                length = self._pin(self._query())
                os.ftruncate(fd, length)
                self.progress.total = length
                self._fetch_all(self._query(), fd, [(0, length)])
            else:
                self._fetch(self._query(), fd, 0, None, sequential=self.out == "-")
        finally:
            os.close(fd)

    def _pin(self, target: str) -> int:
        """HEAD: the ETag every later range must match (If-Range), and the length."""
        head = self.api.request("HEAD", target)
        if head.status != 200:
            raise error_of(head)
        head.read()
        self.etag = head.headers.get("etag")
        return int(head.headers["content-length"])

    def _fetch_all(self, target: str, fd: int, ranges: list[tuple[int, int]]) -> None:
        """The ranges, over `connections` connections at once: cut into pieces of at most
        PIECE, which the connections take in turn."""
        pieces = [(pos, min(pos + PIECE, end)) for start, end in ranges
                  for pos in range(start, end, PIECE)]  # fmt: skip
        if self.connections == 1 or len(pieces) == 1:
            for start, end in pieces:
                self._fetch(target, fd, start, end)
            return
        with concurrent.futures.ThreadPoolExecutor(self.connections) as pool:
            for done in pool.map(lambda p: self._fetch(target, fd, *p), pieces):
                del done

    def _fetch(self, target: str, fd: int, start: int, end: int | None,
               sequential: bool = False) -> None:  # fmt: skip
        """Bytes [start, end) of the export (end None: to its end) written at their offset
        (appended, for a pipe), asked again from where a break left them."""
        deadline = time.monotonic() + self.retry_for
        delay = 1.0
        pos = start
        while end is None or pos < end:
            headers = {}
            if pos or end is not None:
                headers["Range"] = f"bytes={pos}-{'' if end is None else end - 1}"
                if self.etag:
                    headers["If-Range"] = self.etag
            try:
                response = self.api.request("GET", target, headers=headers)
                if response.status not in (200, 206):
                    raise error_of(response)
                if "Range" in headers and response.status == 200:
                    response.close()
                    raise ClientError(
                        "VDI_CHANGED",
                        f"VDI {self.vdi} changed during the download (its ETag is no longer "
                        f"{self.etag}): start again",
                    )
                self.etag = self.etag or response.headers.get("etag")
                self.task = self.task or response.headers.get("task-id")
                if end is None and self.progress.total is None:
                    length = response.headers.get("content-length")
                    self.progress.total = int(length) + pos if length else None
                writeback = _Writeback(fd) if not sequential else None
                for chunk in response.stream():
                    if writeback is None:
                        _write_all(fd, chunk)
                    else:
                        _pwrite_all(fd, chunk, pos)
                        writeback.wrote(pos, len(chunk))
                    pos += len(chunk)
                    with self._lock:
                        self.received += len(chunk)
                        self.progress.advance(len(chunk))
                if end is None:
                    return
                if pos < end:
                    raise ClientError("CONNECTION", f"the answer ended at byte {pos} of {end}")
            except (ClientError, OSError, http.client.HTTPException) as exc:
                code = exc.code if isinstance(exc, ClientError) else "CONNECTION"
                if code not in RETRYABLE:
                    raise
                if time.monotonic() + delay > deadline:
                    raise ClientError(code, f"{exc} (gave up after {self.retry_for:g} s)") from None
                self.progress.note(f"{exc}: going on from byte {pos} in {delay:.0f} s")
                time.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)


class _Writeback:
    """A download's writes gathered into contiguous runs of RUN bytes, each handed to
    `linux.Writeback` (as the server's raw target does): few pages stay dirty or cached."""

    RUN = 8 << 20

    def __init__(self, fd: int):
        from formats import linux

        self.window = linux.Writeback(fd)
        self.start = self.end = 0

    def wrote(self, offset: int, length: int) -> None:
        if offset != self.end:
            self.start = offset
        self.end = offset + length
        if self.end - self.start >= self.RUN:
            self.window.written(self.start, self.end - self.start)
            self.start = self.end


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _zero(fd: int, start: int, length: int) -> None:
    """Zeroes over [start, start + length): a punched hole where the filesystem can."""
    from formats.linux import punch_hole

    if not punch_hole(fd, start, length):
        zeros = bytes(min(length, 4 << 20))
        pos = start
        while pos < start + length:
            n = min(len(zeros), start + length - pos)
            _pwrite_all(fd, zeros[:n], pos)
            pos += n
