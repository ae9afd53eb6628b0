"""`vdi-transfer upload`: a disk image file into a VDI, resumable.

The upload runs under a task of its own (task_id=, so the server keeps what arrived
durable): a dropped connection, or a server restart, is followed by a look at the task's
Upload-Offset and the rest, sent as an append to the upload resource (PATCH
/uploads/{task}), with backoff for as long as --retry-for allows. Ctrl-C cancels the task."""

from __future__ import annotations

import contextlib
import os
import stat
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from formats.detect import HEAD, TAIL, UNSUPPORTED_HINT, Detected, detect
from transfer.client.http import BACKOFF_MAX, RETRYABLE, Api, ClientError, error_of
from transfer.client.parted import PartedUpload
from transfer.client.progress import Progress
from transfer.client.source import FramedRaw, Plain, data_runs, merge


@dataclass
class Opened:
    """The file to send: its descriptor, size (None for a pipe), and what it is."""

    name: str
    fd: int
    size: int | None
    detected: Detected
    head: bytes  # a pipe's first bytes, already read


def open_source(path: str) -> Opened:
    """FILE ("-": standard input) opened, its size taken and its content identified."""
    if path == "-":
        fd = os.dup(0)
        head = b""
        while len(head) < HEAD and (more := os.read(fd, HEAD - len(head))):
            head += more
        return Opened("standard input", fd, None, detect(head), head)
    fd = os.open(path, os.O_RDONLY)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) and not stat.S_ISBLK(st.st_mode):
        os.close(fd)
        raise ClientError("BAD_FILE", f"{path} is not a file or a block device")
    size = st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(fd, 0, os.SEEK_END)
    head = os.pread(fd, HEAD, 0)
    tail = os.pread(fd, TAIL, max(0, size - TAIL)) if size >= TAIL else b""
    return Opened(path, fd, size, detect(head, tail), b"")


def choose_format(source: Opened, asked: str) -> str:
    """The upload format: what the content is, or what was asked if it does not contradict
    the content (a pipe hides a fixed VHD's footer: there, --format vhd is believed)."""
    found = source.detected
    if asked == "auto":
        if found.upload_format is None:
            raise ClientError(
                "FORMAT_UNSUPPORTED",
                f"{source.name} is {found.description}, which the server does not take; "
                + UNSUPPORTED_HINT,
            )
        return found.upload_format
    if asked == found.upload_format:
        return asked
    if found.kind == "raw" and source.size is None and asked == "vhd":
        return asked
    raise ClientError(
        "FORMAT_MISMATCH",
        f"{source.name} is {found.description}, not {asked}: "
        f"leave --format out, or give --format {found.upload_format or 'of what it is'}",
    )


@dataclass
class Result:
    """What the --json output says of an upload."""

    vdi: str
    task: str
    bytes_sent: int
    seconds: float

    def to_json(self) -> dict:
        return {
            "vdi": self.vdi,
            "task": self.task,
            "bytes_sent": self.bytes_sent,
            "seconds": round(self.seconds, 3),
        }


class Upload:
    """One upload, from the first request to the task's success."""

    def __init__(self, api: Api, source: Opened, fmt: str, target: dict[str, str],
                 progress: Progress, retry_for: float, connections: int = 1):  # fmt: skip
        self.api, self.source, self.fmt = api, source, fmt
        self.target = target  # vdi=... or sr=... (and name_label=, virtual_size=)
        self.progress = progress
        self.retry_for = retry_for
        self.connections = connections
        self.created = ""  # a VDI made for an upload in parts, removed if it fails
        self._cancelled = False
        self.sent = 0
        self.task = ""
        self.body = self._body()

    def _body(self) -> FramedRaw | Plain:
        src = self.source
        if self.fmt == "raw" and src.size is not None:
            runs = data_runs(src.fd, src.size)
            old = self._target_data(src.size)
            return FramedRaw(src.fd, src.size, merge(runs, old), must_zero=old)
        return Plain(src.fd, src.size, src.head)

    def _target_data(self, size: int) -> list[tuple[int, int]]:
        """Where the VDI being overwritten holds data (those ranges must be written, with
        zeros where the file has none); nothing for a new VDI."""
        vdi = self.target.get("vdi")
        if not vdi:
            return []
        extents = self.api.call("GET", f"/vdis/{urllib.parse.quote(vdi)}/extents")
        return [(e["start"], min(e["length"], size - e["start"]))
                for e in extents if not e["zero"] and e["start"] < size]  # fmt: skip

    @property
    def parted(self) -> bool:
        """Several connections: only raw data in chunk framing can go in parts."""
        return self.connections > 1 and isinstance(self.body, FramedRaw)

    def run(self) -> Result:
        started = time.monotonic()
        if self.parted:
            return self._run_parted(started)
        self._new_task()
        answer = self._send_with_retries()
        self.progress.set(self.source.size or self.progress.done)
        self.progress.close()
        return Result(answer["vdi"], self.task, self.sent, time.monotonic() - started)

    def _run_parted(self, started: float) -> Result:
        """Into the VDI (made first, for --sr), under one task, in parts at once."""
        name = Path(self.source.name).name
        vdi = self.target.get("vdi")
        if not vdi:
            spec = {
                "sr": self.target["sr"],
                "virtual_size": int(self.target["virtual_size"]),
                "name_label": self.target.get("name_label", name),
            }
            vdi = self.created = self.api.call("POST", "/vdis", spec)["uuid"]
        try:
            task = self.api.call("POST", "/tasks", {"name_label": f"upload {name}"[:255]})
            self.task = task["uuid"]
            assert isinstance(self.body, FramedRaw)
            parted = PartedUpload(self.api, self.task, vdi, self.body, self.connections,
                                  self.progress, self.retry_for)  # fmt: skip
            try:
                parted.run()
            finally:
                self.sent = parted.sent
        except BaseException:
            self.cancel()
            self._remove_created()
            raise
        self.progress.close()
        return Result(vdi, self.task, self.sent, time.monotonic() - started)

    def _remove_created(self) -> None:
        """The VDI made for a failed upload goes, once its task has let go of it."""
        if not self.created:
            return
        for _ in range(50):
            try:
                self.api.call("DELETE", f"/vdis/{self.created}", ok=(200, 204))
                return
            except ClientError as exc:
                if exc.code != "VDI_IN_USE":
                    return
                time.sleep(0.2)

    def _new_task(self) -> None:
        """A task for the upload, and the PUT's target naming it."""
        name = Path(self.source.name).name if self.source.size is not None else "stdin"
        task = self.api.call("POST", "/tasks", {"name_label": f"upload {name}"[:255]})
        self.task = task["uuid"]
        query = {**self.target, "task_id": self.task, "format": self.fmt}
        if isinstance(self.body, FramedRaw):
            query.update(format="raw", chunked="true")
        self._first = f"/import_raw_vdi?{urllib.parse.urlencode(query)}"

    def cancel(self) -> None:
        """Ctrl-C: the task ends cancelled (not left pending for a resume that never comes)."""
        if self.task and not self._cancelled:
            self._cancelled = True
            with contextlib.suppress(ClientError):
                self.api.call("POST", f"/tasks/{self.task}/cancel", None, ok=(200,))

    def _pieces(self, skip: int):
        for data, disk_position in self.body.stream(skip):
            self.sent += len(data)
            self.progress.set(disk_position)
            yield data

    def _send_with_retries(self) -> dict:
        """PUT, then PATCHes at the server's offset after each break, until an answer."""
        deadline = time.monotonic() + self.retry_for
        delay = 1.0
        resume_at: int | None = None  # None: the PUT has not reached the server yet
        while True:
            try:
                response = self._attempt(resume_at)
                if response.status == 200:
                    return response.json()
                error = error_of(response)
                if error.code not in RETRYABLE:
                    raise error
                if resume_at is None:  # refused before a byte: its task failed with it
                    self._new_task()
            except ClientError as exc:
                if exc.code not in RETRYABLE:
                    raise
                error = exc
                resume_at = resume_at or 0
            except OSError as exc:
                raise ClientError("BAD_FILE", f"{self.source.name}: {exc}") from exc
            while True:  # wait, then ask where the server is (it may be restarting)
                if time.monotonic() + delay > deadline:
                    raise ClientError(
                        error.code, f"{error.message} (gave up after {self.retry_for:g} s)"
                    )
                self.progress.note(f"{error.message}: trying again in {delay:.0f} s")
                time.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                if resume_at is None:
                    break
                try:
                    resume_at, complete = self._offset()
                    break
                except ClientError as exc:
                    if exc.code not in RETRYABLE:
                        raise
                    error = exc
            if resume_at is not None and complete:
                return {"vdi": self.api.call("GET", f"/tasks/{self.task}")["vdi"]}
            delay = 1.0

    def _attempt(self, resume_at: int | None):
        if resume_at is None:
            return self.api.request("PUT", self._first, self._pieces(0))
        headers = {
            "Upload-Offset": str(resume_at),
            "Upload-Complete": "?1",
            "Content-Type": "application/partial-upload",
        }
        return self.api.request("PATCH", f"/uploads/{self.task}", self._pieces(resume_at), headers)

    def _offset(self) -> tuple[int, bool]:
        response = self.api.request("HEAD", f"/uploads/{self.task}")
        response.read()
        if response.status not in (200, 204):
            raise ClientError(
                "UPLOAD_FAILED",
                f"the server has no upload to resume under task {self.task} "
                f"(HTTP {response.status}): see vdi-transfer task show {self.task}",
                response.status,
            )
        offset = int(response.headers.get("upload-offset") or 0)
        return offset, response.headers.get("upload-complete") == "?1"
